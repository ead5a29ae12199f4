"""Hostile layers: each is refused (or defused) and nothing outside the target changes.

The corpus is generated here, in the shapes of security.md row 63 and the tar CVEs
(CVE-2007-4559, CVE-2021-32760, CVE-2025-4517, ...). A victim directory sits next to the
target, so `../../victim` and absolute paths both reach it if anything goes wrong, and a
`/tmp/nsbox-tarescape-*` canary catches writes through absolute symlinks. For every case:
the victim is unchanged (type, mode, mtime, content) and the canary does not exist; a
refused case raises a StepError (step `image.unpack`) naming the layer digest and the entry.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from image_util import REPO, Entry, blob, d, dev, f, hard, snapshot, sym, tar, tree

from nsbox.errors import StepError
from nsbox.image.store import remove_tree
from nsbox.image.unpack import Budget, Layer, unpack_layers

SHARED = REPO.parent / "shared"
ESCAPE = Path(f"/tmp/nsbox-tarescape-{uuid.uuid4().hex[:12]}")


@dataclass
class World:
    victim: Path
    target: Path
    blobs: Path


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text("victim\n")
    (victim / "perm400").write_text("read-only\n")
    os.chmod(victim / "perm400", 0o400)
    (victim / "sub").mkdir()
    (victim / "sub" / "x").write_text("x\n")
    os.utime(victim / "sub", (1, 1))
    target = tmp_path / "a" / "rootfs"  # ../../victim from the root reaches the victim
    target.mkdir(parents=True)
    before = snapshot(victim)
    yield World(victim, target, tmp_path / "blobs")
    assert snapshot(victim) == before, "the victim directory outside the target changed"
    assert not ESCAPE.exists(), f"{ESCAPE} was created"
    remove_tree(target)


def pathmax_chain(v: Path) -> list[Entry]:
    """CVE-2025-4517's shape: directories and symlinks whose resolved path passes PATH_MAX."""
    comp = "d" * 247
    entries: list[Entry] = []
    path = ""
    for step in "abcdefghijklmnop":
        entries.append(d(os.path.join(path, comp)))
        entries.append(sym(os.path.join(path, step), comp))
        path = os.path.join(path, step)
    link = os.path.join(*"abcdefghijklmnop", "l" * 254)
    entries.append(sym(link, os.path.join(*[".."] * 16)))
    entries.append(sym("escape", os.path.join(link, "..", "..", str(v).lstrip("/"))))
    entries.append(f("escape/pwned", b"owned"))
    return entries


def huge_pax_header() -> bytes:
    ti = tarfile.TarInfo("././@PaxHeader")
    ti.type, ti.size = tarfile.XHDTYPE, (8 << 30) - 1  # claims 8 GiB of metadata
    return ti.tobuf(tarfile.USTAR_FORMAT) + b"\0" * 4096


def huge_file_header() -> bytes:
    ti = tarfile.TarInfo("big")
    ti.size = (8 << 30) - 1
    return ti.tobuf(tarfile.USTAR_FORMAT) + b"\0" * 4096


# (id, layers built from the victim path, error regex or None when the entry is defused, budget)
Case = tuple[str, Callable[[Path], list[list[Entry] | bytes]], str | None, Budget | None]
CASES: list[Case] = [
    ("dotdot-traversal", lambda v: [[f("../../victim/pwned", b"x")]], r"'\.\.' in entry name", None),
    ("dotdot-inside", lambda v: [[d("a"), f("a/../../../victim/file", b"x")]], r"'\.\.' in entry name", None),
    ("absolute-path", lambda v: [[f(str(v / "pwned"), b"x")]], "absolute entry name", None),
    ("abs-symlink-then-write", lambda v: [[sym("evil", str(v)), f("evil/pwned", b"x")]], "is a symlink", None),
    ("rel-symlink-then-write", lambda v: [[sym("evil", "../../victim"), f("evil/file", b"x")]],
     "is a symlink", None),
    ("symlinked-parent-nested", lambda v: [[d("a"), sym("a/b", str(v)), f("a/b/sub/x", b"x")]],
     r"'a/b' is a symlink", None),
    ("symlink-in-lower-layer", lambda v: [[sym("evil", str(v))], [f("evil/file", b"x")]], "is a symlink", None),
    ("escape-canary", lambda v: [[sym("tmp", "/tmp"), f(f"tmp/{ESCAPE.name}/pwned", b"x")]], "is a symlink", None),
    ("dir-replaced-by-symlink", lambda v: [[d("d"), sym("d", str(v)), f("d/pwned", b"x")]], "is a symlink", None),
    ("hardlink-out", lambda v: [[hard("h", "../../victim/file")]], r"'\.\.' in hardlink target", None),
    ("hardlink-absolute", lambda v: [[hard("h", str(v / "file"))]], "absolute hardlink target", None),
    ("hardlink-via-symlink", lambda v: [[sym("s", str(v)), hard("h", "s/file")]], "is a symlink", None),
    ("hardlink-missing-target", lambda v: [[hard("h", "nothing")]], "does not exist", None),
    # CVE-2021-32760: a hardlink to a symlink, then a chmod through it. Links are made
    # without following and never chmod'ed: allowed, and the victim keeps mode 0400.
    ("hardlink-to-symlink-chmod", lambda v: [[sym("s", str(v / "perm400")), hard("h", "s", 0o777),
                                             f("s", b"replaced", 0o777)]], None, None),
    ("whiteout-dotdot", lambda v: [[d("a"), f("a/.wh...")]], "whiteout of '..'", None),
    ("whiteout-dotdot-root", lambda v: [[f(".wh...")]], "whiteout of '..'", None),
    ("whiteout-dot", lambda v: [[d("a"), f("a/.wh..")]], "whiteout of '.'", None),
    ("whiteout-through-symlink", lambda v: [[sym("s", str(v))], [f("s/.wh.file")]], "is a symlink", None),
    ("opaque-through-symlink", lambda v: [[sym("s", str(v))], [f("s/.wh..wh..opq")]], "is a symlink", None),
    ("whiteout-up-and-out", lambda v: [[f("../.wh.victim")]], r"'\.\.' in entry name", None),
    ("root-becomes-symlink", lambda v: [[sym(".", str(v)), f("pwned", b"x")]], "type of the root", None),
    ("root-becomes-file", lambda v: [[f("./", b"x")]], "type of the root", None),
    ("root-slash-symlink", lambda v: [[sym("/", str(v))]], "absolute entry name", None),
    ("device-node", lambda v: [[dev("dev/sda"), dev("dev/mem")]], None, None),
    ("pathmax-symlink-chain", lambda v: [pathmax_chain(v)], "is a symlink", None),
    ("long-name", lambda v: [[f("/".join(["n" * 200] * 25), b"x")]], "longer than 4096 bytes", None),
    ("gzip-bomb", lambda v: [[f("zeros", b"\0" * (32 << 20))]], "size budget", Budget(max_bytes=4 << 20)),
    ("huge-entry-count", lambda v: [[f(f"f{i}") for i in range(1100)]], "more than 1000 entries",
     Budget(max_entries=1000)),
    ("huge-pax-header", lambda v: [huge_pax_header()], "metadata header of 8589934591 bytes", None),
    ("huge-file-header", lambda v: [huge_file_header()], "exceeds the size budget", Budget(max_bytes=1 << 30)),
    ("huge-file-header-default-budget", lambda v: [huge_file_header()], "unexpected end of data", None),
]


@pytest.mark.parametrize(("layers_of", "error", "budget"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_layer(world: World, layers_of: Callable[[Path], list[list[Entry] | bytes]],
                       error: str | None, budget: Budget | None) -> None:
    raw = [x if isinstance(x, bytes) else tar(x) for x in layers_of(world.victim)]
    layers = [blob(world.blobs, t) for t in raw]
    if error is None:
        unpack_layers(layers, world.target, budget or Budget())
        return
    with pytest.raises(StepError) as e:
        unpack_layers(layers, world.target, budget or Budget())
    msg = str(e.value)
    assert e.value.step == "image.unpack"
    assert msg.startswith("nsbox: image.unpack: layer sha256:")
    assert layers[-1].digest in msg, "the error names the hostile layer"
    assert "entry '" in msg, "the error names the entry"
    assert re.search(error, msg), msg


def test_hardlink_to_symlink_keeps_the_link_and_the_victim(world: World) -> None:
    layer = blob(world.blobs, tar([sym("s", str(world.victim / "perm400")), hard("h", "s", 0o777)]))
    unpack_layers([layer], world.target)
    assert os.readlink(world.target / "h") == str(world.victim / "perm400")  # a link to the symlink


def test_device_nodes_become_one_warning_and_no_node(world: World) -> None:
    layer = blob(world.blobs, tar([d("dev"), dev("dev/sda"), dev("dev/mem"), dev("dev/kmem")]))
    report = unpack_layers([layer], world.target)
    assert tree(world.target) == {"dev": ("dir", 0o755, "")}
    assert [w for w in report.warnings if "device" in w] == [
        "rootless{device}: skipped 3 device node(s) (first: dev/sda): an unprivileged user cannot mknod; "
        "the sandbox builds its own /dev"]


def test_gzip_bomb_is_stopped_early(world: World) -> None:
    layer = blob(world.blobs, tar([f("zeros", b"\0" * (64 << 20))]))
    assert layer.path.stat().st_size < 1 << 20  # 64 MiB of zeros in well under 1 MiB
    with pytest.raises(StepError, match="size budget"):
        unpack_layers([layer], world.target, Budget(max_bytes=1 << 20))
    assert sum(p.stat().st_size for p in world.target.rglob("*") if p.is_file()) <= 1 << 20


def test_failed_unpack_leaves_only_the_partial_target(world: World) -> None:
    layer = blob(world.blobs, tar([f("ok", b"1"), sym("evil", str(world.victim)), f("evil/pwned", b"x")]))
    with pytest.raises(StepError):
        unpack_layers([layer], world.target)
    assert os.listdir(world.target.parent) == ["rootfs"]


@pytest.mark.skipif(not (SHARED / "fixtures" / "tar-moby").is_dir(), reason="../shared/fixtures is absent")
@pytest.mark.parametrize("name", ["pkg-archive-testdata-broken.tar", "tarsum-collision-0.tar",
                                  "tarsum-collision-1.tar", "tarsum-collision-2.tar", "tarsum-collision-3.tar",
                                  "tarsum-xattr-security-capability-layer.tar"])
def test_moby_fixture_layers(world: World, name: str) -> None:
    data = (SHARED / "fixtures" / "tar-moby" / name).read_bytes()
    layer = blob(world.blobs, data, compress=None)
    try:
        report = unpack_layers([layer], world.target)
    except StepError as e:  # refusing is allowed; it must name the layer
        assert layer.digest in str(e)
        return
    for p in world.target.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert not any(x.startswith(("security.", "trusted.")) for x in os.listxattr(p))
    if "security-capability" in name:
        assert any("security.capability" in w for w in report.warnings)


def test_gzip_layer_with_trailing_garbage_is_refused(world: World) -> None:
    layer = blob(world.blobs, tar([f("a", b"1")]))
    layer.path.write_bytes(layer.path.read_bytes() + b"garbage!")
    fixed = Layer("sha256:" + hashlib.sha256(layer.path.read_bytes()).hexdigest(), layer.diff_id, layer.path)
    with pytest.raises(StepError) as e:
        unpack_layers([fixed], world.target)
    assert fixed.digest in str(e.value)


def test_gzip_module_is_what_decompresses() -> None:
    # The bomb case above relies on streaming decompression with bounded output.
    assert gzip.decompress(gzip.compress(b"x")) == b"x"
