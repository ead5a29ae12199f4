"""The image store: import, ls, inspect, rm with garbage collection, locks, and real images.

Every store lives in the test's own tmp directory. Concurrency is tested with real
processes (flock is per open file, so two processes are the honest test).
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from image_util import REPO, d, digest, f, hard, sym, tar, tree

from nsbox.errors import StepError
from nsbox.image.layout import sha256_digest, write_layout
from nsbox.image.store import ImageRef, Store, remove_tree
from nsbox.image.unpack import Budget

SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "images"

L1 = tar([d("bin"), f("bin/tool", b"tool\n", 0o755), sym("bin/sh", "/bin/tool"), hard("bin/tool2", "bin/tool"),
          d("etc"), f("etc/motd", b"motd\n"), d("var/cache"), f("var/cache/old", b"old\n")])
L2 = tar([f("etc/.wh.motd"), d("var/cache"), f("var/cache/.wh..wh..opq"), f("var/cache/new", b"new\n")])
CONFIG = {"config": {"Env": ["PATH=/bin", "A=1"], "WorkingDir": "/work", "User": "1000:1000",
                     "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"]},
          "created": "2024-01-01T00:00:00Z"}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "store")
    yield s
    remove_tree(s.root)


@pytest.fixture
def layout_dir(tmp_path: Path) -> Path:
    out = tmp_path / "layout"
    write_layout(out, [L1, L2], CONFIG, ref_name="demo:1")
    return out


def tar_dir(src: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w") as tf:
        for p in sorted(src.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(src)), recursive=False)
    return dest


def docker_archive(dest: Path, layers: list[bytes], config: dict[str, object], tags: list[str]) -> Path:
    """A `docker save` archive (manifest.json + <id>/layer.tar + <config>.json), built by hand."""
    cfg = json.dumps({**config, "rootfs": {"type": "layers", "diff_ids": [digest(t) for t in layers]}}).encode()
    members: dict[str, bytes] = {f"{digest(cfg)[7:]}.json": cfg}
    paths = []
    for t in layers:
        paths.append(f"{digest(t)[7:]}/layer.tar")
        members[paths[-1]] = t
    members["manifest.json"] = json.dumps([{"Config": f"{digest(cfg)[7:]}.json", "RepoTags": tags,
                                            "Layers": paths}]).encode()
    with tarfile.open(dest, "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return dest


EXPECTED = {
    "bin": ("dir", 0o755, ""),
    "bin/tool": ("file", 0o755, digest(b"tool\n")[7:]),
    "bin/tool2": ("file", 0o755, digest(b"tool\n")[7:]),
    "bin/sh": ("symlink", 0o777, "/bin/tool"),
    "etc": ("dir", 0o755, ""),
    "var": ("dir", 0o755, ""),
    "var/cache": ("dir", 0o755, ""),
    "var/cache/new": ("file", 0o644, digest(b"new\n")[7:]),
}


def test_import_layout_dir_then_rootfs(store: Store, layout_dir: Path) -> None:
    ref = store.import_image(layout_dir)
    assert ref.name == "demo:1"
    assert tree(store.rootfs_for("demo:1")) == EXPECTED
    info = store.inspect("demo:1")
    assert info["names"] == ["demo:1"] and info["digest"] == ref.digest
    assert [layer["diff_id"] for layer in info["layers"]] == [digest(L1), digest(L2)]
    assert info["size"] == sum(p.stat().st_size for p in (layout_dir / "blobs" / "sha256").iterdir())
    assert info["rootfs"] == str(store.rootfs_for(ref))


def test_layout_tar_and_docker_archive_give_the_same_rootfs(store: Store, layout_dir: Path, tmp_path: Path) -> None:
    oci = store.import_image(tar_dir(layout_dir, tmp_path / "layout.tar"), name="from-tar")
    docker = store.import_image(docker_archive(tmp_path / "docker.tar", [L1, L2], CONFIG, ["reg.example/x:7"]))
    assert docker.name == "reg.example/x:7"
    assert store.rootfs_for(oci) == store.rootfs_for(docker)  # same DiffIDs -> same ChainID -> one tree
    assert tree(store.rootfs_for(docker)) == EXPECTED


def test_image_config(store: Store, layout_dir: Path) -> None:
    store.import_image(layout_dir)
    c = store.config("demo:1")
    assert c.env == ("PATH=/bin", "A=1") and c.working_dir == "/work" and c.user == "1000:1000"
    assert c.argv() == ("/bin/sh", "-c", "echo hi")
    assert c.argv(("id",)) == ("/bin/sh", "-c", "id")


@pytest.mark.parametrize(("config", "error"), [
    ({"Env": "PATH=/bin"}, "read Env"),
    ({"Env": ["NOEQUALS"]}, "without '='"),
    ({"Entrypoint": ["x" * (200 << 10)]}, "longer than"),
    ({"Cmd": [1, 2]}, "read Cmd"),
])
def test_hostile_image_config_is_refused(store: Store, tmp_path: Path, config: dict[str, object],
                                         error: str) -> None:
    write_layout(tmp_path / "bad", [L1], {"config": config}, ref_name="bad")
    store.import_image(tmp_path / "bad")
    with pytest.raises(StepError, match=error):
        store.config("bad")


def test_names_tags_and_resolution(store: Store, layout_dir: Path) -> None:
    ref = store.import_image(layout_dir, name="alpha")
    assert ref.name == "alpha:latest"
    assert store.resolve("alpha") == ImageRef(ref.digest, "alpha:latest")
    assert store.resolve(ref.digest[7:19]).digest == ref.digest  # a hex prefix
    assert store.resolve(f"alpha@{ref.digest}").digest == ref.digest
    store.import_image(layout_dir, name="beta:2")
    assert [i.names for i in store.list_images()] == [("alpha:latest", "beta:2")]
    with pytest.raises(StepError) as e:
        store.resolve("nope")
    assert "image.resolve" in str(e.value) and "nsbox image import" in str(e.value)
    with pytest.raises(StepError, match="invalid image name"):
        store.import_image(layout_dir, name="bad name!")


def test_a_name_moves_to_the_newer_image(store: Store, layout_dir: Path, tmp_path: Path) -> None:
    first = store.import_image(layout_dir, name="app")
    write_layout(tmp_path / "v2", [L1], CONFIG)
    second = store.import_image(tmp_path / "v2", name="app")
    assert store.resolve("app").digest == second.digest != first.digest
    assert {i.ref.digest: i.names for i in store.list_images()} == {first.digest: (), second.digest: ("app:latest",)}


def test_remove_collects_garbage(store: Store, layout_dir: Path, tmp_path: Path) -> None:
    ref = store.import_image(layout_dir, name="one")
    store.import_image(layout_dir, name="two")
    rootfs = store.rootfs_for(ref)
    assert store.remove("one") == ["one:latest"]  # "two" still names it: nothing else goes
    assert rootfs.is_dir() and store.resolve("two").digest == ref.digest
    removed = store.remove("two")
    assert "two:latest" in removed and ref.digest in removed
    assert not rootfs.exists()
    assert list(store.blobs.iterdir()) == []
    assert [p.name for p in store.rootfs_dir.iterdir()] == []
    assert store.list_images() == []


def test_remove_keeps_blobs_shared_with_another_image(store: Store, layout_dir: Path, tmp_path: Path) -> None:
    write_layout(tmp_path / "base", [L1], CONFIG)
    base = store.import_image(tmp_path / "base", name="base")
    demo_layers = [layer["digest"] for layer in store.inspect(store.import_image(layout_dir))["layers"]]
    removed = store.remove("demo:1")
    assert demo_layers[1] in removed and demo_layers[0] not in removed  # L1 is shared with base
    assert tree(store.rootfs_for(base)) == {k: v for k, v in EXPECTED.items() if k != "var/cache/new"} | {
        "etc/motd": ("file", 0o644, digest(b"motd\n")[7:]), "var/cache/old": ("file", 0o644, digest(b"old\n")[7:])}


HOLDER = """
import sys
from nsbox.image.store import Store
with Store(sys.argv[1]).use_rootfs(sys.argv[2]) as p:
    print(p, flush=True)
    sys.stdin.read()
"""


def test_remove_refuses_while_a_sandbox_uses_the_rootfs(store: Store, layout_dir: Path) -> None:
    ref = store.import_image(layout_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store.root), "demo:1"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        rootfs = Path(holder.stdout.readline().strip())
        index_before = store.index_path.read_bytes()
        with pytest.raises(StepError) as e:
            store.remove("demo:1")
        assert "in use by a running sandbox" in str(e.value) and e.value.step == "image.remove"
        assert rootfs.is_dir() and store.index_path.read_bytes() == index_before  # nothing changed
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    store.remove(ref.digest)
    assert not rootfs.exists()


RACER = """
import os, sys, time
from nsbox.image.store import Store
store = Store(sys.argv[1])
while not os.path.exists(sys.argv[3]):
    time.sleep(0.001)
path, unpacked = store.ensure_rootfs(sys.argv[2])
print(path, unpacked)
"""


def test_two_processes_unpack_once(store: Store, tmp_path: Path) -> None:
    many = tar([d("many"), *(f(f"many/f{i}", os.urandom(64)) for i in range(3000))])
    write_layout(tmp_path / "big", [many], CONFIG, ref_name="big")
    store.import_image(tmp_path / "big")
    go = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(store.root), "big", str(go)],
                               stdout=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)  # both are importing and polling
    go.touch()
    outs = [r.communicate(timeout=60)[0].split() for r in racers]
    assert all(r.returncode == 0 for r in racers)
    assert outs[0][0] == outs[1][0]
    assert sorted(o[1] for o in outs) == ["False", "True"], "exactly one process unpacked"
    assert len(os.listdir(Path(outs[0][0]) / "many")) == 3000
    assert [p.name for p in store.rootfs_dir.iterdir()] == [Path(outs[0][0]).name]  # no .tmp left


def test_hostile_image_leaves_no_rootfs_in_the_store(store: Store, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    evil = tar([f("ok", b"1"), sym("evil", str(victim)), f("evil/pwned", b"x")])
    write_layout(tmp_path / "evil", [evil], CONFIG, ref_name="evil")
    store.import_image(tmp_path / "evil")
    with pytest.raises(StepError) as e:
        store.rootfs_for("evil")
    assert "evil/pwned" in str(e.value) and store.inspect("evil")["layers"][0]["digest"] in str(e.value)
    assert list(store.rootfs_dir.iterdir()) == []  # neither a rootfs nor a temporary tree
    assert list(victim.iterdir()) == []


def test_budget_applies_to_store_unpacks(tmp_path: Path, layout_dir: Path) -> None:
    s = Store(tmp_path / "small", budget=Budget(max_entries=3))
    s.import_image(layout_dir)
    with pytest.raises(StepError, match="more than 3 entries"):
        s.rootfs_for("demo:1")
    assert list(s.rootfs_dir.iterdir()) == []


def test_corrupted_blob_is_detected_on_read(store: Store, layout_dir: Path) -> None:
    ref = store.import_image(layout_dir)
    config = store.inspect(ref)["manifest"]["config"]["digest"]
    path = store.blob_path(config)
    os.chmod(path, 0o644)
    path.write_bytes(path.read_bytes().replace(b"echo hi", b"rm -rf"))
    with pytest.raises(StepError, match="verify blob"):
        store.config(ref)


def test_corrupted_layer_blob_is_detected_by_the_unpacker(store: Store, layout_dir: Path) -> None:
    ref = store.import_image(layout_dir)
    layer = store.inspect(ref)["layers"][1]["digest"]
    path = store.blob_path(layer)
    os.chmod(path, 0o644)
    data = path.read_bytes()
    path.write_bytes(data[:-8] + bytes(8))  # the gzip trailer no longer matches
    with pytest.raises(StepError) as e:
        store.rootfs_for(ref)
    assert layer in str(e.value)


def test_import_refuses_a_tampered_layout(store: Store, layout_dir: Path) -> None:
    index = json.loads((layout_dir / "index.json").read_text())
    manifest = json.loads((layout_dir / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    layer = manifest["layers"][0]["digest"]
    path = layout_dir / "blobs" / "sha256" / layer[7:]
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(StepError, match=f"verify blob {layer}"):
        store.import_image(layout_dir)
    assert store.list_images() == []


def test_import_refuses_a_manifest_that_is_also_an_index(store: Store, layout_dir: Path) -> None:
    index = json.loads((layout_dir / "index.json").read_text())
    mpath = layout_dir / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]
    manifest = json.loads(mpath.read_text())
    manifest["manifests"] = []
    raw = json.dumps(manifest).encode()
    (layout_dir / "blobs" / "sha256" / sha256_digest(raw)[7:]).write_bytes(raw)
    index["manifests"][0].update(digest=sha256_digest(raw), size=len(raw))
    (layout_dir / "index.json").write_text(json.dumps(index))
    with pytest.raises(StepError, match="CVE-2021-41190"):
        store.import_image(layout_dir)


def test_unpack_to_writes_the_same_tree(store: Store, layout_dir: Path, tmp_path: Path) -> None:
    store.import_image(layout_dir)
    out = tmp_path / "out"
    store.unpack_to("demo:1", out)
    assert tree(out) == EXPECTED
    remove_tree(out)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(StepError, match="ENOTEMPTY"):
        store.unpack_to("demo:1", tmp_path / "full")
    assert not [p for p in tmp_path.iterdir() if "nsbox-unpack" in p.name]


def test_default_store_follows_xdg_data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert Store().root == tmp_path / "xdg" / "nsbox"
    assert (tmp_path / "xdg" / "nsbox").stat().st_mode & 0o077 == 0


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"{FIXTURES} is absent (../shared not laid out)")
@pytest.mark.parametrize("name", ["buildkit-docker.tar", "buildkit-oci.tar", "docker-unnamed.tar.xz",
                                  "oci-unnamed.tar.gz"])
def test_import_real_archives(store: Store, name: str) -> None:
    ref = store.import_image(FIXTURES / name)
    info = store.inspect(ref)
    assert info["config"]["os"] == "linux"
    rootfs = store.rootfs_for(ref)
    if name.startswith("buildkit"):
        assert ref.name == f"github.com/buildkit/archive:{name.split('-')[1].split('.')[0]}"
        assert tree(rootfs) == {} and info["layers"] == []
    else:
        assert ref.name is None
        assert tree(rootfs) == {"empty": ("file", 0o664, digest(b"")[7:])}
    assert store.config(ref).env[0].startswith("PATH=")


# -- the busybox test image (rootfs/busybox) --------------------------------------------


def test_busybox_image(store: Store, busybox_layout: Path) -> None:
    ref = store.import_image(busybox_layout)
    assert ref.name == "busybox:latest"
    root = store.rootfs_for("busybox")
    t = tree(root)
    assert t["bin/busybox"][0] == "file" and t["bin/busybox"][1] == 0o755
    assert t["bin/sh"] == ("symlink", 0o777, "/bin/busybox")
    assert sum(1 for v in t.values() if v[2] == "/bin/busybox") > 100  # the applets
    assert "etc/motd" not in t  # whiteout
    assert "var/cache/old" not in t and t["var/cache/fresh"][0] == "file"  # opaque
    assert t["tmp"] == ("dir", 0o1777, "")
    assert (root / "etc/passwd").read_text().startswith("root:x:0:0:")
    assert store.config("busybox").cmd == ("/bin/sh",)
    # The digest is reproducible: a second build gives the same image.
    again = busybox_layout.parent / "again"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make-busybox-image"), "--offline", str(again)],
                   check=True, capture_output=True)
    assert json.loads((again / "index.json").read_text()) == json.loads((busybox_layout / "index.json").read_text())


def test_busybox_shell_runs_from_the_unpacked_rootfs(store: Store, busybox_layout: Path) -> None:
    store.import_image(busybox_layout)
    root = store.rootfs_for("busybox")
    if shutil.which("unshare") is None:
        pytest.skip("util-linux unshare is not installed")
    script = "echo hello from $(basename $(readlink /bin/ls)); ls /etc"
    out = subprocess.run(["unshare", "--user", "--map-root-user", f"--root={root}", "/bin/sh", "-c", script],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "hello from busybox" in out.stdout and "passwd" in out.stdout and "motd" not in out.stdout


def test_umoci_unpacks_the_same_tree(store: Store, busybox_layout: Path, tmp_path: Path) -> None:
    """`umoci unpack --rootless` and nsbox agree, except for documented differences.

    Documented: umoci writes an empty file for a device node (nsbox skips it) and keeps
    setuid bits (nsbox clears them); the busybox image has neither, so the trees must match.
    """
    if shutil.which("umoci") is None:
        pytest.skip("umoci is not installed (apt-get install umoci)")
    bundle = tmp_path / "bundle"
    run = subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{busybox_layout}:busybox:latest",
                          str(bundle)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    store.import_image(busybox_layout)
    theirs, ours = tree(bundle / "rootfs"), tree(store.rootfs_for("busybox"))
    assert theirs == ours
    remove_tree(bundle)


def test_umoci_agrees_on_whiteouts_links_and_differs_only_as_documented(store: Store, tmp_path: Path) -> None:
    """The two-layer test image (links, fifo, device nodes, setuid, whiteouts, opaque dir).

    The documented differences, and nothing else: umoci keeps setuid bits and writes an
    empty file in place of a device node; nsbox clears the bits and skips the node. (The
    security.capability xattr is left out: umoci 0.4.7 --rootless fails on it with EINVAL.)
    """
    if shutil.which("umoci") is None:
        pytest.skip("umoci is not installed (apt-get install umoci)")
    from test_image_unpack import LAYER1, LAYER2

    layer1 = []
    for ti, data in LAYER1:
        ti = copy.copy(ti)  # TarInfo.replace() is newer than Debian 12's Python
        ti.pax_headers = {k: v for k, v in ti.pax_headers.items() if "security." not in k}
        layer1.append((ti, data))
    write_layout(tmp_path / "layout", [tar(layer1), tar(LAYER2)], {}, ref_name="t")
    bundle = tmp_path / "bundle"
    run = subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{tmp_path / 'layout'}:t", str(bundle)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    store.import_image(tmp_path / "layout")
    theirs, ours = tree(bundle / "rootfs"), tree(store.rootfs_for("t"))
    differ = {k: (theirs.get(k), ours.get(k)) for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k)}
    bb = digest(b"#!busybox\n")[7:]
    empty = digest(b"")[7:]
    assert differ == {
        "bin/busybox": (("file", 0o4755, bb), ("file", 0o755, bb)),
        "bin/ash": (("file", 0o4755, bb), ("file", 0o755, bb)),
        "dev/null": (("file", 0o666, empty), None),
        "dev/zero": (("file", 0o666, empty), None),
    }
    remove_tree(bundle)
