"""Resource limits through the CLI on a host without delegated cgroups (like these machines).

The cgroup v2 paths are proven in a VM (scripts/vm-test runs tests/test_cgroups.py there);
here: strict mode refuses with the fix, best-effort says what is weaker and applies rlimits.
"""

from __future__ import annotations

import json

import pytest

from nsbox.layers import cgroups

HOST = cgroups.probe()
NO_DELEGATION = HOST.v2_problem is not None and HOST.v1_problem is not None and HOST.scope_problem is not None
needs_undelegated = pytest.mark.skipif(not NO_DELEGATION, reason="this host delegates cgroups: see test_cgroups.py")


@needs_undelegated
def test_strict_mode_refuses_with_the_fix_and_nothing_runs(nsbox, project):
    r = nsbox("--memory", "64M", cmd=["touch", str(project / "ran")])
    assert r.returncode == 125
    lines = r.stderr.splitlines()
    assert lines[0].startswith("nsbox: cgroups.plan: enforce the requested limits: memory 64 MiB")
    assert any(line.startswith("  why: ") for line in lines)
    assert any("--limits best-effort" in line and line.startswith("  fix: ") for line in lines)
    assert not (project / "ran").exists()


@needs_undelegated
def test_best_effort_warns_and_rlimits_bite(nsbox):
    alloc = "b = bytearray(512 << 20); print('survived')"
    r = nsbox("--memory", "256M", "--cpus", "0.5", "--limits", "best-effort", "--json",
              cmd=["/usr/bin/python3", "-c", alloc])
    assert r.returncode == 1, r.stdout + r.stderr
    assert "MemoryError" in r.stderr and "survived" not in r.stdout
    assert "warning: memory 256 MiB: rlimits: RLIMIT_AS" in r.stderr
    assert "warning: cpus 0.5: NOT ENFORCED" in r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["status"] == 1 and summary["usage"]["mechanism"] == "rusage"  # no cgroup: wait4's counts
    assert nsbox("--memory", "256M", "--limits", "best-effort", cmd=["/usr/bin/python3", "-c", "print(1)"]
                 ).stdout == "1\n"


def test_the_cgroup_namespace_root_is_the_sandbox(nsbox):
    r = nsbox(cmd=["cat", "/proc/self/cgroup"])
    assert "0::/" in r.stdout.splitlines()
