"""Every raw kernel call nsbox makes through ctypes. Nothing else imports ctypes.

Python 3.11's `os` module has no `unshare`, `mount` or `pivot_root`, so they are called
through libc here, typed, and raise `OSError(errno, strerror, path)` like the standard
library. Flags are `enum.IntFlag`s, so an error message can print `MS_BIND|MS_REC`.

Kernel docs: unshare(2), mount(2), umount(2), pivot_root(2), mount_setattr(2),
             close_range(2), prctl(2), seccomp(2).
"""

from __future__ import annotations

import ctypes
import os
from enum import IntFlag

_libc = ctypes.CDLL(None, use_errno=True)

# Syscall numbers for the calls glibc 2.36 (Debian 12) has no wrapper for.
_NR: dict[str, dict[str, int]] = {
    "x86_64": {"pivot_root": 155, "close_range": 436, "mount_setattr": 442, "seccomp": 317},
    "aarch64": {"pivot_root": 41, "close_range": 436, "mount_setattr": 442, "seccomp": 277},
}
_MACHINE = os.uname().machine  # what platform.machine() answers, without importing platform


class CloneFlag(IntFlag):
    CLONE_NEWNS = 0x00020000
    CLONE_NEWCGROUP = 0x02000000
    CLONE_NEWUTS = 0x04000000
    CLONE_NEWIPC = 0x08000000
    CLONE_NEWUSER = 0x10000000
    CLONE_NEWPID = 0x20000000
    CLONE_NEWNET = 0x40000000


class MountFlag(IntFlag):
    MS_NONE = 0
    MS_RDONLY = 1
    MS_NOSUID = 2
    MS_NODEV = 4
    MS_NOEXEC = 8
    MS_REMOUNT = 32
    MS_NOATIME = 1024
    MS_BIND = 4096
    MS_MOVE = 8192
    MS_REC = 16384
    MS_SILENT = 32768
    MS_PRIVATE = 1 << 18
    MS_SLAVE = 1 << 19
    MS_SHARED = 1 << 20
    MS_RELATIME = 1 << 21
    MS_STRICTATIME = 1 << 24


class MountAttr(IntFlag):
    MOUNT_ATTR_RDONLY = 0x1
    MOUNT_ATTR_NOSUID = 0x2
    MOUNT_ATTR_NODEV = 0x4
    MOUNT_ATTR_NOEXEC = 0x8


MNT_DETACH = 2
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
AT_SYMLINK_NOFOLLOW = 0x100
CLOSE_RANGE_CLOEXEC = 1 << 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_SET_NO_NEW_PRIVS = 38

TIOCSCTTY = 0x540E
TIOCSTI = 0x5412


def _check(ret: int, what: str, path: str | None = None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path) if path else OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _syscall(name: str, *args: object) -> int:
    try:
        nr = _NR[_MACHINE][name]
    except KeyError:
        raise OSError(38, f"{name}: no syscall number known for {_MACHINE}") from None
    return int(_libc.syscall(ctypes.c_long(nr), *args))


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def unshare(flags: CloneFlag) -> None:
    _check(_libc.unshare(ctypes.c_int(int(flags))), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: MountFlag, data: str | None = None) -> None:
    ret = _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(int(flags)), _b(data))
    _check(ret, "mount", target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), "umount2", target)


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_syscall("pivot_root", _b(new_root), _b(put_old)), "pivot_root", new_root)


class _MountAttrStruct(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr(path: str, attr_set: MountAttr, recursive: bool = True) -> None:
    """Set mount attributes on `path` (and, recursively, every mount beneath it).

    Unlike a MS_REMOUNT|MS_BIND, this never clears flags the kernel has locked on a mount
    that came from a more privileged namespace (nosuid, nodev, ...), so it cannot fail
    with EPERM for that reason, and it reaches submounts (kernel >= 5.12).
    """
    attr = _MountAttrStruct(int(attr_set), 0, 0, 0)
    flags = AT_SYMLINK_NOFOLLOW | (AT_RECURSIVE if recursive else 0)
    ret = _syscall(
        "mount_setattr", ctypes.c_int(AT_FDCWD), _b(path), ctypes.c_uint(flags),
        ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(ret, "mount_setattr", path)


def close_range_cloexec(first: int) -> None:
    """Mark every fd >= first close-on-exec: the exec that follows closes them all."""
    _check(_syscall("close_range", ctypes.c_uint(first), ctypes.c_uint(0xFFFFFFFF),
                    ctypes.c_uint(CLOSE_RANGE_CLOEXEC)), "close_range")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    return _check(int(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                                  ctypes.c_ulong(0), ctypes.c_ulong(0))), "prctl")


def set_process_name(name: str) -> None:
    """Name this process for ps/top (comm, at most 15 bytes)."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    prctl(PR_SET_NAME, ctypes.addressof(buf))


def scrub_own_argv_and_environ(title: str) -> None:
    """Overwrite this process's original argv and environ strings in memory.

    /proc/<pid>/cmdline and /proc/<pid>/environ read these bytes straight from the
    process's memory. init is a fork of the launcher, so without this it would show the
    launcher's command line and environment (the caller's secrets) to every process in
    the sandbox. The addresses come from /proc/self/stat (fields 48-51, proc(5)).
    Python copied both into its own objects at startup, so nothing reads them again.
    """
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); arg_start is field 48.
    arg_start, arg_end, env_start, env_end = (int(fields[i - 3]) for i in (48, 49, 50, 51))
    ctypes.memset(env_start, 0, env_end - env_start)
    ctypes.memset(arg_start, 0, arg_end - arg_start)
    raw = title.encode()[: max(arg_end - arg_start - 1, 0)]
    ctypes.memmove(arg_start, raw, len(raw))


def install_seccomp_filter(bpf: bytes, listener: bool = False) -> int:
    """Load a finished classic-BPF program with seccomp(SECCOMP_SET_MODE_FILTER).

    No libseccomp here: the program was compiled in the launcher before any fork. With
    `listener`, SECCOMP_FILTER_FLAG_NEW_LISTENER: the call returns the fd on which the
    filter's SECCOMP_RET_USER_NOTIF decisions arrive (seccomp_unotify(2)); else -1.
    """

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = SockFprog(len(bpf) // 8, ctypes.addressof(buf))
    seccomp_set_mode_filter, flag_new_listener = 1, 1 << 3
    ret = _check(_syscall("seccomp", ctypes.c_uint(seccomp_set_mode_filter),
                          ctypes.c_uint(flag_new_listener if listener else 0), ctypes.byref(prog)), "seccomp")
    return ret if listener else -1


# --- Landlock (landlock(7)) and libseccomp's version: appended for the privilege layers ---

# Landlock's three calls have the same number on every architecture (asm-generic).
_NR_LANDLOCK = {"landlock_create_ruleset": 444, "landlock_add_rule": 445, "landlock_restrict_self": 446}
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1


class _LandlockRulesetAttr(ctypes.Structure):
    # struct landlock_ruleset_attr (ABI 1: fs; ABI 4: net; ABI 6: scoped). A kernel that
    # knows fewer fields accepts the longer struct as long as the unknown tail is zero.
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _LandlockPathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel's struct is __attribute__((packed)): 12 bytes, not 16
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi_version() -> int:
    """The Landlock ABI this kernel speaks (>= 1); OSError ENOSYS/EOPNOTSUPP if none."""
    ret = int(_libc.syscall(ctypes.c_long(_NR_LANDLOCK["landlock_create_ruleset"]), None,
                            ctypes.c_size_t(0), ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION)))
    return _check(ret, "landlock_create_ruleset")


def landlock_create_ruleset(handled_access_fs: int, handled_access_net: int = 0, scoped: int = 0) -> int:
    """Create a ruleset that handles these access rights; returns its fd (close-on-exec)."""
    attr = _LandlockRulesetAttr(handled_access_fs, handled_access_net, scoped)
    ret = int(_libc.syscall(ctypes.c_long(_NR_LANDLOCK["landlock_create_ruleset"]), ctypes.byref(attr),
                            ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0)))
    return _check(ret, "landlock_create_ruleset")


def landlock_add_path_rule(ruleset_fd: int, allowed_access: int, parent_fd: int) -> None:
    """Allow `allowed_access` beneath the file or directory open as `parent_fd` (O_PATH)."""
    attr = _LandlockPathBeneathAttr(allowed_access, parent_fd)
    ret = int(_libc.syscall(ctypes.c_long(_NR_LANDLOCK["landlock_add_rule"]), ctypes.c_int(ruleset_fd),
                            ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(attr), ctypes.c_uint32(0)))
    _check(ret, "landlock_add_rule")


def landlock_restrict_self(ruleset_fd: int, flags: int = 0) -> None:
    """Enforce the ruleset on this thread (and, inherited, on everything it starts)."""
    ret = int(_libc.syscall(ctypes.c_long(_NR_LANDLOCK["landlock_restrict_self"]), ctypes.c_int(ruleset_fd),
                            ctypes.c_uint32(flags)))
    _check(ret, "landlock_restrict_self")


class _ScmpVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


def libseccomp_version() -> tuple[int, int, int]:
    """libseccomp's runtime version (seccomp_version(3)), for keying the compiled-BPF cache.

    Called in the launcher only. pyseccomp does not bind seccomp_version; the library is
    already loaded by then, so dlopen just returns the same handle.
    """
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_version.restype = ctypes.POINTER(_ScmpVersion)
    v = lib.seccomp_version().contents
    return int(v.major), int(v.minor), int(v.micro)


# --- Raw calls for nsbox verify's probe (nsbox/probe.py) and nsbox doctor (nsbox/host.py) ---

# The probe asks the kernel (or the seccomp filter in front of it) for an answer, not a
# service: arguments are deliberately harmless (a bad fd, a bad pointer), so an allowed
# call fails with EBADF/EFAULT/EINVAL and a filtered one with the profile's errno.
_NR_PROBE: dict[str, dict[str, int]] = {
    "x86_64": {"ioctl": 16, "socket": 41, "ptrace": 101, "unshare": 272, "keyctl": 250, "bpf": 321,
               "io_uring_setup": 425, "clone3": 435},
    "aarch64": {"ioctl": 29, "socket": 198, "ptrace": 117, "unshare": 97, "keyctl": 219, "bpf": 280,
                "io_uring_setup": 425, "clone3": 435},
}
PTRACE_ATTACH = 16
PTRACE_DETACH = 17


def try_syscall(name: str, *args: int) -> int:
    """Make one raw system call; return its result (>= 0) or -errno. Never raises for a refusal.

    Arguments are passed as unsigned longs, all 64 bits of them: the probe needs to set
    the high half of an ioctl request, which fcntl.ioctl would truncate.
    """
    try:
        nr = _NR_PROBE[_MACHINE][name]
    except KeyError:
        raise OSError(38, f"{name}: no syscall number known for {_MACHINE}") from None
    ret = int(_libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a & 0xFFFFFFFFFFFFFFFF) for a in args)))
    return -ctypes.get_errno() if ret < 0 else ret


def bad_address() -> int:
    """An address nothing is mapped at: EFAULT wherever the kernel dereferences it."""
    return 0xFFFFFFFFFFFF0000

