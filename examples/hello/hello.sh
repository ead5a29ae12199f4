#!/bin/sh
# A tiny "agent" run for the README: show what the sandbox looks like from inside.
echo "hello from $(hostname) as $(id -un) (uid $(id -u)), pid $$"
echo "project: $(pwd)"
echo "processes I can see: $(ls -d /proc/[0-9]* | wc -l)"
echo "network interfaces: $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')"
if touch /usr/nsbox-test 2>/dev/null; then echo "/usr is writable"; else echo "/usr is read-only"; fi
date > last-run.txt && echo "wrote $(pwd)/last-run.txt"
