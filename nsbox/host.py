"""HostFacts: what this kernel and this user allow nsbox to do, probed once.

What it does: reads sysctls, /proc/self/{cgroup,mountinfo,uid_map,status}, container
markers, /etc/subuid and $PATH, and tries the two things that cannot be read, only
attempted (a user namespace; an overlay mount inside one), each in a throwaway child
process that exits at once: nothing on the system changes. `nsbox doctor` prints the
facts with the exact fix for each gap; `hints.py` reuses the same reads for the `why:`
and `fix:` lines of a failed run.

    unprivileged user namespaces   user.max_user_namespaces, Debian's
                                   kernel.unprivileged_userns_clone, Ubuntu's
                                   kernel.apparmor_restrict_unprivileged_userns
    a container around us          /.dockerenv, /run/.containerenv, /proc/1/cgroup,
                                   the root's fstype, masked /proc paths
    cgroups                        v2, hybrid or v1; delegated or not (layers/cgroups.probe)
    overlayfs in a user namespace  tried on a tmpfs in a fresh user+mount namespace
    Landlock, seccomp, libseccomp  the ABI, the Seccomp field, the library's version
    newuidmap, /etc/subuid         for subordinate id ranges
    pasta, slirp4netns             for user-mode networking

Kernel docs: user_namespaces(7) ("/proc/sys/user"), cgroups(7), overlayfs.rst
             ("Non-root users"), landlock(7), seccomp(2), subuid(5).
Order:       before anything else: the launcher reads these when it explains a failure,
             and `nsbox doctor` on its own.
Verify:      tests/test_doctor.py: `nsbox doctor --json` parses, user namespaces are
             reported unavailable (with the fix) inside an outer user namespace whose
             max_user_namespaces is 0, and this host's hybrid cgroups are named.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from nsbox import syscalls
from nsbox.layers import cgroups, landlock
from nsbox.syscalls import CloneFlag, MountFlag

SYSCTLS = {
    "max_user_namespaces": "/proc/sys/user/max_user_namespaces",
    "unprivileged_userns_clone": "/proc/sys/kernel/unprivileged_userns_clone",  # Debian's patch
    "apparmor_restrict_unprivileged_userns": "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",  # Ubuntu
}
INITIAL_UID_MAP = "0 0 4294967295"  # the initial user namespace maps every id to itself
CONTAINER_CGROUP_WORDS = ("docker", "kubepods", "containerd", "libpod", "lxc", "garden", "crio")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def userns_sysctls() -> dict[str, str | None]:
    """The sysctls that decide unprivileged user namespaces (None: this kernel has no such knob)."""
    return {name: _read(path) for name, path in SYSCTLS.items()}


def in_outer_userns() -> bool:
    """True when this process already runs inside a user namespace (not the initial one)."""
    return " ".join((_read("/proc/self/uid_map") or INITIAL_UID_MAP).split()) != INITIAL_UID_MAP


def apparmor_profile(executable: str) -> str:
    """An AppArmor profile that lets `executable` create user namespaces (Ubuntu >= 23.10)."""
    return (
        "abi <abi/4.0>,\n"
        "include <tunables/global>\n\n"
        f"profile nsbox {executable} flags=(unconfined) {{\n"
        "  userns,\n\n"
        "  include if exists <local/nsbox>\n"
        "}\n"
    )


def interpreter() -> str:
    # AppArmor attaches a profile to the executable's resolved path, not a venv's symlink.
    return os.path.realpath(sys.executable)


def userns_why_fix(err: int | None, sysctls: dict[str, str | None], outer: bool) -> tuple[str, str]:
    """Why unprivileged user namespaces fail here and the exact fix, from what the host says."""
    maximum = sysctls.get("max_user_namespaces")
    clone = sysctls.get("unprivileged_userns_clone")
    apparmor = sysctls.get("apparmor_restrict_unprivileged_userns")
    persist = "(to keep it after a reboot, put the same setting in /etc/sysctl.d/90-nsbox.conf)"
    if maximum == "0" and outer:
        return ("this process runs inside a user namespace whose user.max_user_namespaces is 0: whoever made "
                "it disabled nesting (another sandbox, or bubblewrap --disable-userns)",
                "run nsbox outside the enclosing sandbox; it cannot be fixed from inside")
    if maximum == "0" or err == 28:  # ENOSPC
        return (f"user.max_user_namespaces is {maximum} (the limit is reached)",
                f"sudo sysctl -w user.max_user_namespaces=15000 {persist}")
    if clone == "0":
        return ("kernel.unprivileged_userns_clone is 0 (Debian's switch for unprivileged user namespaces)",
                f"sudo sysctl -w kernel.unprivileged_userns_clone=1 {persist}")
    if apparmor == "1":
        profile = apparmor_profile(interpreter()).replace("\n", "\\n")
        return ("kernel.apparmor_restrict_unprivileged_userns is 1: AppArmor lets only profiled programs "
                "create user namespaces (Ubuntu)",
                f"allow nsbox's interpreter: printf '{profile}' | sudo tee /etc/apparmor.d/nsbox && "
                "sudo apparmor_parser -r /etc/apparmor.d/nsbox")
    return ("unshare(CLONE_NEWUSER) is refused, though no sysctl forbids it: a seccomp filter of an "
            "enclosing container (Docker's and podman's defaults refuse unshare) or an LSM refuses it",
            "run nsbox on the host, or start the container with --security-opt seccomp=unconfined "
            "(podman: also --security-opt unmask=/proc/*)")


# ---- probes in throwaway children -------------------------------------------------------


def _in_child(body: Any) -> tuple[str, int]:
    """Run body() in a forked child; return the (step, errno) it reports ("", 0 = success).

    The child leaves only through os._exit, and reports one line on a pipe.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        message = b""
        try:
            body()
        except OSError as e:
            message = f"{getattr(e, 'step', 'call')} {e.errno or 0}".encode()
        except BaseException as e:  # anything else is reported too: nothing may raise out of a fork
            message = f"{type(e).__name__} 0".encode()
        finally:
            try:
                os.write(w, message)
            finally:
                os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        report = f.read().decode()
    os.waitpid(pid, 0)
    if not report:
        return "", 0
    step, _, number = report.rpartition(" ")
    return step, int(number)


class _Step(OSError):
    step: str


def _step(name: str, fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except OSError as e:
        err = _Step(e.errno, e.strerror)
        err.step = name
        raise err from None


def _try_userns() -> None:
    _step("unshare(CLONE_NEWUSER)", syscalls.unshare, CloneFlag.CLONE_NEWUSER)


def _try_overlay() -> None:
    uid, gid = os.getuid(), os.getgid()
    _step("unshare(CLONE_NEWUSER|CLONE_NEWNS)", syscalls.unshare, CloneFlag.CLONE_NEWUSER | CloneFlag.CLONE_NEWNS)

    def maps() -> None:
        # An unprivileged process may map only its own ids, after denying setgroups.
        for name, content in (("setgroups", "deny"), ("gid_map", f"0 {gid} 1"), ("uid_map", f"0 {uid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(content)

    _step("write /proc/self/uid_map", maps)
    _step("mount --make-rprivate /", syscalls.mount, None, "/", None, MountFlag.MS_REC | MountFlag.MS_PRIVATE)
    # A tmpfs over /tmp, in this throwaway mount namespace only: the overlay's layers live there.
    _step("mount tmpfs", syscalls.mount, "tmpfs", "/tmp", "tmpfs", MountFlag.MS_NOSUID | MountFlag.MS_NODEV)
    for d in ("lower", "upper", "work", "merged"):
        os.mkdir(f"/tmp/{d}")
    options = "lowerdir=/tmp/lower,upperdir=/tmp/upper,workdir=/tmp/work"
    try:
        syscalls.mount("overlay", "/tmp/merged", "overlay", MountFlag.MS_NONE, options)
    except OSError:
        # Kernels 5.11+ mount overlay in a user namespace; some need user.* xattrs for it.
        _step("mount overlay", syscalls.mount, "overlay", "/tmp/merged", "overlay", MountFlag.MS_NONE,
              options + ",userxattr")


# ---- the facts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """One line of `nsbox doctor`: what this host allows, and the exact fix where it does not."""

    name: str
    ok: bool
    summary: str
    fix: str | None = None
    required: bool = False  # nsbox cannot run at all without it
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HostFacts:
    user: str
    uid: int
    interpreter: str
    sysctls: dict[str, str | None]
    outer_userns: bool
    userns: tuple[str, int]  # ("", 0): an unprivileged user namespace could be created
    container_signs: tuple[str, ...]  # strong evidence of an enclosing container
    container_markers: tuple[str, ...]  # weak evidence (a marker file alone)
    root_fstype: str
    masked_proc: tuple[str, ...]  # mounts over paths below /proc: a new procfs will be refused
    cgroup_lines: tuple[str, ...]  # /proc/self/cgroup
    cgroup: cgroups.CgroupHost
    overlay: tuple[str, int]
    landlock_abi: int
    landlock_problem: str | None
    seccomp_field: str | None  # /proc/self/status "Seccomp:", None: kernel without seccomp
    libseccomp: str | None
    libseccomp_problem: str | None
    newuidmap: str | None
    newgidmap: str | None
    subuid: tuple[str, ...]
    subgid: tuple[str, ...]
    pasta: str | None
    slirp4netns: str | None

    def facts(self) -> list[Fact]:
        return [self._userns(), self._container(), self._cgroup(), self._overlay(), self._landlock(),
                self._seccomp(), self._libseccomp(), self._subuid(), self._user_net()]

    def _userns(self) -> Fact:
        details = {"sysctls": self.sysctls, "outer_userns": self.outer_userns}
        if self.userns == ("", 0):
            return Fact("userns", True, "unprivileged user namespaces: available "
                        f"(user.max_user_namespaces={self.sysctls['max_user_namespaces']})",
                        required=True, details=details)
        why, fix = userns_why_fix(self.userns[1], self.sysctls, self.outer_userns)
        return Fact("userns", False, f"unprivileged user namespaces: UNAVAILABLE, {self.userns[0]} failed: "
                    f"{os.strerror(self.userns[1])}; {why}", fix, required=True, details=details)

    def _container(self) -> Fact:
        details = {"signs": list(self.container_signs), "markers": list(self.container_markers),
                   "root_fstype": self.root_fstype, "masked_proc": list(self.masked_proc)}
        blocks = []
        if self.masked_proc:
            blocks.append(f"/proc has {len(self.masked_proc)} masked path(s) ({', '.join(self.masked_proc[:3])}...): "
                          "the kernel refuses the sandbox a new procfs (pidns.mount_proc: EPERM)")
        if self.userns != ("", 0):
            blocks.append("user namespaces are refused here (see userns)")
        if self.container_signs:
            summary = f"inside a container ({'; '.join(self.container_signs)})"
            summary += (": it blocks " + "; ".join(blocks)) if blocks else ": nothing nsbox needs is blocked"
            fix = ("run nsbox on the host, or give the container an unmasked /proc and no seccomp filter on "
                   "unshare (docker run --security-opt seccomp=unconfined --security-opt systempaths=unconfined)"
                   if blocks else None)
            return Fact("container", not blocks, summary, fix, details=details)
        if self.container_markers:
            summary = (f"not in a container, as far as nsbox can tell: {', '.join(self.container_markers)} exists, "
                       f"but PID 1's cgroup is not a container's and / is {self.root_fstype} "
                       "(an image built by a container tool, booted as a machine)")
        else:
            summary = "not in a container"
        if blocks:
            return Fact("container", False, summary + "; yet " + "; ".join(blocks),
                        "run nsbox where /proc is not masked", details=details)
        return Fact("container", True, summary, details=details)

    def _cgroup(self) -> Fact:
        cg = self.cgroup
        details = {"proc_self_cgroup": list(self.cgroup_lines), "v2_base": cg.v2_base,
                   "v2_controllers": sorted(cg.v2_controllers), "v2_problem": cg.v2_problem,
                   "scope_problem": cg.scope_problem, "v1_writable": dict(cg.v1_bases), "v1_problem": cg.v1_problem}
        v1 = [line for line in self.cgroup_lines if not line.startswith("0::")]
        hybrid = bool(v1) and any(line.startswith("0::") for line in self.cgroup_lines)
        if cg.v2_problem is None:
            return Fact("cgroup", True, f"cgroup v2, delegated: leaves go beneath {cg.v2_base} "
                        f"(controllers: {' '.join(sorted(cg.v2_controllers))})", details=details)
        if cg.scope_problem is None:
            return Fact("cgroup", True, "cgroup v2 through a delegated systemd --user scope "
                        f"(controllers: {' '.join(sorted(cg.scope_controllers))}); {cg.v2_problem}", details=details)
        fallback = (f"limits fall back to cgroup v1 ({', '.join(c for c, _ in cg.v1_bases)} writable)"
                    if cg.v1_bases else "--memory/--cpus/--pids fall back to rlimits (weaker; "
                    "refused unless --limits best-effort)")
        if hybrid:
            controllers = sorted({c for line in v1 for c in line.split(":")[1].split(",") if c})
            summary = (f"HYBRID cgroups: v2 at {cg.v2_base or '(unified)'} offers only "
                       f"{' '.join(sorted(cg.v2_controllers)) or 'no controller'}; "
                       f"{', '.join(c for c in controllers if c in ('memory', 'cpu', 'pids'))} are bound to "
                       f"cgroup v1, so nsbox cannot use cgroup v2 here; {fallback}")
            fix = ("boot with cgroup v2 only: add systemd.unified_cgroup_hierarchy=1 cgroup_no_v1=all to "
                   "GRUB_CMDLINE_LINUX in /etc/default/grub, run update-grub, reboot; then run nsbox in a "
                   "delegated subtree (a systemd user session, or systemd-run --user --scope -p Delegate=yes)")
            return Fact("cgroup", False, summary, fix, details=details)
        if not any(line.startswith("0::") for line in self.cgroup_lines):
            return Fact("cgroup", False, f"cgroup v1 only; {fallback}",
                        "boot with systemd.unified_cgroup_hierarchy=1 (cgroup v2)", details=details)
        return Fact("cgroup", False, f"cgroup v2, not delegated to you: {cg.v2_problem}; {fallback}",
                    "run nsbox from a systemd user session (systemd-run --user --scope -p Delegate=yes nsbox ...), "
                    f"or have root chown a subtree to uid {self.uid} and start your shell inside it",
                    details=details)

    def _overlay(self) -> Fact:
        if self.overlay == ("", 0):
            return Fact("overlayfs", True, "overlayfs in a user namespace: works (--image roots are writable "
                        "overlays)")
        step, err = self.overlay
        return Fact("overlayfs", False, f"overlayfs in a user namespace: UNAVAILABLE ({step}: "
                    f"{os.strerror(err) if err else 'failed'}); --image falls back to a read-only root",
                    "use Linux >= 5.11 (unprivileged overlay mounts), with CONFIG_OVERLAY_FS"
                    if self.userns == ("", 0) else "first make user namespaces available (see userns)")

    def _landlock(self) -> Fact:
        if self.landlock_abi:
            scope = "; ABI >= 6: signals and abstract sockets scoped" if self.landlock_abi >= 6 else ""
            return Fact("landlock", True, f"Landlock ABI {self.landlock_abi}{scope}")
        return Fact("landlock", False, f"Landlock: UNAVAILABLE ({self.landlock_problem}); file writes are limited "
                    "by the mount table only", "use Linux >= 5.13 with CONFIG_SECURITY_LANDLOCK=y and landlock "
                    "in the lsm= kernel parameter (e.g. lsm=landlock,lockdown,yama,integrity,apparmor,bpf)")

    def _seccomp(self) -> Fact:
        if self.seccomp_field is None:
            return Fact("seccomp", False, "seccomp: this kernel has no seccomp filter support",
                        "use a kernel built with CONFIG_SECCOMP_FILTER=y", required=True)
        already = {"0": "this process is not filtered", "1": "this process is in strict mode",
                   "2": "this process is already filtered (an enclosing container?); nsbox's filter stacks on it"}
        return Fact("seccomp", True, f"seccomp filters: supported (Seccomp: {self.seccomp_field}, "
                    f"{already.get(self.seccomp_field, '?')})", required=True)

    def _libseccomp(self) -> Fact:
        if self.libseccomp:
            return Fact("libseccomp", True, f"libseccomp {self.libseccomp}", required=True)
        return Fact("libseccomp", False, f"libseccomp: UNAVAILABLE ({self.libseccomp_problem})",
                    "sudo apt-get install libseccomp2 (and pip install pyseccomp in nsbox's environment)",
                    required=True)

    def _subuid(self) -> Fact:
        details = {"newuidmap": self.newuidmap, "newgidmap": self.newgidmap, "subuid": list(self.subuid),
                   "subgid": list(self.subgid)}
        if self.newuidmap and self.newgidmap and self.subuid and self.subgid:
            return Fact("subuid", True, f"subordinate ids: {self.newuidmap}, /etc/subuid {', '.join(self.subuid)}, "
                        f"/etc/subgid {', '.join(self.subgid)}", details=details)
        missing = []
        fixes = []
        if not (self.newuidmap and self.newgidmap):
            missing.append("newuidmap/newgidmap not installed")
            fixes.append("sudo apt-get install uidmap")
        if not (self.subuid and self.subgid):
            missing.append(f"no /etc/subuid or /etc/subgid range for {self.user}")
            fixes.append(f"sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {self.user}")
        return Fact("subuid", False, "subordinate ids: " + "; ".join(missing) + " (only one id is mapped; "
                    "nsbox needs no more)", " && ".join(fixes), details=details)

    def _user_net(self) -> Fact:
        found = [f"{name} ({path})" for name, path in (("pasta", self.pasta), ("slirp4netns", self.slirp4netns))
                 if path]
        if found:
            return Fact("user-networking", True, f"user-mode networking: {', '.join(found)}")
        return Fact("user-networking", False, "user-mode networking: neither pasta nor slirp4netns is installed "
                    "(--network none and allowlist do not need them)", "sudo apt-get install passt (or slirp4netns)")


def _container_evidence() -> tuple[tuple[str, ...], tuple[str, ...], str, tuple[str, ...]]:
    signs, markers = [], []
    if os.path.exists("/run/.containerenv"):
        signs.append("/run/.containerenv (podman)")
    if os.path.exists("/.dockerenv"):
        markers.append("/.dockerenv")
    pid1 = _read("/proc/1/cgroup") or ""
    words = sorted({w for w in CONTAINER_CGROUP_WORDS if w in pid1})
    if words:
        signs.append(f"PID 1's cgroup names {', '.join(words)}")
    root_fstype = "?"
    masked: list[str] = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, right = line.split(" - ", 1)
                point = left.split()[4]
                if point == "/":
                    root_fstype = right.split()[0]
                elif point.startswith("/proc/") and point != "/proc/sys/fs/binfmt_misc":
                    # binfmt_misc sits on an empty, permanent directory: the kernel allows it.
                    masked.append(point)
    except OSError:
        pass
    if root_fstype == "overlay":
        signs.append("/ is an overlay")
    if markers and (signs or root_fstype == "overlay"):
        signs += [f"{m} exists" for m in markers]
        markers = []
    return tuple(signs), tuple(markers), root_fstype, tuple(masked)


def _ranges(path: str, user: str, uid: int) -> tuple[str, ...]:
    out = []
    for line in (_read(path) or "").splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (user, str(uid)):
            out.append(f"{parts[1]}+{parts[2]}")
    return tuple(out)


def _libseccomp() -> tuple[str | None, str | None]:
    try:
        from nsbox.layers import seccomp  # pyseccomp loads libseccomp at import
    except (ImportError, OSError) as e:
        return None, str(e)
    try:
        return seccomp.libseccomp_version(), None
    except (OSError, AttributeError) as e:
        return None, str(e)


@functools.cache
def probe() -> HostFacts:
    """Probe this host once (per process). Changes nothing: the attempts run in throwaway children."""
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    signs, markers, root_fstype, masked = _container_evidence()
    abi, abi_problem = landlock.probe_abi()
    status = _read("/proc/self/status") or ""
    seccomp_field = next((line.split(":", 1)[1].strip() for line in status.splitlines()
                          if line.startswith("Seccomp:")), None)
    lib, lib_problem = _libseccomp()
    return HostFacts(
        user=user, uid=uid, interpreter=interpreter(), sysctls=userns_sysctls(), outer_userns=in_outer_userns(),
        userns=_in_child(_try_userns), container_signs=signs, container_markers=markers,
        root_fstype=root_fstype, masked_proc=masked,
        cgroup_lines=tuple((_read("/proc/self/cgroup") or "").splitlines()), cgroup=cgroups.probe(),
        overlay=_in_child(_try_overlay), landlock_abi=abi, landlock_problem=abi_problem,
        seccomp_field=seccomp_field, libseccomp=lib, libseccomp_problem=lib_problem,
        newuidmap=shutil.which("newuidmap"), newgidmap=shutil.which("newgidmap"),
        subuid=_ranges("/etc/subuid", user, uid), subgid=_ranges("/etc/subgid", user, uid),
        pasta=shutil.which("pasta"), slirp4netns=shutil.which("slirp4netns"),
    )


def as_json(facts: HostFacts) -> dict[str, Any]:
    lines = facts.facts()
    return {"ok": all(f.ok for f in lines if f.required), "facts": [asdict(f) for f in lines]}
