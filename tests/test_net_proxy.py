"""nsbox.net.proxy on loopback: a real proxy serving a listening socket, real upstream
servers on 127.0.0.1 reached through `--resolve`-style pins, real HTTP clients.
Nothing here leaves 127.0.0.1 (names resolve only through pins or an injected table)."""

from __future__ import annotations

import contextlib
import http.client
import json
import resource
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nsbox.errors import StepError
from nsbox.net import (
    ApiKeyInjection,
    Limits,
    ProxyConfig,
    ProxyServer,
    api_key_env,
    parse_cli_entries,
    parse_pins,
    proxy_env,
)
from nsbox.net.rules import ResolveError

REAL_KEY = "sk-ant-api03-REAL-secret-key-0123456789abcdefghijklmnopqrstuvwxyz"
PLACEHOLDER = api_key_env()["ANTHROPIC_API_KEY"]


def no_dns(host: str, port: int) -> list[str]:
    raise ResolveError(f"tests do no DNS ({host})")


# -- upstream servers ------------------------------------------------------------------


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict[str, Any]]

    def log_message(self, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _answer(self) -> None:
        body = self._body()
        type(self).seen.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
             "raw_headers": list(self.headers.items()), "body": body,
             "chunked": self.headers.get("Transfer-Encoding") == "chunked"}
        )
        if self.path.startswith("/big/"):
            size = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            block = b"x" * 65536
            while size:
                n = min(size, len(block))
                self.wfile.write(block[:n])
                size -= n
            return
        if self.path.startswith("/keyed/"):
            # The key it was sent, many times over a long body: masking across reads.
            unit = b"<" + self.headers.get("x-api-key", "").encode() + b">" + b"." * 997
            payload = unit * int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path == "/headers":
            payload = json.dumps(dict(self.headers.items())).encode()
        elif self.command == "POST":
            payload = b"echo:" + body
        else:
            payload = b"hello from upstream " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Echo-Key", self.headers.get("x-api-key", ""))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _answer


@contextlib.contextmanager
def http_upstream(tls: ssl.SSLContext | None = None) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []
    handler = type("H", (Upstream,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """A plain TCP echo server (not HTTP): proves CONNECT carries arbitrary bytes."""
    lsock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(c: socket.socket) -> None:
        with c:
            while data := c.recv(65536):
                c.sendall(data)

    def loop() -> None:
        lsock.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = lsock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield lsock.getsockname()[1]
    finally:
        stop.set()
        t.join()
        lsock.close()


@pytest.fixture(scope="session")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for api.anthropic.com, trusted only by the tests."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl(1) is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    key, crt = str(d / "key.pem"), str(d / "cert.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", crt, "-days", "2", "-subj", "/CN=api.anthropic.com",
         "-addext", "subjectAltName=DNS:api.anthropic.com", "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True, capture_output=True,
    )
    return crt, key


def server_tls(cert: tuple[str, str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    return ctx


# -- the proxy -------------------------------------------------------------------------


class Proxy:
    def __init__(self, config: ProxyConfig) -> None:
        self.events: list[dict[str, Any]] = []
        sock = socket.create_server(("127.0.0.1", 0))  # what init hands over: already listening
        self.server = ProxyServer(sock, config, self.events.append)
        self.port = self.server.port
        self.server.start()

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return s

    def wait_events(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.events) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.events


@contextlib.contextmanager
def running(
    allow: tuple[str, ...] = (), pins: tuple[str, ...] = (), **kw: Any
) -> Iterator[Proxy]:
    config = ProxyConfig(rules=parse_cli_entries(allow), pins=parse_pins(pins), resolver=no_dns, **kw)
    p = Proxy(config)
    try:
        yield p
    finally:
        p.server.stop()


def exchange(p: Proxy, data: bytes) -> bytes:
    """Send raw bytes, read until the proxy closes the connection."""
    with p.connect() as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one Content-Length response from a raw socket (for keep-alive tests)."""
    f = s.makefile("rb")
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = f.read(int(headers.get("content-length", "0")))
    return status, headers, body


def via_proxy(p: Proxy) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)


# -- tests -----------------------------------------------------------------------------


def test_proxy_env_points_both_spellings_at_loopback():
    env = proxy_env(3128)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        assert env[name] == "http://127.0.0.1:3128"
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1"
    assert api_key_env() == {"ANTHROPIC_API_KEY": PLACEHOLDER, "ANTHROPIC_BASE_URL": "http://api.anthropic.com"}


def test_allowed_get_returns_upstream_body_and_an_event():
    with http_upstream() as (port, seen), running((f"www.example.test:{port}",),
                                                  (f"www.example.test:{port}:127.0.0.1",)) as p:
        c = via_proxy(p)
        c.request("GET", f"http://www.example.test:{port}/hello?q=1",
                  headers={"Proxy-Connection": "keep-alive", "X-Custom": "kept"})
        r = c.getresponse()
        body = r.read()
        assert (r.status, body) == (200, b"hello from upstream /hello?q=1")
        c.close()
        got = seen[0]
        assert got["path"] == "/hello?q=1"
        assert got["headers"]["Host"] == f"www.example.test:{port}"
        assert got["headers"]["X-Custom"] == "kept"
        assert "Proxy-Connection" not in got["headers"]
        ev = p.wait_events(1)[0]
        assert ev["decision"] == "allowed" and ev["allowed"] is True
        assert (ev["method"], ev["host"], ev["port"], ev["status"]) == ("GET", "www.example.test", port, 200)
        assert ev["address"] == "127.0.0.1" and ev["code"] == "pinned"
        assert ev["bytes_up"] > 50 and ev["bytes_down"] > len(body)


def test_other_host_is_refused_at_once_with_an_explanation():
    with http_upstream() as (port, seen), running((f"www.example.test:{port}",),
                                                  (f"www.example.test:{port}:127.0.0.1",)) as p:
        t0 = time.monotonic()
        out = exchange(p, b"GET http://evil.example.org/steal HTTP/1.1\r\nHost: evil.example.org\r\n\r\n")
        assert time.monotonic() - t0 < 1.0
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403 ")
        text = body.decode()
        assert "GET http://evil.example.org/steal" in text
        assert "evil.example.org is not in the allowlist" in text
        assert "nsbox run --allow-domain evil.example.org" in text
        assert seen == []
        ev = p.wait_events(1)[0]
        assert (ev["decision"], ev["code"], ev["host"], ev["status"]) == ("denied", "not-allowed",
                                                                         "evil.example.org", 403)
        assert ev["bytes_down"] == len(out) and ev["bytes_up"] > 0


def test_connect_to_allowed_host_on_another_port_is_refused():
    with running(("www.example.test",), ("www.example.test:8443:127.0.0.1",)) as p:
        out = exchange(p, b"CONNECT www.example.test:8443 HTTP/1.1\r\nHost: www.example.test:8443\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 403 ")
        assert b"port 8443 is not allowed for www.example.test" in out
        assert b"--allow-domain www.example.test:8443" in out
        assert p.wait_events(1)[0]["code"] == "port-not-allowed"


def test_connect_tunnel_carries_raw_bytes_both_ways():
    with echo_server() as port, running((f"echo.example.test:{port}",),
                                        (f"echo.example.test:{port}:127.0.0.1",)) as p:
        with p.connect() as s:
            # The first payload rides in the same packet as the CONNECT head.
            s.sendall(f"CONNECT echo.example.test:{port} HTTP/1.1\r\n\r\n".encode() + b"early;")
            f = s.makefile("rb")
            assert f.readline() == b"HTTP/1.1 200 Connection Established\r\n"
            assert f.readline() == b"\r\n"
            payload = bytes(range(256)) * 1000
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)  # half-close: the echo still comes back
            echoed = f.read()
        assert echoed == b"early;" + payload
        ev = p.wait_events(1)[0]
        assert (ev["method"], ev["decision"], ev["status"]) == ("CONNECT", "allowed", 200)
        assert ev["bytes_down"] >= len(echoed) and ev["bytes_up"] >= len(payload) + 6


def test_connect_tunnel_to_a_tls_server(cert):
    with http_upstream(server_tls(cert)) as (port, seen), running(
        (f"api.anthropic.com:{port}",), (f"api.anthropic.com:{port}:127.0.0.1",)
    ) as p:
        ctx = ssl.create_default_context(cafile=cert[0])
        c = http.client.HTTPSConnection("127.0.0.1", p.port, timeout=10, context=ctx)
        c.set_tunnel("api.anthropic.com", port)
        c.request("GET", "/v1/models")
        r = c.getresponse()
        assert (r.status, r.read()) == (200, b"hello from upstream /v1/models")
        c.close()
        assert seen[0]["path"] == "/v1/models"


def test_chunked_post_is_forwarded_chunked():
    with http_upstream() as (port, seen), running((f"www.example.test:{port}",),
                                                  (f"www.example.test:{port}:127.0.0.1",)) as p:
        with p.connect() as s:
            s.sendall(
                f"POST http://www.example.test:{port}/upload HTTP/1.1\r\nHost: x\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
                + b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nTrailer: dropped\r\n\r\n"
            )
            status, _, body = read_response(s)
        assert (status, body) == (200, b"echo:hello world")
        assert seen[0]["chunked"] and seen[0]["body"] == b"hello world"


def test_content_length_post_and_expect_continue():
    with http_upstream() as (port, seen), running((f"www.example.test:{port}",),
                                                  (f"www.example.test:{port}:127.0.0.1",)) as p:
        with p.connect() as s:
            s.sendall(
                f"PUT http://www.example.test:{port}/u HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                "Expect: 100-continue\r\n\r\n".encode()
            )
            f = s.makefile("rb")
            assert f.readline() == b"HTTP/1.1 100 Continue\r\n"
            assert f.readline() == b"\r\n"
            s.sendall(b"data")
            status, _, body = read_response(s)
        assert (status, body) == (200, b"hello from upstream /u")
        assert seen[0]["body"] == b"data" and "Expect" not in seen[0]["headers"]


def test_chunked_response_is_relayed():
    with http_upstream() as (port, _), running((f"www.example.test:{port}",),
                                               (f"www.example.test:{port}:127.0.0.1",)) as p:
        c = via_proxy(p)
        c.request("GET", f"http://www.example.test:{port}/chunked")
        r = c.getresponse()
        assert r.getheader("Transfer-Encoding") == "chunked"
        assert r.read() == b"hello chunked world"


def test_keep_alive_two_requests_on_one_connection():
    with http_upstream() as (port, seen), running((f"www.example.test:{port}",),
                                                  (f"www.example.test:{port}:127.0.0.1",)) as p:
        with p.connect() as s:
            for path in ("/one", "/two"):
                s.sendall(f"GET http://www.example.test:{port}{path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                status, headers, body = read_response(s)
                assert (status, body) == (200, b"hello from upstream " + path.encode())
                assert headers.get("connection") != "close"
            # a HEAD on the same connection: no body, yet the Content-Length is kept
            s.sendall(f"HEAD http://www.example.test:{port}/three HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            f = s.makefile("rb")
            head = b""
            while (line := f.readline()) != b"\r\n":
                head += line
            assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 26" in head
        assert [x["path"] for x in seen] == ["/one", "/two", "/three"]
        events = p.wait_events(3)
        assert [e["status"] for e in events] == [200, 200, 200]
        assert all(e["bytes_up"] > 0 and e["bytes_down"] > 0 for e in events)


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GET http://a.example.test/ HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n",
         431),
        (b"GET http://a.example.test/ HTTP/1.1\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n", 431),
        (b"GET http://a.example.test/ HTTP/1.1\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 8000)
                                                                for i in range(9)) + b"\r\n", 431),
        (b"GET http://a.example.test/" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET\r\n\r\n", 400),
        (b"GET  http://a.example.test/ HTTP/1.1\r\n\r\n", 400),
        (b"GET http://a.example.test/ HTTP/9\r\n\r\n", 400),
        (b"GET http://a.example.test/ HTTP/2.0\r\n\r\n", 505),
        (b"G(T http://a.example.test/ HTTP/1.1\r\n\r\n", 400),
        (b"GET /relative HTTP/1.1\r\nHost: a.example.test\r\n\r\n", 400),
        (b"GET https://a.example.test/ HTTP/1.1\r\n\r\n", 400),
        (b"GET http://user@a.example.test/ HTTP/1.1\r\n\r\n", 400),
        (b"GET http://a.example.test/ HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
        (b"GET http://a.example.test/ HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
        (b"POST http://a.example.test/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST http://a.example.test/ HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
        (b"POST http://a.example.test/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"CONNECT a.example.test HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT a.example.test:99999 HTTP/1.1\r\n\r\n", 400),
    ],
)
def test_malformed_and_oversized_requests(request_bytes, status):
    with running(("a.example.test",), ("a.example.test:80:127.0.0.1",)) as p:
        out = exchange(p, request_bytes)
        assert out.startswith(b"HTTP/1.1 %d " % status), out[:200]
        assert b"Connection: close" in out
        ev = p.wait_events(1)[0]
        assert ev["decision"] == "denied" and ev["status"] == status


def test_bad_chunk_in_request_body_is_400():
    with http_upstream() as (port, _), running((f"www.example.test:{port}",),
                                               (f"www.example.test:{port}:127.0.0.1",)) as p:
        out = exchange(p, f"POST http://www.example.test:{port}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                       "zz\r\n".encode())
        assert out.startswith(b"HTTP/1.1 400 ") and b"invalid chunk size" in out


@pytest.mark.parametrize(
    "target",
    ["127.0.0.1", "0177.0.0.1", "2130706433", "0x7f.1", "[::1]", "[::ffff:127.0.0.1]", "localhost.",
     "LOCALHOST", "169.254.169.254", "0.0.0.0"],
)
def test_ssrf_forms_are_refused_through_the_proxy(target):
    # Every canonical form is even on the allowlist: only the literal/localhost check
    # stands between the agent and the loopback server.
    literals = ("127.0.0.1", "[::1]", "[::ffff:7f00:1]", "169.254.169.254", "0.0.0.0", "localhost")
    with http_upstream() as (port, seen), running(tuple(f"{h}:{port}" for h in literals)) as p:
        out = exchange(p, f"GET http://{target}:{port}/ HTTP/1.1\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 403 "), out[:200]
        assert b"to allow it: if you trust it: nsbox run --resolve " in out
        out = exchange(p, f"CONNECT {target}:{port} HTTP/1.1\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 403 "), out[:200]
        assert seen == []
        assert [e["code"] in ("literal-ip", "localhost") for e in p.wait_events(2)] == [True, True]


def test_allowed_name_resolving_to_loopback_is_refused():
    with http_upstream() as (port, seen):
        config = ProxyConfig(rules=parse_cli_entries([f"rebind.example.test:{port}"]),
                             resolver=lambda h, _p: ["93.184.215.14", "127.0.0.1"])
        p = Proxy(config)
        try:
            out = exchange(p, f"GET http://rebind.example.test:{port}/ HTTP/1.1\r\n\r\n".encode())
        finally:
            p.server.stop()
        assert out.startswith(b"HTTP/1.1 403 ")
        assert b"resolves to 127.0.0.1, a loopback address" in out
        assert b"--resolve rebind.example.test:" in out
        assert seen == []


def test_upstream_refusing_is_502():
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with running((f"down.example.test:{port}",), (f"down.example.test:{port}:127.0.0.1",)) as p:
        out = exchange(p, f"GET http://down.example.test:{port}/ HTTP/1.1\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 502 ")
        assert p.wait_events(1)[0]["code"] == "pinned" and p.events[0]["status"] == 502


def injection_config(port: int, cert: str | None, scheme: str = "https") -> dict[str, Any]:
    return {
        "api": ApiKeyInjection(key=REAL_KEY, upstream_scheme=scheme, upstream_port=port),
        "upstream_ca": cert,
    }


def test_api_key_is_injected_over_tls_and_never_returned(cert):
    with http_upstream(server_tls(cert)) as (port, seen), running(
        (f"api.anthropic.com:{port}",), (f"api.anthropic.com:{port}:127.0.0.1",), **injection_config(port, cert[0])
    ) as p:
        c = via_proxy(p)
        for path in ("/v1/messages?beta=true", "/headers"):
            c.request("POST", f"http://api.anthropic.com{path}", body=b'{"model":"x"}',
                      headers={"x-api-key": PLACEHOLDER, "anthropic-version": "2023-06-01"})
            r = c.getresponse()
            body = r.read()
            assert r.status == 200
            # The upstream echoes the key in a header and (for /headers) in the body:
            # the sandbox side sees neither.
            assert REAL_KEY.encode() not in body and REAL_KEY not in str(r.getheaders())
            assert r.getheader("X-Echo-Key") == "*" * len(REAL_KEY)
        c.close()
        assert b"*" * len(REAL_KEY) in body  # the masked echo kept its length (framing intact)
        for req in seen:
            keys = [v for n, v in req["raw_headers"] if n.lower() == "x-api-key"]
            assert keys == [REAL_KEY]
            assert PLACEHOLDER not in json.dumps(req["raw_headers"])
            assert req["headers"]["Host"] == f"api.anthropic.com:{port}"
        assert seen[0]["path"] == "/v1/messages?beta=true" and seen[0]["body"] == b'{"model":"x"}'
        events = p.wait_events(2)
        assert all(e["api_key_injected"] and e["decision"] == "allowed" for e in events)
        assert REAL_KEY not in json.dumps(events)
        assert REAL_KEY not in repr(p.server.config)


def test_api_key_is_added_when_the_client_sends_none_and_over_plain_upstream():
    with http_upstream() as (port, seen), running(
        (f"api.anthropic.com:{port}",), (f"api.anthropic.com:{port}:127.0.0.1",),
        **injection_config(port, None, scheme="http"),
    ) as p:
        with p.connect() as s:
            s.sendall(b"GET http://api.anthropic.com/ok HTTP/1.1\r\nX-Api-Key: a\r\nx-api-key: b\r\n\r\n")
            status, _, _ = read_response(s)
        assert status == 200
        assert [v for n, v in seen[0]["raw_headers"] if n.lower() == "x-api-key"] == [REAL_KEY]


def test_api_upstream_certificate_is_verified(cert, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    wrong_ca = str(other / "ca.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(other / "k.pem"), "-out", wrong_ca, "-days", "2", "-subj", "/CN=api.anthropic.com"],
        check=True, capture_output=True,
    )
    with http_upstream(server_tls(cert)) as (port, seen), running(
        (f"api.anthropic.com:{port}",), (f"api.anthropic.com:{port}:127.0.0.1",), **injection_config(port, wrong_ca)
    ) as p:
        out = exchange(p, b"GET http://api.anthropic.com/v1/messages HTTP/1.1\r\nx-api-key: p\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 502 ") and b"CERTIFICATE_VERIFY_FAILED" in out
        assert seen == []


def test_api_host_not_allowed_fails_fast_with_explanation():
    with running(("example.test",), **injection_config(443, None)) as p:
        out = exchange(p, b"POST http://api.anthropic.com/v1/messages HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 403 ") and b"api.anthropic.com is not in the allowlist" in out
        assert b"--allow-domain api.anthropic.com" in out


def test_many_concurrent_connections():
    with echo_server() as port, running((f"echo.example.test:{port}",),
                                        (f"echo.example.test:{port}:127.0.0.1",)) as p:
        socks = []
        for _ in range(100):
            s = p.connect()
            s.sendall(f"CONNECT echo.example.test:{port} HTTP/1.1\r\n\r\n".encode())
            socks.append(s)
        for s in socks:
            assert s.recv(39) == b"HTTP/1.1 200 Connection Established\r\n\r\n"
        assert p.server.active_connections() == 100
        for i, s in enumerate(socks):
            s.sendall(b"ping %d" % i)
        for i, s in enumerate(socks):
            assert s.recv(100) == b"ping %d" % i
            s.close()


def test_api_key_is_masked_in_a_long_body_read_in_bulk(cert):
    # 2.1 MB: past the small buffer, so the key straddles reads of the big one too.
    with http_upstream(server_tls(cert)) as (port, _), running(
        (f"api.anthropic.com:{port}",), (f"api.anthropic.com:{port}:127.0.0.1",), **injection_config(port, cert[0])
    ) as p:
        c = via_proxy(p)
        c.request("GET", "http://api.anthropic.com/keyed/2000", headers={"x-api-key": PLACEHOLDER})
        r = c.getresponse()
        body = r.read()
        c.close()
    unit = b"<" + b"*" * len(REAL_KEY) + b">" + b"." * 997
    assert r.status == 200 and REAL_KEY.encode() not in body
    assert body == unit * 2000


def test_large_download_streams_in_bounded_memory():
    size = 64 * 1024 * 1024
    with http_upstream() as (port, _), running((f"www.example.test:{port}",),
                                               (f"www.example.test:{port}:127.0.0.1",)) as p:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with p.connect() as s:
            s.sendall(f"GET http://www.example.test:{port}/big/{size} HTTP/1.1\r\n\r\n".encode())
            f = s.makefile("rb")
            while f.readline() != b"\r\n":
                pass
            got = 0
            while got < size and (chunk := f.read1(1 << 16)):
                got += len(chunk)
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert got == size
        assert grown_mib < 24, f"peak RSS grew {grown_mib:.0f} MiB for a {size >> 20} MiB download"
        assert p.wait_events(1)[0]["bytes_down"] > size


def test_idle_client_is_dropped_and_stop_closes_everything():
    limits = Limits(idle_timeout=0.3)
    with running(("a.example.test",), limits=limits) as p, p.connect() as s:
        s.settimeout(5)
        t0 = time.monotonic()
        assert s.recv(10) == b""
        assert time.monotonic() - t0 < 3
    with running(("a.example.test",)) as p:
        s = p.connect()
        time.sleep(0.1)
        assert p.server.active_connections() == 1
        p.server.stop()
        s.settimeout(5)
        assert s.recv(10) == b""
        assert p.server.active_connections() == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", p.port), timeout=2)
        s.close()


def test_slow_header_is_cut_at_the_deadline():
    with running(("a.example.test",), limits=Limits(header_timeout=0.3)) as p, p.connect() as s:
        s.settimeout(5)
        s.sendall(b"GET http://a.example.test/ HTTP/1.1\r\nX-Slow: ")
        t0 = time.monotonic()
        while s.recv(100):
            pass
        assert time.monotonic() - t0 < 3


def test_connection_limit_answers_503():
    with running(("a.example.test",), limits=Limits(max_connections=2)) as p:
        held = [p.connect(), p.connect()]
        deadline = time.monotonic() + 5
        while p.server.active_connections() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        out = exchange(p, b"GET http://a.example.test/ HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503 ")
        for s in held:
            s.close()


_requests = st.builds(
    lambda method, target, version, headers, body: (
        f"{method} {target} {version}\r\n".encode("latin-1")
        + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
        + b"\r\n"
        + body
    ),
    st.sampled_from(["GET", "CONNECT", "POST", "HEAD", "G T", "", "\x00"]),
    st.one_of(
        st.sampled_from(["http://a.example.test/", "a.example.test:443", "http://[::1]:80/", "http://a:b@c/",
                         "http://a.example.test:0/", "*", "/", "http://%61.test/", "http://a.example.test:80x/"]),
        st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=255), max_size=40),
    ),
    st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "http/1.1", "HTTP/1.1 extra", ""]),
    st.lists(
        st.tuples(
            st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Host", b"Connection", b"Expect",
                             b"X", b"Bad Name", b""]),
            st.one_of(st.sampled_from([b"chunked", b"5", b"-1", b"1, 2", b"100-continue", b"close"]),
                      st.binary(max_size=20)),
        ),
        max_size=5,
    ),
    st.binary(max_size=40),
)


def test_fuzzed_requests_get_a_status_or_a_close_never_a_crash():
    with running(("a.example.test",)) as p:

        @settings(database=None, max_examples=200, deadline=None)
        @given(st.one_of(st.binary(max_size=200), _requests))
        def check(data: bytes) -> None:
            with p.connect() as s:
                s.settimeout(10)
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
            if out:
                assert out.startswith(b"HTTP/1.1 "), out[:100]

        check()
        assert [e for e in p.events if e["code"] == "internal-error"] == []
        assert all(e["decision"] == "denied" for e in p.events)


def test_api_upstream_url_and_key_validation(tmp_path):
    inj = ApiKeyInjection.from_url(REAL_KEY, "https://api.example.test:8443/")
    assert (inj.upstream_scheme, inj.upstream_host, inj.upstream_port) == ("https", "api.example.test", 8443)
    assert ApiKeyInjection.from_url(REAL_KEY, "http://fake.test").upstream_port == 80
    for bad in ("ftp://x", "https://x/v1", "https://u@x", "api.example.test", "https://x:99999"):
        with pytest.raises(ValueError):
            ApiKeyInjection.from_url(REAL_KEY, bad)
    for key in ("", "sk-ant\r\nX-Evil: 1", "with space"):
        with pytest.raises(ValueError):
            ApiKeyInjection(key=key)
    assert REAL_KEY not in repr(inj)
    with socket.socket() as s, pytest.raises(StepError) as info:
        ProxyServer(s, ProxyConfig(api=inj, upstream_ca=str(tmp_path / "missing.pem")))
    assert info.value.step == "net.proxy" and "missing.pem" in info.value.action
