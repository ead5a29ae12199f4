"""Image references and platforms, and `ensure`: the store lookup `nsbox run --image` makes first.

`ensure(REF, policy)` is `nsbox run --pull=missing|always|never`, as in podman: an image
already in the store (by the name given, or the fully qualified one) is used as it is;
only a pull loads `registry` (HTTP, TLS, threads: tens of ms that a run from the store
does not pay). The reference grammar and platforms live here, not in `registry`, so that
the lookup needs neither; `registry` re-exports them.

Spec: distribution/reference grammar (reference.go, normalize.go), OCI image-spec
      image-index.md (platform: os, architecture, variant).
Order: in the launcher's image.materialize step, before any fork; then store.use_rootfs.
Verify: tests/test_registry.py (parsing, platforms, --pull policies), tests/test_imports.py
        (a run from the store imports no registry, ssl, threads, tar).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from nsbox.errors import StepError
from nsbox.image import layout
from nsbox.image.store import NAME_RE, Store
from nsbox.spec import PULL_POLICIES  # one definition: --pull is validated with the rest of the spec

STEP = "image.pull"
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"  # docker.io itself only redirects to the website

# distribution/reference grammar (regexp.go): lowercase path components joined by . _ __ -+
_ALNUM = r"[a-z0-9]+"
_COMPONENT = rf"{_ALNUM}(?:(?:[._]|__|-+){_ALNUM})*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
PATH_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
DOMAIN_RE = re.compile(rf"^(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[a-fA-F0-9:]+\])(?::[0-9]{{1,5}})?$")
TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
PLATFORM_PART_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


def _bad_ref(text: str, why: str) -> StepError:
    return StepError(STEP, f"parse image reference {text!r}", detail=why,
                     fix="use [HOST[:PORT]/]NAME[:TAG][@sha256:DIGEST], e.g. debian:bookworm-slim or "
                         "127.0.0.1:5000/team/app:1.2")


# ---- references ------------------------------------------------------------------------


class Reference(NamedTuple):
    """A fully qualified image reference: registry domain, repository path, tag and/or digest."""

    domain: str  # "docker.io", "ghcr.io", "127.0.0.1:5000"
    path: str  # "library/debian"
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.path}"

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.domain == DOCKER_HUB else self.domain

    @property
    def target(self) -> str:
        """What the manifest request names: the digest if pinned (it wins over a tag, as in Docker)."""
        return self.digest or self.tag or "latest"

    @property
    def store_name(self) -> str | None:
        """The name the store records: NAME:TAG; a pull by digest names nothing (the tag may have moved)."""
        if self.digest or not self.tag:
            return None
        full = f"{self.name}:{self.tag}"
        return full if NAME_RE.match(full) else None  # an IPv6 host's brackets are no store name

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def parse_reference(text: str) -> Reference:
    """Docker's reference parsing: NAME[:TAG][@DIGEST], docker.io and library/ filled in."""
    if not text or len(text) > 1024 or any(c.isspace() or ord(c) < 32 for c in text):
        raise _bad_ref(text, "empty, too long, or containing spaces")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not layout.DIGEST_RE.match(digest):
            raise _bad_ref(text, f"digest {digest!r} is not sha256:<64 lowercase hex digits>")
    tag = None
    colon, slash = rest.rfind(":"), rest.rfind("/")
    if colon > slash:  # a ':' before the last '/' is a port
        rest, tag = rest[:colon], rest[colon + 1:]
        if not TAG_RE.match(tag):
            raise _bad_ref(text, f"tag {tag!r}: letters, digits, _ . - (at most 128, not starting with . or -)")
    first, sep, remainder = rest.partition("/")
    # normalize.go splitDockerDomain: the first component is a registry only if it looks like one
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        domain, path = first, remainder
    else:
        domain, path = DOCKER_HUB, rest
    if domain == "index.docker.io":
        domain = DOCKER_HUB
    if not DOMAIN_RE.match(domain):
        raise _bad_ref(text, f"registry {domain!r} is not a host name or address with an optional port")
    if path != path.lower():
        raise _bad_ref(text, f"repository name {path!r} must be lowercase")
    if not PATH_RE.match(path):
        raise _bad_ref(text, f"repository name {path!r}: lowercase letters and digits, separated by / . _ __ -")
    if domain == DOCKER_HUB and "/" not in path:
        path = "library/" + path
    if re.fullmatch(r"[a-f0-9]{64}", path.rsplit("/", 1)[-1]) and "/" not in rest:
        raise _bad_ref(text, "a 64-digit hex string is an image ID, not a repository name")
    if len(domain) + 1 + len(path) > 255:
        raise _bad_ref(text, "the name is longer than 255 characters")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(domain, path, tag, digest)


# ---- platforms -------------------------------------------------------------------------


class Platform(NamedTuple):
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")

    def matches(self, p: dict[str, Any]) -> bool:
        """An index entry's `platform` fits: same os and architecture, and variant if one was asked for."""
        if p.get("os") != self.os or p.get("architecture") != self.architecture:
            return False
        if self.variant is None:
            return True
        default = _DEFAULT_VARIANT.get(self.architecture)
        return (p.get("variant") or default) == (self.variant or default)


def parse_platform(text: str) -> Platform:
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(PLATFORM_PART_RE.match(p) for p in parts):
        raise StepError(STEP, f"parse --platform {text!r}", detail="expected OS/ARCH[/VARIANT]",
                        fix="e.g. linux/amd64, linux/arm64, linux/arm/v7")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def default_platform() -> Platform:
    """This machine's platform in Go's names (x86_64 -> linux/amd64)."""
    os_name, arch = layout.native_platform()
    return Platform(os_name, arch, "v7" if arch == "arm" else None)


# ---- the local store, then a pull ------------------------------------------------------


def _local(store: Store, ref: str, want: Platform) -> str | None:
    """The manifest digest `ref` already names in the store (as given, or fully qualified), or None."""
    with contextlib.suppress(StepError):
        return store.resolve(ref).digest  # an imported `busybox`, a digest prefix: used as they are
    try:
        r = parse_reference(ref)
    except StepError:
        return None
    if r.digest:
        with contextlib.suppress(StepError):
            return store.resolve(r.digest).digest
        return store.find_source(f"{r.name}@{r.digest} {want}")
    if r.store_name:
        with contextlib.suppress(StepError):
            return store.resolve(r.store_name).digest
    return None


def ensure(ref: str, policy: str = "missing", platform: str | None = None, tls_ca: str | Path | None = None,
           insecure: Sequence[str] = (), store: Store | None = None, progress: bool | None = None) -> str:
    """The store ref (a manifest digest) to run `ref` from, pulling per podman's --pull policy.

    missing: use the local image if there is one (by the name given, or the fully
    qualified one), else pull; always: pull (cheap when nothing changed: blobs are
    shared); never: local only, else an error.
    """
    if policy not in PULL_POLICIES:
        raise StepError("spec.validate", "invalid request", detail=f"--pull {policy!r} is not a policy",
                        fix="one of: " + ", ".join(PULL_POLICIES))
    store = store or Store()
    want = parse_platform(platform) if platform else default_platform()
    if policy != "always":
        found = _local(store, ref, want)
        if found:
            return found
        if policy == "never":
            raise StepError(STEP, f"find image {ref!r}", detail=f"not in the local store ({store.root}) "
                            "and --pull=never", fix=f"nsbox image pull {ref}, or --pull=missing")
    from nsbox.image import registry  # HTTP, TLS, threads: loaded only to pull (launch time)

    return registry.pull(ref, platform, tls_ca, insecure, store, progress).digest
