"""Privilege layers through the real CLI: caps, no_new_privs, seccomp, Landlock, init hardening."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, SHARED, sh

PROBE = REPO / "tests" / "probe.py"
PROFILES = REPO / "tests" / "profiles"
ZERO = "0000000000000000"
x86_64 = pytest.mark.skipif(platform.machine() != "x86_64", reason="probe syscall numbers are x86_64's")

# What the default profile answers, per probe (the kernel never saw these calls).
DENIED = {
    "keyctl": "EPERM", "add_key": "EPERM", "request_key": "EPERM", "bpf": "EPERM", "perf_event_open": "EPERM",
    "userfaultfd": "EPERM", "io_uring_setup": "EPERM", "io_uring_enter": "EPERM", "ptrace": "EPERM",
    "process_vm_readv": "EPERM", "kexec_load": "EPERM", "init_module": "EPERM", "finit_module": "EPERM",
    "delete_module": "EPERM", "swapon": "EPERM", "acct": "EPERM", "syslog": "EPERM", "settimeofday": "EPERM",
    "clock_settime": "EPERM", "iopl": "EPERM", "ioperm": "EPERM", "quotactl": "EPERM",
    "open_by_handle_at": "EPERM", "fanotify_init": "EPERM", "mount": "EPERM", "umount2": "EPERM",
    "pivot_root": "EPERM", "chroot": "EPERM", "unshare_user": "EPERM", "unshare_ns": "EPERM", "setns": "EPERM",
    "clone3": "ENOSYS", "socket_vsock": "EAFNOSUPPORT", "socket_alg": "EAFNOSUPPORT",
    "socket_packet": "EAFNOSUPPORT", "tiocsti": "EPERM", "tiocsti_high_bits": "EPERM", "unknown_1000": "ENOSYS",
}
REACHED_KERNEL = {"EFAULT", "EBADF", "EINVAL"}


def probe(nsbox, project: Path, *args: str, check: str = "syscalls"):
    shutil.copy(PROBE, project / "probe.py")
    return nsbox(*args, cmd=["/usr/bin/python3", str(project / "probe.py"), check])


def status_fields(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def test_agent_and_a_grandchild_after_execve_have_no_privileges(nsbox):
    fields = "^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):"
    r = nsbox(cmd=sh(f"grep -E '{fields}' /proc/self/status; echo ---; sh -c \"grep -E '{fields}' /proc/self/status\""))
    assert r.returncode == 0, r.stderr
    for part in r.stdout.split("---"):
        s = status_fields(part)
        assert [s[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")] == [ZERO] * 5, part
        assert s["NoNewPrivs"] == "1" and s["Seccomp"] == "2", part


@x86_64
def test_default_profile_denies_the_battery_before_the_kernel_sees_it(nsbox, project):
    r = probe(nsbox, project)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert {k: got[k] for k in DENIED} == DENIED
    # The probe works: allowed calls reach the kernel and fail harmlessly.
    assert got["getppid"] == "ok" and got["read"] == "EBADF" and got["ioctl_tcgets"] == "EBADF"


@x86_64
def test_without_seccomp_the_same_calls_reach_the_kernel(nsbox, project):
    r = probe(nsbox, project, "--without", "seccomp")
    assert r.returncode == 0, r.stderr
    assert "warning: --without seccomp" in r.stderr
    got = json.loads(r.stdout)
    reached = {k for k in DENIED if got[k] in REACHED_KERNEL or got[k] == "ok"}
    assert {"keyctl", "bpf", "io_uring_setup", "clone3", "mount"} <= reached, got
    assert got["socket_vsock"] == "ok"  # the lesson: a VM socket that no namespace cuts
    # Nested user namespaces stay impossible without seccomp: max_user_namespaces is 0.
    assert got["unshare_user"] == "ENOSPC"


def test_unshare_user_fails_even_without_seccomp(nsbox):
    script = "cat /proc/sys/user/max_user_namespaces; unshare -U true 2>&1; echo rc=$?"
    r = nsbox("--without", "seccomp", cmd=sh(script))
    assert r.stdout.splitlines()[0] == "0"
    assert "No space left on device" in r.stdout and "rc=1" in r.stdout


@pytest.mark.parametrize("check", ["ptrace-init", "proc1-mem"])
@pytest.mark.parametrize("without", [[], ["--without", "seccomp"]])
@x86_64
def test_init_cannot_be_traced_or_its_memory_opened(nsbox, project, check, without):
    r = probe(nsbox, project, *without, check=check)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() in ("EPERM", "EACCES"), r.stdout


@x86_64
@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build the i386/x32 probe")
@pytest.mark.parametrize("variant", ["int80", "x32"])
def test_other_abis_are_killed(nsbox, project, variant):
    src = project / "abi.c"
    src.write_text(
        "#include <unistd.h>\n#include <sys/syscall.h>\n"
        "int main(void) {\n"
        "#ifdef INT80\n  long r; __asm__ volatile(\"int $0x80\" : \"=a\"(r) : \"a\"(20L));  /* i386 getpid */\n"
        "#else\n  syscall(0x40000000L + 39);  /* x32 getpid */\n#endif\n"
        "  write(1, \"survived\\n\", 9); return 0; }\n")
    flags = ["-DINT80"] if variant == "int80" else []
    subprocess.run(["gcc", "-O0", *flags, "-o", str(project / "abi"), str(src)], check=True)
    r = nsbox(cmd=[str(project / "abi")])
    assert r.returncode == 128 + 31, (r.returncode, r.stdout)  # SIGSYS
    assert "survived" not in r.stdout
    # The launcher carried out the kill (seccomp user notification) and names the call.
    abi = "i386" if variant == "int80" else "x32"
    assert (f"nsbox: the agent was killed by seccomp (SIGSYS) for getpid ({abi} ABI): only the native x86_64 "
            "ABI is allowed") in r.stderr.splitlines(), r.stderr


def test_a_kill_rule_names_the_call_and_quotes_its_why(nsbox):
    code = "import os\nos.getpriority(os.PRIO_PROCESS, 0)\nprint('survived')"
    r = nsbox("--seccomp-profile", str(PROFILES / "kill_getpriority.toml"), cmd=["/usr/bin/python3", "-c", code])
    assert r.returncode == 128 + 31 and "survived" not in r.stdout
    assert ("nsbox: the agent was killed by seccomp (SIGSYS) for getpriority (x86_64 ABI): getpriority is "
            "forbidden by this test profile") in r.stderr.splitlines(), r.stderr


def test_a_program_that_catches_sigsys_is_still_killed_and_the_call_never_runs(nsbox):
    code = ("import os, signal\nsignal.signal(signal.SIGSYS, lambda *a: print('caught'))\n"
            "os.getpriority(os.PRIO_PROCESS, 0)\nprint('survived')")
    r = nsbox("--seccomp-profile", str(PROFILES / "kill_getpriority.toml"), cmd=["/usr/bin/python3", "-c", code])
    assert r.returncode == 128 + 9 and "survived" not in r.stdout and "caught" not in r.stdout
    assert "for getpriority (x86_64 ABI)" in r.stderr


def test_real_work_runs_under_the_default_profile(nsbox, project):
    script = r"""
set -e
cd "$1"
bash -c 'echo bash-ok'
ls / | sort | head -1 >/dev/null; cp README R2; sort R2 | wc -l >/dev/null; echo coreutils-ok
git init -q repo && cd repo && git config user.email t@t && git config user.name t
echo x > f && git add f && git commit -qm one && git log --oneline | wc -l && cd ..
python3 - <<'PYEOF'
import socket, subprocess, threading
out = []
t = threading.Thread(target=lambda: out.append(subprocess.run(["echo", "sub"], capture_output=True).stdout))
t.start(); t.join()
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
c = socket.create_connection(s.getsockname()); a, _ = s.accept(); c.sendall(b"lo")
print("python-ok", out[0].decode().strip(), a.recv(2).decode())
PYEOF
if command -v gcc >/dev/null; then
  printf '#include <stdio.h>\nint main(void){puts("gcc-ok");return 0;}\n' > h.c && gcc -o h h.c && ./h
else echo gcc-ok; fi
"""
    r = nsbox(cmd=["/bin/bash", "-c", script, "bash", str(project)], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["bash-ok", "coreutils-ok", "1", "python-ok", "sub", "lo", "gcc-ok"]


def test_claude_code_runs_under_the_default_profile(nsbox, project):
    claude = REPO / ".venv" / "claude" / "node_modules" / "@anthropic-ai" / "claude-code-linux-x64" / "claude"
    if not claude.exists():
        pytest.skip("Claude Code is not installed: scripts/test installs it with npm (NSBOX_SETUP_CLAUDE=1)")
    # `-- claude ARGS` finds claude on the caller's PATH and binds it in, as for the default agent.
    r = nsbox(cmd=["claude", "--version"], timeout=120, extra_env={"PATH": f"{claude.parent}:/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "Claude Code" in r.stdout


def test_a_distinctive_errno_proves_the_filter_acted(nsbox):
    code = "import os\ntry:\n    os.getpriority(os.PRIO_PROCESS, 0)\nexcept OSError as e:\n    print(e.errno)"
    r = nsbox("--seccomp-profile", str(PROFILES / "econnrefused.toml"), cmd=["/usr/bin/python3", "-c", code])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "111"  # ECONNREFUSED
    assert nsbox(cmd=["/usr/bin/python3", "-c", code]).stdout.strip() == ""  # allowed by default


def test_a_broken_profile_fails_before_anything_runs(nsbox, project):
    r = nsbox("--seccomp-profile", str(PROFILES / "broken.toml"), cmd=sh(f"touch {project}/ran"))
    assert r.returncode == 125
    first = r.stderr.splitlines()[0]
    assert first.startswith("nsbox: seccomp.compile: ") and "broken.toml" in first and "rule 2" in first, r.stderr
    assert "io_uring_setp" in first
    assert not (project / "ran").exists()


@pytest.mark.parametrize("name", ["moby-moby-profiles-seccomp-default.json",
                                  "containers-common-pkg-seccomp-seccomp.json"])
def test_docker_and_podman_profiles_load_unchanged_and_run_a_shell(nsbox, name):
    path = SHARED / "fixtures" / "seccomp" / name
    if not path.exists():
        pytest.skip(f"{path} is absent (a clone without ../shared)")
    r = nsbox("--seccomp-profile", str(path), cmd=sh("echo shell-ok; grep Seccomp: /proc/self/status"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["shell-ok", "Seccomp:", "2"]


def test_landlock_limits_writes_to_the_writable_roots(nsbox, project):
    # /usr and / are read-only mounts anyway; /run/nsbox is on the sealed root. The
    # writable mounts Landlock leaves alone are exactly these; the probe shows the
    # Landlock domain itself in /proc/self/status is not needed: a write to a writable
    # mount outside the rules is what it refuses (see test_landlock.py for that case).
    r = nsbox(cmd=sh(f"touch {project}/ok && echo project-ok; touch $HOME/h && echo home-ok; "
                     "touch /tmp/t && echo tmp-ok; mkdir /dev/shm/d && echo shm-ok; "
                     "grep -c . /proc/self/status >/dev/null && echo read-ok"))
    assert r.stdout.split() == ["project-ok", "home-ok", "tmp-ok", "shm-ok", "read-ok"], r.stdout + r.stderr


def test_landlock_scope_blocks_signals_to_init(nsbox):
    r = nsbox("--without", "seccomp", cmd=sh("kill -0 1 2>&1; echo rc=$?"))
    assert "rc=1" in r.stdout
    r = nsbox("--without", "seccomp", "--without", "landlock", cmd=sh("kill -0 1 2>&1; echo rc=$?"))
    assert "rc=0" in r.stdout  # the lesson: without Landlock's signal scope, init is reachable
