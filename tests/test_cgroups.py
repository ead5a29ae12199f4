"""nsbox.layers.cgroups: which mechanism enforces each limit, and the limits themselves.

Three groups:
  - the plan, from host facts given as data (pure; runs everywhere);
  - this host for real: strict refusal, rlimits, and cgroup v1 where an administrator
    delegated a v1 subtree (scripts/delegate-cgroup-v1);
  - cgroup v2 for real: these skip on hybrid hosts like the test machines, and
    scripts/vm-test runs them in a VM whose only hierarchy is cgroup2, as an unprivileged
    user inside a delegated subtree.

The v2 and v1 tests start tests/cgroup_helper.py (the layer's steps in launch order)
through `launch()`; the `nsbox run` integration tests will take the same shape.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nsbox.errors import ExitCode, StepError
from nsbox.layers import cgroups
from nsbox.layers.cgroups import CGROUP1, CGROUP2, NONE, RLIMITS, SCOPE, CgroupHost

REPO = Path(__file__).resolve().parent.parent
HELPER = [sys.executable, str(REPO / "tests" / "cgroup_helper.py")]
MiB = 1 << 20
pytestmark = pytest.mark.timeout(600)  # the VM emulates its CPU: python starts in seconds there
NO_V2 = "no delegated cgroup2 controllers on this host (hybrid v1); scripts/vm-test runs them in a VM"
NO_V1 = "no cgroup v1 hierarchy is delegated to this user beneath its cgroup (as root: scripts/delegate-cgroup-v1)"

DELEGATED_V2 = CgroupHost(v2_base="/sys/fs/cgroup/user", v2_controllers=frozenset({"memory", "cpu", "pids", "io"}),
                          v2_move_launcher=True, v2_problem=None)
NOTHING = CgroupHost(v2_problem="not delegated", scope_problem="no systemd", v1_problem="not writable")


# ---- the plan, from facts ---------------------------------------------------------------------


def test_no_limits_asked_means_no_mechanism() -> None:
    p = cgroups.plan(None, None, None, best_effort=False, host=NOTHING)
    assert p.limits == () and p.backend == NONE
    assert p.describe() == ["no resource limits requested"]
    assert cgroups.create(p) is None


def test_delegated_cgroup2_enforces_every_limit() -> None:
    p = cgroups.plan(64 * MiB, 0.5, 32, best_effort=False, host=DELEGATED_V2)
    assert [p.mechanism(n) for n in ("memory", "cpus", "pids")] == [CGROUP2] * 3
    assert p.controllers == ("cpu", "memory", "pids")
    text = "\n".join(p.describe())
    assert "memory 64 MiB: cgroup2 leaf beneath /sys/fs/cgroup/user: memory.max 67108864" in text
    assert "memory.swap.max 0, memory.oom.group 1" in text
    assert "cpu.max 50000 100000" in text
    assert "pids 32: cgroup2 leaf beneath /sys/fs/cgroup/user: pids.max 32" in text


def test_missing_controller_falls_back_and_strict_mode_refuses() -> None:
    host = CgroupHost(v2_base="/x", v2_controllers=frozenset({"memory"}), v2_problem=None,
                      scope_problem="no systemd", v1_problem="not writable")
    with pytest.raises(StepError) as e:
        cgroups.plan(64 * MiB, None, 16, best_effort=False, host=host)
    assert e.value.step == "cgroups.plan" and e.value.exit_code == ExitCode.NSBOX
    assert "pids 16 cannot be enforced by a cgroup here" in e.value.render()
    assert "cgroup2: the pids controller(s) are not available" in (e.value.why or "")
    p = cgroups.plan(64 * MiB, None, 16, best_effort=True, host=host)
    assert (p.mechanism("memory"), p.mechanism("pids")) == (CGROUP2, RLIMITS)


def test_strict_refusal_names_the_fix() -> None:
    with pytest.raises(StepError) as e:
        cgroups.plan(64 * MiB, 0.5, None, best_effort=False, host=NOTHING)
    text = e.value.render()
    assert text.startswith("nsbox: cgroups.plan: enforce the requested limits: memory 64 MiB, cpus 0.5 cannot")
    assert "systemd-run --user --scope -p Delegate=yes" in text
    assert "--limits best-effort" in text and "RLIMIT_AS" in text
    assert "why: cgroup2: not delegated; systemd-scope: no systemd; cgroup1: not writable" in text


def test_best_effort_says_what_is_weaker_and_what_is_not_enforced() -> None:
    p = cgroups.plan(64 * MiB, 0.5, 32, best_effort=True, host=NOTHING)
    assert (p.mechanism("memory"), p.mechanism("cpus"), p.mechanism("pids")) == (RLIMITS, NONE, RLIMITS)
    text = "\n".join(p.describe())
    assert "memory 64 MiB: rlimits: RLIMIT_AS 67108864 (WEAKER" in text
    assert "pids 32: rlimits: RLIMIT_NPROC 32 (WEAKER: counts every process of your uid" in text
    assert "cpus 0.5: NOT ENFORCED" in text
    assert cgroups.create(p) is None


def test_order_of_fallbacks() -> None:
    scope = CgroupHost(v2_problem="not delegated", scope_controllers=frozenset({"memory", "pids", "cpu"}),
                       scope_problem=None, v1_bases=(("memory", "/v1/memory/me"),), v1_problem=None)
    p = cgroups.plan(64 * MiB, None, 8, best_effort=False, host=scope)
    assert p.backend == SCOPE and p.mechanism("pids") == SCOPE
    assert any("systemd-run --user --scope -p Delegate=yes" in line for line in p.describe())
    v1 = CgroupHost(v2_problem="hybrid", scope_problem="no systemd", v1_problem=None,
                    v1_bases=(("memory", "/v1/memory/me"), ("pids", "/v1/pids/me")))
    p = cgroups.plan(64 * MiB, None, 8, best_effort=False, host=v1)
    assert (p.mechanism("memory"), p.mechanism("pids")) == (CGROUP1, CGROUP1)
    assert "cgroup v1 leaf beneath /v1/pids/me: pids.max 8" in p.describe()[1]
    # The backend enforcing every limit wins over an earlier one enforcing only some.
    partial_v2 = CgroupHost(v2_base="/x", v2_controllers=frozenset({"memory"}), v2_problem=None,
                            scope_problem="no", v1_problem=None, v1_bases=v1.v1_bases)
    assert cgroups.plan(64 * MiB, None, 8, best_effort=False, host=partial_v2).backend == CGROUP1


def test_scope_reexec_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    if cgroups.shutil.which("systemd-run") is None:
        assert cgroups.scope_reexec_argv(["nsbox", "run"]) is None
    else:
        argv = cgroups.scope_reexec_argv(["nsbox", "run", "--memory", "1G"])
        assert argv is not None
        assert argv[:7] == ["systemd-run", "--user", "--scope", "--quiet", "--collect", "-p", "Delegate=yes"]
        assert argv[-5:] == [f"{cgroups.SCOPE_ENV}=1", "nsbox", "run", "--memory", "1G"]
    monkeypatch.setenv(cgroups.SCOPE_ENV, "1")  # re-executed once already: never again
    assert cgroups.scope_reexec_argv(["nsbox", "run"]) is None


# ---- this host, for real ------------------------------------------------------------------------


HOST = cgroups.probe()


def test_probe_reads_this_process_cgroup() -> None:
    rel = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
               if line.startswith("0::"))
    if HOST.v2_base is not None:
        assert Path(HOST.v2_base, "cgroup.procs").is_file()
        assert HOST.v2_base.endswith(rel) if rel != "/" else Path(HOST.v2_base, "cgroup.controllers").is_file()
        assert (os.getpid() in cgroups._pids_in(HOST.v2_base)) == HOST.v2_move_launcher or rel == "/"
    for controller, base in HOST.v1_bases:
        assert os.access(base, os.W_OK), (controller, base)


@pytest.mark.skipif(HOST.v1_problem is None or HOST.v2_problem is None, reason="a cgroup is delegated to this user")
def test_strict_mode_refuses_on_this_host() -> None:
    run = launch("--memory", "64M", cmd=["true"])
    assert run.returncode == ExitCode.NSBOX
    assert run.stderr.startswith("nsbox: cgroups.plan: enforce the requested limits: memory 64 MiB cannot be enforced")
    assert "fix: " in run.stderr and "--limits best-effort" in run.stderr


def test_rlimits_are_applied_and_bite() -> None:
    # RLIMIT_NPROC 1: this user already runs a process, so the next fork must fail.
    script = textwrap.dedent("""
        import errno, os, resource
        from nsbox.layers import cgroups
        plan = cgroups.plan(256 << 20, None, 1, best_effort=True, host=cgroups.CgroupHost())
        cgroups.apply_rlimits(plan)
        print(resource.getrlimit(resource.RLIMIT_AS), resource.getrlimit(resource.RLIMIT_NPROC))
        try:
            bytearray(512 << 20)
        except MemoryError:
            print("MemoryError")
        try:
            os.fork() or os._exit(0)
        except BlockingIOError as e:
            print(errno.errorcode[e.errno])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == [f"({256 << 20}, {256 << 20}) (1, 1)", "MemoryError", "EAGAIN"]


# ---- launching through the layer -----------------------------------------------------------------


class Run:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        lines = proc.stdout.strip().splitlines()
        self.result: dict[str, Any] = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
        self.output = "\n".join(lines[:-1]) if self.result else proc.stdout


def launch(*limits: str, cmd: list[str], cgroup: str | None = None, timeout: float = 240) -> Run:
    """Run `cmd` under `limits` through the cgroups layer, as a launcher of its own.

    `cgroup`: a cgroup v2 directory the launcher starts in, alone, the way systemd starts
    a scope: a v2 launcher must be the only process of its cgroup to enable controllers.
    """
    def start_in_cgroup() -> None:
        if cgroup is not None:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    proc = subprocess.run([*HELPER, *limits, "--", *cmd], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, preexec_fn=start_in_cgroup)
    return Run(proc)


ALLOCATE_256M = ["python3", "-c", "b = bytearray(256 << 20); b[::4096] = b'x' * len(b[::4096]); print('survived')"]
FORK_BOMB = ["python3", "-c", textwrap.dedent("""
    import os, signal
    children = []
    try:
        while len(children) < 1000:
            pid = os.fork()
            if pid == 0:
                signal.pause()
                os._exit(0)
            children.append(pid)
    except BlockingIOError as e:
        print("EAGAIN after", len(children), "forks", e.errno)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
""")]


# ---- cgroup v2, for real (in the VM) --------------------------------------------------------------

V2_READY = HOST.v2_problem is None and {"memory", "cpu", "pids"} <= HOST.v2_controllers
v2 = pytest.mark.skipif(not V2_READY, reason=NO_V2)


@pytest.fixture(scope="module")
def delegated() -> Iterator[str]:
    """The delegated cgroup v2 directory this test process runs in, readied like systemd's.

    The test process leaves for a leaf beneath its cgroup (the no-internal-processes rule)
    and enables memory, cpu and pids there; each test's launcher then starts alone in a
    fresh child, as in a `systemd-run --user --scope` unit. All of it stays beneath the
    cgroup the tests started in, and is undone afterwards.
    """
    if not V2_READY:
        pytest.skip(NO_V2)
    base = HOST.v2_base
    assert base is not None and HOST.v2_move_launcher
    me = os.path.join(base, f"pytest-{os.getpid()}")
    os.mkdir(me)
    Path(me, "cgroup.procs").write_text(str(os.getpid()))
    Path(base, "cgroup.subtree_control").write_text("+memory +cpu +pids")
    try:
        yield base
    finally:
        Path(base, "cgroup.subtree_control").write_text("-memory -cpu -pids")
        Path(base, "cgroup.procs").write_text(str(os.getpid()))
        os.rmdir(me)


_scopes = itertools.count()


@pytest.fixture
def scope(delegated: str) -> Iterator[str]:
    path = os.path.join(delegated, f"scope-{os.getpid()}-{next(_scopes)}")
    os.mkdir(path)
    try:
        yield path
    finally:
        os.rmdir(path)  # fails (and so fails the test) if the launcher left anything in it


@v2
def test_v2_leaf_beneath_own_cgroup_then_removed(scope: str) -> None:
    run = launch("--pids", "64", cmd=["cat", "/proc/self/cgroup"], cgroup=scope)
    assert run.returncode == 0, run.stderr
    r = run.result
    assert r["mechanisms"]["pids"] == CGROUP2
    assert r["base"] == scope
    assert r["leaf"].startswith(scope + "/nsbox-")
    assert r["launcher_leaf"].startswith(scope + "/nsbox-launcher-")
    assert run.output.strip() == "0::/" + os.path.relpath(r["leaf"], "/sys/fs/cgroup")  # the VM's cgroup2 mount
    assert r["leaves_after"] == [] and r["launcher_leaf_after"] is False
    assert [d.name for d in os.scandir(scope) if d.is_dir()] == []
    assert Path(scope, "cgroup.subtree_control").read_text().strip() == ""


@v2
def test_v2_memory_limit_ends_in_an_oom_kill(scope: str) -> None:
    run = launch("--memory", "64M", cmd=ALLOCATE_256M, cgroup=scope)
    r = run.result
    assert r, run.stderr
    assert r["files"]["memory.max"] == str(64 * MiB)
    assert r["files"]["memory.swap.max"] == "0" and r["files"]["memory.oom.group"] == "1"
    assert run.returncode == 137 and "survived" not in run.output  # SIGKILL; the launcher lived to report
    assert r["usage"]["oom_kills"] >= 1
    assert r["usage"]["sentence"] == "the agent was killed by the OOM killer: memory limit 64 MiB reached"
    assert r["usage"]["memory_peak"] is None or r["usage"]["memory_peak"] <= 64 * MiB
    assert r["leaves_after"] == []


@v2
def test_v2_pids_limit_stops_a_fork_bomb(scope: str) -> None:
    run = launch("--pids", "16", cmd=FORK_BOMB, cgroup=scope)
    r = run.result
    assert run.returncode == 0, run.stderr
    assert r["files"]["pids.max"] == "16"
    words = run.output.split()
    assert words[:2] == ["EAGAIN", "after"] and int(words[2]) <= 15 and words[-1] == "11"  # errno 11 = EAGAIN
    assert r["usage"]["pids_max_hits"] >= 1
    assert r["usage"]["sentence"].startswith("the process limit 16 was reached")


@v2
def test_v2_cpu_max_holds_a_busy_loop_near_half_a_core(scope: str) -> None:
    # The busy process samples its own cgroup's cpu.stat around the loop, so that python's
    # start (slow under emulation) does not count.
    busy = ["python3", "-c", textwrap.dedent("""
        import time
        leaf = "/sys/fs/cgroup" + open("/proc/self/cgroup").read().strip().split(":", 2)[2]
        def usage():
            return int(dict(line.split() for line in open(leaf + "/cpu.stat"))["usage_usec"]) / 1e6
        u, t = usage(), time.monotonic()
        while time.monotonic() - t < 4:
            pass
        print((usage() - u) / (time.monotonic() - t))
    """)]
    run = launch("--cpus", "0.5", cmd=busy, cgroup=scope)
    r = run.result
    assert run.returncode == 0, run.stderr
    assert r["files"]["cpu.max"] == "50000 100000"
    share = float(run.output.strip())
    assert 0.3 < share < 0.7, share  # unlimited, one busy process takes a whole core


# ---- cgroup v1 where delegated (this host, after scripts/delegate-cgroup-v1) -------------------------

V1_READY = HOST.v2_problem is not None and {"memory", "pids"} <= {c for c, _ in HOST.v1_bases}
v1 = pytest.mark.skipif(not V1_READY, reason=NO_V1)


@v1
def test_v1_memory_limit_ends_in_an_oom_kill() -> None:
    run = launch("--memory", "64M", cmd=ALLOCATE_256M)
    r = run.result
    assert r, run.stderr
    assert r["mechanisms"]["memory"] == CGROUP1
    assert r["files"]["memory.limit_in_bytes"] == str(64 * MiB)
    assert run.returncode == 137 and "survived" not in run.output
    assert r["usage"]["oom_kills"] >= 1
    assert r["leaves_after"] == []


@v1
def test_v1_pids_limit_stops_a_fork_bomb() -> None:
    run = launch("--pids", "16", cmd=FORK_BOMB)
    r = run.result
    assert run.returncode == 0, run.stderr
    assert r["mechanisms"]["pids"] == CGROUP1
    assert r["files"]["pids.max"] == "16"
    assert run.output.split()[:2] == ["EAGAIN", "after"]
    assert r["usage"]["pids_max_hits"] >= 1
    assert r["leaves_after"] == []
