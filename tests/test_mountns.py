"""Mount namespace, from inside: what is visible, what is writable, what is protected."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

from conftest import sh


def test_callers_home_and_project_siblings_are_invisible(nsbox, project, tmp_path):
    home_canary = Path.home() / f".nsbox-canary-{uuid.uuid4().hex}"
    home_canary.write_text("secret")
    sibling = tmp_path / "sibling"
    sibling.mkdir()
    (sibling / "canary").write_text("secret")
    try:
        r = nsbox(cmd=sh(f"ls {home_canary} {sibling}/canary {project}/README 2>&1; "
                         f"cat {home_canary} 2>&1; true"))
    finally:
        home_canary.unlink()
    assert r.returncode == 0, r.stderr
    assert f"{project}/README" in r.stdout
    assert "secret" not in r.stdout
    assert r.stdout.count("No such file or directory") == 3


def test_system_dirs_are_read_only_and_the_project_is_writable(nsbox, project):
    r = nsbox(cmd=sh(f"touch /usr/x 2>&1; touch /etc/x 2>&1; touch /x 2>&1; touch /dev/x 2>&1; "
                     f"echo data > {project}/new && echo project-ok; echo t > /tmp/t && echo tmp-ok"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Read-only file system") == 4, r.stdout
    assert "project-ok" in r.stdout and "tmp-ok" in r.stdout
    assert (project / "new").read_text() == "data\n"


def test_project_is_mounted_nosuid_nodev_and_nothing_else_of_the_host_is_writable(nsbox, project):
    r = nsbox(cmd=sh("cat /proc/self/mountinfo"))
    assert r.returncode == 0, r.stderr
    writable = []
    for line in r.stdout.splitlines():
        fields = line.split()
        mountpoint, opts = fields[4], fields[5].split(",")
        fstype = fields[fields.index("-") + 1]
        if mountpoint == str(project):
            assert "rw" in opts and "nosuid" in opts and "nodev" in opts
        if "rw" in opts and fstype not in ("tmpfs", "proc", "devpts"):
            writable.append(mountpoint)
    # The project, the private home, and the device nodes (binds of /dev/null etc.).
    assert str(project) in writable
    others = [m for m in writable if m != str(project) and not m.startswith(("/dev/", "/home/"))]
    assert others == [], others
    assert "oldroot" not in r.stdout and "newroot" not in r.stdout


def test_git_hooks_and_config_are_read_only(nsbox, project):
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    r = nsbox(cmd=sh(f"cd {project}; touch .git/hooks/x 2>&1; {{ echo '[x]' >> .git/config; }} 2>&1; "
                     "touch .git/other && echo other-ok"))
    assert r.stdout.count("Read-only file system") == 2, r.stdout
    assert "other-ok" in r.stdout
    assert not (project / ".git/hooks/x").exists()
    r = nsbox("--writable-git", cmd=sh(f"touch {project}/.git/hooks/x && echo ok"))
    assert r.stdout == "ok\n"


def test_a_symlinked_git_hooks_is_refused(nsbox, project, tmp_path):
    (project / ".git").mkdir()
    os.symlink(tmp_path, project / ".git" / "hooks")
    r = nsbox(cmd=["true"])
    assert r.returncode == 125
    assert r.stderr.startswith("nsbox: mountns.plan: invalid request:")
    assert "--writable-git" in r.stderr


def test_dev_holds_only_the_minimal_nodes(nsbox):
    r = nsbox(cmd=sh("ls -A /dev; stat -c '%t:%T' /dev/null; echo x > /dev/null && echo null-ok"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert sorted(lines[:-2]) == sorted(
        ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"]
    )
    assert lines[-2:] == ["1:3", "null-ok"]


def test_proc_is_masked_and_its_sys_read_only(nsbox):
    r = nsbox(cmd=sh("cat /proc/keys | wc -c; ls /proc/acpi 2>/dev/null | wc -l; "
                     "{ echo 1 > /proc/sys/kernel/core_pattern; } 2>&1; stat -c '%t:%T' /proc/keys"))
    lines = r.stdout.splitlines()
    assert lines[0] == "0" and lines[1] == "0"
    assert lines[2].endswith("/proc/sys/kernel/core_pattern: Read-only file system"), r.stdout
    assert lines[3] == "1:3", r.stdout  # masked by the null device: reads nothing, writes go nowhere
