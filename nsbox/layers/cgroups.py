"""cgroups: how much memory, CPU time and how many processes the sandbox may use.

The namespaces decide what the agent can see; this layer decides how much of the machine
it can take. One leaf cgroup per sandbox holds the holder, init and the agent:

    memory.max         hard limit on resident memory (page cache included)
    memory.swap.max 0  no escape into swap: at the limit the OOM killer acts
    memory.oom.group 1 the OOM killer takes the whole sandbox, never half of it
    cpu.max            "<quota> <period>" microseconds: 0.5 CPUs is "50000 100000"
    pids.max           processes and threads: fork() fails with EAGAIN at the limit

What an unprivileged user may do: nothing, unless someone delegated a cgroup v2 subtree
to them (systemd does for `user@.service` and for `systemd-run --user -p Delegate=yes`).
Within a delegated subtree the user creates children, enables the controllers the parent
offers (`cgroup.subtree_control`) and moves its own processes between cgroups whose
common ancestor it may write. Two kernel rules shape the code:

  - No internal processes: controllers can be enabled for a cgroup's children only while
    the cgroup itself holds no process. nsbox therefore first moves *itself* into a leaf
    `nsbox-launcher-<pid>` beneath its own cgroup, and refuses when other processes share
    that cgroup (it must not move what it did not start).
  - Beneath, never beside: nsbox creates cgroups only inside the one it runs in.

Mechanisms, strongest first; every run says which one enforces each limit, and a limit
is never dropped in silence (`best_effort=False` refuses instead of weakening):

    cgroup2        a leaf beneath nsbox's own, delegated, cgroup v2 cgroup
    systemd-scope  not delegated, but a systemd user instance is: nsbox re-executes itself
                   in `systemd-run --user --scope -p Delegate=yes` and then uses cgroup2
    cgroup1        an administrator delegated a v1 hierarchy beneath nsbox's cgroup
                   (the cgroup itself, or its child `nsbox-<user>`, writable by the user);
                   driven through cgroupspy, the only module that imports it
    rlimits        RLIMIT_AS for memory (address space, not resident memory: runtimes that
                   reserve big heaps fail early), RLIMIT_NPROC for processes (counted per
                   uid, across every process of the user, not only the sandbox's); no rlimit
                   expresses a CPU share, so `cpus` is not enforceable this way

Kernel docs: Documentation/admin-guide/cgroup-v2.rst (Delegation, "No Internal Process
             Constraint", memory/cpu/pids interface files); cgroups(7); setrlimit(2);
             Documentation/admin-guide/cgroup-v1/{memory,pids}.rst.
Order:       plan in the LAUNCHER (probes, changes nothing); create in the LAUNCHER before
             process.fork_holder; enter the holder before it forks init (and before it
             unshares the cgroup namespace, so the sandbox's cgroup root is the leaf);
             apply_rlimits in the HOLDER or AGENT; usage, then remove, after the holder
             exits (kill first on timeout).
Verify:      inside, /proc/self/cgroup reads "0::/"; allocating past --memory ends in an
             OOM kill counted in memory.events; a fork loop meets EAGAIN at --pids; the
             leaf is gone after the run.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import pwd
import re
import resource
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from nsbox.errors import StepError, acting

if TYPE_CHECKING:
    from cgroupspy.controllers import Controller
    from cgroupspy.nodes import Node

NONE, CGROUP2, SCOPE, CGROUP1, RLIMITS = "none", "cgroup2", "systemd-scope", "cgroup1", "rlimits"
MECHANISMS = (NONE, CGROUP2, SCOPE, CGROUP1, RLIMITS)

# Each limit and the controller (v2 and v1 alike) that enforces it.
CONTROLLER = {"memory": "memory", "cpus": "cpu", "pids": "pids"}
CPU_PERIOD_USEC = 100_000
# Set in the environment of the re-executed nsbox, so it never re-executes twice.
SCOPE_ENV = "NSBOX_CGROUP_SCOPE"
LAUNCHER_LEAF = "nsbox-launcher-{pid}"

PROC_SELF_CGROUP = "/proc/self/cgroup"
PROC_SELF_MOUNTINFO = "/proc/self/mountinfo"


def _which(program: str) -> str | None:
    import shutil  # here, not at the top: shutil loads bz2 and lzma, and most runs need no PATH search

    return shutil.which(program)


def format_size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


# ---- what the host allows -----------------------------------------------------------------


class CgroupHost(NamedTuple):
    """What this host and user may do with cgroups. `probe()` fills it; tests may build one."""

    v2_base: str | None = None  # the delegated cgroup v2 directory leaves would go beneath
    v2_controllers: frozenset[str] = frozenset()  # what v2_base offers its children
    v2_enabled: frozenset[str] = frozenset()  # already in v2_base/cgroup.subtree_control
    v2_move_launcher: bool = False  # the no-internal-processes rule: leave v2_base first
    v2_problem: str | None = "cgroup2 was not probed"  # why cgroup2 cannot be used, or None
    scope_controllers: frozenset[str] = frozenset()  # what a systemd --user scope would get
    scope_problem: str | None = "systemd was not probed"
    v1_bases: tuple[tuple[str, str], ...] = ()  # (controller, writable v1 directory)
    v1_problem: str | None = "cgroup v1 was not probed"

    def v1_base(self, controller: str) -> str | None:
        return dict(self.v1_bases).get(controller)


def _own_cgroups() -> list[tuple[str, str]]:
    """(controllers, path) per hierarchy of /proc/self/cgroup; v2 has controllers ''."""
    out = []
    with open(PROC_SELF_CGROUP) as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            out.append((controllers, path))
    return out


def _mounts() -> list[tuple[str, str, str, str]]:
    """(root, mount point, fstype, super options) of every cgroup mount, from mountinfo."""
    out = []
    with open(PROC_SELF_MOUNTINFO) as f:
        for line in f:
            left, right = line.split(" - ", 1)
            fields, (fstype, _source, options) = left.split(), right.split()[:3]
            if fstype in ("cgroup", "cgroup2"):
                # mountinfo escapes spaces and backslashes in paths as octal (\040).
                root, point = (p.encode().decode("unicode_escape") for p in (fields[3], fields[4]))
                out.append((root, point, fstype, options))
    return out


def _dir_of(path: str, mounts: list[tuple[str, str, str, str]], fstype: str, controller: str = "") -> str | None:
    """The directory of cgroup `path` in the mounted hierarchy of `fstype` (and v1 `controller`)."""
    # Prefer the canonical places: cgroup2 at /sys/fs/cgroup (unified) over .../unified (hybrid).
    for root, point, fs, options in sorted(mounts, key=lambda m: len(m[1])):
        if fs != fstype or (controller and controller not in options.split(",")):
            continue
        if path == root or path.startswith(root.rstrip("/") + "/"):
            return os.path.join(point, path[len(root.rstrip("/")):].lstrip("/")).rstrip("/") or "/"
    return None


def _read(path: str | Path) -> str:
    with open(path) as f:
        return f.read()


def _pids_in(cgroup_dir: str) -> list[int]:
    return [int(p) for p in _read(os.path.join(cgroup_dir, "cgroup.procs")).split()]


def _writable(*paths: str) -> bool:
    return all(os.access(p, os.W_OK) for p in paths)


def _probe_v2(own: list[tuple[str, str]], mounts: list[tuple[str, str, str, str]]) -> dict[str, Any]:
    v2_path = next((p for c, p in own if c == ""), None)
    if v2_path is None:
        return {"v2_problem": "this process has no cgroup v2 membership (no 0:: line in /proc/self/cgroup)"}
    current = _dir_of(v2_path, mounts, "cgroup2")
    if current is None:
        return {"v2_problem": "cgroup2 is not mounted (or not the part of it holding this process)"}
    pid = os.getpid()
    base, move = current, True
    if os.path.basename(current) == LAUNCHER_LEAF.format(pid=pid):
        base, move = os.path.dirname(current), False  # an earlier create() already moved us
    # The root cgroup (it alone has no cgroup.type) is exempt from the no-internal-processes rule.
    is_root = not os.path.exists(os.path.join(base, "cgroup.type"))
    controllers = frozenset(_read(os.path.join(base, "cgroup.controllers")).split())
    enabled = frozenset(_read(os.path.join(base, "cgroup.subtree_control")).split())
    facts: dict[str, Any] = {"v2_base": base, "v2_controllers": controllers, "v2_enabled": enabled,
                             "v2_move_launcher": move and not is_root, "v2_problem": None}
    if not controllers & set(CONTROLLER.values()):
        facts["v2_problem"] = (f"cgroup2 at {base} offers none of the memory, cpu, pids controllers (on a hybrid "
                               "host they are bound to cgroup v1)")
    elif not _writable(base, os.path.join(base, "cgroup.subtree_control"), os.path.join(base, "cgroup.procs")):
        facts["v2_problem"] = f"{base} is not delegated to uid {os.geteuid()} (not writable)"
    elif move and not is_root:
        others = [p for p in _pids_in(base) if p != pid]
        if others:
            facts["v2_problem"] = (f"{len(others)} other process(es) share {base}; the no-internal-processes rule "
                                   "forbids enabling controllers there, and nsbox moves only itself")
    return facts


def _probe_scope(mounts: list[tuple[str, str, str, str]]) -> dict[str, Any]:
    uid = os.geteuid()
    if os.environ.get(SCOPE_ENV):
        return {"scope_problem": "nsbox already re-executed itself in a systemd scope"}
    if not any(point == "/sys/fs/cgroup" and fs == "cgroup2" for _, point, fs, _ in mounts):
        return {"scope_problem": "systemd delegates controllers only on a unified cgroup2 host"}
    if _which("systemd-run") is None:
        return {"scope_problem": "systemd-run is not installed"}
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{uid}"
    if not os.path.exists(os.path.join(runtime, "systemd", "private")):
        return {"scope_problem": f"no systemd user instance for uid {uid} ({runtime}/systemd/private is absent)"}
    manager = f"/sys/fs/cgroup/user.slice/user-{uid}.slice/user@{uid}.service"
    try:
        controllers = frozenset(_read(os.path.join(manager, "cgroup.controllers")).split())
    except OSError:
        return {"scope_problem": f"cannot read the user manager's cgroup {manager}"}
    return {"scope_controllers": controllers, "scope_problem": None}


def _probe_v1(own: list[tuple[str, str]], mounts: list[tuple[str, str, str, str]]) -> dict[str, Any]:
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    bases = []
    for controller in sorted(set(CONTROLLER.values())):
        path = next((p for c, p in own if controller in c.split(",")), None)
        current = _dir_of(path, mounts, "cgroup", controller) if path is not None else None
        if current is None:
            continue
        # The cgroup itself when it is ours; else the child an administrator made for us.
        for candidate in (current, os.path.join(current, f"nsbox-{user}")):
            if os.path.isdir(candidate) and _writable(candidate, os.path.join(candidate, "cgroup.procs")):
                bases.append((controller, candidate))
                break
    problem = None if bases else f"no cgroup v1 hierarchy beneath this process's cgroups is writable by {user}"
    return {"v1_bases": tuple(bases), "v1_problem": problem}


def probe() -> CgroupHost:
    """Read what this host lets the current user do with cgroups. Changes nothing."""
    try:
        own, mounts = _own_cgroups(), _mounts()
    except OSError as e:
        return CgroupHost(v2_problem=f"cannot read {e.filename}: {e.strerror}", v1_problem="not probed",
                          scope_problem="not probed")
    facts: dict[str, Any] = {}
    parts: tuple[tuple[str, Callable[[], dict[str, Any]]], ...] = (
        ("v2_problem", lambda: _probe_v2(own, mounts)),
        ("scope_problem", lambda: _probe_scope(mounts)),
        ("v1_problem", lambda: _probe_v1(own, mounts)),
    )
    for problem, part in parts:
        try:
            facts.update(part())
        except OSError as e:  # a file vanished or is unreadable: that mechanism is unusable
            facts[problem] = f"cannot read {e.filename}: {e.strerror}"
    return CgroupHost(**facts)


# ---- the plan -----------------------------------------------------------------------------


class Limit(NamedTuple):
    name: str  # "memory" | "cpus" | "pids"
    value: float  # bytes, CPUs, processes
    mechanism: str  # one of MECHANISMS

    def shown(self) -> str:
        if self.name == "memory":
            return f"memory {format_size(int(self.value))}"
        return f"cpus {self.value:g}" if self.name == "cpus" else f"pids {int(self.value)}"


class CgroupPlan(NamedTuple):
    limits: tuple[Limit, ...]
    host: CgroupHost  # what the plan was chosen from; left out of repr (long, and not the plan)
    controllers: tuple[str, ...] = ()  # v2: what the leaf needs enabled

    def __repr__(self) -> str:
        return f"CgroupPlan(limits={self.limits!r}, controllers={self.controllers!r})"

    def mechanism(self, name: str) -> str:
        """The mechanism enforcing limit `name` ("memory", "cpus", "pids"); "none" if not asked."""
        return next((lim.mechanism for lim in self.limits if lim.name == name), NONE)

    def value(self, name: str) -> float | None:
        return next((lim.value for lim in self.limits if lim.name == name), None)

    @property
    def backend(self) -> str:
        """The cgroup mechanism of this plan (cgroup2, systemd-scope, cgroup1), or none."""
        return next((lim.mechanism for lim in self.limits if lim.mechanism in (CGROUP2, SCOPE, CGROUP1)), NONE)

    def describe(self) -> list[str]:
        if not self.limits:
            return ["no resource limits requested"]
        lines = []
        for lim in self.limits:
            lines.append(f"{lim.shown()}: {_how(lim, self.host)}")
        if self.backend == SCOPE:
            lines.append("nsbox re-executes itself in `systemd-run --user --scope -p Delegate=yes` to get a "
                         "delegated cgroup")
        return lines


def _how(lim: Limit, host: CgroupHost) -> str:
    v = lim.value
    if lim.mechanism in (CGROUP2, SCOPE):
        where = "cgroup2 leaf " + ("in a systemd --user scope" if lim.mechanism == SCOPE else f"beneath {host.v2_base}")
        return {"memory": f"{where}: memory.max {int(v)}, memory.swap.max 0, memory.oom.group 1",
                "cpus": f"{where}: cpu.max {_cpu_quota(v)} {CPU_PERIOD_USEC}",
                "pids": f"{where}: pids.max {int(v)}"}[lim.name]
    if lim.mechanism == CGROUP1:
        where = f"cgroup v1 leaf beneath {host.v1_base(CONTROLLER[lim.name])}"
        return {"memory": f"{where}: memory.limit_in_bytes {int(v)} (and memsw where swap is accounted)",
                "cpus": f"{where}: cpu.cfs_quota_us {_cpu_quota(v)} per cpu.cfs_period_us {CPU_PERIOD_USEC}",
                "pids": f"{where}: pids.max {int(v)}"}[lim.name]
    if lim.mechanism == RLIMITS:
        return {"memory": f"rlimits: RLIMIT_AS {int(v)} (WEAKER: caps address space, not resident memory)",
                "pids": f"rlimits: RLIMIT_NPROC {int(v)} (WEAKER: counts every process of your uid, "
                        "not only the sandbox's)"}[lim.name]
    return "NOT ENFORCED: no cgroup controller is delegated and no rlimit expresses a CPU share"


def _cpu_quota(cpus: float) -> int:
    return max(1000, round(cpus * CPU_PERIOD_USEC))  # the kernel refuses quotas below 1 ms


def plan(memory: int | None, cpus: float | None, pids: int | None, best_effort: bool,
         host: CgroupHost | None = None) -> CgroupPlan:
    """Choose the mechanism for each requested limit. Role LAUNCHER; changes nothing.

    One cgroup backend serves all limits: the first of cgroup2, systemd-scope, cgroup1 that
    can enforce every requested limit, else the one enforcing most. What it cannot enforce
    falls to rlimits, or to nothing. Unless `best_effort`, anything weaker than a cgroup is
    refused with a StepError naming the fix.
    """
    requested = {name: v for name, v in (("memory", memory), ("cpus", cpus), ("pids", pids)) if v is not None}
    if not requested:
        return CgroupPlan((), host or CgroupHost())
    host = host or probe()
    offers = {
        CGROUP2: set() if host.v2_problem else set(host.v2_controllers),
        SCOPE: set() if host.scope_problem else set(host.scope_controllers),
        CGROUP1: set() if host.v1_problem else {c for c, _ in host.v1_bases},
    }
    wanted = {CONTROLLER[name] for name in requested}
    # Full coverage wins in order; otherwise the widest (ties keep the order above).
    backend = max(offers, key=lambda m: (len(wanted & offers[m]) == len(wanted), len(wanted & offers[m])))
    if not wanted & offers[backend]:
        backend = NONE
    limits = []
    for name, value in requested.items():
        if backend != NONE and CONTROLLER[name] in offers[backend]:
            mechanism = backend
        else:
            mechanism = RLIMITS if name in ("memory", "pids") else NONE
        limits.append(Limit(name, float(value), mechanism))
    result = CgroupPlan(tuple(limits), host, tuple(sorted(wanted & offers[backend])) if backend != NONE else ())
    weak = [lim for lim in limits if lim.mechanism in (RLIMITS, NONE)]
    if weak and not best_effort:
        raise StepError(
            "cgroups.plan", "enforce the requested limits",
            detail=", ".join(lim.shown() for lim in weak) + " cannot be enforced by a cgroup here",
            why="; ".join(_shortfall(host, offers, wanted)),
            fix="run nsbox inside a delegated cgroup v2 subtree (as under systemd: `systemd-run --user --scope "
                "-p Delegate=yes nsbox run ...`), or let an administrator chown one to you; or accept weaker "
                "limits with `--limits best-effort` (" + "; ".join(f"{lim.shown()}: {_how(lim, host)}"
                                                                   for lim in weak) + ")",
        )
    return result


def _shortfall(host: CgroupHost, offers: dict[str, set[str]], wanted: set[str]) -> list[str]:
    """Why each cgroup mechanism falls short, in words for the error's `why:` line."""
    problems = {CGROUP2: host.v2_problem, SCOPE: host.scope_problem, CGROUP1: host.v1_problem}
    out = []
    for mechanism, problem in problems.items():
        missing = sorted(wanted - offers[mechanism])
        if problem:
            out.append(f"{mechanism}: {problem}")
        elif missing:
            out.append(f"{mechanism}: the {', '.join(missing)} controller(s) are not available")
    return out


def scope_reexec_argv(argv: list[str]) -> list[str] | None:
    """The command that re-executes `argv` in a delegated systemd user scope, or None.

    None when nsbox already runs in such a scope (SCOPE_ENV) or systemd-run is missing.
    The scope's cgroup holds only the re-executed nsbox, so it may move itself into its
    launcher leaf and enable controllers; systemd removes the scope when nsbox exits.
    """
    if os.environ.get(SCOPE_ENV) or _which("systemd-run") is None:
        return None
    return ["systemd-run", "--user", "--scope", "--quiet", "--collect", "-p", "Delegate=yes",
            "--", "env", f"{SCOPE_ENV}=1", *argv]


# ---- the cgroup itself (role LAUNCHER) -------------------------------------------------------


class Cgroup(NamedTuple):
    """A sandbox's cgroup, made by create(); what usage(), kill() and remove() need."""

    mechanism: str  # cgroup2 or cgroup1
    leaves: tuple[str, ...]  # cgroup2: one directory; cgroup1: one per hierarchy
    plan: CgroupPlan  # left out of repr
    base: str | None = None  # cgroup2: the cgroup nsbox runs in, parent of the leaf
    launcher_leaf: str | None = None  # cgroup2: where nsbox moved itself, if it did
    enabled: tuple[str, ...] = ()  # controllers nsbox enabled in base (and disables again)

    def __repr__(self) -> str:
        return (f"Cgroup(mechanism={self.mechanism!r}, leaves={self.leaves!r}, base={self.base!r}, "
                f"launcher_leaf={self.launcher_leaf!r}, enabled={self.enabled!r})")

    @property
    def path(self) -> str:
        return self.leaves[0]


def _write(path: str, value: str | int, step: str) -> None:
    # One write(2) per value: cgroup files act on each write call, not on the file's content.
    with acting(step, f"write {str(value)!r} to {path}"):
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)


def _mkdir_leaf(parent: str, step: str) -> str:
    for n in range(1000):
        leaf = os.path.join(parent, f"nsbox-{os.getpid()}-{n}")
        try:
            os.mkdir(leaf)
            return leaf
        except FileExistsError:
            continue
        except OSError as e:
            raise StepError(step, f"mkdir {leaf}", e.errno) from e
    raise StepError(step, f"mkdir beneath {parent}", errno_mod.EEXIST)


def create(p: CgroupPlan) -> Cgroup | None:
    """Make the sandbox's leaf cgroup and write its limits. Role LAUNCHER, before fork_holder.

    None when no limit of the plan is enforced by a cgroup (rlimits or nothing).
    """
    if p.backend == SCOPE:
        raise StepError("cgroups.create", "use a systemd scope",
                        detail="this plan needs nsbox re-executed through scope_reexec_argv() first")
    if p.backend == CGROUP2:
        return _create_v2(p)
    if p.backend == CGROUP1:
        return _create_v1(p)
    return None


_STALE = re.compile(r"^nsbox-(?:launcher-(\d+)|(\d+)-\d+)$")


def sweep_stale(base: str) -> list[str]:
    """Remove the leaves a killed launcher left beneath `base`; return what went.

    A launcher killed with SIGKILL cannot rmdir its leaves. They are empty once its
    sandbox is gone (every process dies with the launcher), and named after its pid:
    a leaf whose launcher is no longer alive and that holds no process is removed.
    rmdir refuses a cgroup with processes or children anyway, so nothing in use goes.
    """
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            m = _STALE.match(entry.name)
            if not m or not entry.is_dir(follow_symlinks=False):
                continue
            pid = int(m.group(1) or m.group(2))
            if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
                continue  # ours, or a live launcher's (or a reused pid: left alone, to be safe)
            try:
                os.rmdir(entry.path)
                removed.append(entry.path)
            except OSError:
                continue  # busy (EBUSY) or not ours to remove: left as it is
    return removed


def _create_v2(p: CgroupPlan) -> Cgroup:
    step, host = "cgroups.create", p.host
    assert host.v2_base is not None
    base = host.v2_base
    sweep_stale(base)  # what a launcher killed earlier here could not remove
    launcher_leaf = None
    if host.v2_move_launcher:
        # No internal processes: nsbox leaves its cgroup for a leaf beneath it before
        # enabling controllers there. It moves only itself; the probe checked it is alone.
        launcher_leaf = os.path.join(base, LAUNCHER_LEAF.format(pid=os.getpid()))
        with acting(step, f"mkdir {launcher_leaf}"), contextlib.suppress(FileExistsError):
            os.mkdir(launcher_leaf)
        _write(os.path.join(launcher_leaf, "cgroup.procs"), os.getpid(), step)
    enable = tuple(c for c in p.controllers if c not in host.v2_enabled)
    cg = Cgroup(CGROUP2, (), p, base, launcher_leaf, enable)
    try:
        if enable:
            _write(os.path.join(base, "cgroup.subtree_control"), " ".join(f"+{c}" for c in enable), step)
        leaf = _mkdir_leaf(base, step)
        cg = Cgroup(CGROUP2, (leaf,), p, base, launcher_leaf, enable)
        memory, cpus, pids = (p.value(n) if p.mechanism(n) == CGROUP2 else None for n in ("memory", "cpus", "pids"))
        if memory is not None:
            _write(os.path.join(leaf, "memory.max"), int(memory), step)
            if os.path.exists(os.path.join(leaf, "memory.swap.max")):  # absent without swap accounting
                _write(os.path.join(leaf, "memory.swap.max"), 0, step)
            _write(os.path.join(leaf, "memory.oom.group"), 1, step)
        if cpus is not None:
            _write(os.path.join(leaf, "cpu.max"), f"{_cpu_quota(cpus)} {CPU_PERIOD_USEC}", step)
        if pids is not None:
            _write(os.path.join(leaf, "pids.max"), int(pids), step)
    except StepError:
        remove(cg)
        raise
    return cg


def _v1_node(directory: str, controller: str) -> Node:
    """A cgroupspy node for `directory` in the v1 hierarchy of `controller`."""
    # Imported here, not at the top: only a cgroup v1 run needs it, and the import costs
    # more than a whole bubblewrap launch (scripts/bench).
    from cgroupspy.nodes import Node

    # cgroupspy picks a node's controller class from the name of the hierarchy directory
    # beneath its root ("memory", "cpu"); a hierarchy's mount point plays that part here.
    mount = next(point for _, point, fs, options in _mounts() if fs == "cgroup" and controller in options.split(","))
    hierarchy = Node(os.path.basename(mount).encode(), parent=Node(os.path.dirname(mount).encode()))
    relative = os.path.relpath(directory, mount)
    return hierarchy if relative == "." else Node(relative.encode(), parent=hierarchy)


def _v1_controller(node: Node) -> Controller:
    from cgroupspy.controllers import Controller

    # cgroupspy knows no pids controller: its generic Controller reads and writes any file.
    return node.controller if node.controller is not None else Controller(node)


def _create_v1(p: CgroupPlan) -> Cgroup:
    step, leaves = "cgroups.create", []
    cg = Cgroup(CGROUP1, (), p)
    try:
        for lim in p.limits:
            if lim.mechanism != CGROUP1:
                continue
            controller = CONTROLLER[lim.name]
            base = p.host.v1_base(controller)
            assert base is not None
            leaf_dir = _mkdir_leaf(base, step)
            leaves.append(leaf_dir)
            cg = Cgroup(CGROUP1, tuple(leaves), p)
            ctl = _v1_controller(_v1_node(leaf_dir, controller))
            # cgroupspy keeps paths as bytes, so file names go in as bytes too.
            with acting(step, f"write the {lim.name} limit beneath {leaf_dir}"):
                if lim.name == "memory":
                    ctl.set_property(b"memory.limit_in_bytes", int(lim.value))
                    if os.path.exists(ctl.filepath(b"memory.memsw.limit_in_bytes")):  # swap accounting on
                        ctl.set_property(b"memory.memsw.limit_in_bytes", int(lim.value))
                elif lim.name == "cpus":
                    ctl.set_property(b"cpu.cfs_period_us", CPU_PERIOD_USEC)
                    ctl.set_property(b"cpu.cfs_quota_us", _cpu_quota(lim.value))
                else:
                    ctl.set_property(b"pids.max", int(lim.value))
    except StepError:
        remove(cg)
        raise
    return cg


def enter(cg: Cgroup, pid: int) -> None:
    """Move `pid` (the holder) into the sandbox's cgroup. Role LAUNCHER, before fork_init."""
    for leaf in cg.leaves:
        _write(os.path.join(leaf, "cgroup.procs"), pid, "cgroups.enter")


def apply_rlimits(p: CgroupPlan) -> None:
    """setrlimit for the limits whose mechanism is rlimits. Role HOLDER or AGENT.

    Soft and hard alike, so the agent cannot raise them again; never above the current
    hard limit, which an unprivileged process could not raise anyway.
    """
    for lim in p.limits:
        if lim.mechanism != RLIMITS:
            continue
        which = {"memory": resource.RLIMIT_AS, "pids": resource.RLIMIT_NPROC}[lim.name]
        name = {"memory": "RLIMIT_AS", "pids": "RLIMIT_NPROC"}[lim.name]
        _, hard = resource.getrlimit(which)
        value = int(lim.value) if hard == resource.RLIM_INFINITY else min(int(lim.value), hard)
        with acting("cgroups.apply_rlimits", f"setrlimit({name}, {value})"):
            resource.setrlimit(which, (value, value))


# ---- after the run ------------------------------------------------------------------------


def _keyed(path: str) -> dict[str, int]:
    """A flat-keyed cgroup file ("oom_kill 1\\nmax 0") as a dict; {} when absent."""
    try:
        text = _read(path)
    except OSError:
        return {}
    pairs = (line.split() for line in text.splitlines())
    return {kv[0]: int(kv[1]) for kv in pairs if len(kv) == 2 and kv[1].lstrip("-").isdigit()}


def _number(path: str) -> int | None:
    try:
        return int(_read(path).strip())
    except (OSError, ValueError):
        return None


def usage(cg: Cgroup) -> dict[str, Any]:
    """What the sandbox used, read from its cgroup after it exited (before remove).

    Keys: mechanism, memory_peak (bytes, None if the kernel does not say), cpu_usec,
    cpu_user_usec, cpu_system_usec, oom_kills, pids_max_hits, and `sentence`: one plain
    sentence when a limit stopped the agent (or its forks), else None.
    """
    p = cg.plan
    out: dict[str, Any] = {"mechanism": cg.mechanism, "memory_peak": None, "cpu_usec": None,
                           "cpu_user_usec": None, "cpu_system_usec": None, "oom_kills": 0, "pids_max_hits": 0}
    if cg.mechanism == CGROUP2:
        leaf = cg.path
        out["memory_peak"] = _number(os.path.join(leaf, "memory.peak"))  # Linux >= 5.19
        cpu = _keyed(os.path.join(leaf, "cpu.stat"))
        out["cpu_usec"], out["cpu_user_usec"], out["cpu_system_usec"] = (
            cpu.get("usage_usec"), cpu.get("user_usec"), cpu.get("system_usec"))
        out["oom_kills"] = _keyed(os.path.join(leaf, "memory.events")).get("oom_kill", 0)
        out["pids_max_hits"] = _keyed(os.path.join(leaf, "pids.events")).get("max", 0)
    else:
        for leaf in cg.leaves:
            if os.path.exists(os.path.join(leaf, "memory.max_usage_in_bytes")):
                out["memory_peak"] = _number(os.path.join(leaf, "memory.max_usage_in_bytes"))
                out["oom_kills"] = _keyed(os.path.join(leaf, "memory.oom_control")).get("oom_kill", 0)
            if os.path.exists(os.path.join(leaf, "pids.events")):
                out["pids_max_hits"] = _keyed(os.path.join(leaf, "pids.events")).get("max", 0)
    memory, pids = p.value("memory"), p.value("pids")
    out["sentence"] = None
    if out["oom_kills"] and memory is not None:
        out["sentence"] = f"the agent was killed by the OOM killer: memory limit {format_size(int(memory))} reached"
    elif out["pids_max_hits"] and pids is not None:
        out["sentence"] = (f"the process limit {int(pids)} was reached: fork() failed with EAGAIN "
                           f"{out['pids_max_hits']} time(s)")
    return out


def kill(cg: Cgroup) -> None:
    """SIGKILL everything in the sandbox's cgroup (on timeout). Role LAUNCHER."""
    for leaf in cg.leaves:
        kill_file = os.path.join(leaf, "cgroup.kill")
        if cg.mechanism == CGROUP2 and os.path.exists(kill_file):  # Linux >= 5.14: atomic, no races
            with contextlib.suppress(FileNotFoundError):
                _write(kill_file, 1, "cgroups.kill")
            continue
        # Older kernels and v1: kill what is there until nothing is (new forks race us).
        for _ in range(100):
            try:
                pids = _pids_in(leaf)
            except FileNotFoundError:
                break
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)


def _rmdir(path: str, cg: Cgroup) -> None:
    """rmdir a cgroup, waiting while its last processes exit; a missing one is fine."""
    deadline = time.monotonic() + 5
    killed = False
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno_mod.EBUSY:
                raise StepError("cgroups.remove", f"rmdir {path}", e.errno) from e
            if time.monotonic() > deadline:
                raise StepError("cgroups.remove", f"rmdir {path}", e.errno,
                                detail="processes remain in it") from e
            if not killed and time.monotonic() > deadline - 4:
                kill(cg)  # anything still there after a second outlived the sandbox
                killed = True
            time.sleep(0.02)


def remove(cg: Cgroup) -> None:
    """Remove the sandbox's cgroup and leave nsbox's own as it found it. Role LAUNCHER, last."""
    for leaf in cg.leaves:
        _rmdir(leaf, cg)
    if cg.mechanism != CGROUP2 or cg.base is None:
        return
    base = cg.base
    siblings = [d.name for d in os.scandir(base) if d.is_dir() and d.path != cg.launcher_leaf]
    if siblings:
        return  # another sandbox of this process still uses the controllers and the base
    if cg.enabled:
        _write(os.path.join(base, "cgroup.subtree_control"), " ".join(f"-{c}" for c in cg.enabled), "cgroups.remove")
    if cg.launcher_leaf is not None and os.path.isdir(cg.launcher_leaf):
        # Back to where nsbox started; only now may the base hold a process again.
        _write(os.path.join(base, "cgroup.procs"), os.getpid(), "cgroups.remove")
        _rmdir(cg.launcher_leaf, cg)
