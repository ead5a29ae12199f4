"""Landlock: which files the agent may touch, decided by the agent's own kernel domain.

Landlock lets an unprivileged process restrict itself (and everything it starts) on top
of ordinary permissions. nsbox builds one ruleset in the agent, after pivot_root, so the
paths are the sandbox's own:

    readable roots (e.g. "/")           read files, list directories, execute
    writable roots (project, $HOME,     every right of this ABI: create, write, remove,
      /tmp, /dev/shm)                     rename, truncate, ...
    device roots (/dev)                 read, write, ioctl, truncate existing nodes;
                                          create or remove nothing

Everything the ruleset does not grant is refused with EACCES, even where the mount is
writable and the mode bits agree. Each ABI adds rights (2: REFER for cross-directory
rename/link, 3: TRUNCATE, 5: IOCTL_DEV) and scopes (6: abstract unix sockets and
signals may not cross the domain boundary); nsbox handles every right the running
kernel knows, so nothing is left implicitly allowed. Network rights (ABI 4) are not
used: the network namespace and the proxy already decide what the agent reaches, and
restricting TCP bind/connect would only break dev servers and the proxy on 127.0.0.1.

Kernel docs: landlock(7), landlock_create_ruleset(2), landlock_add_rule(2),
             landlock_restrict_self(2); Documentation/userspace-api/landlock.rst.
Order:       plan in the LAUNCHER (queries the ABI); restrict in the AGENT after
             pivot_root, caps.drop and nnp.enable (required without CAP_SYS_ADMIN), and
             before seccomp.install.
Verify:      a write outside the writable roots fails with EACCES; sending a signal to
             init (outside the domain) fails with EPERM on ABI >= 6.
"""

from __future__ import annotations

import errno as errno_mod
import os
import stat
from collections.abc import Sequence
from typing import NamedTuple

from nsbox import syscalls
from nsbox.errors import StepError, acting

STEP = "landlock.restrict"

# <linux/landlock.h>: filesystem rights, and the ABI that introduced each.
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5

FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1,
                    5: (1 << 16) - 1}
# Rights that make sense on a file rather than a directory (landlock_add_rule(2): EINVAL otherwise).
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

READ_EXEC = READ_FILE | READ_DIR | EXECUTE
DEVICE = READ_FILE | READ_DIR | WRITE_FILE | TRUNCATE | IOCTL_DEV


def fs_rights(abi: int) -> int:
    """Every filesystem right the given ABI knows."""
    return FS_RIGHTS_BY_ABI[min(abi, max(FS_RIGHTS_BY_ABI))] if abi > 0 else 0


class LandlockPlan(NamedTuple):
    abi: int  # 0: no Landlock on this kernel
    unavailable: str | None  # why, when abi == 0
    handled_fs: int
    scoped: int
    rules: tuple[tuple[str, int], ...]  # (inside path, allowed rights)

    @property
    def enabled(self) -> bool:
        return self.abi > 0

    def describe(self) -> list[str]:
        if not self.enabled:
            return [f"Landlock NOT applied: {self.unavailable}; file access is limited by the mount "
                    "table and permissions only"]
        lines = [f"Landlock ABI {self.abi}: every filesystem right handled ({self.handled_fs:#x}); "
                 "anything not granted below is refused with EACCES"]
        for path, rights in self.rules:
            kind = ("read, write, create, remove" if rights == self.handled_fs
                    else "read, write and ioctl on existing nodes" if rights & WRITE_FILE
                    else "read and execute")
            lines.append(f"  {path}: {kind}")
        if self.scoped:
            lines.append("  scoped: no connecting to abstract unix sockets or signalling processes "
                         "outside the agent's domain")
        lines.append("  network rights not used: the network namespace and proxy decide what is reachable")
        return lines


def probe_abi() -> tuple[int, str | None]:
    """(ABI, None), or (0, reason) when this kernel has no usable Landlock."""
    try:
        return syscalls.landlock_abi_version(), None
    except OSError as e:
        if e.errno == errno_mod.ENOSYS:
            return 0, "this kernel was built without Landlock (ENOSYS)"
        if e.errno == errno_mod.EOPNOTSUPP:
            return 0, "Landlock is disabled at boot (EOPNOTSUPP; add landlock to the lsm= kernel parameter)"
        return 0, f"landlock_create_ruleset failed: {os.strerror(e.errno or 0)}"


def plan(writable: Sequence[str], readable: Sequence[str], devices: Sequence[str] = ("/dev",),
         abi: int | None = None) -> LandlockPlan:
    """Rules for inside paths (LAUNCHER). `abi` overrides the probe, for tests and study."""
    for p in (*writable, *readable, *devices):
        if not os.path.isabs(p):
            raise StepError("landlock.plan", f"path {p!r}", detail="Landlock paths must be absolute inside paths",
                            fix="pass paths as the agent sees them after pivot_root, e.g. /tmp")
    reason: str | None = None
    if abi is None:
        abi, reason = probe_abi()
    handled = fs_rights(abi)
    rules = ([(p, READ_EXEC) for p in readable] + [(p, DEVICE & handled) for p in devices]
             + [(p, handled) for p in writable])
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    return LandlockPlan(abi, reason, handled, scoped, tuple(rules))


def restrict(plan: LandlockPlan) -> None:  # role: AGENT, after nnp.enable, before seccomp.install
    """Build the ruleset from inside paths and enforce it on this process and its future children."""
    if not plan.enabled:
        return  # describe() says so plainly; nothing to enforce on this kernel
    with acting(STEP, f"landlock_create_ruleset(handled_access_fs={plan.handled_fs:#x}, scoped={plan.scoped:#x})"):
        ruleset = syscalls.landlock_create_ruleset(plan.handled_fs, 0, plan.scoped)
    try:
        for path, rights in plan.rules:
            with acting(STEP, f"open({path!r}, O_PATH)"):
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    rights &= FILE_RIGHTS  # a single file (e.g. /dev/null) takes file rights only
                with acting(STEP, f"landlock_add_rule({path!r}, allowed_access={rights:#x})"):
                    syscalls.landlock_add_path_rule(ruleset, rights, fd)
            finally:
                os.close(fd)
        with acting(STEP, "landlock_restrict_self()"):
            syscalls.landlock_restrict_self(ruleset)
    finally:
        os.close(ruleset)
