"""The in-sandbox self-checks of `nsbox verify`: evidence read from inside, layer by layer.

What it does: `run(plans)` executes in the agent process after every layer is applied
(seccomp included), in place of execve. It reads what the kernel says about this
process (/proc/self/status, /proc/self/mountinfo, /proc/net/dev...) and tries the
battery's escapes (notes/security.md §(e)) with harmless arguments: a bad fd or a bad
pointer, so an allowed call fails with EBADF/EFAULT/EINVAL, and a refused one answers
with the errno of the layer that refused it. Each check is a row
{layer, check, expected, actual, ok, removed}; the expected value comes from the plans,
so `--seccomp-profile`, `--network` and `--image` change what is expected.

It works with any rootfs, even one without Python: the interpreter is the launcher's
own, already in memory, and every module it uses is imported here, at module load,
before pivot_root; the one exception, pyroute2 (150 ms), is imported by the launcher
for `nsbox verify` alone (netns.load_netlink), also before the first fork. It makes
only calls the default seccomp profile allows (or asks precisely the ones it refuses),
never imports lazily (bytes host names: a str would import the idna codec), and never
execs, except one fork+execve of /bin/sh for the after-execve checks where the rootfs
has a shell (`sh` then uses builtins only).

A layer removed with --without keeps its expected values, the guarantees it would
give: its rows then fail, with the kernel's own answer in `actual`, and say
`removed`. That is the lesson of study mode.

Kernel docs: proc(5) (status, stat, mountinfo), seccomp(2), landlock(7), ptrace(2),
             capabilities(7), PR_SET_NO_NEW_PRIVS in prctl(2).
Order:       the AGENT's step `probe.run`, after seccomp.install, in place of execve.execve.
Verify:      tests/test_verify.py runs `nsbox verify` for real: every row holds with the
             defaults, and the rows of a layer fail once `--without` removes it.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import socket
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nsbox import syscalls
from nsbox.layers import landlock as landlock_layer
from nsbox.layers import mountns as mountns_layer
from nsbox.layers import netns as netns_layer

if TYPE_CHECKING:
    from nsbox.launch import Plans
    from nsbox.layers.seccomp import SeccompPlan

ZERO = "0000000000000000"
CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
AF_VSOCK = 40
TIOCSTI_HIGH_BITS = 0xFFFFFFFF00000000 | syscalls.TIOCSTI  # CVE-2019-10063: the kernel reads 32 bits
BAD_FD = 999
PR_GET_NO_NEW_PRIVS = 39
# The after-execve checks: sh builtins only, so no binary of the rootfs beyond /bin/sh runs.
SH_STATUS = ('while IFS= read -r l; do case "$l" in Cap*|NoNewPrivs*|Seccomp:*) echo "$l";; esac; '
             "done < /proc/self/status")


def _name(err: int) -> str:
    return errno.errorcode.get(err, str(err))


def _answer(ret: int) -> str:
    """A raw call's result as a word: 'ok', or the errno's name."""
    return "ok" if ret >= 0 else _name(-ret)


def _attempt(fn: Callable[[], object]) -> str:
    try:
        fn()
    except OSError as e:
        return _name(e.errno or 0)
    return "ok"


def _status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        return f"error {_name(e.errno or 0)}"


# mountinfo escapes space, tab, newline and backslash as \ooo. Not bytes.decode("unicode_escape"):
# that codec would be imported lazily, and after pivot_root an image has no Python library.
_OCTAL = re.compile(r"\\([0-7]{3})")


def _mountinfo() -> list[tuple[str, str]]:
    """(mount point, per-mount options) of every mount this process sees."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" - ", 1)[0].split()
            out.append((_OCTAL.sub(lambda m: chr(int(m[1], 8)), fields[4]), fields[5]))
    return out


# ---- what the seccomp profile answers ---------------------------------------------------

_MASKED = re.compile(r"^\(arg(\d) & (0x[0-9a-f]+)\) == (0x[0-9a-f]+)$")
_COMPARE = re.compile(r"^arg(\d) (==|!=|<|<=|>|>=) (0x[0-9a-f]+)$")


def _condition_holds(cond: str, args: tuple[int, ...]) -> bool:
    if m := _MASKED.match(cond):
        i, mask, value = int(m[1]), int(m[2], 16), int(m[3], 16)
        return i < len(args) and (args[i] & mask) == value
    if m := _COMPARE.match(cond):
        i, op, value = int(m[1]), m[2], int(m[3], 16)
        a = args[i] if i < len(args) else 0
        return {"==": a == value, "!=": a != value, "<": a < value, "<=": a <= value,
                ">": a > value, ">=": a >= value}[op]
    return False


def profile_answer(plan: SeccompPlan, syscall: str, args: tuple[int, ...] = ()) -> str:
    """The profile's action for this call: "errno EPERM", "allow", "kill_process"...

    nsbox's semantics (seccomp/README.md): a conditional rule is an exception to the
    unconditional rule for the same call; a call no rule names gets the default action.
    """
    rules = [r for r in plan.rules if syscall in r.syscalls]
    for r in rules:
        if r.conditions and all(_condition_holds(c, args) for c in r.conditions):
            return r.action
    return next((r.action for r in rules if not r.conditions), plan.default_action)


# ---- the battery ------------------------------------------------------------------------


class _Rows:
    def __init__(self, removed: tuple[str, ...]) -> None:
        self.rows: list[dict[str, Any]] = []
        self.removed = removed

    def add(self, layer: str, what: str, expected: str, actual: str, ok: bool | None = None) -> None:
        self.rows.append({"layer": layer, "check": what, "expected": expected, "actual": actual,
                          "ok": expected == actual if ok is None else ok, "removed": layer in self.removed})

    def guarded(self, layer: str, fn: Callable[[], None]) -> None:
        """One layer's checks; a probe that breaks is a failed row, never a lost report."""
        try:
            fn()
        except Exception as e:  # reported as a row: the launcher must hear of it
            self.add(layer, "probe error", "no error", f"{type(e).__name__}: {e}", ok=False)


def run(plans: Plans) -> list[dict[str, Any]]:
    """The checks every sandbox must pass; each layer's plan says what it expects."""
    out = _Rows(tuple(plans.spec.without))
    status = _status()
    # The order matters twice: the pid list is read before the fork of the after-execve
    # checks, and the seccomp checks run before anything else could change the process.
    for layer, checks in (("userns", _userns), ("pidns", _pidns), ("mountns", _mountns), ("netns", _netns),
                          ("utsns", _utsns), ("caps", _caps), ("nnp", _nnp), ("seccomp", _seccomp),
                          ("landlock", _landlock), ("execve", _execve)):
        out.guarded(layer, functools.partial(checks, plans, status, out))
    out.guarded("execve", lambda: _after_execve(plans, out))
    return out.rows


def _try(syscall: str, args: tuple[int, ...]) -> str:
    ret = syscalls.try_syscall(syscall, *args)
    if ret >= 0 and syscall == "socket":
        os.close(ret)  # unfiltered, socket(AF_VSOCK) really makes one: the VM host's door
    return _answer(ret)


def _denial(plans: Plans, out: _Rows, layer: str, what: str, syscall: str, args: tuple[int, ...]) -> None:
    """A call the seccomp profile must refuse: expected the profile's errno, never the kernel's."""
    if plans.seccomp is None:
        out.add(layer, what, "refused by the filter", f"{_try(syscall, args)} (no filter: the kernel answered)",
                ok=False)
        return
    action = profile_answer(plans.seccomp, syscall, args)
    if action.startswith("errno "):
        out.add(layer, what, action.split()[1], _try(syscall, args))
    elif action in ("allow", "log"):
        out.add(layer, what, "allowed by this profile", f"{_try(syscall, args)} (the kernel answered)", ok=True)
    else:  # kill_process, kill_thread, trap: trying it would end the probe
        out.add(layer, what, f"{action} (by this profile)", "not tried: it would end the probe", ok=True)


def _userns(plans: Plans, status: dict[str, str], out: _Rows) -> None:
    u = plans.userns
    for name, inside, outside in (("uid_map", u.inside_uid, u.outside_uid), ("gid_map", u.inside_gid, u.outside_gid)):
        lines = [" ".join(line.split()) for line in _read(f"/proc/self/{name}").splitlines()]
        out.add("userns", name, f"{inside} {outside} 1", " | ".join(lines))
    out.add("userns", "setgroups", "deny", _read("/proc/self/setgroups"))
    out.add("userns", "max_user_namespaces", "0", _read("/proc/sys/user/max_user_namespaces"))
    # Nested user namespaces are refused twice: by seccomp, and (without it) by the limit of 0.
    args = (int(syscalls.CloneFlag.CLONE_NEWUSER),)
    expected = "ENOSPC"
    if plans.seccomp is not None:
        action = profile_answer(plans.seccomp, "unshare", args)
        expected = action.split()[1] if action.startswith("errno ") else expected
    out.add("userns", "unshare(CLONE_NEWUSER)", expected, _answer(syscalls.try_syscall("unshare", *args)))


def _pidns(plans: Plans, status: dict[str, str], out: _Rows) -> None:
    out.add("pidns", "pid of the agent", "2", str(os.getpid()))
    out.add("pidns", "pids visible", "1 2", " ".join(sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int)))
    try:
        with open("/proc/1/cmdline", "rb") as f:
            cmdline = f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError as e:
        cmdline = f"error {_name(e.errno or 0)}"
    out.add("pidns", "/proc/1/cmdline", "nsbox:init", cmdline)

    def read_environ() -> None:
        with open("/proc/1/environ", "rb") as f:
            if f.read():
                raise OSError(0, "readable")  # a non-empty environ is the failure: reported as "0"
    out.add("pidns", "/proc/1/environ unreadable", "EACCES", _attempt(read_environ))
    ret = syscalls.try_syscall("ptrace", syscalls.PTRACE_ATTACH, 1, 0, 0)
    if ret >= 0:  # attached: let init go at once, then report the failure
        syscalls.try_syscall("ptrace", syscalls.PTRACE_DETACH, 1, 0, 0)
    out.add("pidns", "ptrace(PTRACE_ATTACH, 1)", "EPERM", _answer(ret))
    mem = _attempt(lambda: os.close(os.open("/proc/1/mem", os.O_RDWR)))
    out.add("pidns", "open /proc/1/mem", "EACCES or EPERM", mem, ok=mem in ("EACCES", "EPERM"))


def _create_and_remove(directory: str) -> None:
    path = os.path.join(directory, f".nsbox-verify-{os.getpid()}")
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    os.unlink(path)


def _mountns(plans: Plans, status: dict[str, str], out: _Rows) -> None:
    m = plans.mountns
    if m.root.image is None:
        out.add("mountns", "create a file in /usr", "EROFS", _attempt(lambda: _create_and_remove("/usr")))
        out.add("mountns", "create a file in /", "EROFS", _attempt(lambda: _create_and_remove("/")))
    # The mount is read-write; the host's permissions still apply (a project you cannot
    # write on the host is not writable inside either).
    out.add("mountns", "project writable" if m.project_writable else "project writable (not by you on the host)",
            "ok" if m.project_writable else "EACCES", _attempt(lambda: _create_and_remove(m.project)))
    out.add("mountns", "/oldroot, /newroot", "absent",
            "present" if any(os.path.lexists(p) for p in (mountns_layer.HOST, mountns_layer.NEW)) else "absent")
    mounts = _mountinfo()
    leaked = [p for p, _ in mounts if p.startswith((mountns_layer.HOST, mountns_layer.NEW))]
    out.add("mountns", "mounts of the old root", "none", " ".join(leaked) or "none")
    expected_dev = sorted(os.path.basename(x.target) for x in m.mounts if os.path.dirname(x.target) == "/dev")
    out.add("mountns", "/dev entries", " ".join(expected_dev), " ".join(sorted(os.listdir("/dev"))))
    out.add("mountns", "/dev/null", "char 1:3", _device("/dev/null"))
    for path in ("/proc/kcore", "/proc/keys"):
        actual = _device(path)
        out.add("mountns", f"{path} masked", "char 1:3 (/dev/null) or absent", actual,
                ok=actual in ("char 1:3", "absent"))
    options = next((opts for point, opts in reversed(mounts) if point == "/proc/sys"), "not a mount")
    out.add("mountns", "/proc/sys mount", "ro", options.split(",")[0])


def _device(path: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "absent"
    if not stat.S_ISCHR(st.st_mode):
        return "not a character device"
    return f"char {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _netns(plans: Plans, status: dict[str, str], out: _Rows) -> None:
    with open("/proc/net/dev") as f:
        interfaces = sorted(line.split(":", 1)[0].strip() for line in f.readlines()[2:])
    if not plans.netns.unshare:
        out.add("netns", "interfaces", "the host's (--network host)", " ".join(interfaces), ok=True)
        return
    out.add("netns", "interfaces", "lo", " ".join(interfaces))
    # lo as rtnetlink reports it (pyroute2, loaded by the launcher before the fork): the
    # kernel adds 127.0.0.1/8, and ::1/128 unless IPv6 is off in this namespace, as lo
    # comes up, so the addresses confirm the flag.
    # Caught here, so that a netlink failure still leaves the checks below to run.
    ipv6 = _read("/proc/sys/net/ipv6/conf/lo/disable_ipv6") == "0"
    try:
        lo = next((link for link in netns_layer.links() if link.name == "lo"), None)
        actual = "absent" if lo is None else " ".join(("UP" if lo.up else "DOWN", *lo.addresses))
    except Exception as e:  # pyroute2 raises its own errors besides OSError
        actual = f"error {type(e).__name__}: {e}"
    out.add("netns", "lo over rtnetlink", "UP 127.0.0.1/8" + (" ::1/128" if ipv6 else ""), actual)
    # A port nobody listens on: bind to learn a free one, close, then connect to it.
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        err = s.connect_ex(("127.0.0.1", port))
    out.add("netns", "connect 127.0.0.1 (closed port)", "ECONNREFUSED", _name(err) if err else "ok")
    if plans.mountns.root.image is not None:
        # glibc would load the NSS modules /etc/nsswitch.conf names from the image into
        # this process (CVE-2019-14271's class): the probe runs no code of the image.
        out.add("netns", "getaddrinfo(example.com)", "fails", "not tried: the image's NSS modules", ok=True)
        return
    try:
        socket.getaddrinfo(b"example.com", 443, proto=socket.IPPROTO_TCP)  # bytes: no lazy idna import
        resolved = "resolved"
    except socket.gaierror as e:
        resolved = f"fails ({e.strerror})"
    except OSError as e:
        resolved = f"fails ({_name(e.errno or 0)})"
    out.add("netns", "getaddrinfo(example.com)", "fails", resolved, ok=resolved.startswith("fails"))


def _utsns(plans: Plans, status: dict[str, str], out: _Rows) -> None:
    out.add("utsns", "hostname", plans.utsns.hostname, os.uname().nodename)


def _caps(plans: Plans, status: dict[str, str], out: _Rows) -> None:
    for field in CAP_FIELDS:
        out.add("caps", field, ZERO, status.get(field, "?"))
    # The same name again: with caps dropped this changes nothing even if it succeeded.
    out.add("caps", "sethostname", "EPERM", _attempt(lambda: socket.sethostname(plans.utsns.hostname)))


def _nnp(plans: Plans, status: dict[str, str], out: _Rows) -> None:
    out.add("nnp", "NoNewPrivs", "1", status.get("NoNewPrivs", "?"))
    out.add("nnp", "PR_GET_NO_NEW_PRIVS", "1", str(syscalls.prctl(PR_GET_NO_NEW_PRIVS)))
    # The kernel offers no way back: any argument but 1 is EINVAL.
    out.add("nnp", "PR_SET_NO_NEW_PRIVS 0", "EINVAL",
            _attempt(lambda: syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 0)))


def _seccomp(plans: Plans, status: dict[str, str], out: _Rows) -> None:
    out.add("seccomp", "Seccomp", "2", status.get("Seccomp", "?"))
    filters = status.get("Seccomp_filters", "0")
    out.add("seccomp", "Seccomp_filters", ">= 1", filters, ok=filters.isdigit() and int(filters) >= 1)
    bad = syscalls.bad_address()
    _denial(plans, out, "seccomp", "keyctl", "keyctl", (0, 0, 0, 0, 0))
    _denial(plans, out, "seccomp", "bpf", "bpf", (0, bad, 16))
    _denial(plans, out, "seccomp", "io_uring_setup", "io_uring_setup", (1, bad))
    _denial(plans, out, "seccomp", "socket(AF_VSOCK)", "socket", (AF_VSOCK, socket.SOCK_STREAM, 0))
    _denial(plans, out, "seccomp", "ioctl TIOCSTI, high bits set", "ioctl", (BAD_FD, TIOCSTI_HIGH_BITS, bad))
    _denial(plans, out, "seccomp", "clone3", "clone3", (bad, 88))


def _landlock(plans: Plans, status: dict[str, str], out: _Rows) -> None:
    p = plans.landlock
    if p is not None and not p.enabled:
        out.add("landlock", "applied", f"no: {p.unavailable}", f"no: {p.unavailable}")
        return
    # /proc/self/comm is on a writable mount and writable by its owner: only Landlock
    # refuses it (a write there would only rename this thread). The agent inherited
    # init's "not dumpable", which makes /proc/self root's; execve would make it dumpable
    # again, so the probe does that first, as the agent's command will be.
    writable = [path for path, rights in p.rules if rights == p.handled_fs] if p is not None else []
    target = "/proc/self/comm"
    if not any(target == w or target.startswith(w.rstrip("/") + "/") for w in writable):
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 1)
        out.add("landlock", f"open {target} for writing", "EACCES",
                _attempt(lambda: os.close(os.open(target, os.O_WRONLY))))
    abi = p.abi if p is not None else _abi()
    if abi >= 6 and (p is None or p.scoped & landlock_layer.SCOPE_SIGNAL):
        # Signal 0 delivers nothing; the scope check applies to it all the same.
        out.add("landlock", "kill(1, 0) across the domain", "EPERM", _attempt(lambda: os.kill(1, 0)))


def _abi() -> int:
    try:
        return syscalls.landlock_abi_version()
    except OSError:
        return 0


def _execve(plans: Plans, status: dict[str, str], out: _Rows) -> None:
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    kept = [fd for fd in fds if _inheritable(fd)]
    out.add("execve", "fds kept across execve", "0 1 2", " ".join(map(str, kept)))
    out.add("execve", "SigIgn", ZERO, status.get("SigIgn", "?"))
    out.add("execve", "SigBlk", ZERO, status.get("SigBlk", "?"))
    out.add("execve", "session leader", "yes", "yes" if os.getsid(0) == os.getpid() else "no")
    out.add("execve", "controlling terminal", "a pty of the sandbox" if plans.execve.tty else "none", _ctty())


def _inheritable(fd: int) -> bool:
    try:
        return os.get_inheritable(fd)
    except OSError:
        return False  # the directory fd listdir used, already closed


def _ctty() -> str:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tty_nr = int(fields[4])  # field 7 of proc(5)
    if tty_nr == 0:
        return "none"
    for name in os.listdir("/dev/pts"):
        path = f"/dev/pts/{name}"
        if name.isdigit() and os.stat(path).st_rdev == tty_nr:
            return "a pty of the sandbox"
    return f"a terminal from outside ({os.major(tty_nr)}:{os.minor(tty_nr)})"


def _after_execve(plans: Plans, out: _Rows) -> None:
    """caps, nnp and seccomp as a program sees them after execve (battery 40, 43, 51).

    The probe itself runs before execve: a capability set that execve would clear for a
    non-root uid still shows above. Here /bin/sh reads its own status after the exec.
    """
    if not os.access("/bin/sh", os.X_OK):
        out.add("execve", "after execve (/bin/sh)", "checked", "not tried: no /bin/sh in this root", ok=True)
        return
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child only execs or exits
        try:
            os.dup2(w, 1)
            os.execve("/bin/sh", ["sh", "-c", SH_STATUS], {})
        finally:
            os._exit(127)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 4096):
        chunks.append(chunk)
    os.close(r)
    _, wstatus = os.waitpid(pid, 0)
    after = {k: v.strip() for k, v in (line.split(":", 1) for line in b"".join(chunks).decode().splitlines()
                                        if ":" in line)}
    if os.waitstatus_to_exitcode(wstatus) != 0 or not after:
        out.add("execve", "after execve (/bin/sh)", "exit 0", f"exit {os.waitstatus_to_exitcode(wstatus)}", ok=False)
        return
    raised = [f"{k}={after.get(k, '?')}" for k in CAP_FIELDS if after.get(k) != ZERO]
    out.add("caps", "after execve: all five sets", "0", " ".join(raised) or "0")
    out.add("nnp", "after execve: NoNewPrivs", "1", after.get("NoNewPrivs", "?"))
    out.add("seccomp", "after execve: Seccomp", "2", after.get("Seccomp", "?"))
