"""no_new_privs: execve can never add privileges again.

Once set, the bit is inherited by every child and can never be unset. setuid/setgid
bits and file capabilities stop working for this process tree, which is also what
lets an unprivileged process install a seccomp filter or a Landlock ruleset (neither
could then be used to confuse a more privileged program).

This module also holds `make_undumpable`, the other one-line prctl of init's hardening:
a non-dumpable process cannot be ptraced by, or have /proc/<pid>/mem and environ read
by, processes of the same uid. Both go through `syscalls.prctl` rather than
python-prctl, which is imported by `caps.py` alone (one third-party library, one module).

Kernel docs: prctl(2) PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE;
             Documentation/userspace-api/no_new_privs.rst.
Order:       in the AGENT after caps.drop (nothing privileged is left to do) and before
             landlock.restrict and seccomp.install (the kernel refuses both without it
             once the capabilities are gone); in INIT as part of its hardening.
Verify:      /proc/self/status shows "NoNewPrivs: 1" in the agent and in its grandchildren.
"""

from __future__ import annotations

from nsbox import syscalls
from nsbox.errors import acting
from nsbox.layers import FieldlessPlan

PR_GET_NO_NEW_PRIVS = 39


class NoNewPrivsPlan(FieldlessPlan):
    def describe(self) -> list[str]:
        return ["set no_new_privs (PR_SET_NO_NEW_PRIVS=1): setuid bits and file capabilities stop "
                "working for the agent and everything it starts"]

    def expected_status(self) -> dict[str, str]:
        return {"NoNewPrivs": "1"}


def plan() -> NoNewPrivsPlan:
    return NoNewPrivsPlan()


def enable(plan: NoNewPrivsPlan | None = None) -> None:  # role: AGENT (and INIT, hardening)
    with acting("nnp.enable", "prctl(PR_SET_NO_NEW_PRIVS, 1)"):
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)


def is_set() -> bool:
    return syscalls.prctl(PR_GET_NO_NEW_PRIVS) == 1


def make_undumpable() -> None:  # role: INIT, after forking the agent
    with acting("pidns.harden_init", "prctl(PR_SET_DUMPABLE, 0)"):
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
