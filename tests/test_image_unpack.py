"""The layer unpacker on well-formed images: the tree that comes out is exactly the expected one.

Runs the real unpacker (a forked child in its own user+mount namespace) as the
unprivileged test user. Pure helpers (name splitting, whiteout arithmetic, ChainID) get
plain unit tests at the end.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from image_util import MTIME, blob, d, dev, f, fifo, hard, sha, sym, tar, tree

from nsbox.errors import StepError
from nsbox.image.store import chain_id, remove_tree
from nsbox.image.unpack import Budget, Layer, UnsafeEntry, split_name, unpack_layers, whiteout_target


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Path]:
    t = tmp_path / "rootfs"
    t.mkdir()
    yield t
    remove_tree(t)


LAYER1 = [
    d("./", 0o755),
    d("bin", 0o555, mtime=1_000_000),
    f("bin/busybox", b"#!busybox\n", 0o4755, pax={"SCHILY.xattr.user.origin": "layer1",
                                                    "SCHILY.xattr.security.capability": "\x01\x00"}),
    sym("bin/sh", "/bin/busybox"),  # absolute: kept as link contents, never followed
    hard("bin/ash", "bin/busybox"),
    d("dev"),
    dev("dev/null"),
    dev("dev/zero"),
    fifo("run.fifo"),
    d("etc"),
    f("etc/motd", b"hello\n"),
    f("etc/hostname", b"box\n"),
    d("var"),
    d("var/cache"),
    f("var/cache/old", b"lower\n"),
    d("var/cache/sub"),
    f("var/cache/sub/deep", b"lower deep\n"),
    f("implicit/parent/file", b"no dir entries for the parents\n"),
]
LAYER2 = [
    f("etc/.wh.motd"),  # removes layer 1's etc/motd
    f("etc/hostname", b"new\n"),  # made in this layer, then...
    f("etc/.wh.hostname"),  # ...a whiteout in the same layer must spare it (umoci's upperPaths)
    d("var/cache"),
    f("var/cache/kept", b"this layer\n"),  # made before the opaque marker: spared
    f("var/cache/.wh..wh..opq"),  # empties what lower layers put in var/cache
    f("var/cache/new", b"this layer too\n"),
    f("bin/.wh.sh"),
    f("bin/sh", b"re-created after its whiteout\n", 0o755),
]


def test_two_layers_unpack_to_exactly_the_expected_tree(tmp_path: Path, target: Path) -> None:
    layers = [blob(tmp_path / "blobs", tar(LAYER1)), blob(tmp_path / "blobs", tar(LAYER2), compress=None)]
    report = unpack_layers(layers, target)
    got = tree(target)
    bb = sha(b"#!busybox\n")
    assert got == {
        "bin": ("dir", 0o555, ""),
        "bin/busybox": ("file", 0o755, bb),  # setuid cleared
        "bin/ash": ("file", 0o755, bb),
        "bin/sh": ("file", 0o755, sha(b"re-created after its whiteout\n")),
        "dev": ("dir", 0o755, ""),  # device nodes skipped
        "run.fifo": ("fifo", 0o644, ""),
        "etc": ("dir", 0o755, ""),
        "etc/hostname": ("file", 0o644, sha(b"new\n")),
        "var": ("dir", 0o755, ""),
        "var/cache": ("dir", 0o755, ""),
        "var/cache/kept": ("file", 0o644, sha(b"this layer\n")),
        "var/cache/new": ("file", 0o644, sha(b"this layer too\n")),
        "implicit": ("dir", 0o755, ""),
        "implicit/parent": ("dir", 0o755, ""),
        "implicit/parent/file": ("file", 0o644, sha(b"no dir entries for the parents\n")),
    }
    assert os.stat(target / "bin/busybox").st_ino == os.stat(target / "bin/ash").st_ino
    assert os.stat(target / "bin").st_mtime == 1_000_000  # set after its children were written
    assert os.stat(target / "etc/hostname").st_mtime == MTIME
    assert os.getxattr(target / "bin/busybox", "user.origin") == b"layer1"
    assert "security.capability" not in os.listxattr(target / "bin/busybox")
    device_warnings = [w for w in report.warnings if "device" in w]
    assert len(device_warnings) == 1 and "2 device node(s)" in device_warnings[0]
    assert any("setuid" in w and "bin/busybox" in w for w in report.warnings)
    assert any("security.capability" in w for w in report.warnings)
    assert report.entries == len(LAYER1) + len(LAYER2)


def test_absolute_symlink_is_kept_as_written(tmp_path: Path, target: Path) -> None:
    unpack_layers([blob(tmp_path / "b", tar([sym("bin/sh", "/bin/busybox"), sym("etc/mtab", "/proc/mounts")]))],
                  target)
    assert os.readlink(target / "bin/sh") == "/bin/busybox"
    assert os.readlink(target / "etc/mtab") == "/proc/mounts"


def test_later_layer_replaces_types(tmp_path: Path, target: Path) -> None:
    l1 = tar([d("a"), f("a/inner", b"x"), f("b", b"file"), sym("c", "/nowhere")])
    l2 = tar([f("a", b"now a file"), d("b", 0o700), f("c", b"now a file too")])
    unpack_layers([blob(tmp_path / "b", l1), blob(tmp_path / "b", l2)], target)
    got = tree(target)
    assert got["a"] == ("file", 0o644, sha(b"now a file"))
    assert got["b"] == ("dir", 0o700, "")
    assert got["c"][0] == "file"
    assert "a/inner" not in got


def test_duplicate_names_last_one_wins(tmp_path: Path, target: Path) -> None:
    unpack_layers([blob(tmp_path / "b", tar([f("x", b"first"), f("x", b"second", 0o600)]))], target)
    assert tree(target)["x"] == ("file", 0o600, sha(b"second"))


def test_read_only_directory_from_a_lower_layer_still_receives_files(tmp_path: Path, target: Path) -> None:
    l1 = tar([d("ro", 0o555), f("ro/a", b"1")])
    l2 = tar([f("ro/b", b"2"), f("ro/.wh.a")])
    unpack_layers([blob(tmp_path / "b", l1), blob(tmp_path / "b", l2)], target)
    assert tree(target) == {"ro": ("dir", 0o555, ""), "ro/b": ("file", 0o644, sha(b"2"))}


@pytest.mark.parametrize("compress", ["gzip", "zstd", None])
def test_compressions(tmp_path: Path, target: Path, compress: str | None) -> None:
    if compress == "zstd" and shutil.which("zstd") is None:
        pytest.skip("the zstd binary is needed to make a zstd layer in the test")
    layer = blob(tmp_path / "b", tar([f("hello", b"world")]), compress=compress)
    unpack_layers([layer], target)
    assert (target / "hello").read_bytes() == b"world"


def test_empty_layer(tmp_path: Path, target: Path) -> None:
    unpack_layers([blob(tmp_path / "b", b"", compress=None), blob(tmp_path / "b", tar([]))], target)
    assert tree(target) == {}


def test_diff_id_mismatch_is_rejected(tmp_path: Path, target: Path) -> None:
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    layer = blob(tmp_path / "b", tar([f("a", b"1")]), diff_id=wrong)
    with pytest.raises(StepError) as e:
        unpack_layers([layer], target)
    msg = str(e.value)
    assert e.value.step == "image.unpack"
    assert layer.digest in msg and "verify DiffID" in msg and wrong in msg


def test_blob_digest_mismatch_is_rejected(tmp_path: Path, target: Path) -> None:
    layer = blob(tmp_path / "b", tar([f("a", b"1")]))
    other = blob(tmp_path / "c", tar([f("a", b"2")]))
    forged = Layer(layer.digest, other.diff_id, other.path)  # right DiffID, but another layer's blob
    with pytest.raises(StepError, match="verify blob digest"):
        unpack_layers([forged], target)


def test_target_must_be_empty(tmp_path: Path, target: Path) -> None:
    (target / "x").write_text("")
    with pytest.raises(StepError, match="not empty"):
        unpack_layers([blob(tmp_path / "b", tar([f("a")]))], target)


def test_truncated_gzip_is_an_error_naming_the_layer(tmp_path: Path, target: Path) -> None:
    layer = blob(tmp_path / "b", tar([f("a", os.urandom(100_000))]))
    layer.path.write_bytes(layer.path.read_bytes()[:5000])
    with pytest.raises(StepError) as e:
        unpack_layers([layer], target)
    assert layer.digest in str(e.value)


# -- pure functions ---------------------------------------------------------------------


def test_split_name() -> None:
    assert split_name("./usr/bin/") == ("usr", "bin")
    assert split_name(".") == ()
    assert split_name("a//b/./c") == ("a", "b", "c")
    for bad in ("../x", "a/../../x", "/etc/passwd", "a/.."):
        with pytest.raises(UnsafeEntry):
            split_name(bad)


def test_whiteout_target() -> None:
    assert whiteout_target(("etc", ".wh.motd")) == ("etc", "motd")
    assert whiteout_target(("var", "cache", ".wh..wh..opq")) == ("var", "cache")
    assert whiteout_target(("etc", "motd")) is None
    assert whiteout_target(()) is None
    for bad in (("a", ".wh.."), ("a", ".wh.."[:-1] + "."), ("a", ".wh.")):
        with pytest.raises(UnsafeEntry):
            whiteout_target(bad)


def test_chain_id_follows_the_oci_definition() -> None:
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    assert chain_id([a]) == a
    assert chain_id([a, b]) == "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()


def test_budget_defaults_are_generous() -> None:
    b = Budget()
    assert b.max_bytes >= 8 << 30 and b.max_entries >= 1_000_000 and b.max_path == 4096


NO_USERNS = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from image_util import blob, f, tar
from nsbox.errors import StepError
from nsbox.image.unpack import unpack_layers
tmp = Path(sys.argv[1])
(tmp / "t").mkdir()
try:
    unpack_layers([blob(tmp / "b", tar([f("a")]))], tmp / "t")
except StepError as e:
    print(e)
"""


def test_without_user_namespaces_the_error_names_the_call_and_the_fix(tmp_path: Path) -> None:
    # Provoke the real errno: in an outer user namespace made here, allow no nested ones.
    if shutil.which("unshare") is None:
        pytest.skip("util-linux unshare is not installed")
    script = tmp_path / "no_userns.py"
    script.write_text(NO_USERNS)
    run = subprocess.run(
        ["unshare", "--user", "--map-root-user", "sh", "-c",
         'echo 0 > /proc/sys/user/max_user_namespaces && exec "$0" "$@"',
         sys.executable, str(script), str(tmp_path), str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == ("nsbox: image.unpack: unshare(CLONE_NEWUSER|CLONE_NEWNS) failed: "
                        "No space left on device (ENOSPC)")
    assert lines[1].startswith("  why: the unpacker runs in its own user+mount namespace")
    assert lines[2].startswith("  fix: ")
    assert list((tmp_path / "t").iterdir()) == []
