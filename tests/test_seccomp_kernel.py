"""Seccomp against the real kernel: install compiled BPF in a subprocess and make calls.

Each test runs a small Python script in a fresh interpreter (never a fork of pytest): it
compiles the profile, sets no_new_privs, installs the filter with `seccomp.install` (the
same call the agent makes) and reports each probe's result as JSON. The probes use ctypes
to make raw system calls; that is test code, not nsbox.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="syscall numbers below are x86_64's")

PRELUDE = textwrap.dedent("""
    import ctypes, json, os, subprocess, sys, threading
    from pathlib import Path
    from nsbox.layers import nnp, seccomp
    libc = ctypes.CDLL(None, use_errno=True)

    def call(nr, *args):
        ret = libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a) for a in args))
        return "ok" if ret >= 0 else os.strerror(ctypes.get_errno()) + "|" + str(ctypes.get_errno())

    plan = seccomp.plan(Path(sys.argv[1]), cache=Path(sys.argv[2]))
    nnp.enable()
    # No supervisor here: closing the listener makes the kernel refuse every call the
    # filter would have the launcher kill (other ABIs, kill rules) with ENOSYS instead.
    os.close(seccomp.install(plan))
""")


def run_probe(tmp_path: Path, profile: Path, body: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "probe.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script), str(profile), str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=60)


def results(tmp_path: Path, profile: Path, body: str) -> dict[str, Any]:
    proc = run_probe(tmp_path, profile, body)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


DEFAULT = Path(__file__).resolve().parents[1] / "seccomp" / "default.toml"


def errno_of(result: str) -> str:
    return result.split("|")[0]


def test_a_distinctive_errno_proves_the_filter_acted(tmp_path: Path) -> None:
    profile = tmp_path / "refuse.toml"
    profile.write_text(textwrap.dedent("""
        default_action = "allow"
        [[rule]]
        syscalls = ["getppid"]
        action = "errno"
        errno = "ECONNREFUSED"
        why = "test: a harmless call with an errno it never returns on its own"
    """))
    r = results(tmp_path, profile, """
        status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\\t" in l)
        print(json.dumps({"getppid": call(110), "getpid": call(39), "seccomp": status["Seccomp"],
                          "nnp": status["NoNewPrivs"]}))
    """)
    assert r["getppid"] == f"{os.strerror(111)}|111"  # ECONNREFUSED
    assert (r["getpid"], r["seccomp"], r["nnp"]) == ("ok", "2", "1")


def test_default_denies_with_the_profiles_errno_not_the_kernels(tmp_path: Path) -> None:
    r = results(tmp_path, DEFAULT, """
        null = os.open("/dev/null", os.O_RDWR)
        print(json.dumps({
            "keyctl": call(250, 0, 2**64 - 3, 0),                       # KEYCTL_GET_KEYRING_ID, session
            "add_key": call(248, 0, 0, 0, 0, 0),
            "bpf": call(321, 0, 0, 0),
            "perf_event_open": call(298, 0, 0, 0, 2**64 - 1, 0),
            "userfaultfd": call(323, 0),
            "io_uring_setup": call(425, 1, 0),
            "ptrace_attach_1": call(101, 16, 1, 0, 0),
            "process_vm_readv": call(310, 1, 0, 0, 0, 0, 0),
            "unshare_newuser": call(272, 0x10000000),
            "clone_newuser": call(56, 0x10000000 | 17, 0, 0, 0, 0),
            "socket_vsock": call(41, 40, 1, 0),
            "socket_vsock_high": call(41, (1 << 32) | 40, 1, 0),
            "socket_alg": call(41, 38, 5, 0),
            "socket_packet": call(41, 17, 3, 0),
            "tiocsti": call(16, null, 0x5412, 0),
            "tiocsti_high": call(16, null, (0xdead << 32) | 0x5412, 0),
            "tioclinux": call(16, null, 0x541c, 0),
            "init_module": call(175, 0, 0, 0),
            "mount": call(165, 0, 0, 0, 0, 0),
            "personality_norandom": call(135, 0x0040000),
            "clone3": call(435, 0, 0),
            "nr_1000": call(1000),
            "tcgets_on_null": call(16, null, 0x5401, 0),
            "socket_inet": call(41, 2, 1, 0),
        }))
    """)
    eperm, afnosupport, enosys = os.strerror(1), os.strerror(97), os.strerror(38)
    expected = {
        "keyctl": eperm, "add_key": eperm, "bpf": eperm, "perf_event_open": eperm, "userfaultfd": eperm,
        "io_uring_setup": eperm, "ptrace_attach_1": eperm, "process_vm_readv": eperm,
        "unshare_newuser": eperm, "clone_newuser": eperm,
        "socket_vsock": afnosupport, "socket_vsock_high": afnosupport, "socket_alg": afnosupport,
        "socket_packet": afnosupport, "tiocsti": eperm, "tiocsti_high": eperm, "tioclinux": eperm,
        "init_module": eperm, "mount": eperm, "personality_norandom": eperm,
        "clone3": enosys, "nr_1000": enosys,
        "tcgets_on_null": os.strerror(25),  # ENOTTY: the kernel answered, ioctl itself is allowed
        "socket_inet": "ok",
    }
    assert {k: errno_of(v) for k, v in r.items()} == expected
    reached_kernel = {os.strerror(n) for n in (14, 9, 22)}  # EFAULT, EBADF, EINVAL
    assert not {k for k, v in r.items() if errno_of(v) in reached_kernel}


def test_threads_fork_and_subprocess_still_work_without_clone3(tmp_path: Path) -> None:
    r = results(tmp_path, DEFAULT, """
        box = []
        t = threading.Thread(target=lambda: box.append(threading.get_native_id()))
        t.start(); t.join()
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        _, status = os.waitpid(pid, 0)
        proc = subprocess.run(["/bin/sh", "-c", "echo hi"], capture_output=True, text=True)
        print(json.dumps({"thread": len(box), "fork": os.waitstatus_to_exitcode(status),
                          "sh": proc.stdout.strip(), "clone3": call(435, 0, 0)}))
    """)
    assert r == {"thread": 1, "fork": 7, "sh": "hi", "clone3": f"{os.strerror(38)}|38"}


def test_x32_syscall_never_runs_without_a_supervisor(tmp_path: Path) -> None:
    # With nsbox's launcher supervising, the caller dies of SIGSYS (test_privileges.py);
    # without one, the kernel refuses the call: it never runs either way.
    proc = run_probe(tmp_path, DEFAULT, """
        print(json.dumps(call(0x40000000 + 39)))  # getpid through the x32 table: not the native ABI
    """)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == "Function not implemented|38"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed: cannot build the int 0x80 probe")
def test_int80_i386_abi_never_runs_without_a_supervisor(tmp_path: Path) -> None:
    src = tmp_path / "int80.c"
    src.write_text(textwrap.dedent("""
        #include <stdio.h>
        int main(void) {
            long ret;
            /* getpid through the i386 table (20): numbers there mean other calls */
            __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(20L) : "memory");
            printf("survived %ld\\n", ret);
            return 0;
        }
    """))
    exe = tmp_path / "int80"
    subprocess.run(["gcc", "-O0", "-o", str(exe), str(src)], check=True, capture_output=True)
    # Without a filter the call works: the probe itself is sound.
    bare = subprocess.run([str(exe)], capture_output=True, text=True)
    assert bare.returncode == 0 and "survived" in bare.stdout
    proc = run_probe(tmp_path, DEFAULT, f"os.execv({str(exe)!r}, [{str(exe)!r}])\n")
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.strip() == "survived -38"  # -ENOSYS: refused, never reached the i386 table
