"""THE launch sequence. Read this file first.

Four processes, each named for `ps`:

    nsbox (LAUNCHER, host)   plans, writes the id maps, relays the terminal, reports
     └─ nsbox:holder         unshares the user namespace, then mount/net/ipc/uts/cgroup/pid
         └─ nsbox:init       PID 1: builds the root, /proc, lo; forks the agent; reaps
             └─ agent        the command: clean env, new session, fds closed, execve

`SEQUENCE` is the whole order, top to bottom, with the reason each step sits where it
does. The four role functions below run exactly these rows, in this order: each step
goes through `Steps`, which refuses a step out of its table order, so the table cannot
drift from the code. A change of role between two rows is a handshake on the sync
channel; those are numbered `# sync N` in the code. tests/test_sequence.py pins the
orderings that matter for security.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from nsbox import config, limits, probe, process, syscalls, terminal
from nsbox.errors import ExitCode, StepError
from nsbox.layers import caps, cgroups, execve, landlock, mountns, netns, nnp, pidns, seccomp, userns, utsns
from nsbox.process import AgentStatus, Channel, ErrorPipe
from nsbox.spec import SandboxSpec
from nsbox.syscalls import CloneFlag

if TYPE_CHECKING:  # imported where used: a run without --image or a proxy never loads them
    from nsbox import net
    from nsbox.image import store as image_store

LAUNCHER, HOLDER, INIT, AGENT = "launcher", "holder", "init", "agent"


class Step(NamedTuple):
    who: str
    id: str
    why: str


SEQUENCE: tuple[Step, ...] = (
    #    who       step                        why it is here
    Step(LAUNCHER, "spec.validate",            "a bad request fails before anything changes"),
    Step(LAUNCHER, "config.prepare_home",      "claim the sandbox name (flock); its persistent $HOME exists"),
    Step(LAUNCHER, "image.materialize",        "unpack (once, cached) and hold the image in use: never after fork"),
    Step(LAUNCHER, "seccomp.compile",          "libseccomp runs here, once; the agent only loads finished BPF"),
    Step(LAUNCHER, "cgroups.create",           "the limits exist before any sandboxed process does"),
    Step(LAUNCHER, "process.fork_holder",      "forked single-threaded; PDEATHSIG ties it to the launcher"),
    Step(HOLDER,   "userns.unshare",           "first: it owns every namespace made after it"),
    Step(LAUNCHER, "userns.write_maps",        "sync 1: setgroups deny, gid_map, uid_map, while the holder waits"),
    Step(LAUNCHER, "cgroups.enter",            "holder joins the leaf before unshare(CLONE_NEWCGROUP): its root"),
    Step(HOLDER,   "userns.disable_nesting",   "max_user_namespaces=0 here: no nested userns, even without seccomp"),
    Step(HOLDER,   "process.unshare_rest",     "sync 2: mount, net, ipc, uts, cgroup, pid; all owned by our userns"),
    Step(HOLDER,   "process.fork_init",        "unshare(CLONE_NEWPID) applies to children only: init is PID 1"),
    Step(INIT,     "mountns.make_private",     "before any mount: no mount event may reach the host"),
    Step(INIT,     "mountns.enter_scratch",    "pivot into a scratch tmpfs; the host root stays at /oldroot"),
    Step(INIT,     "mountns.build_root",       "fresh tmpfs root; binds take their source from /oldroot"),
    Step(INIT,     "pidns.mount_proc",         "before the old root goes: a new procfs needs a fully visible one"),
    Step(INIT,     "mountns.seal",             "root tmpfs and /dev read-only: the agent owns their inodes"),
    Step(INIT,     "mountns.pivot_root",       "/ becomes the new root; the host root is detached"),
    Step(INIT,     "netns.bring_up_loopback",  "needs CAP_NET_ADMIN in the netns: before any privilege drop"),
    Step(INIT,     "netns.open_proxy_socket",  "allowlist: bind 127.0.0.1:3128 inside; the launcher serves it"),
    Step(INIT,     "utsns.set_hostname",       "needs CAP_SYS_ADMIN in the uts ns"),
    Step(INIT,     "terminal.open_pty",        "sync 3: a pty of the sandbox's devpts; its master to the launcher"),
    Step(LAUNCHER, "netns.serve_proxy",        "after the launcher's last fork: the proxy's threads start here"),
    Step(INIT,     "pidns.harden_init",        "scrub argv/environ, not dumpable: before the agent exists"),
    Step(INIT,     "pidns.block_signals",      "hold SIGCHLD and forwarded signals for sigwaitinfo; none is lost"),
    Step(INIT,     "process.fork_agent",       "init stays behind as PID 1"),
    Step(INIT,     "pidns.drop_privileges",    "init needs no capability to reap and forward: caps dropped, nnp set"),
    Step(AGENT,    "execve.prepare",           "setsid, pty as ctty, signals default, cwd, fds >= 3 close-on-exec"),
    Step(AGENT,    "cgroups.apply_rlimits",    "only where no cgroup enforces a limit (--limits best-effort)"),
    Step(AGENT,    "caps.drop",                "after every privileged step; securebits locked while CAP_SETPCAP held"),
    Step(AGENT,    "nnp.enable",               "execve can never grant privileges again; unprivileged filters need it"),
    Step(AGENT,    "landlock.restrict",        "after nnp (required without CAP_SYS_ADMIN); inside paths, after pivot"),
    Step(AGENT,    "seccomp.install",          "LAST before execve: every syscall after this one is filtered"),
    Step(AGENT,    "probe.run",                "nsbox verify only: the self-checks run here, every layer applied"),
    Step(AGENT,    "execve.execve",            "the error pipe closes on success (O_CLOEXEC)"),
    Step(INIT,     "pidns.reap",               "until the agent exits; forwards signals; its status is the result"),
    Step(LAUNCHER, "process.supervise",        "relay the terminal, forward signals, wait for the holder"),
    Step(LAUNCHER, "cgroups.report",           "peak memory, CPU, OOM kills and pids events; then the leaf goes"),
)


class EventLog(list[dict[str, Any]]):
    """The run's events in arrival order; `sink` sees each as it comes (--verbose, --log).

    Steps of the launcher, messages of the children (over the sync channel) and the
    proxy's decisions (from its threads: list.append is atomic) all land here.
    """

    def __init__(self, sink: Callable[[dict[str, Any]], None] | None = None) -> None:
        super().__init__()
        self.sink = sink

    def append(self, event: dict[str, Any]) -> None:
        if event.get("kind") == "event":
            del event["kind"]  # the sync channel's message kind, not part of the event
        super().append(event)
        if self.sink is not None:
            self.sink(event)


class Steps:
    """Runs one role's rows of SEQUENCE, in order, reporting each as an event."""

    def __init__(self, who: str, chan: Channel | None, trace: bool, events: list[dict[str, Any]]) -> None:
        self.who = who
        self.rows = [s.id for s in SEQUENCE if s.who == who]
        self.next = 0
        self.chan, self.trace, self.events = chan, trace, events

    def skip_to(self, step_id: str) -> None:
        """On a failed launch, jump over the rows that will not run (never backwards)."""
        self.next = max(self.next, self.rows.index(step_id))

    @contextlib.contextmanager
    def __call__(self, step_id: str) -> Iterator[None]:
        expected = self.rows[self.next] if self.next < len(self.rows) else "(none)"
        if step_id != expected:
            raise StepError(step_id, "run step", detail=f"out of order in role {self.who}: expected {expected}")
        self.next += 1
        self._report("step.start", step_id)
        try:
            yield
        except StepError:
            raise
        except OSError as e:
            raise StepError(step_id, type(e).__name__, e.errno, detail=e.filename) from e
        self._report("step.ok", step_id)

    def _report(self, kind: str, step_id: str) -> None:
        if not self.trace:
            return
        event = {"event": kind, "role": self.who, "step": step_id, "t": time.time()}
        if self.chan is not None and self.who != LAUNCHER:
            self.chan.send("event", (), **event)
        else:
            self.events.append(event)


class Plans(NamedTuple):
    spec: SandboxSpec
    userns: userns.UserNsPlan
    mountns: mountns.MountNsPlan
    pidns: pidns.PidNsPlan
    netns: netns.NetNsPlan
    utsns: utsns.UtsNsPlan
    cgroups: cgroups.CgroupPlan
    caps: caps.CapsPlan | None  # None: removed with --without (study mode)
    nnp: nnp.NoNewPrivsPlan
    landlock: landlock.LandlockPlan | None
    seccomp: seccomp.SeccompPlan | None
    execve: execve.ExecvePlan

    def describe(self) -> list[tuple[str, list[str]]]:
        off = ["REMOVED with --without (study mode): not enforced"]
        return [
            ("userns", self.userns.describe()), ("mountns", self.mountns.describe()),
            ("pidns", self.pidns.describe()), ("netns", self.netns.describe()),
            ("utsns", self.utsns.describe()), ("cgroups", self.cgroups.describe()),
            ("caps", self.caps.describe() if self.caps is not None else off), ("nnp", self.nnp.describe()),
            ("landlock", self.landlock.describe() if self.landlock is not None else off),
            ("seccomp", self.seccomp.describe() if self.seccomp is not None else off),
            ("execve", self.execve.describe()),
        ]


class ImageRoot(NamedTuple):
    """An image's unpacked tree (held in use by the launcher) and its config."""

    rootfs: str
    config: image_store.ImageConfig
    upper: str


def _with_config_defaults(spec: SandboxSpec, settings: dict[str, object]) -> SandboxSpec:
    """Limits from config.toml where the command line gave none (parsed as strictly as flags)."""
    def get(key: str) -> str | None:
        value = settings.get(key)
        return str(value) if value is not None else None

    memory, cpus, pids, timeout, disk = (get(k) for k in ("memory", "cpus", "pids", "timeout", "disk"))
    return spec._replace(
        memory=spec.memory if spec.memory is not None or memory is None else limits.parse_size(memory),
        cpus=spec.cpus if spec.cpus is not None or cpus is None else limits.parse_cpus(cpus),
        pids=spec.pids if spec.pids is not None or pids is None else limits.parse_pids(pids),
        timeout=spec.timeout if spec.timeout is not None or timeout is None else limits.parse_duration(timeout),
        disk=spec.disk if spec.disk is not None or disk is None else limits.parse_size(disk),
        limits=spec.limits or get("limits"),
    )


def make_plans(spec: SandboxSpec, command: tuple[str, ...] | None, tty: bool, home_source: str,
               image: ImageRoot | None = None, dry_run: bool = False) -> Plans:
    """Every layer's plan, from the spec. Pure apart from reading host paths, $PATH and
    the user's configuration, and compiling the seccomp profile (cached)."""
    settings = config.load_config()
    is_agent = not command
    network = spec.network or str(settings.get("network" if is_agent else "network_for_commands",
                                               "allowlist" if is_agent else "none"))
    key_mode = spec.api_key_mode or str(settings.get("api_key_mode", "inject"))
    key = os.environ.get("ANTHROPIC_API_KEY") or None
    n = netns.plan(network, spec.allow_domains, spec.resolve, key if key_mode == "inject" else None,
                   spec.api_upstream, config.config_home())
    u = userns.plan(spec)
    passed_key = key if key_mode == "env" else None  # "inject" keeps it in the launcher
    if image is not None:
        command = image.config.argv(command or ()) or None  # Entrypoint + (command, or Cmd)
    e = execve.plan(command, str(spec.project), u.home, u.user, u.shell, spec.env, passed_key,
                    netns.environment(n), tty, dict(os.environ), image.config.env if image else None)
    binds = tuple((host, inside, "found on the caller's PATH") for host, inside in e.host_binds)
    for item in spec.ro_binds:
        host, _, inside = item.partition(":")
        binds += ((os.path.realpath(host), inside or os.path.realpath(host), "--ro-bind"),)
    root = (mountns.Root(image.rootfs, None if spec.disk else image.upper, spec.disk) if image
            else mountns.Root())
    m = mountns.plan(str(spec.project), home_source, u.home, u.passwd(), u.group(), spec.writable_git, binds,
                     spec.disk, root)
    # An image's root is the sandbox's own overlay: writable there, as the mounts say.
    writable = [str(spec.project), u.home, "/tmp", "/dev/shm"] + (["/"] if image else [])
    return Plans(
        spec, u, m, pidns.plan(), n, utsns.plan(spec.hostname),
        cgroups=cgroups.plan(spec.memory, spec.cpus, spec.pids, best_effort=spec.limits == "best-effort"),
        caps=None if "caps" in spec.without else caps.plan(),
        nnp=nnp.plan(),
        landlock=None if "landlock" in spec.without else landlock.plan(writable, readable=["/"]),
        seccomp=None if "seccomp" in spec.without else seccomp.plan(
            seccomp.resolve_profile(str(profile)) if (profile := spec.seccomp_profile or
                                                 settings.get("seccomp_profile")) else None,
            write_cache=not dry_run),  # nsbox plan changes nothing, not even the cache
        execve=e,
    )


class Outcome:
    """What the launcher learned: the agent's status, or the error that stopped the launch.

    Filled in as the run goes (the supervisor sets fields and appends events), hence a
    plain mutable class.
    """

    def __init__(self, status: AgentStatus | None = None, error: StepError | None = None,
                 events: list[dict[str, Any]] | None = None, timeout: float | None = None) -> None:
        self.status = status
        self.error = error
        self.events: list[dict[str, Any]] = [] if events is None else events  # the caller's list, shared
        self.timed_out = False
        self.usage: dict[str, Any] | None = None  # what the cgroup counted (peak memory, CPU, OOM kills...)
        self.rusage: Any = None  # the holder's wait4 rusage: the whole sandbox, since every level reaps
        self.probe: list[dict[str, Any]] | None = None  # nsbox verify: the checks from inside
        self.kill_rules: tuple[str, ...] = ()  # the `why` of each seccomp rule that kills, for a SIGSYS report
        self.timeout = timeout  # the --timeout in force (from the flag or config.toml)
        self.seccomp_kills: list[dict[str, Any]] = []  # calls the filter killed, named

    @property
    def exit_code(self) -> int:
        if self.timed_out:
            return ExitCode.TIMEOUT
        if self.status is not None:
            return self.status.exit_code
        return self.error.exit_code if self.error else ExitCode.NSBOX


NAMESPACES = (CloneFlag.CLONE_NEWNS | CloneFlag.CLONE_NEWIPC | CloneFlag.CLONE_NEWUTS
              | CloneFlag.CLONE_NEWCGROUP | CloneFlag.CLONE_NEWPID)  # and CLONE_NEWNET unless --network host


# ---- the four roles ---------------------------------------------------------------------


def launcher(spec: SandboxSpec, command: tuple[str, ...] | None, stdin_is_tty: bool, events: EventLog) -> Outcome:
    step = Steps(LAUNCHER, None, spec.trace, events)
    with step("spec.validate"):
        spec = _with_config_defaults(spec, config.load_config()).resolved()
    assert spec.name is not None
    with contextlib.ExitStack() as held:
        with step("config.prepare_home"):
            held.enter_context(config.claim(spec.name))  # one run per sandbox name at a time
            home = config.prepare_home(spec.name, spec.fresh)
        with step("image.materialize"):
            image = None
            if spec.image:
                # Pulled per --pull (threads are safe: nothing has forked yet), then by digest:
                # unpacked once per image (cached), and marked in use until the run ends.
                # Launcher-only modules, loaded here because only --image needs them. An image
                # in the store loads no registry (http, ssl, threads) nor unpacker (tar): only a
                # pull or a first unpack does (40+ ms). The children never import them.
                from nsbox.image import reference as image_reference
                from nsbox.image import store as image_store

                ref = image_reference.ensure(spec.image, spec.pull)
                rootfs = held.enter_context(image_store.use_rootfs(ref))
                image = ImageRoot(str(rootfs), image_store.image_config(ref),
                                  str(config.prepare_upper(spec.name, spec.fresh)))
        with step("seccomp.compile"):
            plans = make_plans(spec, command, stdin_is_tty, str(home), image)
        if spec.probe and plans.netns.unshare:
            # nsbox verify reads lo over rtnetlink with pyroute2, in the agent after pivot_root
            # where nothing can be imported: loaded now, before any fork. Never for a run (150 ms).
            netns.load_netlink()
        if spec.trace:
            events.append({"event": "plan", "t": time.time(), "layers": dict(plans.describe())})
        if plans.cgroups.limits:  # which mechanism enforces each limit, said before the run
            events.append({"event": "limits", "t": time.time(), "lines": plans.cgroups.describe(),
                           "weaker": [line for line in plans.cgroups.describe()
                                      if "WEAKER" in line or "NOT ENFORCED" in line]})
        with step("cgroups.create"):
            cg = cgroups.create(plans.cgroups)
            if cg is not None:
                held.callback(cgroups.remove, cg)  # last: after the report, however the run ends
        return _launch(plans, step, events, cg)


def _launch(plans: Plans, step: Steps, events: EventLog, cg: cgroups.Cgroup | None) -> Outcome:
    spec = plans.spec

    mine, theirs = Channel.pair()
    errors = ErrorPipe()
    with step("process.fork_holder"):
        holder_pid = process.fork_role("holder", lambda: holder(plans, theirs, errors), errors, parent_end=mine)
    theirs.close()
    errors.close_write()
    outcome = Outcome(events=events, timeout=spec.timeout)
    if plans.seccomp is not None:
        outcome.kill_rules = tuple(r.why for r in plans.seccomp.rules if r.action.startswith("kill"))
    mine.events = events  # children's step events land in the same log, as they arrive
    holder_status: int | None = None
    proxy: net.ProxyServer | None = None
    try:
        # sync 1: the holder owns a new user namespace and waits for its id maps.
        msg, _ = mine.expect("userns-ready")
        if msg["kind"] == "userns-ready":
            with step("userns.write_maps"):
                userns.write_maps(plans.userns, holder_pid)
            with step("cgroups.enter"):
                if cg is not None:
                    cgroups.enter(cg, holder_pid)
            mine.send("maps-written")
            # sync 2: the holder forked init; sync 3: init built the root. Two processes
            # write these, so either may come first (under load, init's often does).
            got = mine.expect_each("init-forked", "root-ready")
            if "init-forked" in got and "root-ready" in got:
                init_msg = got["init-forked"][0]
                ready, fds = got["root-ready"]
                pty_fd = fds.pop(0) if ready.get("pty") else None
                with step("netns.serve_proxy"):
                    if ready.get("proxy"):
                        proxy = netns.serve(plans.netns, fds.pop(0), lambda e: outcome.events.append(
                            {**e, "t": time.time()}))
                with step("process.supervise"):
                    holder_status = _supervise(mine, holder_pid, int(init_msg["init_pid"]), pty_fd, outcome,
                                               spec.timeout, spec.timeout_grace, cg, plans.seccomp)
            else:  # a child failed (the error pipe says why): the fds init sent are not used
                for _, fds in got.values():
                    for fd in fds:
                        os.close(fd)
    finally:
        if proxy is not None:
            proxy.stop()
        if holder_status is None:
            # The launch stopped before supervising: close our end first, so a child still
            # waiting for its next message reads EOF and exits rather than wait for us.
            mine.close()
            _, holder_status, outcome.rusage = os.wait4(holder_pid, 0)
        status = holder_status
        step.skip_to("cgroups.report")  # a failed launch skipped supervise: report all the same
        with step("cgroups.report"):
            outcome.usage = cgroups.usage(cg) if cg is not None else _rusage_report(outcome.rusage)
        mine.close()
        for err in errors.read_all():
            outcome.error = outcome.error or err
        if (outcome.status is None and outcome.usage and outcome.usage.get("oom_kills")
                and process.exit_code_of(status) == ExitCode.SIGNAL_BASE + signal.SIGKILL):
            # memory.oom.group: the OOM killer took the whole sandbox, init with the agent
            # (and perhaps the holder), so no agent-exit message came: the agent got SIGKILL.
            outcome.status = AgentStatus(ExitCode.SIGNAL_BASE + signal.SIGKILL, signal.SIGKILL)
        if outcome.status is None and outcome.timed_out and outcome.error is None:
            # The timeout's SIGKILL (cgroup.kill with a cgroup) took init before it could
            # report: the agent's status is that SIGKILL, the result is 124.
            outcome.status = AgentStatus(ExitCode.SIGNAL_BASE + signal.SIGKILL, signal.SIGKILL)
        if outcome.status is None and outcome.error is None:
            outcome.error = StepError("process.supervise", "wait for the sandbox",
                                      detail=f"it ended without a status (holder: {process.exit_code_of(status)})")
    return outcome


def holder(plans: Plans, chan: Channel, errors: ErrorPipe) -> int:
    step = Steps(HOLDER, chan, plans.spec.trace, [])
    with step("userns.unshare"):
        userns.unshare(plans.userns)
    chan.send("userns-ready")  # sync 1
    if chan.expect("maps-written")[0]["kind"] != "maps-written":
        return ExitCode.NSBOX  # the launcher is gone
    with step("userns.disable_nesting"):
        userns.disable_nesting(plans.userns)
    with step("process.unshare_rest"):  # sync 2
        syscalls.unshare(NAMESPACES | (CloneFlag.CLONE_NEWNET if plans.netns.unshare else 0))
    with step("process.fork_init"):
        init_pid = process.fork_role("init", lambda: init(plans, chan, errors), errors)
    chan.send("init-forked", init_pid=init_pid)
    _, status = os.waitpid(init_pid, 0)
    return process.exit_code_of(status)


def init(plans: Plans, chan: Channel, errors: ErrorPipe) -> int:
    step = Steps(INIT, chan, plans.spec.trace, [])
    with step("mountns.make_private"):
        mountns.make_private(plans.mountns)
    with step("mountns.enter_scratch"):
        mountns.enter_scratch(plans.mountns)
    with step("mountns.build_root"):
        warning = mountns.build_root(plans.mountns)
        if warning:  # reported, not silent: the launcher prints it
            chan.send("event", (), event="warning", step="mountns.build_root", message=warning, t=time.time())
    with step("pidns.mount_proc"):
        pidns.mount_proc(plans.pidns, mountns.NEW, mountns.HOST)
    with step("mountns.seal"):
        mountns.seal(plans.mountns, overlay_root=not warning)
    with step("mountns.pivot_root"):
        mountns.pivot_root(plans.mountns)
    with step("netns.bring_up_loopback"):
        netns.bring_up_loopback(plans.netns)
    with step("netns.open_proxy_socket"):
        proxy_sock = netns.open_proxy_socket(plans.netns)
    with step("utsns.set_hostname"):
        utsns.set_hostname(plans.utsns)
    with step("terminal.open_pty"):
        master, slave = terminal.open_pty() if plans.execve.tty else (-1, None)
        # sync 3: the root is built; the pty master and the proxy socket go to the launcher.
        fds = ([master] if master >= 0 else []) + ([proxy_sock.fileno()] if proxy_sock else [])
        chan.send("root-ready", tuple(fds), pty=master >= 0, proxy=proxy_sock is not None)
        if master >= 0:
            os.close(master)
        if proxy_sock is not None:
            proxy_sock.close()  # init keeps no copy: only the launcher may accept on it
    if chan.expect("go")[0]["kind"] != "go":
        return ExitCode.NSBOX  # the launcher is gone: so is the sandbox
    with step("pidns.harden_init"):
        pidns.harden_init(plans.pidns)
    with step("pidns.block_signals"):
        pidns.block_signals(plans.pidns)
    with step("process.fork_agent"):
        agent_pid = process.fork_role("agent", lambda: agent(plans, chan, slave), errors)
    if slave is not None:
        os.close(slave)
    with step("pidns.drop_privileges"):
        caps.drop(plans.caps)
        nnp.enable(plans.nnp)
    with step("pidns.reap"):
        status = pidns.reap(plans.pidns, agent_pid)
    chan.send("agent-exit", status=status)
    return process.exit_code_of(status)


def agent(plans: Plans, chan: Channel, tty_fd: int | None) -> int:
    step = Steps(AGENT, chan, plans.spec.trace, [])
    with step("execve.prepare"):
        execve.prepare(plans.execve, tty_fd)
    with step("cgroups.apply_rlimits"):
        cgroups.apply_rlimits(plans.cgroups)
    with step("caps.drop"):
        if plans.caps is not None:
            caps.drop(plans.caps)
    with step("nnp.enable"):
        nnp.enable(plans.nnp)
    with step("landlock.restrict"):
        if plans.landlock is not None:
            landlock.restrict(plans.landlock)
    with step("seccomp.install"):
        if plans.seccomp is not None:
            listener = seccomp.install(plans.seccomp)
            chan.send("seccomp-listener", (listener,))  # the launcher carries out and names kills
            os.close(listener)
    with step("probe.run"):
        if plans.spec.probe:
            chan.send("probe", (), rows=probe.run(plans))
            return 0
    with step("execve.execve"):
        execve.execve(plans.execve)
    raise AssertionError("execve returned")


def _supervise(chan: Channel, holder_pid: int, init_pid: int, pty_fd: int | None, outcome: Outcome,
               timeout: float | None, grace: float, cg: cgroups.Cgroup | None,
               seccomp_plan: seccomp.SeccompPlan | None) -> int:
    """Role LAUNCHER, after sync 3: relay the terminal, forward signals, collect the status.

    One select loop in the main thread (the proxy, if any, has its own threads). With a
    timeout, the agent gets SIGTERM (through init) when it expires, and the whole
    sandbox SIGKILL `grace` seconds later: killing init ends every process of its PID
    namespace. Returns the holder's wait status.
    """
    deadline = time.monotonic() + timeout if timeout is not None else None
    supervisor: seccomp.Supervisor | None = None  # from the agent, with its filter's listener
    relay = terminal.Relay(pty_fd) if pty_fd is not None else None
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
               signal.SIGUSR2, signal.SIGWINCH, signal.SIGCHLD)
    old_handlers = {sig: signal.signal(sig, lambda *_: None) for sig in handled}
    try:
        with relay if relay is not None else contextlib.nullcontext():
            chan.send("go")
            holder_status: int | None = None
            chan_open = True
            while holder_status is None:
                readers = [wake_r] + ([chan.sock.fileno()] if chan_open else [])
                readers += [supervisor.fd] if supervisor is not None else []
                writers: list[int] = []
                if relay is not None:
                    readers += relay.read_fds()
                    writers += relay.write_fds()
                if deadline is not None and time.monotonic() >= deadline:
                    deadline = _on_timeout(outcome, init_pid, grace, cg)
                wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
                try:
                    readable, writable, _ = select.select(readers, writers, [], wait)
                except InterruptedError:
                    continue
                for fd in readable:
                    if fd == wake_r:
                        for signum in os.read(wake_r, 256):
                            if signum == signal.SIGWINCH and relay is not None:
                                relay.copy_window_size()
                            elif signum not in (signal.SIGCHLD, signal.SIGWINCH):
                                with contextlib.suppress(ProcessLookupError):
                                    os.kill(init_pid, signum)
                    elif supervisor is not None and fd == supervisor.fd:
                        supervisor.handle()  # a kill decided by the filter: carry it out, name it
                    elif fd == chan.sock.fileno():
                        msg, extra = chan.receive()
                        if msg["kind"] == "seccomp-listener" and extra and seccomp_plan is not None:
                            supervisor = seccomp.Supervisor(extra.pop(0), seccomp_plan)
                        for f in extra:
                            os.close(f)
                        if msg["kind"] == "eof":
                            chan_open = False
                        elif msg["kind"] == "agent-exit":
                            outcome.status = AgentStatus.from_wait_status(int(msg["status"]))
                        elif msg["kind"] == "event":
                            outcome.events.append(msg)
                        elif msg["kind"] == "probe":
                            outcome.probe = list(msg["rows"])
                    elif relay is not None:
                        relay.on_readable(fd)
                for fd in writable:
                    if relay is not None:
                        relay.on_writable(fd)
                pid, status, rusage = os.wait4(holder_pid, os.WNOHANG)
                if pid != 0:
                    holder_status, outcome.rusage = status, rusage
            if relay is not None:
                relay.drain()
            while chan_open:  # the last messages (agent-exit) may still be queued
                msg, extra = chan.receive() if select.select([chan.sock], [], [], 0)[0] else ({"kind": "eof"}, [])
                for f in extra:
                    os.close(f)
                if msg["kind"] == "agent-exit":
                    outcome.status = AgentStatus.from_wait_status(int(msg["status"]))
                chan_open = msg["kind"] != "eof"
            return holder_status
    finally:
        if supervisor is not None:
            outcome.seccomp_kills = supervisor.kills
            supervisor.close()
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        os.close(wake_r)
        os.close(wake_w)


def _rusage_report(rusage: Any) -> dict[str, Any] | None:
    """Without a cgroup: CPU time and the largest process's peak RSS, from wait4(2).

    Each level reaps its children (init every orphan, the holder init), so the holder's
    rusage counts every process of the sandbox. Peak memory is per process, not summed.
    """
    if rusage is None:
        return None
    user, system = round(rusage.ru_utime * 1e6), round(rusage.ru_stime * 1e6)
    return {"mechanism": "rusage", "memory_peak": rusage.ru_maxrss * 1024, "cpu_usec": user + system,
            "cpu_user_usec": user, "cpu_system_usec": system, "oom_kills": 0, "pids_max_hits": 0, "sentence": None}


def _on_timeout(outcome: Outcome, init_pid: int, grace: float, cg: cgroups.Cgroup | None) -> float | None:
    """First expiry: SIGTERM to the agent (init forwards it); second: SIGKILL to init
    (and cgroup.kill, which also reaches anything that left the PID namespace's reach)."""
    if not outcome.timed_out:
        outcome.timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(init_pid, signal.SIGTERM)
        return time.monotonic() + grace
    with contextlib.suppress(ProcessLookupError):
        os.kill(init_pid, signal.SIGKILL)
    if cg is not None:
        cgroups.kill(cg)
    return None


def launch(spec: SandboxSpec, command: tuple[str, ...] | None = None, stdin_is_tty: bool | None = None,
           on_event: Callable[[dict[str, Any]], None] | None = None) -> Outcome:
    """Run one sandbox to completion. Returns the Outcome; never raises StepError."""
    tty = os.isatty(0) if stdin_is_tty is None else stdin_is_tty
    events = EventLog(on_event)
    try:
        return launcher(spec, command, tty, events)
    except StepError as e:
        return Outcome(error=e, events=events)
