"""The in-sandbox self-checks of `nsbox verify`: evidence read from inside, layer by layer.

`run(plans)` executes in the agent process after every layer is applied (seccomp
included), in place of execve, so it works with any rootfs, even one without Python:
the interpreter is the launcher's own, already in memory. Everything it needs is
imported at module load, before pivot_root.

Each check is a row: (layer, check, expected, actual). `ok` is expected == actual.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nsbox.launch import Plans


def _status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        return f"error {e.errno}"


def run(plans: Plans) -> list[dict[str, Any]]:
    """The checks every sandbox must pass; each layer's plan says what it expects."""
    rows: list[dict[str, Any]] = []

    def check(layer: str, what: str, expected: str, actual: str) -> None:
        rows.append({"layer": layer, "check": what, "expected": expected, "actual": actual,
                     "ok": expected == actual})

    status = _status()
    u = plans.userns
    check("userns", "uid_map", f"{u.inside_uid} {u.outside_uid} 1", " ".join(_read("/proc/self/uid_map").split()))
    check("userns", "setgroups", "deny", _read("/proc/self/setgroups"))
    check("userns", "max_user_namespaces", "0", _read("/proc/sys/user/max_user_namespaces"))
    check("pidns", "pid of the agent", "2", str(os.getpid()))
    check("pidns", "pids visible", "2", str(len([p for p in os.listdir("/proc") if p.isdigit()])))
    check("utsns", "hostname", plans.utsns.hostname, os.uname().nodename)
    if plans.caps is not None:
        for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            check("caps", field, "0000000000000000", status.get(field, "?"))
    check("nnp", "NoNewPrivs", "1", status.get("NoNewPrivs", "?"))
    if plans.seccomp is not None:
        check("seccomp", "Seccomp", "2", status.get("Seccomp", "?"))
    return rows
