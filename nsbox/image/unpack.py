"""Apply an image's layers, in order, to an empty directory: the image's root filesystem.

Layers are tar streams (uncompressed, gzip or zstd) from an untrusted source. They are
applied the way the OCI image spec and `umoci unpack --rootless` do:

- `.wh.<name>` removes `<name>` from the layers below; `.wh..wh..opq` empties its
  directory of everything the layers below put there. Entries that this same layer
  created earlier are spared (umoci's `upperPaths`): a whiteout only reaches down.
- regular files, directories, symlinks (absolute targets are kept as link contents: real
  images have `/bin/sh -> /bin/busybox`), hardlinks, FIFOs; directory modes and mtimes are
  set last, deepest first, so writing the children cannot disturb them;
- `user.*` xattrs (PAX `SCHILY.xattr.user.*`) are kept;
- rootless, so: no chown (every file belongs to the caller), device nodes are skipped
  with one warning, setuid/setgid bits and `security.*`/`trusted.*`/`system.*` xattrs are
  dropped (a file capability or a setuid bit must not come from an image);
- budgets: total uncompressed bytes, entry count, path length, metadata-header size;
- each layer's DiffID (sha256 of the uncompressed stream) and blob digest are checked.

Safety: the work runs in a forked child that has entered a new user and mount namespace
and pivoted into the target, so the target is all it can see: no `../`, absolute path or
symlink can name anything outside it. Inside, every entry is still created dir-fd
relative, walking the parent directories one component at a time with O_NOFOLLOW, and an
entry that would write through a symlinked parent, use `..`, an absolute path, or change
the type of the root is refused: the layer is hostile, and the whole unpack fails with a
StepError naming the layer digest and the entry. `tarfile` only parses headers here; its
extraction (and its filters, which Debian 12's Python 3.11.2 lacks and which reject the
absolute symlinks real images contain) is never used.

Documented differences from `umoci unpack --rootless` (0.4.7; pinned by
tests/test_image_store.py): device nodes are skipped (umoci writes an empty file);
setuid/setgid bits are cleared (umoci keeps them); non-`user.*` xattrs are dropped (umoci
fails on `security.capability` with EINVAL); an entry below a symlinked directory is
refused (umoci resolves the symlink inside the root); absolute entry names are refused
(umoci joins them to the root). Ownership is never applied, as with umoci rootless.

Kernel docs: user_namespaces(7), mount_namespaces(7), pivot_root(2), openat(2) (O_NOFOLLOW),
             linkat(2), xattr(7). OCI image spec: layer.md (changesets, whiteouts),
             config.md (DiffIDs).
Order: the launcher unpacks before it forks the sandbox (DESIGN §2: heavy work first);
       within an unpack: fork -> unshare(USER|NS) -> id maps -> private propagation ->
       bind target -> pivot_root -> layers in manifest order -> directory metadata last.
Verify: tests/test_image_unpack.py (expected tree, malicious-layer corpus with a victim
        directory outside the target, budgets, DiffID mismatch).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import importlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from nsbox import syscalls
from nsbox.errors import StepError

zstandard: Any
try:  # optional: the `zstd` binary is the fallback, and a clear error the last resort
    zstandard = importlib.import_module("zstandard")
except ImportError:  # depends on the host
    zstandard = None

STEP = "image.unpack"

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
CHUNK = 1 << 20
# Modes a layer may set. Setuid and setgid are dropped: an image must not hand out
# privilege (the sandbox also has no_new_privs, but the rootfs outlives one sandbox).
KEPT_MODE_BITS = 0o1777
XATTR_PREFIX = "SCHILY.xattr."
_ZSTD_ERRORS: tuple[type[Exception], ...] = (zstandard.ZstdError,) if zstandard is not None else ()
_META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
               tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


@dataclass(frozen=True)
class Budget:
    """Ceilings for one unpack (all layers together). Generous: a Debian rootfs is 0.2 GB."""

    max_bytes: int = 8 << 30  # uncompressed tar bytes: stops a gzip bomb
    max_entries: int = 1_000_000  # tar members, whiteouts included
    max_path: int = 4096  # bytes in an entry name or link target (PATH_MAX)
    max_header: int = 1 << 20  # a PAX or GNU long-name header: stops an 8 GiB header


DEFAULT_BUDGET = Budget()


@dataclass(frozen=True)
class Layer:
    """One layer blob to apply: its digest, the DiffID it must hash to, and where it is."""

    digest: str  # "sha256:<hex>" of the blob as stored (maybe compressed)
    diff_id: str  # "sha256:<hex>" of the uncompressed tar stream
    path: Path


@dataclass(frozen=True)
class UnpackReport:
    entries: int
    bytes: int
    warnings: tuple[str, ...] = ()


class UnsafeEntry(Exception):
    """An entry nsbox will not apply; the layer is hostile or broken. Raised in the child."""

    def __init__(self, entry: str, action: str, detail: str | None = None, err: int | None = None):
        super().__init__(f"{entry}: {action}: {detail or os.strerror(err or 0)}")
        self.entry, self.action, self.detail, self.errno = entry, action, detail, err
        self.layer: str | None = None


class _SetupFailed(Exception):
    """Entering the unpack namespace failed: a host limit, not a hostile layer."""

    def __init__(self, call: str, err: int | None):
        super().__init__(call)
        self.call, self.errno = call, err


# ---------------------------------------------------------------------------------------
# The parent side: open the blobs, fork the child, turn its record into a StepError.


def unpack_layers(layers: Sequence[Layer], target: Path, budget: Budget = DEFAULT_BUDGET) -> UnpackReport:
    """Apply `layers` in order to the empty directory `target`. Raises StepError.

    On failure the target holds a partial tree: callers unpack into a temporary directory
    and rename it into place only on success (the store and `unpack_to` both do).
    """
    target = Path(os.path.abspath(target))
    try:
        if any(target.iterdir()):
            raise StepError(STEP, f"unpack into {target}", detail="target directory is not empty")
    except OSError as e:
        raise StepError(STEP, f"open target {target}", e.errno) from e
    streams: list[_Stream] = []
    helpers: list[subprocess.Popen[bytes]] = []
    try:
        for layer in layers:
            streams.append(_open_layer_stream(layer, helpers))
        return _run_child(streams, target, budget)
    finally:
        for st in streams:
            os.close(st.fd)
        for proc in helpers:
            proc.kill()  # ours; a no-op once it has finished
            proc.wait()


@dataclass(frozen=True)
class _Stream:
    layer: Layer
    fd: int
    decoded: bool  # the parent already checked the blob digest and decompresses it (zstd binary)


def _open_layer_stream(layer: Layer, helpers: list[subprocess.Popen[bytes]]) -> _Stream:
    """What the child reads the layer from: the blob itself, or a `zstd -dc` pipe."""
    try:
        fd = os.open(layer.path, os.O_RDONLY | os.O_CLOEXEC)
        magic = os.pread(fd, 4, 0)
    except OSError as e:
        raise StepError(STEP, f"open layer {layer.digest} ({layer.path})", e.errno) from e
    if not magic.startswith(ZSTD_MAGIC) or zstandard is not None:
        return _Stream(layer, fd, False)
    # No zstandard module: decompress with the zstd binary, started here because the
    # child can no longer see /usr once it has pivoted. The child then cannot hash the
    # blob as it reads, so its digest is checked here first.
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            _check_digest(f, layer.digest, f"layer blob {layer.digest}")
        os.lseek(fd, 0, os.SEEK_SET)  # the dup shares the offset; zstd must read from the start
        zstd = shutil.which("zstd")
        if zstd is None:
            raise StepError(STEP, f"decompress layer {layer.digest}", detail="the layer is zstd-compressed",
                            why="neither the Python module 'zstandard' nor the 'zstd' binary is installed",
                            fix="apt-get install zstd (or pip install zstandard)")
        proc = subprocess.Popen([zstd, "-dcq"], stdin=fd, stdout=subprocess.PIPE)
    finally:
        os.close(fd)
    helpers.append(proc)
    assert proc.stdout is not None
    out = os.dup(proc.stdout.fileno())
    proc.stdout.close()
    return _Stream(layer, out, True)


def _check_digest(f: IO[bytes], digest: str, what: str) -> None:
    h = hashlib.sha256()
    while chunk := f.read(CHUNK):
        h.update(chunk)
    if "sha256:" + h.hexdigest() != digest:
        raise StepError(STEP, f"verify {what}", detail=f"content hashes to sha256:{h.hexdigest()}")


def _run_child(streams: list[_Stream], target: Path, budget: Budget) -> UnpackReport:
    uid, gid = os.getuid(), os.getgid()
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the child leaves only through os._exit, after one JSON record
        code = 1
        try:
            os.close(rfd)
            record = _child(streams, target, budget, uid, gid)
            code = 0
        except UnsafeEntry as r:
            record = {"ok": False, "layer": r.layer, "entry": r.entry, "action": r.action,
                      "detail": r.detail, "errno": r.errno}
        except _SetupFailed as f:
            record = {"ok": False, "setup": True, "action": f.call, "errno": f.errno}
        except BaseException as e:  # a child reports; it never unwinds into the caller's code
            record = {"ok": False, "action": "unpack", "detail": repr(e), "errno": getattr(e, "errno", None)}
        try:
            _write_all(wfd, json.dumps(record).encode())
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        raw = pipe.read()
    _, status = os.waitpid(pid, 0)
    if not raw:
        raise StepError(STEP, "unpack child", detail=f"ended without a report (wait status {status:#x})")
    rec: dict[str, Any] = json.loads(raw)
    if rec.get("ok"):
        return UnpackReport(int(rec["entries"]), int(rec["bytes"]), tuple(rec["warnings"]))
    where = []
    if rec.get("layer"):
        where.append(f"layer {rec['layer']}")
    if rec.get("entry") is not None:
        where.append(f"entry {rec['entry']!r}")
    err = StepError(STEP, ": ".join([*where, str(rec["action"])]), rec.get("errno"), detail=rec.get("detail"))
    if rec.get("setup"):
        err.why = ("the unpacker runs in its own user+mount namespace that sees only the target; "
                   "this host refused to create one")
        err.fix = ("allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
                   "or kernel.apparmor_restrict_unprivileged_userns=0); see `nsbox doctor`")
    raise err


# ---------------------------------------------------------------------------------------
# The child side. Everything it uses is imported above: after pivot_root the host's
# site-packages is gone.


def _child(streams: list[_Stream], target: Path, budget: Budget, uid: int, gid: int) -> dict[str, Any]:
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    _enter_target(target, uid, gid)
    tree = _Tree(os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), budget)
    for st in streams:
        try:
            tree.apply_layer(st)
        except UnsafeEntry as r:
            r.layer = st.layer.digest
            raise
    tree.finish()
    return {"ok": True, "entries": tree.entries, "bytes": tree.bytes, "warnings": tree.warnings()}


def _enter_target(target: Path, uid: int, gid: int) -> None:
    """Become root of a new user+mount namespace whose whole filesystem is `target`."""

    def step(call: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except OSError as e:
            raise _SetupFailed(call, e.errno) from e

    def write(path: str, data: str) -> None:
        with open(path, "w") as f:
            f.write(data)

    step("unshare(CLONE_NEWUSER|CLONE_NEWNS)", syscalls.unshare,
         syscalls.CloneFlag.CLONE_NEWUSER | syscalls.CloneFlag.CLONE_NEWNS)
    # Our own uid becomes 0 inside. Its CAP_DAC_OVERRIDE over our own files lets the child
    # write into directories that an earlier layer made read-only (mode 0555).
    step("write /proc/self/setgroups", write, "/proc/self/setgroups", "deny")
    step("write /proc/self/uid_map", write, "/proc/self/uid_map", f"0 {uid} 1")
    step("write /proc/self/gid_map", write, "/proc/self/gid_map", f"0 {gid} 1")
    step("mount(/, MS_REC|MS_PRIVATE)", syscalls.mount, None, "/", None,
         syscalls.MountFlag.MS_REC | syscalls.MountFlag.MS_PRIVATE)
    step(f"mount({target}, MS_BIND)", syscalls.mount, str(target), str(target), None,
         syscalls.MountFlag.MS_BIND)
    step(f"chdir({target})", os.chdir, str(target))
    # pivot_root(".", "."): the old root ends up stacked on the new one; detach it.
    step("pivot_root(., .)", syscalls.pivot_root, ".", ".")
    step("umount2(., MNT_DETACH)", syscalls.umount2, ".", syscalls.MNT_DETACH)
    step("chdir(/)", os.chdir, "/")


class _Reader(io.RawIOBase):
    """Hash and count what passes through; refuse past `limit` bytes."""

    def __init__(self, inner: IO[bytes], limit: int | None, on_over: str):
        super().__init__()
        self.inner, self.limit, self.on_over = inner, limit, on_over
        self.hash = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        want = len(b)
        if self.limit is not None:
            # Read at most one byte past the limit: enough to know it was crossed.
            want = min(want, self.limit - self.count + 1)
        data = self.inner.read(max(want, 1))
        n = len(data)
        b[:n] = data
        self.hash.update(data)
        self.count += n
        if self.limit is not None and self.count > self.limit:
            raise UnsafeEntry("", "read layer", self.on_over)
        return n

    def drain(self) -> None:
        buf = bytearray(CHUNK)
        while self.readinto(buf):
            pass

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def _bounded_tarinfo(max_header: int) -> type[tarfile.TarInfo]:
    class BoundedTarInfo(tarfile.TarInfo):
        """A TarInfo that refuses oversized PAX/GNU metadata before tarfile buffers it."""

        @classmethod
        def fromtarfile(cls, tarfile_: tarfile.TarFile) -> BoundedTarInfo:
            fileobj = cast(IO[bytes], tarfile_.fileobj)
            buf = fileobj.read(tarfile.BLOCKSIZE)
            obj = cls.frombuf(buf, tarfile_.encoding or "utf-8", tarfile_.errors or "surrogateescape")
            obj.offset = fileobj.tell() - tarfile.BLOCKSIZE
            if obj.type in _META_TYPES and obj.size > max_header:
                raise UnsafeEntry(obj.name, "read header",
                               f"metadata header of {obj.size} bytes exceeds the budget ({max_header})")
            proc = getattr(obj, "_proc_member")  # noqa: B009 - private in typeshed, stable in CPython
            return cast(BoundedTarInfo, proc(tarfile_))

    return BoundedTarInfo


def split_name(name: str, what: str = "path") -> tuple[str, ...]:
    """A tar member name as path components below the root; refuses `..` and absolute names.

    `./` prefixes and `.` components are dropped; "" and "." name the root itself.
    """
    if name.startswith("/"):
        raise UnsafeEntry(name, f"check {what}", f"absolute {what} refused (names are relative to the root)")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeEntry(name, f"check {what}", f"'..' in {what} refused (it would climb out of the root)")
    return parts


def whiteout_target(parts: tuple[str, ...]) -> tuple[str, ...] | None:
    """For `a/b/.wh.c` the path it removes, `a/b/c`; for an opaque marker, its directory.

    Returns None for an entry that is not a whiteout. Pure: unit-tested on its own.
    """
    if not parts or not parts[-1].startswith(WHITEOUT):
        return None
    base = parts[-1]
    if base == OPAQUE:
        return parts[:-1]
    victim = base[len(WHITEOUT):]
    if victim in ("", ".", "..") or victim.startswith(WHITEOUT):
        raise UnsafeEntry("/".join(parts), "check whiteout", f"whiteout of {victim!r} refused")
    return (*parts[:-1], victim)


def _is_ancestor_or_self(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    return b[: len(a)] == a


@dataclass
class _Tree:
    """The root being built, seen through a directory fd. Never follows a symlink."""

    root_fd: int
    budget: Budget
    entries: int = 0
    bytes: int = 0
    # Directory metadata set at the very end, deepest first.
    dir_meta: dict[tuple[str, ...], tuple[int, int]] = field(default_factory=dict)
    upper: set[tuple[str, ...]] = field(default_factory=set)  # made by the current layer
    skipped_devices: list[str] = field(default_factory=list)
    stripped_bits: list[str] = field(default_factory=list)
    stripped_xattrs: dict[str, list[str]] = field(default_factory=dict)
    xattr_unsupported: list[str] = field(default_factory=list)

    # -- layers -------------------------------------------------------------------------

    def apply_layer(self, st: _Stream) -> None:
        layer = st.layer
        raw = io.BufferedReader(io.FileIO(os.dup(st.fd), "rb"), CHUNK)
        blob = _Reader(raw, None, "")  # hashes the blob as stored (maybe compressed)
        magic = raw.peek(4)[:4]
        source: IO[bytes]
        if not st.decoded and magic.startswith(GZIP_MAGIC):
            source = cast(IO[bytes], gzip.GzipFile(fileobj=cast(IO[bytes], blob), mode="rb"))
        elif not st.decoded and magic.startswith(ZSTD_MAGIC):
            source = cast(IO[bytes], zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True))
        else:  # a plain tar, or the output of the parent's `zstd -dc`
            source = cast(IO[bytes], blob)
        stream = _Reader(source, self.budget.max_bytes - self.bytes,
                         f"uncompressed layers exceed the size budget ({self.budget.max_bytes} bytes)")
        self.upper = set()
        last = "(start of layer)"
        try:
            with tarfile.open(fileobj=cast(IO[bytes], stream), mode="r|", encoding="utf-8",
                              errors="surrogateescape",
                              tarinfo=_bounded_tarinfo(self.budget.max_header)) as tf:
                for member in tf:
                    last = member.name
                    self._entry(tf, member)
            stream.drain()  # tar padding and trailing zeros belong to the DiffID too
        except UnsafeEntry as r:
            r.entry = r.entry or last
            raise
        except tarfile.ReadError as e:
            if not (stream.count == 0 and "empty file" in str(e)):  # a 0-byte layer is empty
                raise UnsafeEntry(last, "read the tar header after this entry", str(e)) from e
        except tarfile.TarError as e:
            raise UnsafeEntry(last, "read the tar header after this entry", str(e)) from e
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise UnsafeEntry(last, "decompress", str(e) or type(e).__name__) from e
        except _ZSTD_ERRORS as e:
            raise UnsafeEntry(last, "decompress", str(e) or type(e).__name__) from e
        except OSError as e:  # reading the blob itself failed (EIO...)
            raise UnsafeEntry(last, "read layer", None, e.errno) from e
        finally:
            raw.close()
        self.bytes += stream.count
        if stream.digest() != layer.diff_id:
            raise UnsafeEntry("(whole layer)", "verify DiffID",
                              f"uncompressed stream hashes to {stream.digest()}, the config says {layer.diff_id}")
        if not st.decoded and blob.digest() != layer.digest:
            raise UnsafeEntry("(whole layer)", "verify blob digest",
                              f"blob hashes to {blob.digest()}, the manifest says {layer.digest}")

    def finish(self) -> None:
        """Directory modes and mtimes, deepest first, after every layer wrote into them."""
        for parts in sorted(self.dir_meta, key=len, reverse=True):
            mode, mtime_ns = self.dir_meta[parts]
            try:
                fd = self._open_dir(parts)
            except (UnsafeEntry, OSError):
                continue  # a later layer replaced it with a non-directory
            try:
                os.chmod(fd, mode)
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            except OSError as e:
                raise UnsafeEntry("/".join(parts) or ".", "set directory metadata", None, e.errno) from e
            finally:
                os.close(fd)

    def warnings(self) -> list[str]:
        out = []
        if self.skipped_devices:
            out.append(f"rootless{{device}}: skipped {len(self.skipped_devices)} device node(s) "
                       f"(first: {self.skipped_devices[0]}): an unprivileged user cannot mknod; "
                       "the sandbox builds its own /dev")
        if self.stripped_bits:
            out.append(f"rootless{{mode}}: cleared setuid/setgid on {len(self.stripped_bits)} file(s) "
                       f"(first: {self.stripped_bits[0]})")
        for name, paths in sorted(self.stripped_xattrs.items()):
            out.append(f"xattr{{{name}}}: not applied to {len(paths)} entr(y/ies) (first: {paths[0]})")
        if self.xattr_unsupported:
            out.append(f"xattr{{user.*}}: the filesystem refused user xattrs on {len(self.xattr_unsupported)} "
                       f"entr(y/ies) (first: {self.xattr_unsupported[0]})")
        return out

    # -- entries ------------------------------------------------------------------------

    def _entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        name = m.name
        self.entries += 1
        if self.entries > self.budget.max_entries:
            raise UnsafeEntry(name, "count entries", f"more than {self.budget.max_entries} entries (budget)")
        for what, value in (("name", name), ("link target", m.linkname)):
            if len(os.fsencode(value)) > self.budget.max_path:
                raise UnsafeEntry(name[:200] + "...", f"check {what}",
                               f"{what} longer than {self.budget.max_path} bytes (budget)")
        parts = split_name(name, "entry name")
        victim = whiteout_target(parts)
        if victim is not None:
            self._whiteout(name, victim, opaque=parts[-1] == OPAQUE)
            return
        if m.isfile() and m.size > self.budget.max_bytes - self.bytes:
            raise UnsafeEntry(name, "check size", f"entry of {m.size} bytes exceeds the size budget")
        mode = m.mode & KEPT_MODE_BITS
        if m.mode & (stat.S_ISUID | stat.S_ISGID) and not m.isdir():
            self.stripped_bits.append(name)
        if not parts:
            if not m.isdir():
                raise UnsafeEntry(name, "apply entry", "refusing to change the type of the root directory")
            self.dir_meta[()] = (mode, _mtime_ns(m))
            return
        try:
            parent = self._open_dir(parts[:-1], create=True, entry=name)
        except OSError as e:
            raise UnsafeEntry(name, "open parent directory", None, e.errno) from e
        try:
            self._create(tf, m, parent, parts, mode)
        except OSError as e:
            raise UnsafeEntry(name, f"create {_kind(m)}", None, e.errno) from e
        finally:
            os.close(parent)
        for i in range(1, len(parts) + 1):
            self.upper.add(parts[:i])

    def _create(self, tf: tarfile.TarFile, m: tarfile.TarInfo, parent: int,
                parts: tuple[str, ...], mode: int) -> None:
        leaf, name = parts[-1], m.name
        existing = _lstat(leaf, parent)
        if m.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                self._remove(parent, leaf, existing)
                os.mkdir(leaf, 0o700, dir_fd=parent)
            self.dir_meta[parts] = (mode, _mtime_ns(m))
            fd = os.open(leaf, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            try:
                self._xattrs(fd, m)
            finally:
                os.close(fd)
            return
        if m.isdev():
            self._remove(parent, leaf, existing)
            if m.ischr() or m.isblk():
                self.skipped_devices.append(name)
            else:
                os.mkfifo(leaf, mode, dir_fd=parent)
                os.utime(leaf, ns=(_mtime_ns(m),) * 2, dir_fd=parent, follow_symlinks=False)
            return
        if m.issym():
            self._remove(parent, leaf, existing)
            os.symlink(m.linkname, leaf, dir_fd=parent)
            os.utime(leaf, ns=(_mtime_ns(m),) * 2, dir_fd=parent, follow_symlinks=False)
            return
        if m.islnk():
            tparts = split_name(m.linkname, "hardlink target")
            if not tparts:
                raise UnsafeEntry(name, "create hardlink", "hardlink to the root directory refused")
            tparent = self._open_dir(tparts[:-1], entry=name)
            try:
                target = _lstat(tparts[-1], tparent)
                if target is None:
                    raise UnsafeEntry(name, "create hardlink", f"target {m.linkname!r} does not exist")
                if existing is not None and (existing.st_dev, existing.st_ino) == (target.st_dev, target.st_ino):
                    return  # already that very inode
                self._remove(parent, leaf, existing)
                # linkat without AT_SYMLINK_FOLLOW: a link to a symlink is a link to the
                # symlink itself, and nothing is ever chmod'ed through it (CVE-2021-32760).
                os.link(tparts[-1], leaf, src_dir_fd=tparent, dst_dir_fd=parent, follow_symlinks=False)
            finally:
                os.close(tparent)
            return
        if not m.isfile():
            raise UnsafeEntry(name, "apply entry", f"unsupported tar entry type {m.type!r}")
        self._remove(parent, leaf, existing)
        # O_EXCL|O_NOFOLLOW: always a new inode, never an existing file or a symlink's target.
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=parent)
        try:
            src = tf.extractfile(m)
            if src is not None:
                with src:
                    while chunk := src.read(CHUNK):
                        _write_all(fd, chunk)
            os.chmod(fd, mode)
            self._xattrs(fd, m)
            os.utime(fd, ns=(_mtime_ns(m),) * 2)
        finally:
            os.close(fd)

    def _xattrs(self, fd: int, m: tarfile.TarInfo) -> None:
        for key, value in m.pax_headers.items():
            if not key.startswith(XATTR_PREFIX):
                continue
            attr = key[len(XATTR_PREFIX):]
            if not attr.startswith("user."):
                # security.capability, security.selinux, trusted.overlay.*, system.posix_acl_*
                self.stripped_xattrs.setdefault(attr, []).append(m.name)
                continue
            try:
                os.setxattr(fd, attr, value.encode("utf-8", "surrogateescape"))
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
                self.xattr_unsupported.append(m.name)

    def _whiteout(self, name: str, victim: tuple[str, ...], opaque: bool) -> None:
        try:
            parent = self._open_dir(victim[:-1] if not opaque else victim, entry=name)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return  # nothing below to hide
            raise UnsafeEntry(name, "open whiteout directory", None, e.errno) from e
        try:
            if opaque:
                self._empty_lower(parent, victim)
            elif victim not in self.upper:  # made by this layer: a whiteout only reaches down
                self._remove(parent, victim[-1], _lstat(victim[-1], parent))
        except OSError as e:
            raise UnsafeEntry(name, "apply whiteout", None, e.errno) from e
        finally:
            os.close(parent)

    def _empty_lower(self, dir_fd: int, parts: tuple[str, ...]) -> None:
        """Remove what lower layers put under `parts`, sparing what this layer made."""
        for child in os.listdir(dir_fd):
            cparts = (*parts, child)
            st = _lstat(child, dir_fd)
            if cparts not in self.upper:
                self._remove(dir_fd, child, st)
            elif st is not None and stat.S_ISDIR(st.st_mode):
                sub = os.open(child, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    self._empty_lower(sub, cparts)
                finally:
                    os.close(sub)

    # -- primitives ---------------------------------------------------------------------

    def _open_dir(self, parts: tuple[str, ...], create: bool = False, entry: str | None = None) -> int:
        """An fd on directory `parts`, walked one component at a time without following links."""
        fd = os.dup(self.root_fd)
        try:
            for i, comp in enumerate(parts):
                try:
                    nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError as e:
                    if e.errno == errno.ENOENT and create:
                        os.mkdir(comp, 0o755, dir_fd=fd)
                        nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                      dir_fd=fd)
                    else:
                        st = _lstat(comp, fd)
                        if st is not None and stat.S_ISLNK(st.st_mode):
                            where = "/".join(parts[: i + 1])
                            raise UnsafeEntry(entry or where, "resolve parent",
                                           f"{where!r} is a symlink: refusing to write through it") from e
                        raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _remove(self, parent: int, leaf: str, st: os.stat_result | None) -> None:
        if st is None:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(leaf, dir_fd=parent)
            return
        fd = os.open(leaf, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            for child in os.listdir(fd):
                self._remove(fd, child, _lstat(child, fd))
        finally:
            os.close(fd)
        os.rmdir(leaf, dir_fd=parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _mtime_ns(m: tarfile.TarInfo) -> int:
    return int(float(m.mtime) * 1_000_000_000)


def _kind(m: tarfile.TarInfo) -> str:
    if m.isdir():
        return "directory"
    if m.issym():
        return "symlink"
    if m.islnk():
        return "hardlink"
    return "file" if m.isfile() else "special file"
