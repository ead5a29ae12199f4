"""Capabilities: the agent keeps none, and can never gain one again.

Inside its user namespace the agent starts with every capability (they count only for
objects that namespace owns, but that still covers mounts, network setup and more). This
layer empties all five sets and locks the securebits so that no later execve, of any
binary, as any uid, can bring a capability back:

    bounding     empty  -> execve can never grant a capability (file caps included)
    ambient      empty  -> nothing is handed through execve
    inheritable, permitted, effective  empty
    securebits   NOROOT, NO_SETUID_FIXUP, KEEP_CAPS off, NO_CAP_AMBIENT_RAISE,
                 each with its _LOCKED bit: uid 0 inside is no longer special

An unprivileged user may do all of this: dropping needs no privilege, and the two
operations that do (dropping from the bounding set, setting securebits) need
CAP_SETPCAP, which the agent holds in its own user namespace until this step.

python-prctl is imported here and nowhere else (DESIGN.md §3). It has no wrapper for the
ambient set or for the NO_CAP_AMBIENT_RAISE securebit (it refuses bits it does not
know), so those two go through `syscalls.prctl`. no_new_privs lives in `nnp.py`, also
through `syscalls.prctl`, so that each layer keeps its own module and python-prctl stays
in one.

Kernel docs: capabilities(7) ("Capability bounding set", "Ambient capabilities",
             "The securebits flags"); prctl(2) PR_CAPBSET_DROP, PR_CAP_AMBIENT,
             PR_SET_SECUREBITS.
Order:       in the AGENT after every privileged step (mounts, hostname, loopback are
             done by init before the fork), before nnp.enable, landlock.restrict and
             seccomp.install. Also used by init's hardening after it forked the agent.
Verify:      /proc/self/status shows CapInh, CapPrm, CapEff, CapBnd and CapAmb all
             0000000000000000, in the agent and in anything it execs;
             /proc/self/status is checked by `drop` itself before it returns.
"""

from __future__ import annotations

import prctl  # python-prctl ships no type hints: pyproject's mypy override treats it as Any

from nsbox import syscalls
from nsbox.errors import StepError, acting
from nsbox.layers import FieldlessPlan

STEP = "caps.drop"

# <linux/securebits.h>
SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_KEEP_CAPS = 1 << 4
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7

# KEEP_CAPS stays off (its bit is not set) but is locked off.
SECUREBITS = (SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP | SECBIT_NO_SETUID_FIXUP_LOCKED
              | SECBIT_KEEP_CAPS_LOCKED | SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED)

PR_SET_SECUREBITS = 28
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


class CapsPlan(FieldlessPlan):
    def describe(self) -> list[str]:
        return [
            "drop every capability: bounding, ambient, inheritable, permitted and effective sets emptied",
            f"securebits {SECUREBITS:#x} locked: NOROOT, NO_SETUID_FIXUP, KEEP_CAPS off, "
            "NO_CAP_AMBIENT_RAISE; no execve can restore a capability, not even as uid 0",
        ]

    def expected_status(self) -> dict[str, str]:
        """/proc/self/status fields after the drop (verify)."""
        return {name: "0000000000000000" for name in CAP_FIELDS}


def plan() -> CapsPlan:
    return CapsPlan()


def _last_cap() -> int:
    # The kernel may know more capabilities than python-prctl was built with.
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def drop(plan: CapsPlan | None = None) -> None:  # role: AGENT (and INIT, hardening)
    """Empty every capability set and lock the securebits; checks /proc/self/status after."""
    # 1. securebits first: setting them needs CAP_SETPCAP, which step 2 and 4 take away.
    with acting(STEP, f"prctl(PR_SET_SECUREBITS, {SECUREBITS:#x})"):
        syscalls.prctl(PR_SET_SECUREBITS, SECUREBITS)
    # 2. The bounding set: the upper limit of what any later execve could grant.
    with acting(STEP, "prctl(PR_CAPBSET_DROP, <every capability>)"):
        known = len(prctl.ALL_CAPS)
        for cap in range(_last_cap() + 1):
            if cap < known:
                prctl.capbset_drop(cap)
            else:
                syscalls.prctl(PR_CAPBSET_DROP, cap)  # newer than python-prctl knows
    # 3. Ambient: capabilities that would survive execve of an unprivileged binary.
    with acting(STEP, "prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)"):
        syscalls.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    # 4. Inheritable, permitted, effective: one capset(2) through libcap.
    with acting(STEP, "capset(all sets empty)"):
        prctl.set_caps((prctl.ALL_CAPS, (prctl.CAP_EFFECTIVE, prctl.CAP_PERMITTED, prctl.CAP_INHERITABLE),
                        False))
    _check_all_zero()


def _check_all_zero() -> None:
    """Fail closed: a capability python-prctl did not know would still be in CapPrm."""
    with acting(STEP, "reading /proc/self/status"), open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    left = {k: fields.get(k, "?").strip() for k in CAP_FIELDS if int(fields.get(k, "1"), 16) != 0}
    if left:
        raise StepError(STEP, "verify /proc/self/status", detail=f"capabilities left: {left}",
                        fix="report this: the kernel knows a capability nsbox could not drop")
