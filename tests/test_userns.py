"""User namespace, from inside: the chosen non-root uid, one mapping line, setgroups deny."""

from __future__ import annotations

import os

from conftest import sh, start_nsbox, wait_for_file


def test_agent_runs_as_uid_1000_with_exactly_one_mapping(nsbox):
    r = nsbox(cmd=sh("id -u; id -g; cat /proc/self/uid_map; cat /proc/self/setgroups; whoami; echo $HOME"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "1000" and lines[1] == "1000"
    maps = [line.split() for line in lines[2:3]]
    assert maps == [["1000", str(os.getuid()), "1"]]
    assert lines[3] == "deny"
    assert lines[5] == f"/home/{lines[4]}"


def test_uid_option_and_unmapped_ids_are_nobody(nsbox):
    r = nsbox("--uid", "1234", cmd=sh("id -u; wc -l < /proc/self/uid_map; stat -c %u /etc/shadow"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1234", "1", "65534"]  # host root is not mapped: it shows as nobody


def test_chown_to_an_unmapped_id_fails(nsbox, project):
    r = nsbox(cmd=sh(f"touch {project}/f; chown 0 {project}/f; echo rc=$?"))
    assert "rc=1" in r.stdout
    assert os.stat(project / "f").st_uid == os.getuid()


def test_home_is_private_persistent_and_wiped_by_fresh(nsbox):
    r = nsbox("--name", "box1", cmd=sh('echo kept > "$HOME/note"; ls -A "$HOME"'))
    assert r.returncode == 0, r.stderr
    assert nsbox("--name", "box1", cmd=sh('cat "$HOME/note"')).stdout == "kept\n"
    assert nsbox("--name", "box2", cmd=sh('cat "$HOME/note" 2>&1; true')).stdout != "kept\n"
    assert nsbox("--name", "box1", "--fresh", cmd=sh('ls -A "$HOME" | wc -l')).stdout.strip() == "0"


def test_two_runs_with_the_same_name_at_once(nsbox, env, project):
    first = start_nsbox(env, project, f"touch {project}/ready; sleep 5", "--name", "same")
    try:
        wait_for_file(project / "ready")
        r = nsbox("--name", "same", cmd=["true"])
        assert r.returncode == 125
        assert r.stderr.startswith("nsbox: config.claim: ") and "in use by another nsbox" in r.stderr, r.stderr
        assert nsbox("--name", "different", cmd=["true"]).returncode == 0
    finally:
        first.kill()
        first.wait()
    assert nsbox("--name", "same", cmd=["true"]).returncode == 0  # the kernel released the lock
