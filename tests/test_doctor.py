"""`nsbox doctor` through the real CLI, and the host facts hints.py shares with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NSBOX

from nsbox import host
from nsbox.errors import StepError
from nsbox.hints import explain

FACTS = ["userns", "container", "cgroup", "overlayfs", "landlock", "seccomp", "libseccomp", "subuid",
         "user-networking"]


def doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NSBOX, "doctor", *args], env=env, capture_output=True, text=True, timeout=60)


def facts_of(r: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    return {f["name"]: f for f in json.loads(r.stdout)["facts"]}


def _hybrid() -> bool:
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    return any(line.startswith("0::") for line in lines) and any(not line.startswith("0::") for line in lines)


def test_doctor_json_on_this_host(env):
    r = doctor(env, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is True
    facts = facts_of(r)
    assert list(facts) == FACTS
    assert facts["userns"]["ok"] is True and facts["userns"]["required"] is True
    assert facts["seccomp"]["ok"] and facts["libseccomp"]["ok"]
    for f in facts.values():
        assert f["ok"] or f["fix"], f  # every gap comes with its fix


@pytest.mark.skipif(not _hybrid(), reason="this host's cgroups are not hybrid (v1 controllers beside a v2 mount)")
def test_the_hybrid_cgroup_state_is_named_with_a_fix(env):
    cgroup = facts_of(doctor(env, "--json"))["cgroup"]
    assert cgroup["ok"] is False
    assert str(cgroup["summary"]).startswith("HYBRID cgroups")
    assert "memory" in str(cgroup["summary"]) and "cgroup v1" in str(cgroup["summary"])
    assert "systemd.unified_cgroup_hierarchy=1" in str(cgroup["fix"])
    assert cgroup["details"]["proc_self_cgroup"] == Path("/proc/self/cgroup").read_text().splitlines()


def test_userns_unavailable_inside_an_outer_namespace_with_max_0(env):
    script = f"echo 0 > /proc/sys/user/max_user_namespaces && exec {sys.executable} -m nsbox doctor --json"
    r = subprocess.run(["unshare", "--user", "--map-root-user", "/bin/sh", "-c", script], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert json.loads(r.stdout)["ok"] is False
    facts = facts_of(r)
    userns = facts["userns"]
    assert userns["ok"] is False and "UNAVAILABLE" in str(userns["summary"])
    assert "No space left on device" in str(userns["summary"]) and "max_user_namespaces is 0" in str(userns["summary"])
    assert "outside the enclosing sandbox" in str(userns["fix"])
    assert facts["overlayfs"]["ok"] is False  # it needs a user namespace too: the fix says so
    assert "userns" in str(facts["overlayfs"]["fix"])


def test_the_text_report_has_one_line_per_fact_and_a_verdict(env):
    r = doctor(env)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if not line.lstrip().startswith(("fix:",)) and line[:1] != " "]
    names = [line.split()[1] for line in lines[:-1]]
    assert names == FACTS
    assert lines[-1] == "nsbox doctor: nsbox can run here"


def test_doctor_changes_nothing(env, tmp_path):
    r = doctor(env, "--json")
    assert r.returncode == 0
    for var in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        assert not os.path.exists(env[var]), var


# hints.py asks host.py, so a failed run and the doctor give the same reason and fix.

def test_debian_switch():
    why, fix = host.userns_why_fix(1, {"max_user_namespaces": "100", "unprivileged_userns_clone": "0",
                                       "apparmor_restrict_unprivileged_userns": None}, outer=False)
    assert "unprivileged_userns_clone is 0" in why and "sysctl -w kernel.unprivileged_userns_clone=1" in fix


def test_ubuntu_apparmor_profile_names_the_interpreter():
    why, fix = host.userns_why_fix(1, {"max_user_namespaces": "100", "unprivileged_userns_clone": None,
                                       "apparmor_restrict_unprivileged_userns": "1"}, outer=False)
    assert "apparmor_restrict_unprivileged_userns is 1" in why
    assert f"profile nsbox {os.path.realpath(sys.executable)} flags=(unconfined)" in fix
    assert "userns," in fix and "apparmor_parser -r /etc/apparmor.d/nsbox" in fix


def test_a_failed_run_gets_the_doctors_fix():
    err = explain(StepError("userns.unshare", "unshare(CLONE_NEWUSER)", 1))  # EPERM
    _, fix = host.userns_why_fix(1, host.userns_sysctls(), host.in_outer_userns())
    assert err.fix == fix
