"""The local image store: content-addressed blobs, named images, unpacked root filesystems.

Layout under `$XDG_DATA_HOME/nsbox/` (default `~/.local/share/nsbox/`), mode 0700:

    blobs/sha256/<hex>     manifests, configs, layers; checked against <hex> when written
                           and when read (layers: by the unpacker as it streams them)
    index.json             {"version": 1, "images": {<manifest digest>: {"names": [...]}}},
                           replaced atomically (write, fsync, rename)
    rootfs/<chain hex>     an unpacked image, named by the OCI ChainID of its layers, so
                           images that share all layers share one tree
    rootfs/.tmp-<hex>-*    an unpack in progress: renamed to rootfs/<hex> only when complete,
                           so no reader ever sees a half-unpacked tree
    locks/store.lock       flock: shared to read blobs (unpack, inspect), exclusive to
                           change the index or delete (import, rm)
    locks/unpack-<hex>.lock  exclusive while one process unpacks <hex>; the others wait
    locks/use-<hex>.lock   shared while a sandbox runs on <hex> (`use_rootfs`); `remove`
                           refuses when it cannot take it exclusively
    tmp/                   blobs being written, archives being read
    tmp/pull-<hex>         a blob being downloaded (registry.py): flock'ed by its writer,
                           kept after an interrupted pull so the next one resumes it

A pull holds store.lock shared while it downloads (so `import` cannot wipe tmp/ and `rm`
cannot collect its blobs), then takes it exclusively to name the image (`add_manifest`).

Lock order: store.lock, then use-/unpack-<hex>.lock or a tmp/pull-<hex> file; `remove` only *tries* the use locks
(LOCK_NB), so a running sandbox never blocks it and it never deadlocks.

Kernel docs: flock(2) (locks belong to the open file: two opens conflict even in one
             process), rename(2) (atomic replace of index.json and of a finished tree).
Spec: OCI image-spec v1.1 config.md (ChainID, DiffIDs, Env/WorkingDir/User/Entrypoint/Cmd).
Order: the CLI resolves a REF and calls `use_rootfs` before the launcher forks; the lead's
       mount namespace step mounts the yielded directory as the overlay's lower layer.
Verify: tests/test_image_store.py (import of real archives, ls/inspect/rm, in-use refusal,
        two concurrent processes unpack once, no temporary tree left behind).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from nsbox.errors import StepError
from nsbox.image import layout

if TYPE_CHECKING:  # imported where an image is unpacked: tar, gzip, subprocess are off a run from the store
    from nsbox.image.unpack import Budget, Layer, UnpackReport

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}$")
HEX_PREFIX_RE = re.compile(r"^(sha256:)?[0-9a-f]{4,64}$")
MAX_ARGV_BYTES = 128 << 10  # Entrypoint + Cmd: an image config is untrusted input


# Records are NamedTuples, not dataclasses, as on the rest of the run path (nsbox/layers/__init__.py).


class ImageRef(NamedTuple):
    """A resolved image: its manifest digest, and the name it was found by (if any)."""

    digest: str
    name: str | None = None

    def __str__(self) -> str:
        return self.name or self.digest


class ImageConfig(NamedTuple):
    """The parts of the image config the launcher applies (within the sandbox's rules)."""

    env: tuple[str, ...] = ()
    working_dir: str | None = None
    user: str | None = None
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()

    def argv(self, override: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Entrypoint + (the user's command, or Cmd), as `docker run IMAGE [CMD]` does."""
        return self.entrypoint + (override or self.cmd)


class ImageInfo(NamedTuple):
    ref: ImageRef
    names: tuple[str, ...]
    size: int  # bytes of the manifest, config and layer blobs (as stored)
    layers: int
    created: str | None
    chain_id: str
    unpacked: bool


def default_root() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "nsbox"


def normalize_name(name: str) -> str:
    """`busybox` -> `busybox:latest`; a tag is the part after the last ':' past the last '/'."""
    if not NAME_RE.match(name) or "@" in name:
        raise StepError("image.import", "check image name", detail=f"invalid image name {name!r}",
                        fix="use NAME[:TAG] with letters, digits and . _ - / :")
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else name + ":latest"


def chain_id(diff_ids: list[str]) -> str:
    """OCI ChainID: ChainID(L0) = DiffID(L0); ChainID(L0..n) = sha256(ChainID(L0..n-1) + " " + DiffID(n))."""
    if not diff_ids:
        return "sha256:" + hashlib.sha256(b"").hexdigest()
    chain = diff_ids[0]
    for d in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
    return chain


@contextlib.contextmanager
def _flock(path: Path, exclusive: bool, wait: bool = True) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        fcntl.flock(fd, op)
        yield fd
    finally:
        os.close(fd)  # closing the last fd of the open file description drops the lock


def remove_tree(path: Path) -> None:
    """rm -rf for trees with read-only directories (an image's 0555 /usr): chmod, then remove."""
    if not os.path.lexists(path):
        return
    if not path.is_dir() or path.is_symlink():
        path.unlink()
        return
    stack = [str(path)]
    while stack:  # iterative: a hostile layer can nest thousands of directories
        d = stack.pop()
        os.chmod(d, 0o700)
        with os.scandir(d) as it:
            stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
    import shutil  # here, not above: it loads bz2 and lzma (launch time)

    shutil.rmtree(path)


class Store:
    """One image store directory. Every method raises StepError on failure."""

    def __init__(self, root: Path | None = None, budget: Budget | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.budget = budget  # None: unpack.DEFAULT_BUDGET
        self.blobs = self.root / "blobs" / "sha256"
        self.rootfs_dir = self.root / "rootfs"
        self.locks = self.root / "locks"
        self.tmp = self.root / "tmp"
        self.index_path = self.root / "index.json"
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for d in (self.blobs, self.rootfs_dir, self.locks, self.tmp):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StepError("image.store", f"mkdir {self.root}", e.errno,
                            fix="set XDG_DATA_HOME to a writable directory") from e

    # -- blobs --------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs / layout.check_digest(digest, "blob").split(":", 1)[1]

    def put(self, data: bytes, digest: str | None = None) -> str:
        return self.put_file(io.BytesIO(data), digest)

    def put_file(self, f: IO[bytes], digest: str | None = None) -> str:
        """Copy `f` into the store under its sha256; refuse if it is not `digest`."""
        import tempfile  # here, not above: a run from the store writes no blob (launch time)

        h = hashlib.sha256()
        with acting_store("write blob"), tempfile.NamedTemporaryFile(dir=self.tmp, prefix="blob-",
                                                                     delete=False) as out:
            try:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                actual = "sha256:" + h.hexdigest()
                if digest is not None and actual != digest:
                    raise StepError("image.import", f"verify blob {digest}", detail=f"content hashes to {actual}")
                os.chmod(out.name, 0o444)
                dest = self.blobs / h.hexdigest()
                if dest.exists():
                    os.unlink(out.name)
                else:
                    os.rename(out.name, dest)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(out.name)
                raise
        return actual

    def read_blob(self, digest: str, limit: int = layout.SMALL) -> bytes:
        """A small blob (manifest, config), checked against its digest."""
        path = self.blob_path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except OSError as e:
            raise StepError("image.store", f"read blob {digest}", e.errno,
                            why="the store lost a blob an image needs", fix="re-import the image") from e
        if len(data) > limit or layout.sha256_digest(data) != digest:
            raise StepError("image.store", f"verify blob {digest}", detail="content does not match its digest",
                            why="the blob was modified or truncated on disk", fix="re-import the image")
        return data

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    @contextlib.contextmanager
    def download_blob(self, digest: str, size: int | None = None) -> Iterator[BlobDownload | None]:
        """A resumable writer for blob `digest` (None if the store has it already).

        Hold `pulling()` around it. The partial file survives an interrupted download so the
        next call resumes it; `commit` verifies size and digest and only then renames it in.
        """
        hexd = self.blob_path(digest).name
        path = self.tmp / f"pull-{hexd}"
        while True:
            if self.has_blob(digest):
                yield None
                return
            with acting_store(f"open {path}"):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # another process downloading this blob: wait for it
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    st = None
                if st is None or (st.st_dev, st.st_ino) != (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                    continue  # the holder committed or discarded this file while we waited: look again
                with acting_store(f"read {path}"):
                    writer = BlobDownload(self, digest, size, path, fd)
                yield writer
                return
            finally:
                os.close(fd)

    @contextlib.contextmanager
    def pulling(self) -> Iterator[None]:
        """Shared store.lock for the length of a download: no import wipes tmp/, no rm collects blobs."""
        with self._lock("store.lock", exclusive=False):
            yield

    def add_manifest(self, digest: str, name: str | None = None, source: str | None = None) -> ImageRef:
        """Name a manifest whose blobs are all in the store (a pull's last step).

        `name` moves to this image as `import` does; `source` (an index digest and platform
        the manifest was chosen by) is remembered so a pull by that digest finds it again.
        """
        full = normalize_name(name) if name else None
        with self._lock("store.lock", exclusive=True):
            manifest, _ = self._config_of(digest)
            missing = [d["digest"] for d in manifest["layers"] if not self.has_blob(d["digest"])]
            if missing:  # an `rm` ran between the download and now: it collected them
                raise StepError("image.pull", f"register {digest}", detail=f"layer {missing[0]} left the store",
                                fix="pull again")
            images = self._load_index()
            if full:
                for other in images.values():
                    other["names"] = [n for n in other.get("names", []) if n != full]
            entry = images.setdefault(digest, {"names": []})
            entry["names"] = sorted(set(entry.get("names", [])) | ({full} if full else set()))
            if source:
                entry["sources"] = sorted(set(entry.get("sources", [])) | {source})
            self._save_index(images)
        return ImageRef(digest, full)

    def find_source(self, source: str) -> str | None:
        """The manifest digest registered with `source` by `add_manifest`, if any."""
        for digest, entry in self._load_index().items():
            if source in entry.get("sources", []):
                return digest
        return None

    # -- index --------------------------------------------------------------------------

    def _load_index(self) -> dict[str, dict[str, Any]]:
        try:
            doc = json.loads(self.index_path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise StepError("image.store", f"read {self.index_path}", getattr(e, "errno", None),
                            detail=None if isinstance(e, OSError) else str(e)) from e
        images = doc.get("images", {}) if isinstance(doc, dict) else {}
        return {str(k): v for k, v in images.items() if isinstance(v, dict)}

    def _save_index(self, images: dict[str, dict[str, Any]]) -> None:
        import tempfile  # here, not above: a run from the store writes no index (launch time)

        data = json.dumps({"version": 1, "images": images}, indent=1, sort_keys=True).encode()
        with acting_store(f"write {self.index_path}"):
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".index-")
            try:
                os.write(fd, data)
                os.fsync(fd)
                os.close(fd)
                os.rename(tmp, self.index_path)
                dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    def _lock(self, name: str, exclusive: bool, wait: bool = True) -> contextlib.AbstractContextManager[int]:
        return _flock(self.locks / name, exclusive, wait)

    # -- images -------------------------------------------------------------------------

    def import_image(self, path: Path | str, name: str | None = None) -> ImageRef:
        """Import an OCI layout (directory or tar) or a `docker save` archive."""
        path = Path(path)
        if not path.exists():
            raise StepError("image.import", f"open {path}", errno.ENOENT)
        import tempfile  # here, not above: launch time

        wanted = normalize_name(name) if name else None
        with self._lock("store.lock", exclusive=True):
            for stale in self.tmp.iterdir():  # only an import writes here, under this lock
                remove_tree(stale)
            with tempfile.TemporaryDirectory(dir=self.tmp, prefix="import-") as staging:
                found = layout.read_archive(path, self, Path(staging))
            if not found:
                raise StepError("image.import", f"read {path}", detail="no image for this platform "
                                f"({'/'.join(layout.native_platform())}) in the archive")
            if wanted and len(found) > 1:
                raise StepError("image.import", f"name the image in {path}",
                                detail=f"the archive holds {len(found)} images; a name applies to one")
            images = self._load_index()
            refs = []
            for img in found:
                digest = layout.sha256_digest(img.manifest)
                names = [wanted] if wanted else [normalize_name(n) for n in img.names if NAME_RE.match(n)]
                self._config_of(digest)  # the config is readable and well-formed
                for other in images.values():  # a name points at one image
                    other["names"] = [n for n in other.get("names", []) if n not in names]
                entry = images.setdefault(digest, {"names": []})
                entry["names"] = sorted(set(entry["names"]) | set(names))
                refs.append(ImageRef(digest, names[0] if names else None))
            self._save_index(images)
        return refs[0]

    def resolve(self, ref: str | ImageRef) -> ImageRef:
        """A name[:tag], name@digest, full digest or unique hex prefix -> ImageRef."""
        images = self._load_index()
        if isinstance(ref, ImageRef):
            if ref.digest in images:
                return ref
            raise self._not_found(str(ref))
        if "@" in ref:
            name, digest = ref.split("@", 1)
            if digest in images and normalize_name(name) in images[digest].get("names", []):
                return ImageRef(digest, normalize_name(name))
            raise self._not_found(ref)
        if NAME_RE.match(ref) and not ref.startswith("sha256:"):
            full = normalize_name(ref)
            for digest, entry in images.items():
                if full in entry.get("names", []):
                    return ImageRef(digest, full)
        if HEX_PREFIX_RE.match(ref):
            prefix = ref if ref.startswith("sha256:") else "sha256:" + ref
            hits = [d for d in images if d.startswith(prefix)]
            if len(hits) == 1:
                names = images[hits[0]].get("names", [])
                return ImageRef(hits[0], names[0] if names else None)
            if len(hits) > 1:
                raise StepError("image.resolve", f"find image {ref!r}", detail="ambiguous digest prefix",
                                fix="give more digits")
        raise self._not_found(ref)

    def _not_found(self, ref: str) -> StepError:
        return StepError("image.resolve", f"find image {ref!r}", detail=f"no such image in {self.root}",
                         fix="nsbox image ls; nsbox image import PATH --name NAME")

    def _manifest(self, digest: str) -> dict[str, Any]:
        return layout.validate_manifest(self.read_blob(digest), digest)

    def _config_of(self, digest: str) -> tuple[dict[str, Any], dict[str, Any]]:
        manifest = self._manifest(digest)
        cdesc = manifest["config"]
        config = layout.parse_json(self.read_blob(cdesc["digest"]), f"config {cdesc['digest']}")
        raw_rootfs = config.get("rootfs")
        rootfs: dict[str, Any] = raw_rootfs if isinstance(raw_rootfs, dict) else {}
        diff_ids = rootfs.get("diff_ids") or []
        config["rootfs"] = {**rootfs, "diff_ids": diff_ids}  # null (buildkit) reads as []
        if len(diff_ids) != len(manifest["layers"]) or not all(
                isinstance(d, str) and layout.DIGEST_RE.match(d) for d in diff_ids):
            raise StepError("image.import", f"read config of {digest}",
                            detail=f"{len(diff_ids)} DiffIDs for {len(manifest['layers'])} layers")
        return manifest, config

    def _chain_hex(self, digest: str) -> str:
        """The hex of the image's ChainID: the name of its tree under rootfs/."""
        return chain_id(self._config_of(digest)[1]["rootfs"]["diff_ids"]).split(":")[1]

    def _layers(self, digest: str) -> tuple[list[Layer], str]:
        # here, not above: the unpacker loads tarfile, gzip, subprocess, which a run from an
        # unpacked tree does not need (launch time); such a run asks only for `_chain_hex`
        from nsbox.image.unpack import Layer

        manifest, config = self._config_of(digest)
        diff_ids = config["rootfs"]["diff_ids"]
        layers = [Layer(d["digest"], diff, self.blob_path(d["digest"]))
                  for d, diff in zip(manifest["layers"], diff_ids, strict=True)]
        return layers, chain_id(diff_ids)

    def _unpack(self, digest: str, target: Path) -> UnpackReport:
        """Apply the image's layers to the empty directory `target`; hold store.lock."""
        from nsbox.image.unpack import DEFAULT_BUDGET, unpack_layers  # launch time, as in _layers

        return unpack_layers(self._layers(digest)[0], target, DEFAULT_BUDGET if self.budget is None else self.budget)

    def config(self, ref: str | ImageRef) -> ImageConfig:
        """Env, WorkingDir, User, Entrypoint, Cmd from the image config, type-checked."""
        _, config = self._config_of(self.resolve(ref).digest)
        c = config.get("config") or {}
        if not isinstance(c, dict):
            raise StepError("image.config", "read image config", detail="'config' is not an object")

        def strings(key: str) -> tuple[str, ...]:
            v = c.get(key)
            if v is None:
                return ()
            if not isinstance(v, list) or not all(isinstance(s, str) and "\0" not in s for s in v):
                raise StepError("image.config", f"read {key}", detail="not a list of strings")
            return tuple(v)

        def string(key: str) -> str | None:
            v = c.get(key)
            if v is None or v == "":
                return None
            if not isinstance(v, str) or "\0" in v:
                raise StepError("image.config", f"read {key}", detail="not a string")
            return v

        env = strings("Env")
        if any("=" not in e for e in env):
            raise StepError("image.config", "read Env", detail="an entry without '='")
        out = ImageConfig(env, string("WorkingDir"), string("User"), strings("Entrypoint"), strings("Cmd"))
        if sum(len(a) + 1 for a in out.entrypoint + out.cmd) > MAX_ARGV_BYTES:
            raise StepError("image.config", "read Entrypoint/Cmd", detail=f"longer than {MAX_ARGV_BYTES} bytes")
        return out

    def list_images(self) -> list[ImageInfo]:
        with self._lock("store.lock", exclusive=False):
            images = self._load_index()
            out = [self._info(d, e) for d, e in images.items()]
        return sorted(out, key=lambda i: (i.names or ("~",), i.ref.digest))

    def _info(self, digest: str, entry: dict[str, Any]) -> ImageInfo:
        manifest, config = self._config_of(digest)
        names = tuple(entry.get("names", []))
        size = len(self.read_blob(digest)) + int(manifest["config"]["size"]) + sum(
            int(d["size"]) for d in manifest["layers"])
        chain = chain_id(config["rootfs"]["diff_ids"])
        return ImageInfo(ImageRef(digest, names[0] if names else None), names, size,
                         len(manifest["layers"]), str(config["created"]) if config.get("created") else None, chain,
                         (self.rootfs_dir / chain.split(":")[1]).is_dir())

    def inspect(self, ref: str | ImageRef) -> dict[str, Any]:
        """Manifest, config, layers (digest, mediaType, size, DiffID), sizes, ChainID, rootfs."""
        with self._lock("store.lock", exclusive=False):
            img = self.resolve(ref)
            manifest, config = self._config_of(img.digest)
            info = self._info(img.digest, self._load_index()[img.digest])
        layers = [{"digest": d["digest"], "mediaType": d.get("mediaType"), "size": d["size"], "diff_id": diff}
                  for d, diff in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True)]
        rootfs = self.rootfs_dir / info.chain_id.split(":")[1]
        return {"digest": img.digest, "names": list(info.names), "size": info.size, "chain_id": info.chain_id,
                "rootfs": str(rootfs) if info.unpacked else None, "layers": layers,
                "manifest": manifest, "config": config}

    def remove(self, ref: str | ImageRef) -> list[str]:
        """Remove a name (or, given a digest, the image) and collect unreferenced blobs and trees.

        Refuses, changing nothing, when a tree it would delete is in use by a sandbox.
        Returns what went: names, then blob digests, then rootfs ChainIDs.
        """
        with self._lock("store.lock", exclusive=True), contextlib.ExitStack() as held:
            img = self.resolve(ref)
            images = self._load_index()
            by_name = isinstance(ref, str) and img.name is not None and not HEX_PREFIX_RE.match(ref)
            gone_names = [img.name] if by_name and img.name else list(images[img.digest].get("names", []))
            remaining = [n for n in images[img.digest].get("names", []) if n not in gone_names]
            if remaining:
                images[img.digest]["names"] = remaining
            else:
                del images[img.digest]
            keep_blobs: set[str] = set()
            keep_chains: set[str] = set()
            for digest in images:
                manifest, config = self._config_of(digest)
                keep_blobs |= {digest, manifest["config"]["digest"], *(d["digest"] for d in manifest["layers"])}
                keep_chains.add(chain_id(config["rootfs"]["diff_ids"]).split(":")[1])
            doomed = [p for p in self.rootfs_dir.iterdir()
                      if not p.name.startswith(".") and p.name not in keep_chains]
            for tree in doomed:
                try:
                    held.enter_context(self._lock(f"use-{tree.name}.lock", exclusive=True, wait=False))
                except BlockingIOError as e:
                    raise StepError("image.remove", f"remove {img}", e.errno,
                                    detail=f"its rootfs {tree} is in use by a running sandbox",
                                    fix="stop that sandbox first, then retry") from e
            self._save_index(images)
            removed = list(gone_names)
            for blob in self.blobs.iterdir():
                if "sha256:" + blob.name not in keep_blobs:
                    blob.unlink()
                    removed.append("sha256:" + blob.name)
            for tree in doomed:
                trash = self.rootfs_dir / f".trash-{tree.name}-{os.getpid()}"
                os.rename(tree, trash)  # gone from view at once; deletion may take a while
                remove_tree(trash)
                for lock in (f"use-{tree.name}.lock", f"unpack-{tree.name}.lock"):
                    with contextlib.suppress(FileNotFoundError):
                        (self.locks / lock).unlink()
                removed.append("sha256:" + tree.name)
        return removed

    # -- root filesystems ---------------------------------------------------------------

    def ensure_rootfs(self, ref: str | ImageRef) -> tuple[Path, bool]:
        """The image's unpacked tree, unpacking it first if needed; True if this call unpacked."""
        with self._lock("store.lock", exclusive=False):  # no blob goes away meanwhile
            img = self.resolve(ref)
            hexid = self._chain_hex(img.digest)
            final = self.rootfs_dir / hexid
            if final.is_dir():
                return final, False
            with self._lock(f"unpack-{hexid}.lock", exclusive=True):  # the second process waits here
                if final.is_dir():
                    return final, False
                for stale in self.rootfs_dir.glob(f".tmp-{hexid}-*"):  # a crashed unpack
                    remove_tree(stale)
                tmp = self.rootfs_dir / f".tmp-{hexid}-{os.getpid()}"
                with acting_store(f"mkdir {tmp}"):
                    tmp.mkdir(mode=0o755)
                try:
                    self._unpack(img.digest, tmp)
                    os.rename(tmp, final)
                except BaseException:
                    remove_tree(tmp)
                    raise
            return final, True

    def rootfs_for(self, ref: str | ImageRef) -> Path:
        return self.ensure_rootfs(ref)[0]

    @contextlib.contextmanager
    def use_rootfs(self, ref: str | ImageRef) -> Iterator[Path]:
        """The image's tree, marked in use (shared lock) until the block ends: `remove` refuses."""
        with contextlib.ExitStack() as held:
            with self._lock("store.lock", exclusive=False):  # taken before `remove` can look
                img = self.resolve(ref)
                hexid = self._chain_hex(img.digest)
                held.enter_context(self._lock(f"use-{hexid}.lock", exclusive=False))
            yield self.rootfs_for(img)

    def unpack_to(self, ref: str | ImageRef, dest: Path | str) -> UnpackReport:
        """Write the image's rootfs into `dest` (absent or empty) with the store's unpacker."""
        import tempfile  # here, not above: launch time

        dest = Path(os.path.abspath(dest))
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise StepError("image.unpack", f"unpack into {dest}", errno.ENOTEMPTY,
                            fix="give a new or empty directory")
        with acting_store(f"mkdir {dest.parent}"):
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.nsbox-unpack-"))
            os.chmod(tmp, 0o755)
        try:
            with self._lock("store.lock", exclusive=False):
                report = self._unpack(self.resolve(ref).digest, tmp)
            with acting_store(f"rename into {dest}"):
                if dest.exists():
                    dest.rmdir()
                os.rename(tmp, dest)
        except BaseException:
            remove_tree(tmp)
            raise
        return report


class BlobDownload:
    """A blob being written to tmp/pull-<hex>, hashed as it is written; see Store.download_blob."""

    def __init__(self, store: Store, digest: str, size: int | None, path: Path, fd: int):
        self.store, self.digest, self.size, self.path, self.fd = store, digest, size, path, fd
        self.hash = hashlib.sha256()
        self.offset = 0
        while chunk := os.read(fd, layout.CHUNK):  # what an interrupted pull left: hash it to resume
            self.hash.update(chunk)
            self.offset += len(chunk)
        self.resumed = self.offset
        self.committed = False
        if size is not None and self.offset > size:
            self.restart()

    def restart(self) -> None:
        """Start from byte 0 (the server ignored Range, or the partial file was bad)."""
        with acting_store(f"truncate {self.path}"):
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
        self.hash, self.offset, self.resumed = hashlib.sha256(), 0, 0

    def write(self, chunk: bytes) -> None:
        if self.size is not None and self.offset + len(chunk) > self.size:
            self.discard()
            raise StepError("image.pull", f"verify blob {self.digest}", detail=f"the registry sent more than "
                            f"the {self.size} bytes the manifest says; nothing was stored")
        with acting_store(f"write {self.path}"):
            view = memoryview(chunk)
            while view:
                view = view[os.write(self.fd, view):]
        self.hash.update(chunk)
        self.offset += len(chunk)

    def commit(self, keep_on_mismatch: bool = False) -> None:
        """Verify size and digest, then rename into blobs/; on a mismatch, delete (unless told) and raise."""
        actual = "sha256:" + self.hash.hexdigest()
        if actual != self.digest or (self.size is not None and self.offset != self.size):
            if not keep_on_mismatch:
                self.discard()
            raise StepError("image.pull", f"verify blob {self.digest}",
                            detail=f"digest mismatch: {self.offset} bytes hashing to {actual}; nothing was stored",
                            why="the registry's copy is corrupt, or something between you and it altered it")
        with acting_store(f"store blob {self.digest}"):
            os.fsync(self.fd)
            os.fchmod(self.fd, 0o444)
            os.rename(self.path, self.store.blob_path(self.digest))  # under our flock: waiters re-check
        self.committed = True

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@contextlib.contextmanager
def acting_store(action: str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise StepError("image.store", action, e.errno) from e


# Plain functions for the CLI: the default store under $XDG_DATA_HOME/nsbox.


def import_image(path: Path | str, name: str | None = None) -> ImageRef:
    return Store().import_image(path, name)


def list_images() -> list[ImageInfo]:
    return Store().list_images()


def inspect(ref: str | ImageRef) -> dict[str, Any]:
    return Store().inspect(ref)


def remove(ref: str | ImageRef) -> list[str]:
    return Store().remove(ref)


def rootfs_for(ref: str | ImageRef) -> Path:
    return Store().rootfs_for(ref)


def use_rootfs(ref: str | ImageRef) -> contextlib.AbstractContextManager[Path]:
    return Store().use_rootfs(ref)


def unpack_to(ref: str | ImageRef, dest: Path | str) -> UnpackReport:
    return Store().unpack_to(ref, dest)


def image_config(ref: str | ImageRef) -> ImageConfig:
    return Store().config(ref)
