"""The allowlist proxy: the sandbox's only way out, served by the launcher on the host.

What it isolates: the sandbox's network namespace has only `lo`. init binds a listening
socket on 127.0.0.1:<port> there and hands it to the launcher, which serves it from the
host's namespace. Every connection the agent makes to the outside is therefore an HTTP
request to this code, which decides (rules.Policy), connects to the exact address it
checked, and reports the decision as an audit event. The real API key is added here, on
the host side, so it never has to enter the sandbox.

Two request shapes (RFC 9112, RFC 9110 §9.3.6):
  CONNECT host:port           -> decision, connect, "200 Connection Established", bytes
                                 relayed both ways until both sides close (TLS end to end).
  METHOD http://host[:port]/p -> decision, a fresh upstream connection per request,
                                 hop-by-hop headers removed, bodies streamed (Content-Length
                                 or chunked), the response streamed back; the client
                                 connection is kept alive when both sides allow it.
Requests to `http://<api host>` (the agent's ANTHROPIC_BASE_URL) are rewritten: the
`x-api-key` header is replaced by the real key and the request goes over verified TLS to
the real API host. The key is masked (same length, so framing holds) if an upstream
response ever echoes it back.

Parsing is by hand with hard limits (request line, header bytes and count, chunk-size
lines) and timeouts (idle keep-alive, whole-head deadline, connect, upstream silence):
the peer is the agent, so every input is hostile. Memory per connection is bounded by
one buffer in each direction (buffer_size, bulk_buffer_size once a transfer proves long);
nothing is read whole. Bodies and tunnels move by recv_into that buffer and sendall of a
view of it, timeouts set once per phase: per-read allocation, copies and settimeout calls
held the proxy to 0.4x of a direct loopback download.

Order: the launcher receives the listening socket from init, forks nothing afterwards,
then `ProxyServer(sock, config, on_event).start()`; `stop()` at teardown closes the
listening socket and every connection.
Verify: tests/test_net_proxy.py (loopback only: allow/deny, CONNECT, chunked, keep-alive,
limits, key injection, events); `nsbox verify` probes the proxy from inside.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nsbox.errors import acting
from nsbox.net.rules import Decision, HostError, Pin, Policy, Resolver, Rule, normalize_host

EventSink = Callable[[dict[str, Any]], None]

_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
# RFC 9110 §7.6.1 plus the proxy-only ones; Transfer-Encoding and Content-Length are
# framing, which this proxy re-does itself on each side.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
        "expect",
    }
)
_MAX_LINGERING = 64  # overflow connections being closed politely at once
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one peer can make the proxy hold or wait for."""

    max_line: int = 8 * 1024  # request line, status line, one header line, chunk-size line
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout: float = 30.0  # a whole request head, from its first byte (slowloris)
    idle_timeout: float = 120.0  # keep-alive wait for the next request; tunnel silence
    connect_timeout: float = 10.0
    upstream_timeout: float = 600.0  # upstream silence (the API streams slowly; its SDK allows 600 s)
    max_connections: int = 1024
    buffer_size: int = 64 * 1024  # what a connection starts with, per direction
    # A direction whose reads keep filling `buffer_size` (a long transfer) switches to one
    # buffer this big: a quarter of the per-read cost of 64 KiB reads, where 1 MiB gains
    # little more on loopback, and 1024 connections all in bulk transfer at once still
    # hold at most 2 x 256 KiB each (512 MiB), where 1 MiB would be 2 GiB.
    bulk_buffer_size: int = 256 * 1024


@dataclass(frozen=True)
class ApiKeyInjection:
    """Plain-HTTP requests to `http://<host>` (port 80) get header `header` set to `key`
    and are sent to `upstream_scheme://upstream_host:upstream_port` instead. The decision
    is made for the upstream host and port, so the upstream must be allowed too."""

    key: str = field(repr=False)
    host: str = "api.anthropic.com"
    header: str = "x-api-key"
    upstream_scheme: str = "https"
    upstream_host: str = "api.anthropic.com"
    upstream_port: int = 443

    def __post_init__(self) -> None:
        # The key goes into a header line verbatim: anything but visible ASCII could
        # split the request (and an empty key is a configuration mistake).
        if not self.key or not all(33 <= ord(c) < 127 for c in self.key):
            raise ValueError("the API key must be non-empty visible ASCII (no spaces or newlines)")
        if not self.header or not set(self.header) <= _TOKEN:
            raise ValueError(f"invalid header name {self.header!r}")
        if self.upstream_scheme not in ("http", "https"):
            raise ValueError(f"upstream scheme must be http or https, not {self.upstream_scheme!r}")

    @classmethod
    def from_url(cls, key: str, upstream: str, host: str = "api.anthropic.com") -> ApiKeyInjection:
        """`--api-upstream URL`: https://name[:port] or http://name[:port], no path."""
        scheme, sep, rest = upstream.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in ("http", "https") or not rest:
            raise ValueError(f"--api-upstream must be http(s)://HOST[:PORT], not {upstream!r}")
        authority = rest.rstrip("/")
        if "/" in authority or "@" in authority or "?" in authority:
            raise ValueError(f"--api-upstream takes no path, user or query: {upstream!r}")
        name, port = _split_authority(authority, 443 if scheme == "https" else 80)
        return cls(key=key, host=host, upstream_scheme=scheme, upstream_host=name, upstream_port=port)


@dataclass(frozen=True)
class ProxyConfig:
    rules: tuple[Rule, ...] = ()
    pins: tuple[Pin, ...] = ()
    api: ApiKeyInjection | None = None
    upstream_ca: str | None = None  # CA bundle for TLS to the API upstream; None: system store
    limits: Limits = field(default_factory=Limits)
    resolver: Resolver | None = None  # None: getaddrinfo on the host (tests inject a table)

    @property
    def policy(self) -> Policy:
        return Policy(self.rules, self.pins)


class _HttpError(Exception):
    """A request the proxy answers with an error status and closes."""

    def __init__(self, status: int, message: str, code: str = "malformed") -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Gone(Exception):
    """The peer closed or timed out; nothing more can be said to it."""


def _split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError(f"bad authority {authority!r}")
        host, rest = authority[: end + 1], authority[end + 1 :]
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            host, rest = authority, ""
        else:
            rest = ":" + port_text
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit() or len(rest) > 6:
            raise ValueError(f"bad port in {authority!r}")
        port = int(rest[1:])
    elif default_port is None:
        raise ValueError(f"{authority!r} needs a port")
    else:
        port = default_port
    if not host or not 1 <= port <= 65535:
        raise ValueError(f"bad authority {authority!r}")
    return host, port


class _Reader:
    """Buffered reads from a socket with a line limit, counting what it hands out."""

    def __init__(self, sock: socket.socket, bufsize: int, bulk_size: int | None = None) -> None:
        self.sock, self.bufsize = sock, bufsize
        self.bulk_size = max(bufsize, bulk_size or bufsize)
        self.buf = bytearray()
        self.consumed = 0
        self._pump_buf: memoryview | None = None  # pump's fixed buffer, made on first use

    def _fill(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(self.bufsize)
        except TimeoutError:
            raise _Gone("timed out") from None
        except OSError as e:
            raise _Gone(str(e)) from None
        self.buf += data
        return bool(data)

    def wait(self, timeout: float) -> bool:
        """Wait for the first byte of something; False at a clean EOF."""
        return bool(self.buf) or self._fill(timeout)

    def readline(self, limit: int, deadline: float) -> bytes:
        """One line with its LF; raises _HttpError(0) past `limit`, _Gone at EOF."""
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i >= 0:
                if i + 1 > limit:
                    raise _HttpError(0, "line too long")
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                self.consumed += len(line)
                return line
            if len(self.buf) > limit:
                raise _HttpError(0, "line too long")
            start = len(self.buf)
            if not self._fill(deadline - time.monotonic()):
                raise _Gone("closed mid-line")
            if time.monotonic() > deadline:
                raise _Gone("timed out")

    def read(self, n: int, timeout: float) -> bytes:
        """Up to n bytes (at least one); b"" at EOF."""
        if not self.buf and not self._fill(timeout):
            return b""
        chunk = bytes(self.buf[:n])
        del self.buf[:n]
        self.consumed += len(chunk)
        return chunk

    def read_exact(self, n: int, timeout: float) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.read(min(n - len(out), self.bufsize), timeout)
            if not chunk:
                raise _Gone("closed mid-body")
            out += chunk
        return bytes(out)

    def take(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        self.consumed += len(data)
        return data

    def pump(self, n: int | None, timeout: float, send: Callable[[memoryview], object]) -> int:
        """Hand `send` the next n bytes (None: everything until EOF), the buffered ones
        first; returns how many, fewer than n only at EOF. Bodies are the bulk of the
        traffic, so this path avoids what `read` costs per call: the socket's timeout is
        set once (it bounds each recv, as before), and data goes from recv_into a fixed
        buffer straight to `send` (no bytes object, no copy through self.buf). `send`
        must not keep the view: the buffer is reused by the next read."""
        moved = 0
        if self.buf:
            first = self.buf if n is None or n >= len(self.buf) else self.buf[:n]
            chunk = bytes(first)
            del self.buf[: len(chunk)]
            self.consumed += len(chunk)
            moved = len(chunk)
            send(memoryview(chunk))
        if n is not None and moved >= n:
            return moved
        self.sock.settimeout(max(timeout, 0.001))
        view = self._pump_buf
        if view is None:
            view = self._pump_buf = memoryview(bytearray(self.bufsize))
        while n is None or moved < n:
            want = len(view) if n is None else min(len(view), n - moved)
            try:
                got = self.sock.recv_into(view, want)
            except TimeoutError:
                raise _Gone("timed out") from None
            except OSError as e:
                raise _Gone(str(e)) from None
            if not got:
                break
            self.consumed += got
            moved += got
            send(view[:got])
            if got == len(view) < self.bulk_size:
                # A full read means more was waiting: a long transfer, worth the big
                # buffer (allocated only now, so idle and short connections stay small).
                view = self._pump_buf = memoryview(bytearray(self.bulk_size))
        return moved


Headers = list[tuple[str, str]]


def _read_head(reader: _Reader, limits: Limits, deadline: float, what: str) -> tuple[str, Headers]:
    """Start line and headers. Raises _HttpError with 414/431/400 for the client side."""
    total = 0
    try:
        line = reader.readline(limits.max_line, deadline)
        while line in (b"\r\n", b"\n") and total < 4:  # RFC 9112 §2.2: ignore a stray CRLF
            total += 1
            line = reader.readline(limits.max_line, deadline)
    except _HttpError:
        raise _HttpError(414, f"{what} line longer than {limits.max_line} bytes") from None
    start = _strip_eol(line)
    total = len(line)
    headers: Headers = []
    while True:
        try:
            raw = reader.readline(limits.max_line, deadline)
        except _HttpError:
            raise _HttpError(431, f"a header line is longer than {limits.max_line} bytes") from None
        total += len(raw)
        if total > limits.max_header_bytes:
            raise _HttpError(431, f"headers larger than {limits.max_header_bytes} bytes")
        text = _strip_eol(raw)
        if not text:
            return start, headers
        if len(headers) >= limits.max_headers:
            raise _HttpError(431, f"more than {limits.max_headers} headers")
        if text[0] in " \t":
            raise _HttpError(400, "obsolete header line folding")
        name, sep, value = text.partition(":")
        if not sep or not name or not set(name) <= _TOKEN:
            raise _HttpError(400, f"malformed header line {text[:80]!r}")
        value = value.strip(" \t")
        if any(c in value for c in "\r\x00") or any(ord(c) < 32 and c != "\t" for c in value):
            raise _HttpError(400, f"control character in header {name!r}")
        headers.append((name, value))


def _strip_eol(line: bytes) -> str:
    if line.endswith(b"\r\n"):
        line = line[:-2]
    elif line.endswith(b"\n"):
        line = line[:-1]
    if b"\r" in line or b"\x00" in line:
        raise _HttpError(400, "stray CR or NUL in the message head")
    # latin-1 maps bytes 1:1, so what is forwarded is what was received.
    return line.decode("latin-1")


def _get_all(headers: Headers, name: str) -> list[str]:
    return [v for n, v in headers if n.lower() == name]


def _tokens(headers: Headers, name: str) -> set[str]:
    return {t.strip().lower() for v in _get_all(headers, name) for t in v.split(",") if t.strip()}


def _body_framing(headers: Headers, is_request: bool) -> tuple[str, int]:
    """("none"|"length"|"chunked"|"close", length). RFC 9112 §6.3, strict: both
    Transfer-Encoding and Content-Length, or conflicting lengths, are errors (the classic
    request-smuggling shapes)."""
    te = _get_all(headers, "transfer-encoding")
    cl = _get_all(headers, "content-length")
    if te:
        if cl:
            raise _HttpError(400, "both Transfer-Encoding and Content-Length")
        codings = [t.strip().lower() for v in te for t in v.split(",") if t.strip()]
        if codings != ["chunked"]:
            raise _HttpError(501, f"unsupported Transfer-Encoding {', '.join(te)!r}", "unsupported")
        return "chunked", 0
    if cl:
        values = {v.strip() for c in cl for v in c.split(",")}
        if len(values) != 1:
            raise _HttpError(400, "conflicting Content-Length values")
        value = values.pop()
        if not value.isdigit() or len(value) > 18:
            raise _HttpError(400, f"invalid Content-Length {value!r}")
        return "length", int(value)
    return ("none", 0) if is_request else ("close", 0)


class _Redactor:
    """Replaces a secret by asterisks of the same length in a byte stream, across chunk
    boundaries (it holds back len(secret)-1 bytes until more arrive or `flush`)."""

    def __init__(self, secret: bytes) -> None:
        self.secret, self.mask = secret, b"*" * len(secret)
        self.hold = b""

    def feed(self, data: bytes) -> bytes:
        buf = (self.hold + data).replace(self.secret, self.mask)
        keep = len(self.secret) - 1
        if keep <= 0:
            self.hold = b""
            return buf
        self.hold = buf[-keep:]
        return buf[:-keep]

    def flush(self) -> bytes:
        out, self.hold = self.hold, b""
        return out


@dataclass
class _Exchange:
    """What one request did, for its audit event."""

    method: str = ""
    host: str = ""
    port: int = 0
    decision: Decision | None = None
    status: int | None = None
    address: str | None = None
    injected: bool = False
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    up_start: int = 0
    bytes_down: int = 0


def _event(
    *, method: str = "", host: str = "", port: int = 0, allowed: bool = False, code: str, reason: str,
    status: int | None = None, address: str | None = None, bytes_up: int = 0, bytes_down: int = 0,
    api_key_injected: bool = False, duration_ms: int = 0, error: str | None = None,
) -> dict[str, Any]:
    """The audit record of one proxy decision (one per request or tunnel, emitted when
    it ends, so the byte counts are final). Never contains a key or a URL path."""
    return {
        "event": "proxy",
        "method": method,
        "host": host,
        "port": port,
        "decision": "allowed" if allowed else "denied",
        "allowed": allowed,
        "code": code,
        "reason": reason,
        "status": status,
        "address": address,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "api_key_injected": api_key_injected,
        "duration_ms": duration_ms,
        "error": error,
    }


class ProxyServer:
    """Serves the already-listening socket `listen_sock` (which it now owns) in threads:
    one accept thread, one thread per client connection. `on_event` is called from those
    threads with one dict per decision; it must be thread-safe and quick."""

    def __init__(
        self, listen_sock: socket.socket, config: ProxyConfig, on_event: EventSink | None = None
    ) -> None:
        self.listen_sock = listen_sock
        self.config = config
        self.limits = config.limits
        self.policy = config.policy
        self.on_event = on_event
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        self._tls: ssl.SSLContext | None = None
        if config.api is not None and config.api.upstream_scheme == "https":
            # Built once, before any request: a bad CA file fails the launch, not a request.
            with acting("net.proxy", f"load the upstream CA {config.upstream_ca or '(system store)'}"):
                self._tls = ssl.create_default_context(cafile=config.upstream_ca)
        self._api_key = config.api.key.encode("ascii") if config.api else b""
        self._wake_r, self._wake_w = os.pipe()  # stop() wakes the accept loop through it
        os.set_blocking(self._wake_r, False)
        self._accept_thread: threading.Thread | None = None
        self._lingering = 0

    @property
    def port(self) -> int:
        return int(self.listen_sock.getsockname()[1])

    def start(self) -> None:
        self.listen_sock.setblocking(False)
        self._accept_thread = threading.Thread(target=self._accept_loop, name="nsbox-proxy", daemon=True)
        self._accept_thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, cut every connection, wait for the threads."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        with contextlib.suppress(OSError):
            self.listen_sock.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for s in sockets:
            # shutdown wakes a thread blocked in recv/send on it; close alone does not.
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def active_connections(self) -> int:
        with self._lock:
            return len(self._threads)

    # -- plumbing -------------------------------------------------------------------

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.add(s)
        if self._stopping.is_set():
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _untrack(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(s)
        with contextlib.suppress(OSError):
            s.close()

    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listen_sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r:
                        return
                    try:
                        conn, _addr = self.listen_sock.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        # EMFILE and friends: back off instead of spinning on a ready socket.
                        time.sleep(0.05)
                        continue
                    self._spawn(conn)
        finally:
            sel.close()

    def _spawn(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        with self._lock:
            full = len(self._threads) >= self.limits.max_connections
        if full:
            conn.settimeout(1.0)
            with contextlib.suppress(OSError):
                conn.sendall(_error_bytes(503, "nsbox proxy: too many connections\n", "overloaded"))
            with self._lock:
                lingering = self._lingering < _MAX_LINGERING
                self._lingering += lingering
            if lingering:  # off the accept thread, and bounded: an overload must not grow it
                threading.Thread(target=self._linger_then_close, args=(conn,), daemon=True).start()
            else:
                conn.close()
            self._emit(_event(code="overloaded", reason="too many connections", status=503))
            return
        t = threading.Thread(target=self._serve, args=(conn,), name="nsbox-proxy-conn", daemon=True)
        with self._lock:
            self._threads.add(t)
        self._track(conn)
        t.start()

    def _linger_then_close(self, conn: socket.socket) -> None:
        try:
            _lingering_close(conn)
        finally:
            conn.close()
            with self._lock:
                self._lingering -= 1

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = _Reader(conn, self.limits.buffer_size, self.limits.bulk_buffer_size)
        try:
            while not self._stopping.is_set() and self._one_request(conn, reader):
                pass
        except Exception as e:  # a bug must end this connection, never the launcher
            self._emit(_event(code="internal-error", reason=f"{type(e).__name__}: {e}"))
        finally:
            _lingering_close(conn)
            self._untrack(conn)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _emit(self, event: dict[str, Any]) -> None:
        if self.on_event is None:
            return
        with contextlib.suppress(Exception):  # a broken log must not break the network
            self.on_event(event)

    def _finish(self, ex: _Exchange, reader: _Reader) -> None:
        d = ex.decision
        allowed = bool(d and d.allowed)
        reason = d.reason if d else (ex.error or "")
        if allowed and ex.error:
            reason = f"{reason}; {ex.error}"
        self._emit(
            _event(
                method=ex.method,
                host=d.host if d and d.host else ex.host,
                port=d.port if d and d.port else ex.port,
                allowed=allowed,
                code=d.code if d else "malformed",
                reason=reason,
                status=ex.status,
                address=ex.address,
                bytes_up=reader.consumed - ex.up_start,
                bytes_down=ex.bytes_down,
                api_key_injected=ex.injected,
                duration_ms=int((time.monotonic() - ex.started) * 1000),
                error=ex.error,
            )
        )

    def _send(self, conn: socket.socket, ex: _Exchange, data: bytes) -> None:
        conn.settimeout(self.limits.idle_timeout)
        try:
            conn.sendall(data)
        except OSError as e:
            raise _Gone(str(e)) from None
        ex.bytes_down += len(data)

    def _refuse(self, conn: socket.socket, ex: _Exchange, status: int, body: str, code: str) -> None:
        ex.status = status
        with contextlib.suppress(_Gone):
            self._send(conn, ex, _error_bytes(status, body, code))

    # -- one request ----------------------------------------------------------------

    def _one_request(self, conn: socket.socket, reader: _Reader) -> bool:
        """Serve one request; True to read another on this connection."""
        lim = self.limits
        try:
            if not reader.wait(lim.idle_timeout):
                return False
        except _Gone:
            return False
        ex = _Exchange(up_start=reader.consumed)
        try:
            try:
                start, headers = _read_head(reader, lim, time.monotonic() + lim.header_timeout, "request")
                method, target, version = _parse_request_line(start)
            except _HttpError as e:
                ex.error = e.message
                self._refuse(conn, ex, e.status, f"nsbox proxy: {e.message}\n", e.code)
                return False
            ex.method = method
            if method == "CONNECT":
                self._connect(conn, reader, ex, target)
                return False
            return self._forward(conn, reader, ex, method, target, version, headers)
        except _Gone as e:
            ex.error = ex.error or f"connection lost: {e}"
            return False
        finally:
            if ex.method or ex.status is not None:
                self._finish(ex, reader)

    def _decide(self, conn: socket.socket, ex: _Exchange, host: str, port: int, what: str) -> bool:
        d = self.policy.decide(host, port, self.config.resolver)
        ex.decision = d
        if d.allowed:
            return True
        status = {"malformed": 400, "unresolvable": 502}.get(d.code, 403)
        lines = [f"nsbox blocked this request: {what}", f"reason: {d.reason}"]
        if d.fix:
            lines.append(f"to allow it: {d.fix}")
        self._refuse(conn, ex, status, "\n".join(lines) + "\n", d.code)
        return False

    def _open_upstream(self, conn: socket.socket, ex: _Exchange, d: Decision) -> socket.socket | None:
        """Connect to the addresses the decision checked, in order; None after answering
        502/504 to the client."""
        last: OSError | None = None
        for addr in d.addresses:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            self._track(s)
            s.settimeout(self.limits.connect_timeout)
            try:
                s.connect((addr, d.port))
            except OSError as e:
                last = e
                self._untrack(s)
                continue
            with contextlib.suppress(OSError):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ex.address = addr
            return s
        timed_out = isinstance(last, TimeoutError)
        ex.error = f"connect to {d.host}:{d.port} ({', '.join(d.addresses)}) failed: {last}"
        self._refuse(
            conn, ex, 504 if timed_out else 502, f"nsbox proxy: {ex.error}\n",
            "connect-timeout" if timed_out else "connect-failed",
        )
        return None

    # -- CONNECT ----------------------------------------------------------------------

    def _connect(self, conn: socket.socket, reader: _Reader, ex: _Exchange, target: str) -> None:
        try:
            host, port = _split_authority(target, None)
        except ValueError as e:
            ex.error = str(e)
            self._refuse(conn, ex, 400, f"nsbox proxy: CONNECT needs host:port: {e}\n", "malformed")
            return
        ex.host, ex.port = host, port
        if not self._decide(conn, ex, host, port, f"CONNECT {target}"):
            return
        assert ex.decision is not None
        upstream = self._open_upstream(conn, ex, ex.decision)
        if upstream is None:
            return
        try:
            ex.status = 200
            self._send(conn, ex, b"HTTP/1.1 200 Connection Established\r\n\r\n")
            early = reader.take()  # a client may send its TLS hello right behind CONNECT
            if early:
                upstream.sendall(early)
            self._relay(conn, upstream, reader, ex)
        except (_Gone, OSError):
            pass
        finally:
            self._untrack(upstream)

    def _relay(self, client: socket.socket, upstream: socket.socket, reader: _Reader, ex: _Exchange) -> None:
        lim = self.limits
        sel = selectors.DefaultSelector()
        peer = {client: upstream, upstream: client}
        # One fixed buffer per direction, read into with recv_into and sent from a view: no
        # bytes object per read. Each starts at buffer_size and is replaced once by one of
        # bulk_buffer_size when a read fills it (a long transfer), so an idle or chatty
        # tunnel never holds more than 2 x buffer_size.
        bufs = {s: memoryview(bytearray(lim.buffer_size)) for s in peer}
        for s in peer:
            s.settimeout(lim.idle_timeout)  # once: it bounds sendall to a stalled reader
            sel.register(s, selectors.EVENT_READ)
        open_reads = 2
        try:
            while open_reads:
                ready = sel.select(lim.idle_timeout)  # the tunnel's idle timeout
                if not ready:
                    ex.error = "tunnel idle timeout"
                    return
                for key, _ in ready:
                    src = key.fileobj
                    assert isinstance(src, socket.socket)
                    dst, view = peer[src], bufs[src]
                    try:
                        n = src.recv_into(view)
                    except OSError:
                        return
                    if not n:
                        # Half-close: pass the EOF on and keep the other direction open.
                        sel.unregister(src)
                        open_reads -= 1
                        with contextlib.suppress(OSError):
                            dst.shutdown(socket.SHUT_WR)
                        continue
                    try:
                        dst.sendall(view[:n])
                    except OSError:
                        return
                    if src is client:
                        reader.consumed += n
                    else:
                        ex.bytes_down += n
                    if n == len(view) < lim.bulk_buffer_size:
                        bufs[src] = memoryview(bytearray(lim.bulk_buffer_size))
        finally:
            sel.close()

    # -- forward requests -----------------------------------------------------------

    def _forward(
        self, conn: socket.socket, reader: _Reader, ex: _Exchange, method: str, target: str,
        version: str, headers: Headers,
    ) -> bool:
        lim = self.limits
        try:
            host, port, path = _parse_absolute_uri(target)
            framing, length = _body_framing(headers, is_request=True)
        except _HttpError as e:
            ex.error = e.message
            self._refuse(conn, ex, e.status, f"nsbox proxy: {e.message}\n", e.code)
            return False
        ex.host, ex.port = host, port
        api = self.config.api
        scheme, up_host, up_port = "http", host, port
        if api is not None and port == 80 and _same_name(host, api.host):
            scheme, up_host, up_port = api.upstream_scheme, api.upstream_host, api.upstream_port
            ex.injected = True
        if not self._decide(conn, ex, up_host, up_port, f"{method} {target}"):
            return False
        assert ex.decision is not None
        upstream = self._open_upstream(conn, ex, ex.decision)
        if upstream is None:
            return False
        try:
            if scheme == "https":
                assert self._tls is not None
                raw = upstream
                try:
                    upstream = self._tls.wrap_socket(raw, server_hostname=up_host)
                except (ssl.SSLError, OSError) as e:
                    ex.error = f"TLS to {up_host}:{up_port} failed: {e}"
                    self._refuse(conn, ex, 502, f"nsbox proxy: {ex.error}\n", "tls-failed")
                    return False
                finally:
                    self._untrack(raw)  # its fd now belongs to the TLS socket (or is closed)
                self._track(upstream)
            client_keepalive = version == "HTTP/1.1" and "close" not in _tokens(headers, "connection")
            head = self._upstream_head(method, path, up_host, up_port, scheme, headers, framing, length,
                                       api if ex.injected else None)
            if "100-continue" in _tokens(headers, "expect") and framing != "none":
                # We answer the client's Expect ourselves: the upstream gets the body anyway.
                self._send(conn, ex, b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                upstream.settimeout(lim.upstream_timeout)
                upstream.sendall(head)
                self._copy_request_body(reader, upstream, framing, length)
            except _HttpError as e:
                ex.error = e.message
                self._refuse(conn, ex, e.status, f"nsbox proxy: {e.message}\n", e.code)
                return False
            except OSError as e:
                ex.error = f"sending to upstream failed: {e}"
                self._refuse(conn, ex, 502, f"nsbox proxy: {ex.error}\n", "upstream-failed")
                return False
            ok = self._relay_response(conn, upstream, ex, method, version, client_keepalive)
            return ok and client_keepalive
        finally:
            self._untrack(upstream)

    def _upstream_head(
        self, method: str, path: str, host: str, port: int, scheme: str, headers: Headers,
        framing: str, length: int, inject: ApiKeyInjection | None,
    ) -> bytes:
        """The request head for the upstream; `inject` replaces the key header."""
        drop = set(_HOP_BY_HOP) | _tokens(headers, "connection")
        if inject is not None:
            drop.add(inject.header.lower())
        default = 443 if scheme == "https" else 80
        authority = host if port == default else f"{host}:{port}"
        lines = [f"{method} {path} HTTP/1.1", f"Host: {authority}"]
        lines += [f"{n}: {v}" for n, v in headers if n.lower() not in drop]
        if inject is not None:
            lines.append(f"{inject.header}: {inject.key}")
        if framing == "length":
            lines.append(f"Content-Length: {length}")
        elif framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
        lines.append("Connection: close")  # one upstream connection per request: simple framing
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _copy_request_body(self, reader: _Reader, upstream: socket.socket, framing: str, length: int) -> None:
        # upstream's timeout (upstream_timeout) was set before the head was sent.
        lim = self.limits
        if framing == "length":
            if reader.pump(length, lim.idle_timeout, upstream.sendall) < length:
                raise _Gone("client closed mid-body")
        elif framing == "chunked":
            _pump_chunks(reader, lim, lim.idle_timeout,
                         lambda piece: upstream.sendall(b"%x\r\n%s\r\n" % (len(piece), piece)))
            upstream.sendall(b"0\r\n\r\n")

    def _relay_response(
        self, conn: socket.socket, upstream: socket.socket, ex: _Exchange, method: str, version: str,
        client_keepalive: bool,
    ) -> bool:
        """Stream the upstream response to the client; True if the client connection is
        still in a clean state for another request."""
        lim = self.limits
        up = _Reader(upstream, lim.buffer_size, lim.bulk_buffer_size)
        try:
            while True:
                start, headers = _read_head(up, lim, time.monotonic() + lim.upstream_timeout, "status")
                status = _parse_status_line(start)
                if status >= 200 or status == 101:
                    break  # interim 1xx responses are ours to drop: we sent no Expect
        except (_HttpError, _Gone) as e:
            msg = e.message if isinstance(e, _HttpError) else str(e)
            ex.error = f"bad response from upstream: {msg}"
            self._refuse(conn, ex, 502, f"nsbox proxy: {ex.error}\n", "upstream-failed")
            return False
        if status == 101:
            ex.error = "upstream switched protocols (Upgrade is not forwarded)"
            self._refuse(conn, ex, 502, f"nsbox proxy: {ex.error}\n", "upstream-failed")
            return False
        ex.status = status
        reason = start.split(" ", 2)[2] if start.count(" ") >= 2 else _REASONS.get(status, "")
        if method == "HEAD" or status in (204, 304):
            framing, length = "none", 0
        else:
            try:
                framing, length = _body_framing(headers, is_request=False)
            except _HttpError as e:
                ex.error = f"bad response from upstream: {e.message}"
                self._refuse(conn, ex, 502, f"nsbox proxy: {ex.error}\n", "upstream-failed")
                return False
        redactor = _Redactor(self._api_key) if ex.injected and self._api_key else None
        key, mask = self._api_key.decode("latin-1"), "*" * len(self._api_key)
        drop = set(_HOP_BY_HOP) | _tokens(headers, "connection")
        if framing == "none":
            drop.discard("content-length")  # a HEAD/304 answer describes the real body
        lines = [f"HTTP/1.1 {status} {reason}"]
        for n, v in headers:
            if n.lower() not in drop:
                if redactor is not None:
                    v = v.replace(key, mask)
                lines.append(f"{n}: {v}")
        chunked_out = framing == "chunked" and version == "HTTP/1.1"
        keep = client_keepalive and (framing in ("none", "length") or chunked_out)
        if framing == "length":
            lines.append(f"Content-Length: {length}")
        elif chunked_out:
            lines.append("Transfer-Encoding: chunked")
        if not keep:
            lines.append("Connection: close")
        self._send(conn, ex, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

        def out(data: memoryview) -> None:
            # The body is sent with the client timeout set once, below, not per piece: nothing
            # reads from the client (which would change it) until the body is through.
            piece: bytes | memoryview = data
            if redactor is not None:
                piece = redactor.feed(bytes(data))  # masking needs the bytes (and across reads)
            if not piece:
                return
            frame = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked_out else piece
            try:
                conn.sendall(frame)
            except OSError as e:
                raise _Gone(str(e)) from None
            ex.bytes_down += len(frame)

        try:
            conn.settimeout(lim.idle_timeout)
            if framing == "length":
                if up.pump(length, lim.upstream_timeout, out) < length:
                    raise _Gone("upstream closed mid-body")
            elif framing == "chunked":
                _pump_chunks(up, lim, lim.upstream_timeout, out)
            elif framing == "close":
                up.pump(None, lim.upstream_timeout, out)
            if redactor is not None:
                tail = redactor.flush()
                if tail:
                    self._send(conn, ex, b"%x\r\n%s\r\n" % (len(tail), tail) if chunked_out else tail)
            if chunked_out:
                self._send(conn, ex, b"0\r\n\r\n")
        except _HttpError as e:
            ex.error = f"bad response body from upstream: {e.message}"
            return False
        except _Gone as e:
            ex.error = f"response cut short: {e}"
            return False
        return keep


def _pump_chunks(reader: _Reader, lim: Limits, timeout: float, send: Callable[[memoryview], object]) -> None:
    """Pass the data of a chunked body (RFC 9112 §7.1) to `send`, trailers read and dropped."""
    while True:
        deadline = time.monotonic() + timeout
        try:
            line = _strip_eol(reader.readline(lim.max_line, deadline))
        except _HttpError:
            raise _HttpError(400, "chunk-size line too long") from None
        size_text = line.split(";", 1)[0].strip()
        if not size_text or len(size_text) > 16 or any(c not in "0123456789abcdefABCDEF" for c in size_text):
            raise _HttpError(400, f"invalid chunk size {line[:40]!r}")
        size = int(size_text, 16)
        if size == 0:
            trailer_bytes = 0
            while True:
                try:
                    raw = reader.readline(lim.max_line, time.monotonic() + timeout)
                except _HttpError:
                    raise _HttpError(400, "trailer line too long") from None
                trailer_bytes += len(raw)
                if trailer_bytes > lim.max_header_bytes:
                    raise _HttpError(400, "trailers too large")
                if not _strip_eol(raw):
                    return
        if reader.pump(size, timeout, send) < size:
            raise _Gone("closed mid-chunk")
        try:
            end = reader.readline(2, time.monotonic() + timeout)
        except _HttpError:
            end = b""
        if end not in (b"\r\n", b"\n"):
            raise _HttpError(400, "chunk data not followed by CRLF")


def _parse_request_line(line: str) -> tuple[str, str, str]:
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise _HttpError(400, f"malformed request line {line[:100]!r}")
    method, target, version = parts
    if not set(method) <= _TOKEN:
        raise _HttpError(400, f"invalid method {method[:40]!r}")
    if not version.startswith("HTTP/") or len(version) != 8 or version[6] != ".":
        raise _HttpError(400, f"invalid HTTP version {version[:20]!r}")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _HttpError(505, f"{version} is not supported (HTTP/1.0 and 1.1 are)", "unsupported")
    if any(ord(c) <= 32 or ord(c) >= 127 for c in target):
        raise _HttpError(400, "control or non-ASCII character in the request target")
    return method, target, version


def _parse_status_line(line: str) -> int:
    parts = line.split(" ", 2)
    if len(parts) < 2 or parts[0] not in ("HTTP/1.0", "HTTP/1.1") or not _is_status(parts[1]):
        raise _HttpError(502, f"malformed status line {line[:100]!r}")
    return int(parts[1])


def _is_status(text: str) -> bool:
    return len(text) == 3 and text.isdigit()


def _parse_absolute_uri(target: str) -> tuple[str, int, str]:
    """`http://host[:port]/path?q` -> (host, port, "/path?q")."""
    scheme, sep, rest = target.partition("://")
    if not sep:
        raise _HttpError(
            400, "this is a proxy: the request target must be an absolute http:// URI "
            "(set HTTP_PROXY, or use CONNECT)"
        )
    if scheme.lower() != "http":
        raise _HttpError(400, f"{scheme}:// targets must be tunnelled with CONNECT")
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:].split("#", 1)[0]
    if "@" in authority:
        raise _HttpError(400, "user information in the URI is not allowed")
    try:
        host, port = _split_authority(authority, 80)
    except ValueError as e:
        raise _HttpError(400, str(e)) from None
    if not path.startswith("/"):
        path = "/" + path
    return host, port, path


def _same_name(a: str, b: str) -> bool:
    try:
        return normalize_host(a) == normalize_host(b)
    except HostError:
        return False


def _lingering_close(s: socket.socket, seconds: float = 1.0, limit: int = 1 << 20) -> None:
    """Half-close, then read what the client still sends before closing. Closing a socket
    with unread input makes the kernel send RST, which can destroy the error response we
    just wrote before the client reads it (RFC 9112 §9.6)."""
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + seconds
        drained = 0
        while drained < limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            s.settimeout(remaining)
            data = s.recv(65536)
            if not data:
                break
            drained += len(data)


def _error_bytes(status: int, body: str, code: str) -> bytes:
    data = body.encode("utf-8")
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\n"
        f"X-Nsbox-Proxy: {code}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + data
