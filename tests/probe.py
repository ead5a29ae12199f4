"""The in-sandbox probe: raw system calls, each answered by its errno, printed as JSON.

Runs INSIDE the sandbox with the host's /usr/bin/python3 (stdlib and ctypes only).
Allowed calls are made with deliberately bad pointers or fds, so they fail harmlessly
with EFAULT or EBADF (bubblewrap's try-syscall method); a call the filter refuses answers
with the profile's errno instead, and never reaches the kernel. x86_64 numbers.

    python3 probe.py syscalls            {"keyctl": "EPERM", "getppid": "ok", ...}
    python3 probe.py ptrace-init         errno of ptrace(PTRACE_ATTACH, 1)
"""

import ctypes
import errno
import json
import os
import sys

libc = ctypes.CDLL(None, use_errno=True)
BAD = 0xFFFFFFFFFFFF0000  # an address nothing is mapped at: EFAULT if the kernel is reached

CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
TIOCSTI = 0x5412

# name: (number, args)
CALLS = {
    "keyctl": (250, (0, 0, 0, 0, 0)),
    "add_key": (248, (BAD, BAD, BAD, 0, 0)),
    "request_key": (249, (BAD, BAD, BAD, 0)),
    "bpf": (321, (0, BAD, 16)),
    "perf_event_open": (298, (BAD, 0, -1 & 0xFFFFFFFF, -1 & 0xFFFFFFFF, 0)),
    "userfaultfd": (323, (0,)),
    "io_uring_setup": (425, (1, BAD)),
    "io_uring_enter": (426, (999, 0, 0, 0, 0, 0)),
    "ptrace": (101, (16, 1, 0, 0)),  # PTRACE_ATTACH to init
    "process_vm_readv": (310, (1, BAD, 1, BAD, 1, 0)),
    "kexec_load": (246, (0, 0, 0, 0)),
    "init_module": (175, (BAD, 0, BAD)),
    "finit_module": (313, (999, BAD, 0)),
    "delete_module": (176, (BAD, 0)),
    "swapon": (167, (BAD, 0)),
    "acct": (163, (BAD,)),
    "syslog": (103, (3, BAD, 10)),
    "settimeofday": (164, (BAD, BAD)),
    "clock_settime": (227, (0, BAD)),
    "iopl": (172, (3,)),
    "ioperm": (173, (0, 1, 1)),
    "quotactl": (179, (0, BAD, 0, BAD)),
    "open_by_handle_at": (304, (999, BAD, 0)),
    "fanotify_init": (300, (0, 0)),
    "mount": (165, (BAD, BAD, BAD, 0, BAD)),
    "umount2": (166, (BAD, 0)),
    "pivot_root": (155, (BAD, BAD)),
    "chroot": (161, (BAD,)),
    "unshare_user": (272, (CLONE_NEWUSER,)),
    "unshare_ns": (272, (CLONE_NEWNS,)),
    "setns": (308, (999, 0)),
    "clone3": (435, (BAD, 88)),
    "socket_vsock": (41, (40, 1, 0)),
    "socket_alg": (41, (38, 5, 0)),
    "socket_packet": (41, (17, 3, 0)),
    "tiocsti": (16, (999, TIOCSTI, BAD)),
    "tiocsti_high_bits": (16, (999, 0xFFFFFFFF00000000 | TIOCSTI, BAD)),
    "unknown_1000": (1000, ()),
    # Allowed: these must reach the kernel (EFAULT/EBADF), proving the probe itself works.
    "getppid": (110, ()),
    "read": (0, (999, BAD, 1)),
    "ioctl_tcgets": (16, (999, 0x5401, BAD)),
    "socket_inet_bad_type": (41, (2, 999, 0)),
}


def call(nr, args):
    ret = libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a) for a in args))
    return "ok" if ret >= 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))


def main():
    what = sys.argv[1]
    if what == "syscalls":
        print(json.dumps({name: call(nr, args) for name, (nr, args) in CALLS.items()}))
    elif what == "ptrace-init":
        print(call(101, (16, 1, 0, 0)))
    elif what == "proc1-mem":
        try:
            os.close(os.open("/proc/1/mem", os.O_RDWR))
            print("ok")
        except OSError as e:
            print(errno.errorcode[e.errno])
    else:
        sys.exit(f"probe: unknown check {what!r}")


main()
