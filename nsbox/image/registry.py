"""Pull images from an OCI distribution registry (Docker Hub, ghcr.io, a local `docker-registry`) into the store.

`pull(REF)` parses REF as Docker does (`debian:bookworm-slim` is
`docker.io/library/debian:bookworm-slim`), pings `/v2/`, answers the registry's
`WWW-Authenticate` challenge (Bearer tokens, anonymous or with credentials, or Basic),
fetches the manifest (an index or manifest list is narrowed to one platform), then the
config and the layers, several at a time, each streamed into the store's `tmp/pull-<hex>`
with its sha256 computed as it arrives: only a blob whose digest and size match is renamed
into `blobs/`. A pull that is interrupted leaves its partial files; the next one resumes
them with `Range` requests (or starts over if the server ignores Range). Transient
failures (429, 5xx, a dropped or stalled connection) are retried with exponential backoff.
Only then is the image named in the store's index (`Store.add_manifest`).
`reference.ensure(REF, policy)` (`nsbox run --pull=missing|always|never`) calls `pull`
when the store lacks the image; this module is loaded only then.

Transport rules: TLS is verified (system CAs, or `--tls-ca FILE`); plain HTTP is used only
for a loopback registry (127.0.0.0/8, ::1, localhost) or one named by
`--insecure-registry HOST` (which also skips TLS verification), after HTTPS failed.
Credentials never follow a redirect to another host (blob storage, CDNs).
Credentials come from the first of `$REGISTRY_AUTH_FILE`,
`$XDG_RUNTIME_DIR/containers/auth.json`, `~/.config/containers/auth.json`,
`~/.docker/config.json` with an `auths` entry for the registry (or the repository);
credential helpers (`credHelpers`, `credsStore`) are not run.

Kernel docs: flock(2), rename(2) (through store.download_blob: a blob appears whole or not at all).
Spec: OCI distribution-spec v1.1 (pull: /v2/, manifests, blobs, Range), the Docker
      registry token-auth spec (docs/spec/auth/token.md), RFC 7235 (WWW-Authenticate),
      distribution/reference grammar (reference.go, normalize.go), OCI image-spec
      image-index.md (platform: os, architecture, variant), containers-auth.json(5).
Order: in `nsbox image pull`, or in the launcher's image.materialize step before any fork
       (threads are safe there); the pulled image is then unpacked by store.use_rootfs.
Verify: tests/test_registry.py (Debian's docker-registry on 127.0.0.1, images pushed with
        skopeo: tag, digest, multi-platform index, htpasswd, token auth, corrupt blob,
        killed pull resumed, unknown tag, --pull=never).
"""

from __future__ import annotations

import base64
import functools
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import IO, Any

from nsbox.errors import StepError
from nsbox.image import layout
from nsbox.image.reference import (  # re-exported: the grammar and platforms live there (launch time)
    _DEFAULT_VARIANT,
    DOCKER_HUB,
    STEP,
    Platform,
    Reference,
    default_platform,
    ensure,
    parse_platform,
    parse_reference,
)
from nsbox.image.store import BlobDownload, ImageRef, Store

__all__ = ["Platform", "Reference", "default_platform", "ensure", "parse_platform",
           "parse_reference", "pull"]

DOCKER_HUB_AUTH_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io")
MANIFEST_ACCEPT = ", ".join((layout.OCI_INDEX, layout.DOCKER_LIST, layout.OCI_MANIFEST, layout.DOCKER_MANIFEST))
ATTEMPTS = 5  # per request: 0.5 + 1 + 2 + 4 s of backoff at most (or what Retry-After asks, up to 30 s)
BACKOFF = 0.5
CONNECT_ATTEMPTS = 3  # the registry refusing connections outright is rarely transient
TIMEOUT = 30.0  # seconds without a byte: a stalled connection is dropped and the blob resumed
PARALLEL = 4
MAX_REDIRECTS = 5

_AUTH_PARAM_RE = re.compile(r'([A-Za-z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


# ---- platforms -------------------------------------------------------------------------


def _platform_of(d: dict[str, Any]) -> str:
    p = d.get("platform") if isinstance(d.get("platform"), dict) else {}
    assert isinstance(p, dict)
    parts = [str(p.get("os", "?")), str(p.get("architecture", "?"))] + ([str(p["variant"])] if p.get("variant") else [])
    return "/".join(parts)


def select_platform(index: dict[str, Any], want: Platform, what: str) -> dict[str, Any]:
    """The descriptor of `want`'s image in an index; refuse, listing the platforms there are."""
    if "layers" in index or "config" in index:
        raise StepError(STEP, f"read index of {what}", detail="an index carrying layers/config is ambiguous "
                        "(CVE-2021-41190)")
    entries = [d for d in index.get("manifests") or [] if isinstance(d, dict)
               and d.get("mediaType") in (*layout.MANIFEST_TYPES, *layout.INDEX_TYPES)]
    fits = [d for d in entries if isinstance(d.get("platform"), dict) and want.matches(d["platform"])]
    if not fits:
        there = sorted({_platform_of(d) for d in entries} - {"unknown/unknown"})  # attestations, not images
        raise StepError(STEP, f"choose a platform of {what}", detail=f"no image for {want}; "
                        f"available: {', '.join(there) or 'none'}",
                        fix="nsbox image pull --platform OS/ARCH[/VARIANT] with one of those")
    if want.variant is None and len(fits) > 1:
        # linux/arm: prefer the default variant (v7) over v6, as containerd's matcher does
        default = _DEFAULT_VARIANT.get(want.architecture)
        fits.sort(key=lambda d: (d["platform"].get("variant") or default) != default)
    return fits[0]


# ---- credentials -----------------------------------------------------------------------


def auth_files() -> list[Path]:
    """Where credentials are looked for, in order (containers-auth.json(5), then Docker's file)."""
    files = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    home = Path(os.path.expanduser("~"))
    config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    files.append(config / "containers" / "auth.json")
    files.append(home / ".docker" / "config.json")
    return files


def _auth_key(key: str) -> str:
    """`https://index.docker.io/v1/` -> `index.docker.io`: entries may be URLs (Docker) or host[/path]."""
    key = re.sub(r"^[a-z]+://", "", key.strip()).rstrip("/")
    return re.sub(r"/v[12]$", "", key)


def find_credentials(ref: Reference, files: Sequence[Path] | None = None) -> tuple[str, str] | None:
    """(username, password) for `ref`: the most specific `auths` entry of the first file that has one."""
    parts = ref.path.split("/")
    wanted = [f"{ref.domain}/{'/'.join(parts[:i])}" for i in range(len(parts), 0, -1)] + [ref.domain]
    if ref.domain == DOCKER_HUB:
        wanted += [_auth_key(k) for k in DOCKER_HUB_AUTH_KEYS]
    for f in auth_files() if files is None else files:
        try:
            doc = json.loads(f.read_bytes())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise StepError(STEP, f"read credentials {f}", getattr(e, "errno", None),
                            detail=None if isinstance(e, OSError) else f"not JSON: {e}") from e
        auths = doc.get("auths") if isinstance(doc, dict) else None
        if not isinstance(auths, dict):
            continue
        entries = {_auth_key(k): v for k, v in auths.items() if isinstance(v, dict)}
        for key in wanted:
            entry = entries.get(key)
            if entry is None:
                continue
            if entry.get("auth"):
                try:
                    user, _, password = base64.b64decode(str(entry["auth"]), validate=True).decode().partition(":")
                except (ValueError, UnicodeDecodeError) as e:
                    raise StepError(STEP, f"read credentials {f}", detail=f"auths[{key!r}].auth is not "
                                    "base64 of USER:PASSWORD") from e
                return user, password
            if entry.get("username"):
                return str(entry["username"]), str(entry.get("password", ""))
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="..."` -> ("bearer", {...}) (RFC 7235)."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3) or "").replace('\\"', '"')
              for m in _AUTH_PARAM_RE.finditer(rest)}
    return scheme.lower(), params


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost (a host[:port] or [v6]:port as in a reference)."""
    h = host
    if h.startswith("["):
        h = h[1:h.find("]")] if "]" in h else h
    elif h.count(":") == 1:
        h = h.split(":")[0]
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


# ---- HTTP ------------------------------------------------------------------------------


class _Retry(Exception):
    """A transient answer (429, 5xx): worth another try after `delay` seconds."""

    def __init__(self, status: int, delay: float | None):
        super().__init__(f"HTTP {status}")
        self.status, self.delay = status, delay


class _Cancelled(Exception):
    """Another layer's download failed: stop this one (its partial file stays for a resume)."""


def _retry_after(resp: http.client.HTTPResponse) -> float | None:
    value = resp.getheader("Retry-After")
    if value and value.strip().isdigit():
        return min(float(value), 30.0)
    return None


def _registry_error(body: bytes) -> str:
    """The registry's own words: {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "..."}]}."""
    try:
        errors = json.loads(body).get("errors") or []
        return "; ".join(f"{e.get('code', '?')}: {e.get('message', '')}".rstrip(": ") for e in errors[:3])
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace").strip()


class Client:
    """One registry, one repository: connection rules, authentication, retries."""

    def __init__(self, ref: Reference, tls_ca: str | Path | None = None, insecure: Sequence[str] = (),
                 credentials: tuple[str, str] | None = None, stop: threading.Event | None = None):
        self.ref = ref
        self.host = ref.api_host
        self.insecure_hosts = set(insecure)
        self.insecure = ref.domain in self.insecure_hosts or self.host in self.insecure_hosts
        self.plain_ok = self.insecure or is_loopback(self.host)
        try:
            self.ctx = ssl.create_default_context(cafile=str(tls_ca) if tls_ca else None)
            self.unverified = ssl.create_default_context(cafile=str(tls_ca) if tls_ca else None)
        except (OSError, ssl.SSLError) as e:
            raise StepError(STEP, f"load --tls-ca {tls_ca}", getattr(e, "errno", None) if isinstance(e, OSError)
                            else None, detail=None if isinstance(e, OSError) else str(e)) from e
        # --insecure-registry HOST: HTTPS without verification (or HTTP), for that host only
        self.unverified.check_hostname = False
        self.unverified.verify_mode = ssl.CERT_NONE
        self.credentials = credentials
        self.stop = stop or threading.Event()
        self.scheme = "https"
        self.authorization: str | None = None
        self.lock = threading.Lock()  # layer threads share the token

    # -- transport

    def _connect(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        if scheme == "http":
            if not (is_loopback(netloc) or netloc in self.insecure_hosts or (netloc == self.host and self.plain_ok)):
                raise StepError(STEP, f"connect to http://{netloc}", detail="refusing plain HTTP to a "
                                "non-loopback host", fix=f"use HTTPS, or --insecure-registry {netloc} if you trust "
                                "the network")
            return http.client.HTTPConnection(netloc, timeout=TIMEOUT)
        insecure = netloc in self.insecure_hosts or (netloc == self.host and self.insecure)
        return http.client.HTTPSConnection(netloc, timeout=TIMEOUT, context=self.unverified if insecure else self.ctx)

    def _open(self, method: str, url: str, headers: dict[str, str], auth: bool = True) -> http.client.HTTPResponse:
        """One request, following redirects; the Authorization header only goes to the registry itself."""
        for _ in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("https", "http"):
                raise StepError(STEP, f"follow redirect to {url[:200]}", detail="not an http(s) URL")
            h = {"User-Agent": "nsbox", **headers}
            if auth and parts.netloc == self.host and self.authorization:
                h["Authorization"] = self.authorization
            conn = self._connect(parts.scheme, parts.netloc)
            try:
                conn.request(method, urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")), headers=h)
                resp = conn.getresponse()
            except BaseException:
                conn.close()
                raise
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                resp.read()
                conn.close()
                url = urllib.parse.urljoin(url, resp.getheader("Location", ""))
                continue
            return resp  # the caller reads it; closing the response releases the connection
        raise StepError(STEP, f"fetch {url[:200]}", detail=f"more than {MAX_REDIRECTS} redirects")

    def _retrying(self, what: str, attempt_fn: Callable[[], http.client.HTTPResponse]) -> http.client.HTTPResponse:
        """Retry on 429/5xx and dropped connections with backoff; turn the last failure into a StepError."""
        last: str = ""
        refused = 0
        for attempt in range(ATTEMPTS):
            if self.stop.is_set():
                raise _Cancelled()
            delay = BACKOFF * 2 ** attempt
            try:
                resp = attempt_fn()
                if resp.status == 429 or resp.status in (500, 502, 503, 504):
                    resp.read(1 << 16)
                    resp.close()
                    raise _Retry(resp.status, _retry_after(resp))
                return resp
            except _Retry as e:
                last = f"the registry answered HTTP {e.status}"
                delay = e.delay if e.delay is not None else delay
            except ssl.SSLCertVerificationError as e:
                raise StepError(STEP, f"{what}: verify the TLS certificate of {self.host}", detail=e.verify_message,
                                fix="--tls-ca FILE with the registry's CA certificate (or --insecure-registry "
                                    f"{self.ref.domain} if you trust the network)") from e
            except ssl.SSLError as e:  # not transient: a plain-HTTP server, a TLS version mismatch
                raise StepError(STEP, f"{what}: TLS handshake with {self.host}", detail=str(e),
                                fix=f"if {self.ref.domain} speaks plain HTTP: --insecure-registry {self.ref.domain}"
                                ) from e
            except socket.gaierror as e:  # a name that does not resolve will not resolve in 1 s either
                raise self.unreachable(what, f"cannot resolve {self.host}: {e.strerror}") from e
            except ConnectionRefusedError as e:
                refused += 1
                last = f"connection refused ({e.strerror})"
                if refused >= CONNECT_ATTEMPTS:
                    break
            except (OSError, http.client.HTTPException) as e:  # reset, timeout, RemoteDisconnected, bad status line
                last = f"{type(e).__name__}: {e}"
            if attempt + 1 < ATTEMPTS and self.stop.wait(delay):
                raise _Cancelled()
        raise self.unreachable(what, last)

    def unreachable(self, what: str, why: str) -> StepError:
        return StepError(STEP, what if self.host in what else f"{what} ({self.host})",
                         detail=f"registry unreachable: {why}",
                         fix="check the name and port, your network, and that the registry is up; plain "
                             "HTTP is tried only for loopback hosts or with --insecure-registry HOST")

    # -- authentication

    def ping(self) -> None:
        """GET /v2/: choose https or (loopback/insecure only) http, and learn the auth challenge."""
        schemes = ["https", "http"] if self.plain_ok else ["https"]
        for scheme in schemes:
            self.scheme = scheme
            try:
                url = f"{scheme}://{self.host}/v2/"
                resp = self._retrying(f"ping {url}", functools.partial(self._open, "GET", url, {}, auth=False))
            except StepError as e:
                cause = e.__cause__
                tls_talk = isinstance(cause, ssl.SSLError) and not isinstance(cause, ssl.SSLCertVerificationError)
                if scheme == "https" and len(schemes) > 1 and (tls_talk or "registry unreachable" in (e.detail or "")):
                    continue  # a plain-HTTP registry answers a TLS hello with garbage, or is on another port
                raise
            body = resp.read(1 << 16)
            resp.close()
            if resp.status == 401:
                self.authenticate(resp.getheader("WWW-Authenticate", ""))
            elif resp.status == 404 and not body.strip().startswith(b"{"):
                raise StepError(STEP, f"ping {scheme}://{self.host}/v2/", detail="HTTP 404: not an OCI "
                                "distribution (v2) registry")
            return

    def authenticate(self, challenge: str) -> None:
        """Answer a 401's WWW-Authenticate: a Bearer token for this repository, or Basic credentials."""
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if not self.credentials:
                raise self.denied("the registry wants a user name and password")
            user, password = self.credentials
            with self.lock:
                self.authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            return
        if scheme != "bearer" or "realm" not in params:
            raise StepError(STEP, f"authenticate to {self.host}", detail=f"unsupported challenge {challenge[:120]!r}")
        scope = params.get("scope") or f"repository:{self.ref.path}:pull"
        query = {k: v for k, v in (("service", params.get("service")), ("scope", scope)) if v}
        realm = params["realm"]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        headers = {}
        if self.credentials:
            user, password = self.credentials
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        realm_host = urllib.parse.urlsplit(realm).netloc

        def fetch() -> http.client.HTTPResponse:
            # the token endpoint is another host: the registry's Authorization must not go there
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("https", "http"):
                raise StepError(STEP, f"fetch a token from {realm[:200]}", detail="the realm is not an http(s) URL")
            conn = self._connect(parts.scheme, parts.netloc)
            try:
                conn.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")),
                             headers={"User-Agent": "nsbox", **headers})
                return conn.getresponse()
            except BaseException:
                conn.close()
                raise

        resp = self._retrying(f"fetch a token from {realm_host}", fetch)
        body = resp.read(1 << 20)
        resp.close()
        if resp.status in (401, 403):
            raise self.denied(f"the token service {realm_host} refused: {_registry_error(body) or resp.status}")
        if resp.status != 200:
            raise StepError(STEP, f"fetch a token from {realm_host}", detail=f"HTTP {resp.status}: "
                            f"{_registry_error(body)}")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise StepError(STEP, f"fetch a token from {realm_host}", detail="the answer holds no token")
        with self.lock:
            self.authorization = "Bearer " + token

    def denied(self, why: str) -> StepError:
        if self.credentials:
            return StepError(STEP, f"pull {self.ref}", detail=f"access denied with your credentials: {why}",
                             fix="check the user name and password (or token) stored for "
                                 f"{self.ref.domain} in {', '.join(map(str, auth_files()))}")
        return StepError(STEP, f"pull {self.ref}", detail=f"access denied without credentials: {why}",
                         why="the image is private or does not exist (registries answer both the same way)",
                         fix=f'put {{"auths": {{"{self.ref.domain}": {{"auth": "<base64 of USER:PASSWORD>"}}}}}} in '
                             f"$REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json or ~/.docker/config.json "
                             f"(`podman login {self.ref.domain}` writes it)")

    def get(self, path: str, headers: dict[str, str], what: str) -> http.client.HTTPResponse:
        """GET /v2/<repo>/<path> with retries; a 401 is answered once (a token for a new scope, say)."""
        url = f"{self.scheme}://{self.host}/v2/{self.ref.path}/{path}"
        for answered in (False, True):
            resp = self._retrying(what, lambda: self._open("GET", url, headers))
            if resp.status != 401:
                if resp.status == 403:
                    body = resp.read(1 << 16)
                    resp.close()
                    raise self.denied(_registry_error(body) or "HTTP 403")
                return resp
            challenge = resp.getheader("WWW-Authenticate", "")
            body = resp.read(1 << 16)
            resp.close()
            if answered or not challenge:
                raise self.denied(_registry_error(body) or "HTTP 401")
            self.authenticate(challenge)
        raise AssertionError("unreachable")

    # -- manifests and blobs

    def manifest(self, target: str) -> tuple[bytes, str, str]:
        """(raw bytes, media type, digest) of the manifest or index named by a tag or digest."""
        what = f"fetch manifest {self.ref.name}:{target}" if not target.startswith("sha256:") else \
            f"fetch manifest {self.ref.name}@{target}"
        resp = self.get(f"manifests/{target}", {"Accept": MANIFEST_ACCEPT}, what)
        body = resp.read(layout.SMALL + 1)
        resp.close()
        if resp.status == 404:
            code = _registry_error(body)
            kind = "no such tag or digest" if "MANIFEST_UNKNOWN" in code else \
                "no such repository" if "NAME_UNKNOWN" in code else "not found"
            raise StepError(STEP, what, detail=f"unknown image: {kind} ({code or 'HTTP 404'})",
                            fix=f"check the name and tag; the registry is {self.ref.domain}")
        if resp.status != 200:
            raise StepError(STEP, what, detail=f"HTTP {resp.status}: {_registry_error(body)}")
        if len(body) > layout.SMALL:
            raise StepError(STEP, what, detail=f"larger than {layout.SMALL} bytes")
        digest = layout.sha256_digest(body)
        expected = target if target.startswith("sha256:") else resp.getheader("Docker-Content-Digest")
        if expected and expected.startswith("sha256:") and expected != digest:
            raise StepError(STEP, what, detail=f"digest mismatch: the manifest hashes to {digest}, "
                            f"not {expected}; nothing was stored")
        doc = layout.parse_json(body, what)
        media = doc.get("mediaType") or (resp.getheader("Content-Type") or "").split(";")[0].strip()
        if doc.get("schemaVersion") == 1:
            raise StepError(STEP, what, detail="a Docker schema 1 manifest: not supported (deprecated since 2017)",
                            fix="re-push the image with a current tool")
        if not media and "manifests" in doc:
            media = layout.OCI_INDEX
        elif not media:
            media = layout.OCI_MANIFEST
        if media not in (*layout.MANIFEST_TYPES, *layout.INDEX_TYPES):
            raise StepError(STEP, what, detail=f"not an image: media type {media!r}")
        return body, media, digest

    def small_blob(self, digest: str) -> bytes:
        resp = self.get(f"blobs/{digest}", {}, f"fetch blob {digest}")
        body = resp.read(layout.SMALL + 1)
        resp.close()
        if resp.status != 200:
            raise self._blob_error(digest, resp.status, body)
        if layout.sha256_digest(body) != digest:
            raise StepError(STEP, f"verify blob {digest}", detail=f"digest mismatch: content hashes to "
                            f"{layout.sha256_digest(body)}; nothing was stored")
        return body

    def _blob_error(self, digest: str, status: int, body: bytes) -> StepError:
        detail = f"HTTP {status}: {_registry_error(body)}"
        if status == 404:
            detail = f"the registry lacks a blob its manifest names ({_registry_error(body) or 'HTTP 404'})"
        return StepError(STEP, f"fetch blob {digest} of {self.ref}", detail=detail)

    def download(self, store: Store, digest: str, size: int | None, progress: Progress) -> None:
        """Stream one blob into the store, resuming a partial file; verified by the store's writer."""
        with store.download_blob(digest, size) as w:
            if w is None:
                return
            try:
                self._download(w, digest, progress)
            finally:
                if w.offset == 0 and not w.committed:  # stopped before a byte arrived: no empty partial left
                    w.discard()

    def _download(self, w: BlobDownload, digest: str, progress: Progress) -> None:
        progress.add(w.offset, resumed=True)
        fresh_retry = w.offset > 0  # a mismatch after resuming may be a bad partial: one clean retry
        failures = 0
        while True:
            headers = {"Range": f"bytes={w.offset}-"} if w.offset else {}
            resp = self.get(f"blobs/{digest}", headers, f"fetch blob {digest}")
            try:
                if resp.status == 416:  # our partial is as long as the blob, or longer: verify or restart
                    resp.read(1 << 16)
                elif resp.status not in (200, 206):
                    raise self._blob_error(digest, resp.status, resp.read(1 << 16))
                else:
                    start = _range_start(resp.getheader("Content-Range")) if resp.status == 206 else 0
                    if start != w.offset:  # Range ignored (200) or answered from elsewhere: start over
                        if start > 0:
                            raise StepError(STEP, f"fetch blob {digest}", detail="the registry answered "
                                            f"a range from byte {start}, not {w.offset}")
                        progress.add(-w.offset)
                        w.restart()
                    while chunk := resp.read1(layout.CHUNK):  # what has arrived: progress, resume
                        if self.stop.is_set():
                            raise _Cancelled()
                        w.write(chunk)
                        progress.add(len(chunk))
            except (OSError, http.client.HTTPException) as e:  # dropped mid-body: resume from w.offset
                failures += 1
                if failures >= ATTEMPTS:
                    raise self.unreachable(f"fetch blob {digest}", f"{type(e).__name__}: {e}") from e
                if self.stop.wait(BACKOFF * 2 ** (failures - 1)):
                    raise _Cancelled() from e
                continue
            finally:
                resp.close()
            try:
                w.commit(keep_on_mismatch=fresh_retry)
                return
            except StepError:
                if not fresh_retry:
                    raise
                fresh_retry = False  # the partial we resumed from may have been bad: once more, whole
                progress.add(-w.offset)
                w.restart()


def _range_start(content_range: str | None) -> int:
    m = re.match(r"^bytes (\d+)-\d+/(\d+|\*)$", (content_range or "").strip())
    return int(m.group(1)) if m else -1


# ---- progress --------------------------------------------------------------------------


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class Progress:
    """One status line on a terminal (bytes, total, rate), redrawn at most 10 times a second; else silent."""

    def __init__(self, label: str, total: int, stream: IO[str] | None):
        self.label, self.total, self.stream = label, total, stream
        self.done = 0
        self.resumed = 0  # bytes already on disk from an earlier pull: not part of the rate
        self.start = time.monotonic()
        self.drawn = 0.0
        self.lock = threading.Lock()

    def add(self, n: int, resumed: bool = False) -> None:
        with self.lock:
            self.done += n
            if resumed:
                self.resumed += n
            now = time.monotonic()
            if self.stream is not None and now - self.drawn >= 0.1:
                self.drawn = now
                self.stream.write("\r" + self.line(now) + "\x1b[K")
                self.stream.flush()

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-3)
        rate = max(self.done - self.resumed, 0) / elapsed
        return f"{self.label}: {_human(self.done)} / {_human(self.total)}, {_human(rate)}/s"

    def finish(self, ok: bool) -> None:
        if self.stream is not None:
            self.stream.write("\r" + self.line(time.monotonic()) + ("" if ok else " (interrupted)") + "\x1b[K\n")
            self.stream.flush()


# ---- pull ----------------------------------------------------------------------------


def _as_pull_error(e: StepError) -> StepError:
    return e if e.step == STEP else StepError(STEP, e.action, e.errno, e.detail, e.exit_code, e.why, e.fix)


def pull(ref: str | Reference, platform: str | Platform | None = None, tls_ca: str | Path | None = None,
         insecure: Sequence[str] = (), store: Store | None = None, progress: bool | None = None) -> ImageRef:
    """Pull `ref` into the store and name it; return its ImageRef (the manifest digest and the name)."""
    r = parse_reference(ref) if isinstance(ref, str) else ref
    want = parse_platform(platform) if isinstance(platform, str) else platform or default_platform()
    store = store or Store()
    stream = sys.stderr if (progress if progress is not None else sys.stderr.isatty()) else None
    client = Client(r, tls_ca, insecure, find_credentials(r))
    client.ping()
    source = None
    with store.pulling():
        raw, media, digest = client.manifest(r.target)
        depth = 0
        while media in layout.INDEX_TYPES:  # an index (or a nested one): narrow it to the platform
            depth += 1
            if depth > 3:
                raise StepError(STEP, f"read index of {r}", detail="indexes nested too deep")
            desc = select_platform(layout.parse_json(raw, f"index of {r}"), want, str(r))
            if r.digest and depth == 1:
                source = f"{r.name}@{r.digest} {want}"
            raw, media, digest = client.manifest(layout.check_digest(str(desc.get("digest")), "index entry"))
        try:
            manifest = layout.validate_manifest(raw, digest)
        except StepError as e:
            raise _as_pull_error(e) from e
        cdesc = manifest["config"]
        config_raw = client.small_blob(cdesc["digest"]) if not store.has_blob(cdesc["digest"]) \
            else store.read_blob(cdesc["digest"])
        config = layout.parse_json(config_raw, f"config of {r}")
        if (config.get("os"), config.get("architecture")) != (want.os, want.architecture):
            got = f"{config.get('os')}/{config.get('architecture')}"
            if platform is not None:  # asked for explicitly: a single-platform image of another kind is wrong
                raise StepError(STEP, f"choose a platform of {r}", detail=f"no image for {want}; available: {got}",
                                fix=f"--platform {got}, or another tag")
            print(f"nsbox: warning: {r} is a {got} image; this machine is {want}", file=sys.stderr)
        store.put(config_raw, cdesc["digest"])
        layers = [(str(d["digest"]), int(d["size"])) for d in manifest["layers"]]
        _download_all(client, store, layers, Progress(f"pulling {r}", sum(
            s for d, s in layers if not store.has_blob(d)), stream))
        store.put(raw, digest)
    return store.add_manifest(digest, r.store_name, source)


def _download_all(client: Client, store: Store, layers: list[tuple[str, int]], progress: Progress) -> None:
    """Download the layers a few at a time; the first failure stops the others, and is raised."""
    todo = list(dict.fromkeys(d for d, _ in layers if not store.has_blob(d)))
    sizes = dict(layers)
    if not todo:
        return
    ok = False
    pool = ThreadPoolExecutor(max_workers=min(PARALLEL, len(todo)), thread_name_prefix="nsbox-pull")
    try:
        futures: list[Future[None]] = [pool.submit(client.download, store, d, sizes[d], progress) for d in todo]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            exc = f.exception() if f in done else None
            if exc is not None and not isinstance(exc, _Cancelled):
                raise exc
        wait(futures)
        for f in futures:
            f.result()
        ok = True
    finally:
        client.stop.set()  # on an error or ^C: the other threads end at their next chunk
        pool.shutdown(wait=True)
        if todo:
            progress.finish(ok)
