"""Helpers for the image tests: tar layers built in memory, trees read back as data."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterable
from pathlib import Path

from nsbox.image.unpack import Layer

REPO = Path(__file__).resolve().parent.parent
MTIME = 1_600_000_000

Entry = tuple[tarfile.TarInfo, bytes | None]


def _info(name: str, kind: bytes, mode: int, link: str = "", size: int = 0,
          pax: dict[str, str] | None = None, mtime: int = MTIME) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.linkname, ti.size, ti.mtime = kind, mode, link, size, mtime
    if pax:
        ti.pax_headers = dict(pax)
    return ti


def f(name: str, data: bytes = b"", mode: int = 0o644, pax: dict[str, str] | None = None,
      mtime: int = MTIME) -> Entry:
    return _info(name, tarfile.REGTYPE, mode, size=len(data), pax=pax, mtime=mtime), data


def d(name: str, mode: int = 0o755, mtime: int = MTIME, pax: dict[str, str] | None = None) -> Entry:
    return _info(name, tarfile.DIRTYPE, mode, mtime=mtime, pax=pax), None


def sym(name: str, target: str) -> Entry:
    return _info(name, tarfile.SYMTYPE, 0o777, link=target), None


def hard(name: str, target: str, mode: int = 0o644) -> Entry:
    return _info(name, tarfile.LNKTYPE, mode, link=target), None


def dev(name: str) -> Entry:
    ti = _info(name, tarfile.CHRTYPE, 0o666)
    ti.devmajor, ti.devminor = 1, 3
    return ti, None


def fifo(name: str, mode: int = 0o644) -> Entry:
    return _info(name, tarfile.FIFOTYPE, mode), None


def tar(entries: Iterable[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob(dirpath: Path, tar_bytes: bytes, compress: str | None = "gzip", diff_id: str | None = None) -> Layer:
    """Store a layer blob in `dirpath` and describe it; `diff_id` overrides the true one."""
    if compress == "gzip":
        data = gzip.compress(tar_bytes, mtime=0)
    elif compress == "zstd":
        data = subprocess.run(["zstd", "-q", "-c"], input=tar_bytes, capture_output=True, check=True).stdout
    else:
        data = tar_bytes
    dirpath.mkdir(parents=True, exist_ok=True)
    path = dirpath / digest(data).split(":")[1]
    path.write_bytes(data)
    return Layer(digest(data), diff_id or digest(tar_bytes), path)


def tree(root: Path) -> dict[str, tuple[str, int, str]]:
    """{path: (type, mode, link target or sha256 of content)} below root, never following links."""
    out: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", mode, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode, "")
            elif stat.S_ISREG(st.st_mode):
                os.chmod(p, mode | 0o400)  # our own file: readable to hash it
                out[rel] = ("file", mode, hashlib.sha256(Path(p).read_bytes()).hexdigest())
                os.chmod(p, mode)
            elif stat.S_ISFIFO(st.st_mode):
                out[rel] = ("fifo", mode, "")
            else:
                out[rel] = ("other", mode, "")
    return out


def snapshot(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """Like `tree`, plus each entry's mtime: for victim directories that must not change."""
    snap = {rel: (*v[:2], os.lstat(root / rel).st_mtime_ns, v[2]) for rel, v in tree(root).items()}
    snap["."] = ("dir", stat.S_IMODE(os.lstat(root).st_mode), os.lstat(root).st_mtime_ns, "")
    return snap


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
