"""PID namespace: the agent sees only the sandbox's processes, and init is PID 1.

`unshare(CLONE_NEWPID)` moves only the caller's *future children* into the new
namespace, so the holder unshares it and forks init, which becomes PID 1. PID 1 has
duties no ordinary program fulfils, so nsbox's init is small and does only these:

- reap every orphan (a coding agent starts many subprocesses; zombies would pile up);
- forward SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 to the agent (the kernel
  delivers nothing to PID 1 for which it has no handler);
- exit with the agent's status when the agent exits; the kernel then SIGKILLs every
  process left in the namespace, daemons included.

init is a fork of the launcher, so its memory holds the launcher's argv and environment,
which /proc/1/cmdline and /proc/1/environ expose. `harden_init` overwrites both and makes
init non-dumpable, so no process inside can read or ptrace it.

A fresh procfs for the new namespace is mounted before the old root is detached: the
kernel grants a new proc mount only while a fully visible one is still in the mount
namespace (fs/namespace.c, mount_too_revealing). Then runc's masks apply.

Kernel docs: pid_namespaces(7), proc(5), Documentation/filesystems/proc.rst.
Order:       holder unshares (with the other namespaces), then forks init; mount_proc
             before mountns.pivot_root; harden_init right after fork_agent.
Verify:      /proc lists only sandbox pids; the agent's parent is PID 1; an orphan is
             reaped; /proc/1/environ and cmdline hold no secret of the caller.
"""

from __future__ import annotations

import contextlib
import os
import signal

from nsbox import syscalls
from nsbox.errors import acting
from nsbox.layers import FieldlessPlan
from nsbox.syscalls import MountAttr, MountFlag

# runc's defaults (config.go: MaskedPaths, ReadonlyPaths).
MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/interrupts", "/proc/kcore", "/proc/keys",
    "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
    "/proc/scsi", "/proc/sysrq-trigger",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys")
FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class PidNsPlan(FieldlessPlan):
    def describe(self) -> list[str]:
        return [
            "new PID namespace: init is PID 1 (reaps orphans, forwards "
            + ", ".join(s.name for s in FORWARDED_SIGNALS) + "), the agent is its child",
            "/proc: a new procfs (nosuid,nodev,noexec); masked: " + " ".join(MASKED_PATHS),
            "/proc read-only: " + " ".join(READONLY_PATHS),
            "init hardened: argv and environ overwritten, not dumpable",
        ]


def plan() -> PidNsPlan:
    return PidNsPlan()


def mount_proc(p: PidNsPlan, new_root: str, host_root: str) -> None:
    """Role INIT: a procfs for this PID namespace at <new root>/proc, then runc's masks."""
    step = "pidns.mount_proc"
    proc = new_root + "/proc"
    flags = MountFlag.MS_NOSUID | MountFlag.MS_NODEV | MountFlag.MS_NOEXEC
    with acting(step, f"mount('proc', {proc!r}, 'proc', {flags!s})"):
        syscalls.mount("proc", proc, "proc", flags)
    for path in MASKED_PATHS:
        target = new_root + path
        if not os.path.lexists(target):
            continue
        if os.path.isdir(target):
            with acting(step, f"mask {path}: mount('tmpfs', ro)"):
                syscalls.mount("tmpfs", target, "tmpfs", MountFlag.MS_RDONLY | MountFlag.MS_NOSUID
                               | MountFlag.MS_NODEV | MountFlag.MS_NOEXEC, "size=0,mode=0555")
        else:
            with acting(step, f"mask {path}: bind /dev/null, read-only"):
                syscalls.mount(host_root + "/dev/null", target, None, MountFlag.MS_BIND)
                syscalls.mount_setattr(target, MountAttr.MOUNT_ATTR_RDONLY | MountAttr.MOUNT_ATTR_NOSUID
                                       | MountAttr.MOUNT_ATTR_NOEXEC, recursive=False)
    for path in READONLY_PATHS:
        target = new_root + path
        if not os.path.isdir(target):
            continue
        with acting(step, f"read-only {path}: bind onto itself, MOUNT_ATTR_RDONLY"):
            syscalls.mount(target, target, None, MountFlag.MS_BIND | MountFlag.MS_REC)
            syscalls.mount_setattr(target, MountAttr.MOUNT_ATTR_RDONLY | MountAttr.MOUNT_ATTR_NOSUID
                                   | MountAttr.MOUNT_ATTR_NODEV, recursive=True)


def block_signals(p: PidNsPlan) -> None:
    """Role INIT: hold forwarded signals and SIGCHLD for sigwaitinfo (the agent unblocks)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {*FORWARDED_SIGNALS, signal.SIGCHLD})


def harden_init(p: PidNsPlan) -> None:
    """Role INIT, after forking the agent: nothing inside can read init's memory or environ."""
    step = "pidns.harden_init"
    with acting(step, "scrub argv and environ (/proc/1/cmdline, /proc/1/environ)"):
        syscalls.scrub_own_argv_and_environ("nsbox:init")
        os.environ.clear()
    with acting(step, "prctl(PR_SET_DUMPABLE, 0)"):
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)


def reap(p: PidNsPlan, agent_pid: int) -> int:
    """Role INIT: reap everything, forward signals, return the agent's raw wait status."""
    watched = {*FORWARDED_SIGNALS, signal.SIGCHLD}
    while True:
        info = signal.sigwaitinfo(watched)
        if info.si_signo != signal.SIGCHLD:
            with contextlib.suppress(ProcessLookupError):
                os.kill(agent_pid, info.si_signo)
            continue
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return 0
            if pid == 0:
                break
            if pid == agent_pid:
                return status
