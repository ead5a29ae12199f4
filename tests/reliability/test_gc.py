"""`nsbox gc`: what a killed launcher really leaves, and gc removes exactly that, never what is in use."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path

import rel_util as ru


def _nsbox(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ru.NSBOX, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _data(env: dict[str, str]) -> Path:
    return Path(env["XDG_DATA_HOME"]) / "nsbox"


def test_a_kill9_mid_run_leaves_nothing_for_gc(env, project, tmp_path):
    """The claim that the launcher makes no host mounts and no temp dirs of its own, checked."""
    env = {**env, "TMPDIR": str(tmp_path / "t")}
    (tmp_path / "t").mkdir()
    mounts = ru.mounts()
    for i in range(3):
        p = subprocess.Popen([*ru.NSBOX, "run", "--name", "g", str(project), "--", "/bin/sh", "-c",
                              f"touch {project}/up{i}; sleep 30"], env=env, start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert ru.wait_until(lambda i=i: (project / f"up{i}").exists(), 30)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    assert ru.mounts() == mounts
    assert list((tmp_path / "t").iterdir()) == []
    r = _nsbox(env, "gc", "--dry-run")
    assert (r.returncode, r.stdout) == (0, "nothing to remove\n"), r.stderr
    # What is there: the home, the (free) name lock, the seccomp cache. No temporary name.
    assert sorted(p.name for p in (_data(env) / "sandboxes" / "g").iterdir()) == ["home", "lock"]


def test_an_interrupted_fresh_never_leaves_a_half_wiped_home(env, project):
    home = _data(env) / "sandboxes" / "f" / "home"
    r = _nsbox(env, "run", "--name", "f", str(project), "--", "/bin/sh", "-c",
               "mkdir -p $HOME/many && cd $HOME/many && i=0; while [ $i -lt 200 ]; do mkdir d$i; "
               "j=0; while [ $j -lt 100 ]; do : > d$i/$j; j=$((j+1)); done; i=$((i+1)); done; echo keep > $HOME/k")
    assert r.returncode == 0, r.stderr
    files_before = sum(len(f) for _, _, f in os.walk(home))
    p = subprocess.Popen([*ru.NSBOX, "run", "--name", "f", "--fresh", str(project), "--", "true"], env=env,
                         start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    sandbox = home.parent
    assert ru.wait_until(lambda: any(sandbox.glob(".trash-home-*")) or p.poll() is not None, 60, step=0.002)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    trash = sorted(sandbox.glob(".trash-home-*"))
    assert len(trash) == 1, "killed while wiping: the old home sits under a trash name"
    # The home is either gone (the next run gets a fresh one) or whole: never a mix.
    assert not home.exists() or sum(len(f) for _, _, f in os.walk(home)) in (0, files_before)
    dry = _nsbox(env, "gc", "--dry-run")
    assert f"would remove {trash[0]} (an interrupted --fresh of sandbox 'f')" in dry.stdout, dry.stdout
    assert trash[0].exists()
    r = _nsbox(env, "gc")
    assert f"removed {trash[0]}" in r.stdout and not trash[0].exists()
    r = _nsbox(env, "run", "--name", "f", str(project), "--", "/bin/sh", "-c", "ls -A $HOME | wc -l")
    assert (r.returncode, r.stdout.strip()) == (0, "0"), r.stderr


def test_the_next_run_of_the_name_sweeps_its_trash_too(env, project):
    assert _nsbox(env, "run", "--name", "s", str(project), "--", "true").returncode == 0
    trash = _data(env) / "sandboxes" / "s" / ".trash-home-1-dead"
    (trash / "sub").mkdir(parents=True)
    (trash / "sub").chmod(0o500)
    assert _nsbox(env, "run", "--name", "s", str(project), "--", "true").returncode == 0
    assert not trash.exists()


def test_gc_skips_whatever_a_live_nsbox_holds(env, project):
    data = _data(env)
    go = project / "go"
    p = subprocess.Popen([*ru.NSBOX, "run", "--name", "live", str(project), "--", "/bin/sh", "-c",
                          f"touch {project}/up; while [ ! -e {go} ]; do sleep 0.05; done"], env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert ru.wait_until(lambda: (project / "up").exists(), 30)
    trash = data / "sandboxes" / "live" / ".trash-home-7-x"
    trash.mkdir()
    # A store with an unpack in progress (its lock held) and a store-wide writer.
    for d in ("locks", "rootfs", "tmp"):
        (data / d).mkdir(exist_ok=True)
    unpacking = data / "rootfs" / (".tmp-" + "a" * 64 + "-99")
    unpacking.mkdir()
    fd = os.open(data / "locks" / ("unpack-" + "a" * 64 + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        r = _nsbox(env, "gc")
        assert r.returncode == 0, r.stderr
        assert f"skipped {trash}: sandbox 'live' is running" in r.stdout
        assert f"skipped {unpacking}: being unpacked right now" in r.stdout
        assert trash.exists() and unpacking.exists()
        store_lock = os.open(data / "locks" / "store.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(store_lock, fcntl.LOCK_SH)  # what an import, unpack or run holds
        try:
            (data / "tmp" / "blob-half").write_bytes(b"x")
            r = _nsbox(env, "gc")
            assert "the image store is in use" in r.stdout and (data / "tmp" / "blob-half").exists()
        finally:
            os.close(store_lock)
    finally:
        os.close(fd)
        go.touch()
        assert p.wait(60) == 0
    r = _nsbox(env, "gc")
    for gone in (trash, unpacking, data / "tmp" / "blob-half"):
        assert f"removed {gone}" in r.stdout and not gone.exists(), r.stdout


def test_gc_removes_each_kind_of_store_leftover_and_nothing_else(env, project, tmp_path):
    data = _data(env)
    # A real image in the store, unpacked, so that gc has live things to leave alone.
    from nsbox.image.layout import write_layout

    import_dir = tmp_path / "layout"
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("hello")
        ti.size = 3
        tf.addfile(ti, io.BytesIO(b"hi\n"))
    write_layout(import_dir, [buf.getvalue()], {"config": {"Cmd": ["/hello"]}})
    assert _nsbox(env, "image", "import", str(import_dir), "--name", "t").returncode == 0
    assert _nsbox(env, "image", "unpack", "t", str(tmp_path / "out")).returncode == 0
    from nsbox.image.store import Store

    Store(data).rootfs_for("t")
    planted = [data / "tmp" / "blob-abc123", data / "tmp" / "import-xyz", data / ".index-q1",
               data / "rootfs" / (".trash-" + "b" * 64 + "-5"), data / "rootfs" / (".tmp-" + "c" * 64 + "-6")]
    for path in planted:
        if path.name.startswith(("import-", ".trash-", ".tmp-")):
            (path / "usr").mkdir(parents=True)
            (path / "usr" / "f").write_text("x")
            (path / "usr").chmod(0o555)  # an image's read-only directory
        else:
            path.write_bytes(b"half")
    assert _nsbox(env, "run", "--network", "none", str(project), "--", "true").returncode == 0  # caches a filter
    cache = Path(env["XDG_CACHE_HOME"]) / "nsbox" / "seccomp"
    old_tmp, new_tmp = cache / ".tmp-old", cache / ".tmp-new"
    old_tmp.write_bytes(b"\0" * 8)
    new_tmp.write_bytes(b"\0" * 8)
    old_format = cache / ("d" * 64 + ".bpf")  # what nsbox cached before whole plans (<key>.json)
    old_format.write_bytes(b"\0" * 8)
    current = sorted(cache.glob("*.json"))  # this run's cache entries: in use, kept
    os.utime(old_tmp, (time.time() - 7200,) * 2)
    keep = ru.tree_state(data / "blobs"), (data / "index.json").read_bytes(), sorted(os.listdir(data / "rootfs"))
    r = _nsbox(env, "gc")
    assert r.returncode == 0, r.stderr
    for path in [*planted, old_tmp, old_format]:
        assert f"removed {path} (" in r.stdout and not os.path.lexists(path), r.stdout
    assert f"skipped {new_tmp}" in r.stdout and new_tmp.exists()
    assert current and all(p.exists() for p in current)
    after = ru.tree_state(data / "blobs"), (data / "index.json").read_bytes(), sorted(os.listdir(data / "rootfs"))
    assert after[:2] == keep[:2]
    assert after[2] == [n for n in keep[2] if not n.startswith(".")] and len(after[2]) == 1
    ls = _nsbox(env, "image", "ls", "--json")
    assert '"unpacked": true' in ls.stdout
