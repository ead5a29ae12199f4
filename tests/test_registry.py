"""`nsbox image pull` and `nsbox run --pull` against Debian's real `docker-registry` on 127.0.0.1.

Each test starts its own registry (storage in a temp dir) and pushes the busybox recipe's
OCI layout with skopeo; htpasswd and token auth use the registry's own auth modules, with a
token issuer written here (RS256 JWTs signed by `openssl`). Nothing leaves loopback.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import NSBOX, sh

from nsbox.errors import StepError
from nsbox.image import layout, registry
from nsbox.image.registry import Platform, Reference, parse_reference

REGISTRY_BIN = "/usr/bin/docker-registry"
needs_registry = pytest.mark.skipif(not os.path.exists(REGISTRY_BIN) or not shutil.which("skopeo"),
                                    reason="needs Debian's docker-registry and skopeo packages "
                                           "(apt-get install docker-registry skopeo)")


# ---- pure: references, platforms, credentials --------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("debian:bookworm-slim", Reference("docker.io", "library/debian", "bookworm-slim")),
    ("busybox", Reference("docker.io", "library/busybox", "latest")),
    ("user/app", Reference("docker.io", "user/app", "latest")),
    ("index.docker.io/library/alpine:3", Reference("docker.io", "library/alpine", "3")),
    ("localhost/app", Reference("localhost", "app", "latest")),
    ("localhost:5000/team/app:1.2", Reference("localhost:5000", "team/app", "1.2")),
    ("127.0.0.1:5000/a/b/c", Reference("127.0.0.1:5000", "a/b/c", "latest")),
    ("ghcr.io/o/r@sha256:" + "a" * 64, Reference("ghcr.io", "o/r", None, "sha256:" + "a" * 64)),
    ("Registry/app", Reference("Registry", "app", "latest")),  # an uppercase first part is a host (Docker)
    ("[::1]:5000/app:v1", Reference("[::1]:5000", "app", "v1")),
    ("my_app.x__y-z:tag_1.0-rc", Reference("docker.io", "library/my_app.x__y-z", "tag_1.0-rc")),
    ("a:5000", Reference("docker.io", "library/a", "5000")),  # no '/': the ':' is a tag, as in Docker
])
def test_reference_parsing(text: str, expected: Reference) -> None:
    assert parse_reference(text) == expected


def test_reference_string_and_store_name() -> None:
    r = parse_reference("debian:bookworm-slim")
    assert str(r) == "docker.io/library/debian:bookworm-slim" == r.store_name
    assert r.api_host == "registry-1.docker.io" and r.target == "bookworm-slim"
    pinned = parse_reference("app:1@sha256:" + "b" * 64)
    assert pinned.target == "sha256:" + "b" * 64 and pinned.store_name is None  # the digest wins
    assert parse_reference("[::1]:5000/app").store_name is None  # brackets are no store name


@pytest.mark.parametrize("text,why", [
    ("", "empty"), ("Debian", "lowercase"), ("user/App", "lowercase"), ("a b", "spaces"),
    ("app@sha256:abc", "digest"), ("app@md5:" + "a" * 32, "digest"), ("app:-x", "tag"),
    ("app:" + "x" * 129, "tag"), ("a//b", "repository"), ("a/b_/c", "repository"), ("-a", "repository"),
    ("host:99999999/a", "registry"), ("a" * 64, "image ID"), ("x/" + "a" * 300, "255"),
])
def test_reference_errors_are_strict_and_say_why(text: str, why: str) -> None:
    with pytest.raises(StepError) as e:
        parse_reference(text)
    assert e.value.step == "image.pull" and why in (e.value.detail or ""), e.value.render()


def test_platforms() -> None:
    assert registry.parse_platform("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert registry.parse_platform("linux/amd64") == Platform("linux", "amd64")
    for bad in ("linux", "linux/", "Linux/AMD64", "a/b/c/d"):
        with pytest.raises(StepError):
            registry.parse_platform(bad)
    if os.uname().machine == "x86_64":
        assert registry.default_platform() == Platform("linux", "amd64")
    index = {"manifests": [
        {"mediaType": layout.OCI_MANIFEST, "digest": "sha256:" + "1" * 64, "platform": {"os": "linux",
                                                                                        "architecture": "amd64"}},
        {"mediaType": layout.OCI_MANIFEST, "digest": "sha256:" + "2" * 64,
         "platform": {"os": "linux", "architecture": "arm", "variant": "v6"}},
        {"mediaType": layout.OCI_MANIFEST, "digest": "sha256:" + "3" * 64,
         "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
        {"mediaType": layout.OCI_MANIFEST, "digest": "sha256:" + "4" * 64, "platform": {"os": "linux",
                                                                                        "architecture": "arm64"}},
        {"mediaType": layout.OCI_MANIFEST, "digest": "sha256:" + "5" * 64,
         "platform": {"os": "unknown", "architecture": "unknown"}},  # an attestation
    ]}
    pick = registry.select_platform
    assert pick(index, Platform("linux", "amd64"), "x")["digest"].endswith("1" * 64)
    assert pick(index, Platform("linux", "arm"), "x")["digest"].endswith("3" * 64)  # v7 preferred
    assert pick(index, Platform("linux", "arm", "v6"), "x")["digest"].endswith("2" * 64)
    assert pick(index, Platform("linux", "arm64", "v8"), "x")["digest"].endswith("4" * 64)  # v8 is arm64's default
    with pytest.raises(StepError) as e:
        pick(index, Platform("linux", "s390x"), "x")
    assert e.value.detail == "no image for linux/s390x; available: linux/amd64, linux/arm/v6, linux/arm/v7, linux/arm64"


def test_credentials_files_in_order(tmp_path: Path) -> None:
    first, second = tmp_path / "auth.json", tmp_path / "config.json"
    first.write_text(json.dumps({"auths": {"other.io": {"auth": base64.b64encode(b"o:p").decode()}}}))
    second.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw:with:colons").decode()},
        "ghcr.io": {"username": "u", "password": "p"},
        "ghcr.io/team": {"auth": base64.b64encode(b"team:tp").decode()}}}))
    files = [tmp_path / "absent.json", first, second]
    assert registry.find_credentials(parse_reference("debian"), files) == ("hub", "pw:with:colons")
    assert registry.find_credentials(parse_reference("ghcr.io/team/app"), files) == ("team", "tp")
    assert registry.find_credentials(parse_reference("ghcr.io/x/app"), files) == ("u", "p")
    assert registry.find_credentials(parse_reference("other.io/a"), files) == ("o", "p")
    assert registry.find_credentials(parse_reference("quay.io/a"), files) is None
    first.write_text("{not json")
    with pytest.raises(StepError) as e:
        registry.find_credentials(parse_reference("other.io/a"), files)
    assert str(first) in e.value.render()


def test_challenge_and_loopback_rules() -> None:
    assert registry.parse_challenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                                    'scope="repository:library/debian:pull"') == (
        "bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                   "scope": "repository:library/debian:pull"})
    assert registry.parse_challenge('Basic realm="Registry Realm"') == ("basic", {"realm": "Registry Realm"})
    assert all(registry.is_loopback(h) for h in ("127.0.0.1:5000", "127.8.9.10", "localhost:1", "[::1]:5000"))
    assert not any(registry.is_loopback(h) for h in ("10.0.0.1:5000", "example.com", "[::2]:1", "localhostx"))
    client = registry.Client(parse_reference("registry.example:5000/app"))
    with pytest.raises(StepError) as e:
        client._connect("http", "registry.example:5000")
    assert "plain HTTP" in (e.value.detail or "") and "--insecure-registry" in (e.value.fix or "")
    assert registry.Client(parse_reference("registry.example:5000/app"),
                           insecure=["registry.example:5000"])._connect("http", "registry.example:5000")


# ---- a real registry on 127.0.0.1 ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"docker-registry exited {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"docker-registry did not listen on {port}: {log.read_text()[-2000:]}")


class Registry:
    """docker-registry serving a temp dir on 127.0.0.1:<port>, optionally with htpasswd, token auth or TLS."""

    def __init__(self, tmp: Path, auth: dict[str, Any] | None = None, tls: tuple[Path, Path] | None = None):
        self.dir = tmp / f"registry-{_free_port()}"
        self.dir.mkdir()
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.storage = self.dir / "storage"
        http_cfg: dict[str, Any] = {"addr": self.host}
        if tls:
            http_cfg["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
        config = {"version": 0.1, "log": {"level": "info", "accesslog": {"disabled": True}},
                  "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True}},
                  "http": http_cfg}
        if auth:
            config["auth"] = auth
        cfg = self.dir / "config.yml"
        cfg.write_text(json.dumps(config))  # YAML is a superset of JSON
        self.log = self.dir / "log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc, self.log)

    def push(self, layout_dir: Path, repo: str, creds: str | None = None, all_images: bool = False) -> None:
        argv = ["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false", "--quiet"]
        argv += ["--dest-creds", creds] if creds else []
        argv += ["--all"] if all_images else []
        tmp = self.dir / "skopeo-tmp"
        tmp.mkdir(exist_ok=True)
        r = subprocess.run([*argv, f"oci:{layout_dir}", f"docker://{self.host}/{repo}"], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp), "HOME": str(self.dir)})
        assert r.returncode == 0, r.stderr

    def blob_file(self, digest: str) -> Path:
        hexd = digest.split(":")[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def registries(tmp_path: Path) -> Iterator[list[Registry]]:
    started: list[Registry] = []
    yield started
    for r in started:
        r.stop()


@pytest.fixture
def start(registries: list[Registry], tmp_path: Path) -> Any:
    if not os.path.exists(REGISTRY_BIN) or not shutil.which("skopeo"):
        pytest.skip("needs Debian's docker-registry and skopeo packages (apt-get install docker-registry skopeo)")

    def go(**kw: Any) -> Registry:
        reg = Registry(tmp_path, **kw)
        registries.append(reg)
        return reg

    return go


def _manifest_digest(layout_dir: Path) -> str:
    return str(json.loads((layout_dir / "index.json").read_text())["manifests"][0]["digest"])


def pull(env: dict[str, str], *args: str, extra_env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NSBOX, "image", "pull", *args], env={**env, **(extra_env or {})}, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def store_state(env: dict[str, str]) -> tuple[dict[str, Any], list[str], list[str]]:
    """(index images, blob names, tmp entries): and every blob hashes to its name."""
    root = Path(env["XDG_DATA_HOME"]) / "nsbox"
    index = json.loads((root / "index.json").read_text())["images"] if (root / "index.json").exists() else {}
    blobs = sorted(p.name for p in (root / "blobs/sha256").iterdir()) if (root / "blobs/sha256").is_dir() else []
    for name in blobs:
        assert hashlib.sha256((root / "blobs/sha256" / name).read_bytes()).hexdigest() == name
    tmp = sorted(p.name for p in (root / "tmp").iterdir()) if (root / "tmp").is_dir() else []
    return index, blobs, tmp


@needs_registry
def test_pull_by_tag_and_by_digest_then_run_a_shell(start, busybox_layout, env, nsbox, tmp_path):
    reg = start()
    reg.push(busybox_layout, "test/busybox:1")
    digest = _manifest_digest(busybox_layout)
    r = pull(env, f"{reg.host}/test/busybox:1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [f"{reg.host}/test/busybox:1", digest]
    assert r.stderr == ""  # not a terminal: no progress display
    index, _blobs, tmp = store_state(env)
    assert index[digest]["names"] == [f"{reg.host}/test/busybox:1"] and tmp == []
    ok = nsbox("--image", f"{reg.host}/test/busybox:1", "--pull=never", cmd=sh("echo ok"))
    assert (ok.returncode, ok.stdout) == (0, "ok\n"), ok.stderr

    # By digest, into an empty store, pulled by `nsbox run` itself (--pull=missing is the default).
    env["XDG_DATA_HOME"] = str(tmp_path / "second-store")
    ok = nsbox("--image", f"{reg.host}/test/busybox@{digest}", cmd=sh("echo ok"))
    assert (ok.returncode, ok.stdout) == (0, "ok\n"), ok.stderr
    index, _, _ = store_state(env)
    assert list(index) == [digest] and index[digest]["names"] == []  # a digest pull names no tag
    reg.stop()  # present now: --pull=missing must not need the registry
    ok = nsbox("--image", f"{reg.host}/test/busybox@{digest}", cmd=sh("echo ok"))
    assert (ok.returncode, ok.stdout) == (0, "ok\n"), ok.stderr
    again = nsbox("--image", f"{reg.host}/test/busybox@{digest}", "--pull=always", cmd=sh("echo ok"))
    assert again.returncode == 125 and "registry unreachable" in again.stderr, again.stderr


def _arm64_variant(src: Path, out: Path) -> str:
    """The busybox layout with its config's architecture rewritten to arm64 (for the pull only)."""
    shutil.copytree(src, out)
    blobs = out / "blobs/sha256"
    manifest = json.loads((blobs / _manifest_digest(src).split(":")[1]).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_bytes())
    config.update(architecture="arm64", variant="v8")

    def put(doc: dict[str, Any]) -> tuple[str, int]:
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        digest = layout.sha256_digest(raw)
        (blobs / digest.split(":")[1]).write_bytes(raw)
        return digest, len(raw)

    cdigest, csize = put(config)
    manifest["config"].update(digest=cdigest, size=csize)
    mdigest, msize = put(manifest)
    (out / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": layout.OCI_MANIFEST, "digest": mdigest, "size": msize}]}))
    return mdigest


def _multi_layout(amd64: Path, arm64: Path, out: Path) -> str:
    """One OCI layout whose index.json names an image index of both (skopeo copies it with --all)."""
    shutil.copytree(amd64, out)
    for blob in (arm64 / "blobs/sha256").iterdir():
        shutil.copy(blob, out / "blobs/sha256" / blob.name)
    entries = []
    for src, arch, variant in ((amd64, "amd64", None), (arm64, "arm64", "v8")):
        d = _manifest_digest(src)
        plat = {"os": "linux", "architecture": arch, **({"variant": variant} if variant else {})}
        entries.append({"mediaType": layout.OCI_MANIFEST, "digest": d,
                        "size": (out / "blobs/sha256" / d.split(":")[1]).stat().st_size, "platform": plat})
    raw = json.dumps({"schemaVersion": 2, "mediaType": layout.OCI_INDEX, "manifests": entries}).encode()
    digest = layout.sha256_digest(raw)
    (out / "blobs/sha256" / digest.split(":")[1]).write_bytes(raw)
    (out / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": layout.OCI_INDEX, "digest": digest, "size": len(raw)}]}))
    return digest


@needs_registry
def test_a_multi_platform_index_selects_amd64_by_default_and_arm64_on_request(start, busybox_layout, env,
                                                                              tmp_path):
    if os.uname().machine != "x86_64":
        pytest.skip("the default-platform half of this test assumes an x86_64 host")
    arm64_digest = _arm64_variant(busybox_layout, tmp_path / "arm64")
    index_digest = _multi_layout(busybox_layout, tmp_path / "arm64", tmp_path / "multi")
    reg = start()
    reg.push(tmp_path / "multi", "test/multi:1", all_images=True)
    amd64_digest = _manifest_digest(busybox_layout)

    r = pull(env, f"{reg.host}/test/multi:1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1] == amd64_digest
    r = pull(env, f"{reg.host}/test/multi:1", "--platform", "linux/arm64")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1] == arm64_digest
    index, _, _ = store_state(env)
    assert index[arm64_digest]["names"] == [f"{reg.host}/test/multi:1"]  # the name moved to the last pull
    assert index[amd64_digest]["names"] == []
    inspect = subprocess.run([*NSBOX, "image", "inspect", arm64_digest], env=env, capture_output=True, text=True)
    assert json.loads(inspect.stdout)["config"]["architecture"] == "arm64"

    by_index = pull(env, f"{reg.host}/test/multi@{index_digest}", "--platform", "linux/arm64/v8")
    assert by_index.returncode == 0 and by_index.stdout.split()[1] == arm64_digest, by_index.stderr
    r = pull(env, f"{reg.host}/test/multi:1", "--platform", "linux/s390x")
    assert r.returncode == 125
    assert "no image for linux/s390x; available: linux/amd64, linux/arm64/v8" in r.stderr, r.stderr


def _auth_file(path: Path, host: str, user: str, password: str) -> Path:
    path.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))
    return path


@needs_registry
def test_htpasswd_registry_denies_without_credentials_and_accepts_an_auth_file(start, busybox_layout, env,
                                                                               tmp_path):
    if not shutil.which("htpasswd"):
        pytest.skip("needs htpasswd (apt-get install apache2-utils) for a bcrypt password file")
    htpasswd = tmp_path / "htpasswd"
    subprocess.run(["htpasswd", "-Bbc", str(htpasswd), "alice", "s3cret"], check=True, capture_output=True)
    reg = start(auth={"htpasswd": {"realm": "nsbox-test", "path": str(htpasswd)}})
    reg.push(busybox_layout, "private/busybox:1", creds="alice:s3cret")
    ref = f"{reg.host}/private/busybox:1"

    r = pull(env, ref)
    assert r.returncode == 125
    assert "access denied without credentials" in r.stderr and "REGISTRY_AUTH_FILE" in r.stderr, r.stderr
    assert store_state(env)[0] == {}
    wrong = pull(env, ref, extra_env={"REGISTRY_AUTH_FILE": str(_auth_file(tmp_path / "w.json", reg.host,
                                                                           "alice", "wrong"))})
    assert wrong.returncode == 125 and "denied with your credentials" in wrong.stderr, wrong.stderr
    good = pull(env, ref, extra_env={"REGISTRY_AUTH_FILE": str(_auth_file(tmp_path / "a.json", reg.host,
                                                                          "alice", "s3cret"))})
    assert good.returncode == 0, good.stderr
    assert good.stdout.split() == [ref, _manifest_digest(busybox_layout)]


class TokenIssuer(http.server.ThreadingHTTPServer):
    """The registry's token service: RS256 JWTs (kid = libtrust key ID), pull for anyone on public/*."""

    def __init__(self, tmp: Path):
        self.key, self.cert = tmp / "token.key", tmp / "token.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
                        "-out", str(self.cert), "-days", "2", "-subj", "/CN=nsbox-test-issuer"],
                       check=True, capture_output=True)
        pub = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-pubkey", "-noout"], check=True,
                             capture_output=True).stdout
        der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub, check=True,
                             capture_output=True).stdout
        b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
        self.kid = ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))
        self.requests: list[tuple[str | None, list[str]]] = []
        super().__init__(("127.0.0.1", 0), _TokenHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/token"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def token(self, subject: str, access: list[dict[str, Any]]) -> str:
        def b64(doc: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

        now = int(time.time())
        signing_input = b64({"typ": "JWT", "alg": "RS256", "kid": self.kid}) + "." + b64(
            {"iss": "nsbox-test-issuer", "sub": subject, "aud": "nsbox-test-registry", "exp": now + 600,
             "nbf": now - 60, "iat": now, "jti": os.urandom(8).hex(), "access": access})
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing_input.encode(),
                             check=True, capture_output=True).stdout
        return signing_input + "." + base64.urlsafe_b64encode(sig).decode().rstrip("=")


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    server: TokenIssuer

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        user = None
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if (user, password) != ("alice", "s3cret"):
                self.send_response(401)
                self.end_headers()
                return
        scopes = query.get("scope", [])
        self.server.requests.append((user, scopes))
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":")
            if user == "alice":
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
            elif name.startswith("public/"):
                access.append({"type": kind, "name": name, "actions": ["pull"]})
        if user is None and not access:
            self.send_response(401)
            self.end_headers()
            return
        body = json.dumps({"token": self.server.token(user or "", access)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@needs_registry
def test_token_auth_anonymous_and_with_credentials(start, busybox_layout, env, tmp_path):
    issuer = TokenIssuer(tmp_path)
    try:
        reg = start(auth={"token": {"realm": issuer.url, "service": "nsbox-test-registry",
                                    "issuer": "nsbox-test-issuer", "rootcertbundle": str(issuer.cert)}})
        reg.push(busybox_layout, "public/busybox:1", creds="alice:s3cret")
        reg.push(busybox_layout, "private/busybox:1", creds="alice:s3cret")
        digest = _manifest_digest(busybox_layout)
        issuer.requests.clear()

        anon = pull(env, f"{reg.host}/public/busybox:1")  # an anonymous bearer token, pull only
        assert anon.returncode == 0 and anon.stdout.split()[1] == digest, anon.stderr
        assert issuer.requests == [(None, ["repository:public/busybox:pull"])]
        denied = pull(env, f"{reg.host}/private/busybox:1")
        assert denied.returncode == 125 and "access denied without credentials" in denied.stderr, denied.stderr
        issuer.requests.clear()
        creds = {"REGISTRY_AUTH_FILE": str(_auth_file(tmp_path / "a.json", reg.host, "alice", "s3cret"))}
        ok = pull(env, f"{reg.host}/private/busybox:1", extra_env=creds)
        assert ok.returncode == 0 and ok.stdout.split() == [f"{reg.host}/private/busybox:1", digest], ok.stderr
        assert issuer.requests == [("alice", ["repository:private/busybox:pull"])]
    finally:
        issuer.shutdown()
        issuer.server_close()


@needs_registry
def test_a_blob_corrupted_in_the_registry_is_refused_and_nothing_is_stored(start, busybox_layout, env):
    reg = start()
    reg.push(busybox_layout, "test/busybox:1")
    manifest = json.loads((busybox_layout / "blobs/sha256" / _manifest_digest(busybox_layout).split(":")[1])
                          .read_bytes())
    big = max(manifest["layers"], key=lambda d: d["size"])
    data = bytearray(reg.blob_file(big["digest"]).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the digest can tell
    reg.blob_file(big["digest"]).write_bytes(bytes(data))

    r = pull(env, f"{reg.host}/test/busybox:1")
    assert r.returncode == 125
    assert f"verify blob {big['digest']}" in r.stderr and "digest mismatch" in r.stderr, r.stderr
    assert "nothing was stored" in r.stderr
    index, blobs, tmp = store_state(env)
    assert index == {} and big["digest"].split(":")[1] not in blobs and tmp == []
    ls = subprocess.run([*NSBOX, "image", "ls", "--json"], env=env, capture_output=True, text=True)
    assert json.loads(ls.stdout) == []


class SlowProxy:
    """A TCP relay to the registry that trickles answers while `slow` is set, counting what it relays."""

    def __init__(self, target: int):
        self.target, self.slow, self.relayed = target, threading.Event(), 0
        self.slow.set()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, answer: bool) -> None:
        try:
            while data := src.recv(16384 if answer and self.slow.is_set() else 1 << 16):
                if answer:
                    with self.lock:
                        self.relayed += len(data)
                    if self.slow.is_set():
                        time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


@needs_registry
def test_a_pull_killed_midway_resumes_and_leaves_a_consistent_store(start, busybox_layout, env):
    reg = start()
    reg.push(busybox_layout, "test/busybox:1")
    proxy = SlowProxy(reg.port)
    ref = f"127.0.0.1:{proxy.port}/test/busybox:1"
    manifest = json.loads((busybox_layout / "blobs/sha256" / _manifest_digest(busybox_layout).split(":")[1])
                          .read_bytes())
    big = max(manifest["layers"], key=lambda d: d["size"])
    partial = Path(env["XDG_DATA_HOME"]) / "nsbox/tmp" / f"pull-{big['digest'].split(':')[1]}"
    try:
        proc = subprocess.Popen([*NSBOX, "image", "pull", ref], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > 128 << 10):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        kept = partial.stat().st_size
        index, blobs, _ = store_state(env)
        assert index == {} and big["digest"].split(":")[1] not in blobs  # no half blob, no image

        proxy.slow.clear()
        proxy.relayed = 0
        r = pull(env, ref)
        assert r.returncode == 0, r.stderr
        assert proxy.relayed < big["size"] - kept // 2  # resumed with a Range request, not from byte 0
        index, blobs, tmp = store_state(env)
        assert list(index) == [_manifest_digest(busybox_layout)] and tmp == []
        assert big["digest"].split(":")[1] in blobs
    finally:
        proxy.close()


@needs_registry
def test_unknown_tag_and_repository_and_an_unreachable_registry(start, busybox_layout, env):
    reg = start()
    reg.push(busybox_layout, "test/busybox:1")
    r = pull(env, f"{reg.host}/test/busybox:2")
    assert r.returncode == 125 and "unknown image: no such tag or digest" in r.stderr, r.stderr
    r = pull(env, f"{reg.host}/test/nothing:1")
    assert r.returncode == 125 and "unknown image" in r.stderr, r.stderr
    r = pull(env, f"127.0.0.1:{_free_port()}/test/busybox:1")
    assert r.returncode == 125 and "registry unreachable" in r.stderr, r.stderr
    assert store_state(env)[0] == {}


def test_pull_never_with_a_missing_image_errors_without_the_network(nsbox, env):
    r = nsbox("--image", f"127.0.0.1:{_free_port()}/test/busybox:1", "--pull=never", cmd=sh("echo ok"))
    assert r.returncode == 125
    assert "not in the local store" in r.stderr and "--pull=never" in r.stderr, r.stderr
    bad = nsbox("--image", "busybox", "--pull=sometimes", cmd=sh("echo ok"))
    assert bad.returncode == 125 and "--pull" in bad.stderr


@needs_registry
def test_tls_is_verified_and_tls_ca_trusts_a_private_ca(start, busybox_layout, env, tmp_path):
    cert, key = tmp_path / "reg.pem", tmp_path / "reg.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    reg = start(tls=(cert, key))
    reg.push(busybox_layout, "test/busybox:1")
    r = pull(env, f"{reg.host}/test/busybox:1")
    assert r.returncode == 125 and "verify the TLS certificate" in r.stderr and "--tls-ca" in r.stderr, r.stderr
    r = pull(env, f"{reg.host}/test/busybox:1", "--tls-ca", str(cert))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1] == _manifest_digest(busybox_layout)
