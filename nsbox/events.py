"""Audit events and violation reports: what happened in a run, as data and as sentences.

One schema, JSON lines (`--log FILE` appends them), every event an object with "event":

    plan           {"layers": {layer: [describe lines]}}          what the run will do
    step.start     {"role", "step"}                                a row of launch.SEQUENCE begins
    step.ok        {"role", "step"}                                ... and ends
    step.fail      {"step", "error"}                               the launch stopped here
    proxy          {"method", "host", "port", "decision", "code", "reason", "status",
                    "bytes_up", "bytes_down", "api_key_injected", ...}   one request or tunnel
    violation      {"kind": seccomp|oom|pids|proxy|timeout, "message"} something was refused or stopped
    sandbox.exit   {"status", "signal", "flags", "usage", "error"}   the result

Secrets never reach the log: the launcher's API key and every value given with --env are
replaced by "<redacted>" wherever they would appear (`redact`).

Violation reports are for the user and for the agent that reads nsbox's stderr: one line
per distinct event, saying what was blocked and how to allow it where that is the user's
call.
"""

from __future__ import annotations

import json
import signal
from typing import Any

REDACTED = "<redacted>"


def redact(event: dict[str, Any], secrets: tuple[str, ...]) -> str:
    """The event as one JSON line, with every secret value replaced."""
    text = json.dumps(event, default=str)
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= 4:  # shorter values would blank out ordinary words
            text = text.replace(json.dumps(secret)[1:-1], REDACTED)
    return text


def _allow_hint(e: dict[str, Any]) -> str:
    host, port, code = e.get("host", "?"), e.get("port"), e.get("code", "")
    if code in ("literal-ip", "localhost", "blocked-address"):
        return (f"it is a private, loopback or literal address; if you mean it: "
                f"--allow-domain {host}:{port} --resolve {host}:{port}:ADDR")
    with_port = f"{host}:{port}" if port not in (80, 443, None) else str(host)
    return f"to allow it: nsbox run --allow-domain {with_port}"


def violations(signal_number: int | None, timed_out: bool, timeout: float | None,
               usage: dict[str, Any] | None, events: list[dict[str, Any]],
               kill_rules: tuple[str, ...] = (), seccomp_kills: list[dict[str, Any]] | None = None,
               ) -> list[dict[str, Any]]:
    """The distinct things the sandbox refused or stopped during a run, each with a sentence."""
    found: list[dict[str, Any]] = []
    named: set[tuple[str, str]] = set()
    for k in seccomp_kills or []:
        if (k["syscall"], k["abi"]) in named:
            continue
        named.add((k["syscall"], k["abi"]))
        who = "the agent" if k.get("pid") is not None and signal_number == signal.SIGSYS else "a process"
        found.append({"kind": "seccomp", "syscall": k["syscall"], "abi": k["abi"], "message":
                      f"{who} was killed by seccomp (SIGSYS) for {k['syscall']} ({k['abi']} ABI): {k['why']}"})
    if signal_number == signal.SIGSYS and not named:
        why = "; rules that kill: " + "; ".join(kill_rules) if kill_rules else ""
        found.append({"kind": "seccomp", "message":
                      "the agent was killed by seccomp (SIGSYS): it made a system call the profile kills, such as "
                      "one from another ABI (i386 int 0x80, x32); the kernel does not report which call" + why})
    if usage and usage.get("sentence"):
        kind = "oom" if usage.get("oom_kills") else "pids"
        found.append({"kind": kind, "message": str(usage["sentence"])})
    seen: set[tuple[Any, Any, Any]] = set()
    for e in events:
        if e.get("event") != "proxy" or e.get("decision") != "denied":
            continue
        key = (e.get("method"), e.get("host"), e.get("port"))
        if key in seen:
            continue
        seen.add(key)
        found.append({"kind": "proxy", "host": e.get("host"), "port": e.get("port"), "message":
                      f"blocked {e.get('method', '?')} {e.get('host')}:{e.get('port')}: {e.get('reason', '')}; "
                      + _allow_hint(e)})
    if timed_out:
        found.append({"kind": "timeout", "message": f"the agent ran past --timeout {timeout:g}s and was stopped "
                                                    "(SIGTERM, then SIGKILL of the whole sandbox)"})
    return found
