"""Network modes through the real CLI: `none` is only lo, `allowlist` is the host-side
proxy and nothing else, `host` is the host's network; Claude Code end to end through the
proxy with the real key injected on the host; 100 concurrent connections and a 100 MB
download with the launcher's memory bounded.

Every server here is started by the test on the host's 127.0.0.1; names reach it only
through `--resolve NAME:PORT:127.0.0.1` pins. No test needs DNS or the internet.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import NSBOX, REPO

from nsbox.net import PLACEHOLDER_API_KEY

PY = "/usr/bin/python3"  # the host's python, visible read-only inside
PROXY_NOTE = "--allow-domain"
CLAUDE = REPO / ".venv/claude/node_modules/@anthropic-ai/claude-code-linux-x64/claude"


def inside(script: str, *args: object) -> list[str]:
    return [PY, "-c", script, *map(str, args)]


def last_json(stdout: str) -> Any:
    lines = [line for line in stdout.splitlines() if line.startswith(("{", "["))]
    assert lines, f"no JSON line in the output:\n{stdout}"
    return json.loads(lines[-1])


def proxy_events(log: Path) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, log.read_text().splitlines()) if e.get("event") == "proxy"]


# -- servers on the host's loopback ----------------------------------------------------


def chunk(k: int) -> bytes:
    """The k-th 64 KiB block of a download: distinct per block, so a lost, repeated or
    reordered block changes the hash."""
    return k.to_bytes(8, "big") * 8192


def expected_download(n: int) -> tuple[int, str]:
    h = hashlib.sha256()
    k, left = 0, n
    while left > 0:
        block = chunk(k)[:left]
        h.update(block)
        left -= len(block)
        k += 1
    return n, h.hexdigest()


HELLO = b"hello from the host's loopback\n"
HOLDERS = 100


class Web(BaseHTTPRequestHandler):
    """GET /hello; GET /bytes?n=N (streamed, never held); GET /hold (answers only when
    HOLDERS requests are in flight at once)."""

    protocol_version = "HTTP/1.1"
    server: WebServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/hello":
            self._reply(200, HELLO)
        elif path == "/bytes":
            n = int(query.removeprefix("n="))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            k, left = 0, n
            while left > 0:
                block = chunk(k)[:left]
                self.wfile.write(block)
                left -= len(block)
                k += 1
        elif path == "/hold":
            s = self.server
            with s.lock:
                s.in_flight += 1
                s.max_in_flight = max(s.max_in_flight, s.in_flight)
            try:
                s.barrier.wait(timeout=20)
                self._reply(200, b"held\n")
            except threading.BrokenBarrierError:
                self._reply(503, b"not enough concurrent requests\n")
            finally:
                with s.lock:
                    s.in_flight -= 1
        else:
            self._reply(404, b"no such path\n")

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class WebServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Web)
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.barrier = threading.Barrier(HOLDERS)


@contextlib.contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[int]:
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def web() -> Iterator[WebServer]:
    server = WebServer()
    with serving(server):
        yield server


def port_of(server: ThreadingHTTPServer) -> int:
    return int(server.server_address[1])


@pytest.fixture
def echo() -> Iterator[int]:
    """A TCP echo server on the host's 127.0.0.1 (a CONNECT target)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    stop = threading.Event()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()


@pytest.fixture
def canaries() -> Iterator[tuple[int, str]]:
    """A TCP listener on the host's 127.0.0.1 and a host abstract unix socket."""
    name = f"nsbox-canary-{uuid.uuid4().hex}"
    with socket.create_server(("127.0.0.1", 0)) as tcp, socket.socket(socket.AF_UNIX) as unix:
        unix.bind(b"\0" + name.encode())
        unix.listen()
        # Both are reachable from the host itself: an unreachable result inside means isolation.
        with socket.create_connection(tcp.getsockname(), timeout=5), socket.socket(socket.AF_UNIX) as c:
            c.connect(b"\0" + name.encode())
        yield tcp.getsockname()[1], name


# -- none and host ---------------------------------------------------------------------

REACH = r"""
import errno, json, socket, sys, time
out = {}
t = time.monotonic()
try:
    socket.getaddrinfo("example.com", 443)
    out["dns"] = "resolved"
except socket.gaierror as e:
    out["dns"] = "gaierror"
out["dns_seconds"] = time.monotonic() - t

def attempt(family, address):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(address)
        return "connected"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))
    finally:
        s.close()

out["tcp"] = attempt(socket.AF_INET, ("127.0.0.1", int(sys.argv[1])))
out["abstract"] = attempt(socket.AF_UNIX, b"\0" + sys.argv[2].encode())
out["links"] = [line.split(":")[0].strip() for line in open("/proc/net/dev").read().splitlines()[2:]]
print(json.dumps(out))
"""


def test_none_is_only_lo_no_dns_and_no_host_loopback_or_abstract_socket(nsbox, canaries):
    tcp_port, abstract = canaries
    r = nsbox("--network", "none", cmd=inside(REACH, tcp_port, abstract))
    assert r.returncode == 0, r.stderr
    out = last_json(r.stdout)
    assert out["links"] == ["lo"]
    assert out["dns"] == "gaierror" and out["dns_seconds"] < 5
    assert out["tcp"] == "ECONNREFUSED"  # the sandbox's own 127.0.0.1: nothing listens there
    # ECONNREFUSED, not EPERM: the name does not exist in this network namespace
    # (Landlock's abstract-socket scope would answer EPERM instead).
    assert out["abstract"] == "ECONNREFUSED"


def test_host_mode_warns_and_shares_the_hosts_loopback(nsbox, canaries):
    tcp_port, abstract = canaries
    r = nsbox("--network", "host", cmd=inside(REACH, tcp_port, abstract))
    assert r.returncode == 0, r.stderr
    assert "warning: --network host" in r.stderr and "unfiltered" in r.stderr
    out = last_json(r.stdout)
    assert out["tcp"] == "connected"
    assert out["abstract"] == "EPERM"  # the host's socket exists here; only Landlock's scope stops it
    # The same probe, Landlock removed: the abstract canary answers, so ECONNREFUSED above
    # (in `none`) is the network namespace at work, and the probe can see a reachable socket.
    r = nsbox("--network", "host", "--without", "landlock", cmd=inside(REACH, tcp_port, abstract))
    assert r.returncode == 0, r.stderr
    assert last_json(r.stdout)["abstract"] == "connected"


# -- allowlist -------------------------------------------------------------------------

# Runs inside: raw requests to the proxy named by $http_proxy, one JSON line per probe.
PROXY_CLIENT = r"""
import errno, http.client, json, os, socket, sys, time, urllib.parse, urllib.request

PROXY = urllib.parse.urlsplit(os.environ["http_proxy"])
PROXY_ADDR = (PROXY.hostname, PROXY.port)

def ask(request, then=b""):
    # One raw request to the proxy: status, body (for CONNECT: what came back through the
    # tunnel after sending `then` and half-closing), seconds; errors are results too.
    t = time.monotonic()
    s = socket.create_connection(PROXY_ADDR, timeout=10)
    status, rest = None, b""
    try:
        s.sendall(request.encode())
        data = b""
        while b"\r\n\r\n" not in data and (more := s.recv(65536)):
            data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None
        if status == 200 and request.startswith("CONNECT"):
            s.sendall(then)
            s.shutdown(socket.SHUT_WR)
        while more := s.recv(65536):  # denials close; tunnels close after the far side does
            rest += more
    except OSError as e:
        rest += f"[{type(e).__name__}: {e}]".encode()
    finally:
        s.close()
    return {"status": status, "body": rest.decode(errors="replace"), "seconds": time.monotonic() - t}

def get(hostport, path="/hello"):
    return ask(f"GET http://{hostport}{path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n")

def connect(hostport, then=b""):
    return ask(f"CONNECT {hostport} HTTP/1.1\r\nHost: {hostport}\r\n\r\n", then)
"""

ALLOWLIST = PROXY_CLIENT + r"""
web, echo, loopback_name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
out = {}
# urllib, honouring the proxy environment, as any client inside would.
r = urllib.request.urlopen(f"http://web.test:{web}/hello", timeout=15)
out["urllib"] = {"status": r.status, "body": r.read().decode()}
out["get"] = get(f"web.test:{web}")
out["connect_echo"] = connect(f"echo.test:{echo}", b"ping through the tunnel\n")
# http.client through a CONNECT tunnel to the web server: 200 from inside the tunnel.
c = http.client.HTTPConnection(*PROXY_ADDR, timeout=15)
c.set_tunnel(f"web.test", web)
c.request("GET", "/hello")
resp = c.getresponse()
out["tunnel_get"] = {"status": resp.status, "body": resp.read().decode()}
c.close()
out["other_get"] = get("other.test")
out["other_connect"] = connect("other.test:443")
out["wrong_port_get"] = get(f"web.test:{echo}")
out["wrong_port_connect"] = connect(f"web.test:{echo}", b"x")
ssrf = [f"127.0.0.1:{web}", f"localhost.:{web}", f"0.0.0.0:{web}", f"[::1]:{web}", f"[::ffff:127.0.0.1]:{web}",
        f"2130706433:{web}", f"0177.0.0.1:{web}", "169.254.169.254:80"]
if loopback_name != "-":
    ssrf.append(f"{loopback_name}:{web}")
out["ssrf"] = {t: {"get": get(t), "connect": connect(t, b"x")} for t in ssrf}

# Around the proxy: the host's 127.0.0.1 is not ours, and no name resolves here.
s = socket.socket()
s.settimeout(5)
try:
    s.connect(("127.0.0.1", web))
    out["direct"] = "connected"
except OSError as e:
    out["direct"] = errno.errorcode.get(e.errno, str(e))
try:
    urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"http://web.test:{web}/hello", timeout=5)
    out["no_proxy"] = "fetched"
except Exception as e:
    out["no_proxy"] = type(getattr(e, "reason", e)).__name__
print(json.dumps(out))
"""


def loopback_name_on_this_host() -> str | None:
    """A name the host resolves to loopback only (from /etc/hosts: the machine's own name,
    or Debian's ip6-localhost), not refused by name, to show the resolved address is checked."""
    candidates = [socket.gethostname()]
    with contextlib.suppress(OSError):
        for line in Path("/etc/hosts").read_text().splitlines():
            fields = line.split("#")[0].split()
            candidates += fields[1:]
    for name in candidates:
        lower = name.lower().rstrip(".")
        if lower == "localhost" or lower.endswith(".localhost") or not re.fullmatch(r"[A-Za-z0-9.-]+", name):
            continue  # refused by name already, or not a name
        try:
            addrs = {a[4][0] for a in socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)}
        except OSError:
            continue
        if addrs and all(a.startswith("127.") or a == "::1" for a in addrs):
            return name
    return None


def test_allowlist_proxy_allows_pinned_names_refuses_the_rest_and_logs_bytes(nsbox, web, echo, tmp_path):
    wp = port_of(web)
    loopback = loopback_name_on_this_host()
    if loopback is None:
        warnings.warn("no name resolves to loopback on this host: the resolved-to-loopback SSRF case is not run",
                      stacklevel=1)
    log = tmp_path / "events.jsonl"
    # Every SSRF target is allowed by an entry, so a refusal below is the address check,
    # not the allowlist.
    entries = [f"web.test:{wp}", f"echo.test:{echo}", f"127.0.0.1:{wp}", f"localhost:{wp}", f"0.0.0.0:{wp}",
               f"[::1]:{wp}", f"[::ffff:127.0.0.1]:{wp}", "169.254.169.254:80"] + ([f"{loopback}:{wp}"] if loopback
                                                                                  else [])
    args = ["--network", "allowlist", "--log", str(log), "--no-api-key",
            "--resolve", f"web.test:{wp}:127.0.0.1", "--resolve", f"web.test:{echo}:127.0.0.1",
            "--resolve", f"echo.test:{echo}:127.0.0.1"]
    for e in entries:
        args += ["--allow-domain", e]
    r = nsbox(*args, cmd=inside(ALLOWLIST, wp, echo, loopback or "-"))
    assert r.returncode == 0, r.stderr
    out = last_json(r.stdout)

    assert out["urllib"] == {"status": 200, "body": HELLO.decode()}
    assert out["get"]["status"] == 200 and out["get"]["body"] == HELLO.decode()
    assert out["connect_echo"]["status"] == 200 and out["connect_echo"]["body"] == "ping through the tunnel\n"
    assert out["tunnel_get"] == {"status": 200, "body": HELLO.decode()}

    for probe in ("other_get", "other_connect"):
        assert out[probe]["status"] == 403, out[probe]
        assert out[probe]["seconds"] < 2, out[probe]
        assert "other.test is not in the allowlist" in out[probe]["body"]
        assert f"{PROXY_NOTE} other.test" in out[probe]["body"]
    for probe in ("wrong_port_get", "wrong_port_connect"):  # echo's port: a live listener, pinned
        assert out[probe]["status"] == 403, out[probe]
        assert f"port {echo} is not allowed for web.test" in out[probe]["body"]

    for target, result in out["ssrf"].items():
        for how in ("get", "connect"):
            assert result[how]["status"] == 403, (target, how, result[how])
            assert "nsbox blocked" in result[how]["body"] and "--resolve" in result[how]["body"], (target, how)

    assert out["direct"] == "ECONNREFUSED"
    assert out["no_proxy"] == "gaierror"

    events = proxy_events(log)
    by = {(e["method"], e["host"], e["port"]): e for e in events}
    get_ok = by[("GET", "web.test", wp)]
    assert get_ok["allowed"] and get_ok["status"] == 200 and get_ok["address"] == "127.0.0.1"
    assert get_ok["bytes_down"] > len(HELLO) and get_ok["bytes_up"] > 0
    tunnel = by[("CONNECT", "echo.test", echo)]
    assert tunnel["allowed"] and tunnel["code"] == "pinned"
    # bytes_down counts the "200 Connection Established" line too
    assert tunnel["bytes_up"] >= len("ping through the tunnel\n")
    assert tunnel["bytes_down"] >= len("ping through the tunnel\n") + len("HTTP/1.1 200 Connection Established\r\n\r\n")
    assert by[("GET", "other.test", 80)]["code"] == "not-allowed"
    assert by[("CONNECT", "other.test", 443)]["code"] == "not-allowed"
    assert by[("GET", "web.test", echo)]["code"] == "port-not-allowed"
    # Each SSRF form is logged under its canonical host (2130706433 and 0177.0.0.1 are 127.0.0.1).
    ssrf = [e for e in events if e["code"] in ("literal-ip", "localhost", "blocked-address")]
    forms = ["127.0.0.1"] * 3 + ["localhost", "0.0.0.0", "[::1]", "[::ffff:7f00:1]", "169.254.169.254"]
    forms += [loopback.lower()] if loopback else []
    assert sorted(e["host"] for e in ssrf) == sorted(2 * forms)
    if loopback:  # resolved on the host, and refused for what it resolved to
        assert {e["code"] for e in ssrf if e["host"] == loopback.lower()} == {"blocked-address"}
    denied = [e for e in events if not e["allowed"]]
    assert all(e["status"] == 403 and e["bytes_down"] > 0 for e in denied)
    assert len(denied) == 4 + 2 * len(out["ssrf"])


# -- concurrency and size --------------------------------------------------------------

CONCURRENT = PROXY_CLIENT + r"""
import threading
web, n = int(sys.argv[1]), int(sys.argv[2])
results = [None] * n

def one(i):
    try:
        c = http.client.HTTPConnection(*PROXY_ADDR, timeout=60)
        c.request("GET", f"http://web.test:{web}/hold?i={i}")
        r = c.getresponse()
        results[i] = [r.status, r.read().decode()]
        c.close()
    except Exception as e:
        results[i] = ["error", repr(e)]

threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(results))
"""


def test_a_hundred_concurrent_connections_through_the_proxy(nsbox, web):
    wp = port_of(web)
    t = time.monotonic()
    r = nsbox("--network", "allowlist", "--no-api-key", "--allow-domain", f"web.test:{wp}",
              "--resolve", f"web.test:{wp}:127.0.0.1", cmd=inside(CONCURRENT, wp, HOLDERS))
    assert r.returncode == 0, r.stderr
    results = last_json(r.stdout)
    # /hold answers only once HOLDERS requests are waiting at the server at the same time:
    # a proxy that serialised or capped connections would get 503s (or time out).
    assert results == [[200, "held\n"]] * HOLDERS
    assert web.max_in_flight == HOLDERS
    assert time.monotonic() - t < 30


DOWNLOAD = PROXY_CLIENT + r"""
import hashlib
web = int(sys.argv[1])

def fetch(n):
    r = urllib.request.urlopen(f"http://web.test:{web}/bytes?n={n}", timeout=60)
    h, total = hashlib.sha256(), 0
    while block := r.read(1 << 16):
        total += len(block)
        h.update(block)
    return [total, h.hexdigest()]

for n in sys.argv[2:]:
    print(json.dumps(fetch(int(n))), flush=True)
    sys.stdin.readline()  # the test reads the launcher's memory while we wait
"""


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def test_a_100_mb_download_streams_and_the_launchers_memory_stays_bounded(env, project, web):
    wp = port_of(web)
    small, big = 1 << 20, 100 << 20
    argv = [*NSBOX, "run", "--network", "allowlist", "--no-api-key", "--allow-domain", f"web.test:{wp}",
            "--resolve", f"web.test:{wp}:127.0.0.1", str(project), "--", *inside(DOWNLOAD, wp, small, big)]
    t = time.monotonic()
    p = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdin is not None and p.stdout is not None
        first = json.loads(p.stdout.readline() or "null")
        hwm_small = vm_hwm_kib(p.pid)
        p.stdin.write("\n")
        p.stdin.flush()
        second = json.loads(p.stdout.readline() or "null")
        hwm_big = vm_hwm_kib(p.pid)
        p.stdin.close()
        assert p.wait(timeout=30) == 0, p.stderr.read() if p.stderr else ""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    elapsed = time.monotonic() - t
    assert first == list(expected_download(small))
    assert second == list(expected_download(big))
    # The launcher (the proxy's process) grows by buffers, not by the download.
    assert hwm_big < 200 * 1024, f"launcher VmHWM {hwm_big} KiB"
    assert hwm_big - hwm_small < 32 * 1024, f"launcher VmHWM grew {hwm_small} -> {hwm_big} KiB"
    assert elapsed < 60
    print(f"100 MB through the proxy: {elapsed:.1f} s; launcher VmHWM {hwm_small} -> {hwm_big} KiB")


# -- Claude Code end to end ------------------------------------------------------------


@dataclass
class FakeApi:
    """What the fake Messages API saw."""

    key: str
    tool_command: str | None = None  # answer the first turn with a Bash tool_use
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def posts(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["method"] == "POST" and r["path"].startswith("/v1/messages")]


FAKE_TEXT = "Hello from the fake Messages API behind nsbox"


def sse_turn(model: str, blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]], stop: str) -> bytes:
    events: list[tuple[str, dict[str, Any]]] = [("message_start", {"type": "message_start", "message": {
        "id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 1}}})]
    for i, (start, deltas) in enumerate(blocks):
        events.append(("content_block_start", {"type": "content_block_start", "index": i, "content_block": start}))
        events += [("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d}) for d in deltas]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    events.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": 12}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)


class FakeApiHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeApiServer

    def log_message(self, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                out += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return out
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _record(self, body: bytes = b"") -> dict[str, Any]:
        rec = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()), "body": body}
        with self.server.api.lock:
            self.server.api.requests.append(rec)
        return rec

    def _plain(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._record()
        self._plain(404, b"")

    def do_GET(self) -> None:
        self._record()
        self._plain(404, b'{"type":"error","error":{"type":"not_found_error","message":"not here"}}')

    def do_POST(self) -> None:
        body = self._body()
        self._record(body)
        if not self.path.startswith("/v1/messages") or self.path.startswith("/v1/messages/"):
            self._plain(404, b'{"type":"error","error":{"type":"not_found_error","message":"not here"}}')
            return
        if self.headers.get("x-api-key") != self.server.api.key:  # the assertion: only the real key passes
            self._plain(401, b'{"type":"error","error":{"type":"authentication_error","message":"fake: wrong key"}}')
            return
        req = json.loads(body)
        model = req.get("model", "claude-test")
        has_result = any(isinstance(m.get("content"), list) and any(
            isinstance(b, dict) and b.get("type") == "tool_result" for b in m["content"]) for m in req["messages"])
        command = self.server.api.tool_command
        if command and not has_result:
            payload = sse_turn(model, [({"type": "tool_use", "id": "toolu_01nsboxtest", "name": "Bash", "input": {}},
                                        [{"type": "input_json_delta", "partial_json": json.dumps(
                                            {"command": command, "description": "write the proof"})}])],
                               "tool_use")
        else:
            payload = sse_turn(model, [({"type": "text", "text": ""},
                                        [{"type": "text_delta", "text": FAKE_TEXT}])], "end_turn")
        if not req.get("stream"):
            text = {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": FAKE_TEXT}], "stop_reason": "end_turn",
                    "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 12}}
            self._plain(200, json.dumps(text).encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()
        self.close_connection = True


class FakeApiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, api: FakeApi) -> None:
        super().__init__(("127.0.0.1", 0), FakeApiHandler)
        self.api = api


def test_key() -> str:
    return f"sk-ant-api03-nsbox-REAL-test-key-{uuid.uuid4().hex}{uuid.uuid4().hex}-AA"


test_key.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@pytest.fixture
def claude_path(env: dict[str, str]) -> dict[str, str]:
    if not os.access(CLAUDE, os.X_OK):
        pytest.skip(f"Claude Code is not installed at {CLAUDE} (scripts/test installs it)")
    return {"PATH": f"{CLAUDE.parent}:{env.get('PATH', '/usr/bin:/bin')}"}


@contextlib.contextmanager
def fake_api(key: str, tool_command: str | None = None) -> Iterator[tuple[FakeApi, int]]:
    api = FakeApi(key, tool_command)
    server = FakeApiServer(api)
    with serving(server) as port:
        yield api, port


def api_args(port: int, log: Path, allow: bool = True) -> list[str]:
    return ["--network", "allowlist", "--log", str(log), "--api-upstream", f"http://fakeapi.test:{port}",
            *(["--allow-domain", f"fakeapi.test:{port}"] if allow else []),
            "--resolve", f"fakeapi.test:{port}:127.0.0.1", "--env", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
            # An API failure (a wrong key, a refused request) ends the run in seconds, not minutes.
            "--env", "CLAUDE_CODE_MAX_RETRIES=1"]


def files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                hits.append(str(p))
    return hits


# Runs inside: the agent's environment, then every /proc/*/environ and cmdline. The real
# key arrives hex-encoded, so this script's own argv does not contain it.
KEY_HUNT = r"""
import glob, json, os, sys
key = bytes.fromhex(sys.argv[1])
placeholder = sys.argv[2].encode()
seen = {"read": [], "unreadable": [], "key": [], "placeholder": []}
for path in sorted(glob.glob("/proc/[0-9]*/environ") + glob.glob("/proc/[0-9]*/cmdline")
                   + glob.glob("/proc/[0-9]*/task/[0-9]*/environ")):
    try:
        data = open(path, "rb").read()
    except OSError:
        seen["unreadable"].append(path)
        continue
    seen["read"].append(path)
    if key in data:
        seen["key"].append(path)
    if placeholder in data:
        seen["placeholder"].append(path)
seen["env"] = dict(os.environ)
print(json.dumps(seen))
"""


def test_claude_code_end_to_end_through_the_proxy_with_the_key_injected(nsbox, env, claude_path, tmp_path):
    key = test_key()
    log = tmp_path / "events.jsonl"
    with fake_api(key) as (api, port):
        t = time.monotonic()
        r = nsbox(*api_args(port, log), cmd=["claude", "-p", "hello", "--output-format", "json"],
                  extra_env={**claude_path, "ANTHROPIC_API_KEY": key}, timeout=90)
        elapsed = time.monotonic() - t
        assert r.returncode == 0, (r.stdout, r.stderr)
        result = last_json(r.stdout)
        assert result["type"] == "result" and result["is_error"] is False, result
        assert result["result"] == FAKE_TEXT

        posts = api.posts()
        assert posts, api.requests
        # The fake saw the real key (it answers 401 to anything else), never the placeholder.
        assert all(p["headers"].get("x-api-key") == key for p in posts)
        assert all(PLACEHOLDER_API_KEY not in json.dumps(q["headers"]) for q in api.requests)
        assert any(p["headers"].get("User-Agent", "").startswith("claude-cli/") for p in posts)
        events = proxy_events(log)
        injected = [e for e in events if e["api_key_injected"]]
        assert injected and all(e["host"] == "fakeapi.test" and e["port"] == port and e["allowed"] for e in injected)
        assert key not in log.read_text()
        assert not files_containing(Path(env["XDG_DATA_HOME"]), key.encode()), "the key reached the sandbox's home"
        print(f"claude -p through nsbox: {elapsed:.1f} s, {len(api.requests)} requests to the fake")

        # The same launch, but looking: the agent holds the placeholder, /proc has no key.
        r = nsbox(*api_args(port, log), cmd=inside(KEY_HUNT, key.encode().hex(), PLACEHOLDER_API_KEY),
                  extra_env={**claude_path, "ANTHROPIC_API_KEY": key})
    assert r.returncode == 0, r.stderr
    seen = last_json(r.stdout)
    assert seen["env"]["ANTHROPIC_API_KEY"] == PLACEHOLDER_API_KEY
    assert seen["env"]["ANTHROPIC_BASE_URL"] == "http://api.anthropic.com"
    assert seen["env"]["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert key not in json.dumps(seen["env"])
    assert seen["key"] == [], seen["key"]
    assert any(p.endswith("/environ") for p in seen["placeholder"])  # the hunt does find what is there
    assert len(seen["read"]) >= 4


def test_claude_code_fails_fast_with_the_proxys_explanation_when_the_api_host_is_not_allowed(
        nsbox, claude_path, tmp_path):
    key = test_key()
    log = tmp_path / "events.jsonl"
    with fake_api(key) as (api, port):
        t = time.monotonic()
        r = nsbox(*api_args(port, log, allow=False),
                  cmd=["claude", "-p", "hello", "--output-format", "json"],
                  extra_env={**claude_path, "ANTHROPIC_API_KEY": key}, timeout=60)
        elapsed = time.monotonic() - t
    assert r.returncode != 0, (r.stdout, r.stderr)
    # Seconds, not minutes: a refused CONNECT would be retried for ~194 s (notes §3). The
    # time here is claude's start-up and its settings fetches (7 s idle, ~18 s under load).
    assert elapsed < 45, f"took {elapsed:.1f} s"
    assert api.posts() == []  # nothing reached the API
    denied = [e for e in proxy_events(log) if e["host"] == "fakeapi.test" and not e["allowed"]]
    assert denied and all(e["code"] == "not-allowed" and e["status"] == 403 for e in denied), denied
    assert all(e["duration_ms"] < 1000 for e in denied)  # the proxy answers at once; the rest is claude
    output = r.stdout + r.stderr
    assert "403" in output and "fakeapi.test is not in the allowlist" in output, output
    assert f"{PROXY_NOTE} fakeapi.test:{port}" in output, output
    print(f"refused claude -p: {elapsed:.1f} s")


def test_claude_code_runs_a_bash_tool_in_the_project(nsbox, claude_path, project, tmp_path):
    key = test_key()
    log = tmp_path / "events.jsonl"
    with fake_api(key, tool_command="echo made-in-the-sandbox > proof.txt && hostname") as (api, port):
        r = nsbox(*api_args(port, log), cmd=["claude", "-p", "make the proof file", "--output-format", "json",
                                              "--allowedTools", "Bash"],
                  extra_env={**claude_path, "ANTHROPIC_API_KEY": key}, timeout=90)
        posts = api.posts()
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert last_json(r.stdout)["result"] == FAKE_TEXT
    assert (project / "proof.txt").read_text() == "made-in-the-sandbox\n"
    # The tool ran inside: its output (the sandbox's hostname) came back as the tool_result.
    last = json.loads(posts[-1]["body"])
    results = [b for m in last["messages"] if isinstance(m.get("content"), list) for b in m["content"]
               if isinstance(b, dict) and b.get("type") == "tool_result"]
    assert results and "nsbox" in json.dumps(results[-1]["content"])
    assert all(p["headers"].get("x-api-key") == key for p in posts)

