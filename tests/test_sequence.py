"""The launch order: pinned on the table, and observed in a real run's events."""

from __future__ import annotations

import json

from nsbox.launch import AGENT, HOLDER, INIT, LAUNCHER, SEQUENCE


def ids(who: str | None = None) -> list[str]:
    return [s.id for s in SEQUENCE if who is None or s.who == who]


def before(a: str, b: str) -> bool:
    return ids().index(a) < ids().index(b)


def test_every_step_appears_once():
    assert len(ids()) == len(set(ids()))


def test_user_namespace_first_then_maps_then_the_rest():
    assert ids(HOLDER)[0] == "userns.unshare"
    assert before("userns.unshare", "userns.write_maps")
    assert before("userns.write_maps", "process.unshare_rest")
    assert before("process.unshare_rest", "process.fork_init")


def test_proc_is_mounted_before_the_pivot_and_mounts_start_private():
    assert ids(INIT)[0] == "mountns.make_private"
    assert before("pidns.mount_proc", "mountns.pivot_root")
    assert before("mountns.seal", "mountns.pivot_root")


def test_privileged_init_steps_come_before_the_agent_exists():
    for step in ("netns.bring_up_loopback", "utsns.set_hostname", "pidns.harden_init", "pidns.block_signals"):
        assert before(step, "process.fork_agent")


def test_execve_is_the_agents_last_step():
    assert ids(AGENT)[-1] == "execve.execve"


def test_the_launcher_supervises_then_reports():
    assert ids(LAUNCHER)[-2:] == ["process.supervise", "cgroups.report"]


def test_the_cgroup_exists_before_the_holder_and_holds_it_before_its_namespaces():
    assert before("cgroups.create", "process.fork_holder")
    assert before("cgroups.enter", "process.unshare_rest")


def test_privileges_drop_in_order_and_seccomp_is_last_before_exec():
    agent = ids(AGENT)
    assert agent.index("caps.drop") < agent.index("nnp.enable") < agent.index("seccomp.install")
    assert agent.index("landlock.restrict") < agent.index("seccomp.install")
    # probe.run is verify's replacement for execve: nothing but it sits between the two.
    assert agent[-3:] == ["seccomp.install", "probe.run", "execve.execve"]


def test_a_real_run_reports_the_steps_in_table_order(nsbox, tmp_path):
    log = tmp_path / "events.jsonl"
    r = nsbox("--log", str(log), cmd=["true"])
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in log.read_text().splitlines()]
    seen = [e["step"] for e in events if e.get("event") == "step.ok"]
    for who in (LAUNCHER, HOLDER, INIT):
        mine = [e["step"] for e in events if e.get("event") == "step.ok" and e["role"] == who]
        assert mine == [s for s in ids(who) if s in mine]
    # The agent's last step (execve) never reports: a successful execve replaces the process.
    assert "execve.prepare" in seen and "execve.execve" not in seen
    assert set(ids()) - set(seen) == {"execve.execve"}
    assert events[-1]["event"] == "sandbox.exit" and events[-1]["status"] == 0 and events[-1]["signal"] is None
