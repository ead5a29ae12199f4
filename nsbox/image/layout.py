"""Image archives as data: read an OCI image layout or a `docker save` archive, write a layout.

Reading: an OCI image layout (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`) as a
directory or a tar (optionally gzip/xz/bz2-compressed), or a `docker save` archive
(`manifest.json` listing `Config` and `Layers` paths; older ones add `repositories` and
`<id>/layer.tar`). Archive members are never extracted as files: small ones (JSON) are read
into memory, large ones are copied into a staging directory under numbered names, so no
member name can place anything anywhere. Every blob named by a digest is checked against
it before use; a docker archive's config and layers are content-addressed as they are
copied, and described by a synthesized OCI manifest.

Writing (`write_layout`): a small OCI layout from in-memory tar layers, for the rootfs
recipes (`scripts/make-busybox-image`) and the tests.

Kernel docs: none: this module only reads and writes files it is given.
Spec: OCI image-spec v1.1 image-layout.md, image-index.md, manifest.md, config.md,
      descriptor.md (digests); CVE-2021-41190 (an index must not carry `layers`/`config`,
      a manifest must not carry `manifests`).
Order: used by store.import_image, under the store lock, before anything is unpacked.
Verify: tests/test_image_store.py (fixtures from containers/common and moby, built layouts).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol

from nsbox.errors import StepError

STEP = "image.import"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
LAYER_TYPES = (
    LAYER_TAR, LAYER_TAR + "+gzip", LAYER_TAR + "+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
SMALL = 4 << 20  # JSON documents: manifests, configs, indexes are far smaller
IN_MEMORY = 64 << 20  # an archive of many small members must not fill the memory
CHUNK = 1 << 20
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


def native_platform() -> tuple[str, str]:
    machine = os.uname().machine  # what platform.machine() returns, without importing it (launch time)
    return "linux", _GOARCH.get(machine, machine)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str, what: str) -> str:
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise StepError(STEP, f"read {what}", detail=f"unsupported or malformed digest {digest!r} (sha256 only)")
    return digest


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise StepError(STEP, f"parse {what}", detail=str(e)) from e
    if not isinstance(doc, dict):
        raise StepError(STEP, f"parse {what}", detail="not a JSON object")
    return doc


# NamedTuples, not dataclasses: the store validates manifests on every `nsbox run --image`
# (nsbox/layers/__init__.py says why).


class Descriptor(NamedTuple):
    media_type: str
    digest: str
    size: int


class FoundImage(NamedTuple):
    """One image found in an archive: its manifest as the store will hold it."""

    manifest: bytes  # verified bytes of an OCI (or docker v2) manifest
    names: tuple[str, ...]


class BlobSink(Protocol):
    """Where verified blobs go (the store): each call returns the blob's digest."""

    def put(self, data: bytes, digest: str | None = None) -> str: ...

    def put_file(self, f: IO[bytes], digest: str | None = None) -> str: ...


# ---------------------------------------------------------------------------------------
# Archive access: a directory or a tar, by member path.


class _Archive:
    def __init__(self, path: Path, staging: Path):
        self.path, self.staging = path, staging
        self.small: dict[str, bytes] = {}
        self.large: dict[str, Path] = {}
        self.links: dict[str, str] = {}
        if path.is_dir():
            self.is_dir = True
            return
        self.is_dir = False
        import shutil  # here, not above: only an archive import reads a tar (launch time)
        import tarfile

        held = 0  # bytes of small members kept in memory; past IN_MEMORY they go to staging too
        try:
            with tarfile.open(path, mode="r:*") as tf:
                for n, m in enumerate(tf):
                    name = _clean(m.name)
                    if name is None:
                        continue  # never used: blob paths and documents are relative
                    if m.issym() or m.islnk():
                        # newer `docker save` links layer.tar to blobs/sha256/<hex>
                        base = m.linkname if m.islnk() else os.path.join(os.path.dirname(name), m.linkname)
                        target = _clean(os.path.normpath(base))
                        if target is not None:
                            self.links[name] = target
                    elif m.isfile():
                        src = tf.extractfile(m)
                        assert src is not None
                        if m.size <= SMALL and held + m.size <= IN_MEMORY:
                            self.small[name] = src.read()
                            held += m.size
                        else:
                            dest = staging / f"member-{n}"
                            with open(dest, "wb") as out:
                                shutil.copyfileobj(src, out, CHUNK)
                            self.large[name] = dest
        except (tarfile.TarError, EOFError, OSError) as e:
            raise StepError(STEP, f"read archive {path}", getattr(e, "errno", None) if isinstance(e, OSError)
                            else None, detail=None if isinstance(e, OSError) else str(e)) from e

    def _resolve(self, name: str) -> str:
        for _ in range(16):
            if name not in self.links:
                return name
            name = self.links[name]
        raise StepError(STEP, f"read {name} in {self.path}", detail="too many links")

    def has(self, name: str) -> bool:
        if self.is_dir:
            return (self.path / name).is_file()
        name = self._resolve(name)
        return name in self.small or name in self.large

    def open(self, name: str) -> IO[bytes]:
        clean = _clean(name)
        if clean is None:
            raise StepError(STEP, f"read {name!r} in {self.path}", detail="path leaves the archive")
        try:
            if self.is_dir:
                return open(self.path / clean, "rb")
            clean = self._resolve(clean)
            if clean in self.large:
                return open(self.large[clean], "rb")
            if clean in self.small:
                return io.BytesIO(self.small[clean])
        except OSError as e:
            raise StepError(STEP, f"read {clean} in {self.path}", e.errno) from e
        raise StepError(STEP, f"read {clean} in {self.path}", detail="no such member")

    def read(self, name: str, limit: int = SMALL) -> bytes:
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise StepError(STEP, f"read {name} in {self.path}", detail=f"larger than {limit} bytes")
        return data


def _clean(name: str) -> str | None:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or not parts:
        return None
    return "/".join(parts)


def _blob_path(digest: str) -> str:
    alg, _, hexpart = digest.partition(":")
    return f"blobs/{alg}/{hexpart}"


# ---------------------------------------------------------------------------------------
# Reading


def read_archive(path: Path, sink: BlobSink, staging: Path) -> list[FoundImage]:
    """Copy every image of the archive at `path` into `sink`; return what was found."""
    arc = _Archive(path, staging)
    if arc.has("index.json") and arc.has("oci-layout"):
        layout = parse_json(arc.read("oci-layout"), "oci-layout")
        if not str(layout.get("imageLayoutVersion", "")).startswith("1."):
            raise StepError(STEP, f"read {path}", detail=f"unsupported imageLayoutVersion {layout!r}")
        index = parse_json(arc.read("index.json"), "index.json")
        return list(_from_index(arc, index, sink, depth=0))
    if arc.has("manifest.json"):
        return _from_docker(arc, sink)
    if arc.has("repositories"):
        raise StepError(STEP, f"read {path}", detail="a legacy docker v1 archive (repositories, no "
                        "manifest.json) is not supported", fix="re-save it with Docker >= 1.10")
    raise StepError(STEP, f"read {path}", detail="neither an OCI image layout (index.json, oci-layout) "
                    "nor a docker-save archive (manifest.json)",
                    fix="export with `skopeo copy ... oci:DIR`, `docker save`, or `podman save`")


def _descriptor(d: Any, what: str) -> Descriptor:
    if not isinstance(d, dict) or not isinstance(d.get("size"), int):
        raise StepError(STEP, f"read {what}", detail="malformed descriptor")
    return Descriptor(str(d.get("mediaType", "")), check_digest(d.get("digest", ""), what), d["size"])


def _from_index(arc: _Archive, index: dict[str, Any], sink: BlobSink, depth: int) -> Iterator[FoundImage]:
    if "layers" in index or "config" in index:
        raise StepError(STEP, "read image index", detail="an index carrying layers/config is ambiguous "
                        "(CVE-2021-41190)")
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise StepError(STEP, "read image index", detail="no manifests list")
    want_os, want_arch = native_platform()
    for d in manifests:
        desc = _descriptor(d, "index entry")
        annotations = d.get("annotations") or {}
        plat = d.get("platform") or {}
        if not isinstance(plat, dict) or not isinstance(annotations, dict):
            raise StepError(STEP, "read image index", detail=f"index entry {desc.digest}: platform and annotations "
                            "must be objects")
        if plat and (plat.get("os"), plat.get("architecture")) != (want_os, want_arch):
            continue
        if desc.media_type in INDEX_TYPES:
            if depth > 4:
                raise StepError(STEP, "read image index", detail="indexes nested too deep")
            sub = parse_json(_verified(arc, desc, "image index"), f"index {desc.digest}")
            yield from _from_index(arc, sub, sink, depth + 1)
            continue
        if desc.media_type not in MANIFEST_TYPES:
            continue  # signatures, attestations, artifacts: not images
        raw = _verified(arc, desc, "manifest")
        manifest = validate_manifest(raw, desc.digest)
        for blob in [manifest["config"], *manifest["layers"]]:
            bd = _descriptor(blob, "manifest entry")
            with arc.open(_blob_path(bd.digest)) as f:
                sink.put_file(f, bd.digest)
        sink.put(raw, desc.digest)
        yield FoundImage(raw, _names(annotations))


def _names(annotations: dict[str, Any]) -> tuple[str, ...]:
    for key in (CONTAINERD_NAME, REF_NAME):
        value = annotations.get(key)
        if isinstance(value, str) and value:
            return (value,)
    return ()


def _verified(arc: _Archive, desc: Descriptor, what: str) -> bytes:
    data = arc.read(_blob_path(desc.digest))
    if sha256_digest(data) != desc.digest:
        raise StepError(STEP, f"verify {what} {desc.digest}", detail=f"content hashes to {sha256_digest(data)}")
    if len(data) != desc.size:
        raise StepError(STEP, f"verify {what} {desc.digest}", detail=f"size {len(data)}, descriptor says {desc.size}")
    return data


def validate_manifest(raw: bytes, digest: str) -> dict[str, Any]:
    """Parse an image manifest and refuse the shapes that confuse (an index in disguise...)."""
    if sha256_digest(raw) != digest:
        raise StepError(STEP, f"verify manifest {digest}", detail=f"content hashes to {sha256_digest(raw)}")
    m = parse_json(raw, f"manifest {digest}")
    if "manifests" in m:
        raise StepError(STEP, f"read manifest {digest}", detail="a manifest carrying 'manifests' is ambiguous "
                        "(CVE-2021-41190)")
    if m.get("mediaType", OCI_MANIFEST) not in MANIFEST_TYPES:
        raise StepError(STEP, f"read manifest {digest}", detail=f"mediaType {m.get('mediaType')!r}")
    config = _descriptor(m.get("config"), f"config of {digest}")
    if config.media_type not in CONFIG_TYPES:
        raise StepError(STEP, f"read manifest {digest}", detail=f"config mediaType {config.media_type!r} "
                        "is not an image config")
    if m.get("layers") is None:  # buildkit writes `"layers": null` for an image without layers
        m["layers"] = []
    layers = m["layers"]
    if not isinstance(layers, list):
        raise StepError(STEP, f"read manifest {digest}", detail="no layers list")
    for d in layers:
        desc = _descriptor(d, f"layer of {digest}")
        if desc.media_type not in LAYER_TYPES:
            raise StepError(STEP, f"read manifest {digest}", detail=f"layer mediaType {desc.media_type!r}")
    return m


def _from_docker(arc: _Archive, sink: BlobSink) -> list[FoundImage]:
    try:
        entries = json.loads(arc.read("manifest.json"))
    except ValueError as e:
        raise StepError(STEP, "parse manifest.json", detail=str(e)) from e
    if not isinstance(entries, list):
        raise StepError(STEP, "parse manifest.json", detail="not a list")
    found = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise StepError(STEP, "parse manifest.json", detail="entry without Config")
        config = arc.read(entry["Config"])
        config_digest = sink.put(config)
        parse_json(config, f"config {entry['Config']}")
        layers = []
        for path in entry.get("Layers") or []:
            with arc.open(str(path)) as f:
                magic = f.read(4)
                f.seek(0)
                media = LAYER_TAR + ("+gzip" if magic[:2] == b"\x1f\x8b" else
                                     "+zstd" if magic == b"\x28\xb5\x2f\xfd" else "")
                digest = sink.put_file(f)
                size = f.tell()
            layers.append({"mediaType": media, "digest": digest, "size": size})
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": layers,
        }
        raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        sink.put(raw)
        tags = entry.get("RepoTags") or []
        found.append(FoundImage(raw, tuple(str(t) for t in tags)))
    return found


# ---------------------------------------------------------------------------------------
# Writing


def write_layout(out: Path, layers: Sequence[bytes], config: dict[str, Any],
                 ref_name: str | None = None, compress: bool = True) -> str:
    """Write an OCI image layout holding one image; return its manifest digest.

    `layers` are uncompressed tar streams; their DiffIDs are written into the config's
    `rootfs`. Gzip uses mtime 0 so the same input gives the same digests.
    """
    import gzip  # here, not above: launch time

    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = sha256_digest(data)
        (blobs / digest.split(":")[1]).write_bytes(data)
        return digest

    descs = []
    for tar in layers:
        blob = gzip.compress(tar, mtime=0) if compress else tar
        descs.append({"mediaType": LAYER_TAR + ("+gzip" if compress else ""), "digest": put(blob),
                      "size": len(blob)})
    config = {**config, "rootfs": {"type": "layers", "diff_ids": [sha256_digest(t) for t in layers]}}
    config.setdefault("os", "linux")
    config.setdefault("architecture", native_platform()[1])
    config_raw = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": put(config_raw), "size": len(config_raw)},
        "layers": descs,
    }
    manifest_raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    digest = put(manifest_raw)
    entry: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest_raw)}
    if ref_name:
        entry["annotations"] = {REF_NAME: ref_name}
    (out / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (out / "index.json").write_text(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                "manifests": [entry]}, indent=1))
    return digest
