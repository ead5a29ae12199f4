"""`nsbox run --image`: a shell from the busybox image with every launcher layer active."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from conftest import NSBOX, sh, start_nsbox, wait_for_file


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames + dirnames):
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(f"{p.relative_to(root)} {st.st_mode} {st.st_size} {int(st.st_mtime)}\n".encode())
    return h.hexdigest()


def test_a_shell_from_the_image_with_every_layer(nsbox, imported, project):
    assert imported == "busybox:latest"
    fields = "^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):"
    r = nsbox("--image", "busybox", cmd=sh(f"cat /etc/nsbox-image; id -u; wc -l < /proc/self/uid_map; "
                                           f"ls /proc | grep -c '^[0-9]'; hostname; ls {project}; "
                                           f"grep -E '{fields}' /proc/self/status | tr -d '\\t'; "
                                           "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0:3] == ["busybox", "test", "image"]
    assert lines[3] == "1000" and lines[4] == "1" and int(lines[5]) <= 4 and lines[6] == "nsbox"
    assert "README" in lines
    status = dict(line.split(":") for line in lines if ":" in line)
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert all(status[k] == "0000000000000000" for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"))
    assert lines[-1] == "lo"


def test_whiteouts_of_the_image_apply(nsbox, imported):
    r = nsbox("--image", "busybox", cmd=sh("ls /etc/motd 2>&1; ls /var/cache"))
    assert "No such file" in r.stdout and r.stdout.split()[-1] == "fresh"


def test_writes_persist_per_name_fresh_discards_and_the_image_is_never_modified(nsbox, imported, env):
    store_rootfs = Path(env["XDG_DATA_HOME"]) / "nsbox"
    assert nsbox("--image", "busybox", "--name", "keep", cmd=sh("mkdir -p /opt && echo kept > /opt/x")).returncode == 0
    rootfs_digest = _tree_digest(store_rootfs / "rootfs")
    assert nsbox("--image", "busybox", "--name", "keep", cmd=["cat", "/opt/x"]).stdout == "kept\n"
    assert nsbox("--image", "busybox", "--name", "other", cmd=sh("cat /opt/x 2>&1; true")).stdout != "kept\n"
    r = nsbox("--image", "busybox", "--name", "keep", "--fresh", cmd=sh("cat /opt/x 2>&1; true"))
    assert "No such file" in r.stdout
    assert _tree_digest(store_rootfs / "rootfs") == rootfs_digest  # the unpacked image is untouched


def test_disk_makes_the_upper_a_sized_tmpfs(nsbox, imported):
    r = nsbox("--image", "busybox", "--disk", "8M", cmd=sh("dd if=/dev/zero of=/big bs=1M count=32 2>&1; true"))
    assert "No space left on device" in r.stdout, r.stdout


def test_an_image_rm_is_refused_while_a_sandbox_uses_it(imported, env, project):
    p = start_nsbox(env, project, f"touch {project}/ready; sleep 30", "--image", "busybox")
    try:
        wait_for_file(project / "ready")
        r = subprocess.run([*NSBOX, "image", "rm", "busybox"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 125, r.stdout + r.stderr
        assert r.stderr.startswith("nsbox: image.")
    finally:
        p.kill()
        p.wait()


def _hostile_image(env: dict[str, str], tmp_path: Path, name: str, extra: list) -> None:
    """The busybox tree plus `extra` entries in a second layer, imported as NAME."""
    from image_util import d, tar

    from nsbox.image.layout import write_layout

    layout = tmp_path / name
    base = tar([d("etc"), d("tmp", 0o1777)])
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]}}
    write_layout(layout, [base, tar(extra)], config, ref_name=f"{name}:latest")
    r = subprocess.run([*NSBOX, "image", "import", str(layout)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_an_image_cannot_redirect_proc_dev_or_its_mount_points(env, nsbox, tmp_path, project):
    from image_util import sym

    victim = tmp_path / "victim"
    victim.mkdir()
    # /proc as a symlink to a host path: refused, nothing created there.
    _hostile_image(env, tmp_path, "evil-proc", [sym("proc", str(victim))])
    r = nsbox("--image", "evil-proc", cmd=["/bin/true"])
    assert r.returncode == 125 and r.stderr.startswith("nsbox: mountns.build_root: mount point '/proc'"), r.stderr
    assert list(victim.iterdir()) == []
    # /dev as a symlink: the same.
    _hostile_image(env, tmp_path, "evil-dev", [sym("dev", str(victim))])
    r = nsbox("--image", "evil-dev", cmd=["/bin/true"])
    assert r.returncode == 125 and "mount point '/dev'" in r.stderr, r.stderr
    assert list(victim.iterdir()) == []


def test_without_overlayfs_the_image_is_bound_read_only_and_said_so(nsbox, imported, env):
    # A real refusal by the kernel: overlayfs needs its upper and work directories on one
    # filesystem; this sandbox's work directory is a symlink to another one (/dev/shm).
    import tempfile

    upper = Path(env["XDG_DATA_HOME"]) / "nsbox" / "sandboxes" / "nooverlay" / "upper"
    upper.mkdir(parents=True)
    (upper / "data").mkdir()
    elsewhere = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        (upper / "work").symlink_to(elsewhere)
        r = nsbox("--image", "busybox", "--name", "nooverlay",
                  cmd=sh("cat /etc/nsbox-image; touch /opt-x 2>&1; touch /etc/x 2>&1; echo ok > /tmp/t && cat /tmp/t"))
    finally:
        import shutil

        shutil.rmtree(elsewhere)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "busybox test image"
    assert "Read-only file system" in lines[1] and "Read-only file system" in lines[2] and lines[3] == "ok"
    assert "nsbox: warning: overlayfs refused the image's root" in r.stderr
    assert list((upper / "data").iterdir()) == []  # nothing was written into the upper layer
