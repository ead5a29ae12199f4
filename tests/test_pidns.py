"""PID namespace and init: only sandbox pids, statuses returned, signals, orphans, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from conftest import sh, start_nsbox, wait_for_file


def test_proc_shows_only_the_sandbox_and_the_agent_is_init_child(nsbox):
    r = nsbox(cmd=sh("echo $$ $PPID; for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    pid, ppid = lines[0].split()
    assert ppid == "1" and pid == "2"
    cmdlines = [line for line in lines[1:] if line.strip()]
    assert len(cmdlines) <= 3, cmdlines  # init, the shell, and the tr it runs
    assert not any("pytest" in c or "nsbox run" in c for c in cmdlines), cmdlines


@pytest.mark.parametrize("code", [0, 1, 42])
def test_exit_status_is_returned(nsbox, code):
    assert nsbox(cmd=sh(f"exit {code}")).returncode == code


def test_command_not_found_is_127(nsbox):
    r = nsbox(cmd=["no-such-command-xyz"])
    assert r.returncode == 127
    assert r.stderr.startswith("nsbox: execve.execve: execve('no-such-command-xyz') failed: No such file")
    assert "why:" in r.stderr and "fix:" in r.stderr


def test_not_executable_is_126(nsbox, project):
    (project / "script").write_text("echo hi\n")
    r = nsbox(cmd=[str(project / "script")])
    assert r.returncode == 126, r.stderr
    assert "(EACCES)" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_death_by_signal_is_128_plus_n(nsbox, sig):
    assert nsbox(cmd=sh(f"kill -{int(sig)} $$")).returncode == 128 + sig


def test_sigterm_to_the_launcher_reaches_the_agent(env, project):
    p = start_nsbox(env, project, f"trap 'echo got-term; exit 7' TERM; touch {project}/ready; "
                             "while :; do sleep 0.05; done")
    wait_for_file(project / "ready")
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 7, err
    assert "got-term" in out


def test_orphans_are_reaped(nsbox):
    # The shell starts a background grandchild that outlives its parent subshell: init
    # must reap it, so no zombie is left while the agent still runs.
    script = "(sleep 0.2 &) ; sleep 0.8; grep -l '^State:.*Z' /proc/[0-9]*/status | wc -l"
    r = nsbox(cmd=sh(script))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0"


def _pids_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def test_kill_9_of_the_launcher_leaves_nothing_alive(env, project):
    marker = f"nsbox-marker-{uuid.uuid4().hex}"
    # A daemonized grandchild too: double fork, setsid, SIGHUP ignored.
    # The marker is $0 of each shell, so it shows in their /proc/<pid>/cmdline on the host.
    p = start_nsbox(env, project, f"setsid sh -c 'trap \"\" HUP; sleep 300; :' {marker} & "
                             f"sh -c 'sleep 300; :' {marker} & touch {project}/ready; wait")
    wait_for_file(project / "ready")
    deadline = time.monotonic() + 10
    while len(_pids_with(marker)) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_pids_with(marker)) >= 4  # launcher, holder, and the two shells
    p.kill()
    p.wait()
    deadline = time.monotonic() + 10
    while _pids_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pids_with(marker) == []


def test_python_api_returns_a_result(project, env):
    code = (
        "import sys; from nsbox import Sandbox, SandboxSpec\n"
        f"r = Sandbox(SandboxSpec(project={str(project)!r})).run(['/bin/sh', '-c', 'kill -TERM $$'])\n"
        "print(r.status, r.signal, sorted(r.flags), r.error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert out.stdout.strip() == "143 15 ['signaled'] None", out.stderr
