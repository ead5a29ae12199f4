"""--timeout and --disk through the real CLI (cgroup limits are in test_cgroups.py)."""

from __future__ import annotations

import time

from conftest import sh


def test_timeout_ends_an_agent_that_ignores_sigterm_with_124(nsbox):
    start = time.monotonic()
    r = nsbox("--timeout", "2s", cmd=sh("trap '' TERM; sleep 60"))
    elapsed = time.monotonic() - start
    assert r.returncode == 124, r.stderr
    assert "timeout" in r.stderr and "--timeout 2s" in r.stderr
    assert elapsed < 2 + 3 + 5  # timeout + grace + launch slack, far below the 60 s sleep


def test_timeout_sends_sigterm_first(nsbox, project):
    r = nsbox("--timeout", "1s", cmd=sh(f"trap 'echo term > {project}/got; exit 0' TERM; "
                                        "while :; do sleep 0.05; done"))
    assert r.returncode == 124
    assert (project / "got").read_text() == "term\n"


def test_a_command_within_its_timeout_keeps_its_status(nsbox):
    assert nsbox("--timeout", "30s", cmd=sh("exit 3")).returncode == 3


def test_disk_caps_tmp_with_enospc_and_the_project_is_intact(nsbox, project):
    (project / "keep").write_text("precious\n")
    r = nsbox("--disk", "16M", cmd=sh("dd if=/dev/zero of=/tmp/big bs=1M count=64 2>&1; "
                                      "dd if=/dev/zero of=/dev/shm/big bs=1M count=64 2>&1; true"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("No space left on device") == 2, r.stdout
    assert (project / "keep").read_text() == "precious\n"


def test_bad_limit_values_are_refused_before_anything_runs(nsbox, project):
    for args in (["--timeout", "5x"], ["--timeout", "0"], ["--disk", "lots"], ["--disk", "10K"]):
        r = nsbox(*args, cmd=sh(f"touch {project}/ran"))
        assert r.returncode == 125, (args, r.stderr)
        assert r.stderr.startswith("nsbox: spec.validate: "), r.stderr
    assert not (project / "ran").exists()


def test_config_toml_gives_default_limits_and_flags_win(nsbox, env, project):
    from pathlib import Path

    conf = Path(env["XDG_CONFIG_HOME"]) / "nsbox"
    conf.mkdir(parents=True)
    (conf / "config.toml").write_text('timeout = "1s"\ndisk = "8M"\n')
    r = nsbox(cmd=sh("dd if=/dev/zero of=/tmp/big bs=1M count=16 2>&1; sleep 30"))
    assert r.returncode == 124 and "No space left on device" in r.stdout
    assert nsbox("--timeout", "30s", cmd=sh("sleep 2; exit 5")).returncode == 5  # the flag wins
    (conf / "config.toml").write_text('timeout = "soon"\n')
    r = nsbox(cmd=["true"])
    assert r.returncode == 125 and r.stderr.startswith("nsbox: spec.validate: "), r.stderr


def test_verbose_reports_usage(nsbox):
    r = nsbox("--verbose", cmd=sh("i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"))
    assert r.returncode == 0
    line = next(x for x in r.stderr.splitlines() if x.startswith("nsbox: usage ("))
    assert "cpu " in line and "peak memory" in line
