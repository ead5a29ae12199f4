"""Network rules: which host:port the sandbox may reach through the proxy, decided on the host.

What it isolates: the sandbox has no route and no resolver of its own; every outbound
connection is a request to the host-side proxy naming a host and a port. This module is
the pure decision: allowlist and denylist entries, `--resolve` pins, and the refusal of
every address that would let the agent reach the host or its neighbours (SSRF) instead of
the internet. The proxy then connects to exactly the addresses returned here, so the name
is resolved once, checked, and never looked up again (no DNS-rebinding window).

Entry syntax (`allowed-domains.txt`, one a line, and `--allow-domain`):

    example.com            exactly this name, ports 80 and 443
    *.example.com          any name below example.com (not example.com itself), 80 and 443
    example.com:8443       exactly this name, only port 8443
    !ads.example.com       deny entry: `!` prefix; without a port it denies every port
    # comment              blank lines and `#` comments (also after an entry) are ignored

Deny entries win over allow entries. Names are compared case-insensitively without a
trailing dot. An IP literal may appear as an entry (`10.0.0.5:8080`, `[fd00::1]:443`); a
literal still needs a `--resolve` pin to be reached (see below).

`--resolve NAME:PORT:ADDR[,ADDR...]` (curl's syntax) pins NAME:PORT to ADDR: no DNS
lookup, and ADDR is exempt from the address checks. It does not allow NAME by itself:
the name must also be allowed by an entry. This is the one way to reach a loopback or
private server (tests point names at 127.0.0.1 this way).

Refused unless pinned: a literal IP in any spelling a resolver accepts (`127.0.0.1`,
`0177.0.0.1`, `2130706433`, `0x7f.1`, `127.1`, `[::1]`, `[::ffff:127.0.0.1]`), the names
`localhost` and `*.localhost`, and any name whose addresses (getaddrinfo on the host)
include a loopback, private, link-local, multicast, unspecified, reserved, CGNAT,
documentation, 6to4/NAT64-embedded private, or cloud metadata address. One bad address
refuses the whole name: a name that answers both public and private addresses is either
misconfigured or a rebinding attempt, and the user can pin the address they trust.

Order: parsed in the launcher before the first fork (config errors stop the launch with
a StepError naming file and line); `Policy.decide` runs in the proxy's threads.
Verify: tests/test_net_rules.py (parsing, matching, SSRF table, property tests over IP
encodings); `nsbox verify` checks the same table through the proxy from inside.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nsbox.errors import StepError

STEP = "net.rules"
DEFAULT_PORTS: frozenset[int] = frozenset({80, 443})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> addresses as strings. The default asks the host's getaddrinfo; tests
# inject a table so no test ever depends on real DNS.
Resolver = Callable[[str, int], Sequence[str]]

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_HEX_NUMBER = re.compile(r"0[xX][0-9a-fA-F]*")


class HostError(ValueError):
    """A host string that is neither a valid DNS name nor an IP literal."""


@dataclass(frozen=True)
class Host:
    """A host in canonical form: `kind` is "name", "ipv4" or "ipv6"; `text` is lowercase
    without trailing dot for names, the canonical address for literals (whatever the
    spelling: `0x7f.1` becomes `127.0.0.1`)."""

    kind: str
    text: str

    @property
    def is_literal(self) -> bool:
        return self.kind != "name"

    def display(self) -> str:
        return f"[{self.text}]" if self.kind == "ipv6" else self.text


def _ends_in_number(labels: list[str]) -> bool:
    # The WHATWG URL rule: a host whose last label is numeric is an IPv4 address to
    # every browser and to inet_aton(3). Catching this is what stops `2130706433` and
    # `0x7f.1` from being treated as names.
    last = labels[-1]
    return last.isdigit() or bool(_HEX_NUMBER.fullmatch(last))


def _parse_ipv4_number(part: str) -> int:
    if not part:
        raise HostError("empty part in IPv4 address")
    if part[:2] in ("0x", "0X"):
        digits, base = part[2:], 16
        if not digits:
            return 0
    elif len(part) > 1 and part[0] == "0":
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    try:
        return int(digits, base)
    except ValueError:
        raise HostError(f"invalid number {part!r} in IPv4 address") from None


def parse_ipv4_any(text: str) -> ipaddress.IPv4Address:
    """Parse an IPv4 address the way inet_aton(3) and browsers do (1 to 4 parts,
    decimal, octal with a leading 0, hex with 0x). `127.1`, `2130706433` and `0x7f.1`
    are all 127.0.0.1."""
    parts = text.split(".")
    if len(parts) > 4:
        raise HostError(f"{text!r} has more than four numeric parts")
    numbers = [_parse_ipv4_number(p) for p in parts]
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise HostError(f"{text!r} is out of range for an IPv4 address")
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def normalize_host(raw: str) -> Host:
    """Canonicalize a host as written in a request or an entry. Raises HostError."""
    text = raw.strip()
    if not text or len(text) > 255:
        raise HostError(f"invalid host {raw!r}")
    if not text.isascii():
        raise HostError(f"host {raw!r} is not ASCII (send IDNA names in their xn-- form)")
    if text.startswith("[") or ":" in text:
        inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        if "%" in inner:
            raise HostError(f"IPv6 zone ids are not allowed: {raw!r}")
        try:
            return Host("ipv6", str(ipaddress.IPv6Address(inner)))
        except ValueError:
            raise HostError(f"invalid IPv6 address {raw!r}") from None
    text = text.lower()
    if text.endswith("."):
        text = text[:-1]  # one trailing dot is the root; `a..` is malformed below
    labels = text.split(".")
    if any(not label for label in labels):
        raise HostError(f"invalid host {raw!r}: empty label")
    if _ends_in_number(labels):
        return Host("ipv4", str(parse_ipv4_any(text)))
    if len(text) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise HostError(f"invalid host name {raw!r}")
    return Host("name", text)


# Special-purpose ranges (IANA registries) nobody should reach through an egress proxy.
# Listed explicitly instead of trusting `is_private`, whose contents changed between
# Python patch releases.
_BLOCKED: tuple[tuple[str, str], ...] = (
    ("169.254.169.254/32", "a cloud metadata address"),
    ("169.254.170.2/32", "a cloud metadata address"),
    ("100.100.100.200/32", "a cloud metadata address"),
    ("fd00:ec2::254/128", "a cloud metadata address"),
    ("0.0.0.0/8", "an unspecified/this-network address"),
    ("127.0.0.0/8", "a loopback address"),
    ("10.0.0.0/8", "a private address"),
    ("172.16.0.0/12", "a private address"),
    ("192.168.0.0/16", "a private address"),
    ("100.64.0.0/10", "a carrier-grade NAT (CGNAT) address"),
    ("169.254.0.0/16", "a link-local address"),
    ("192.0.0.0/24", "an IETF protocol assignment address"),
    ("192.0.2.0/24", "a documentation address"),
    ("198.51.100.0/24", "a documentation address"),
    ("203.0.113.0/24", "a documentation address"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
    ("::/128", "an unspecified address"),
    ("::1/128", "a loopback address"),
    ("::/96", "an IPv4-compatible (deprecated) address"),
    ("100::/64", "a discard-only address"),
    ("2001::/23", "an IETF protocol assignment address"),
    ("2001:db8::/32", "a documentation address"),
    ("fc00::/7", "a unique-local (private) address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local (deprecated) address"),
    ("ff00::/8", "a multicast address"),
)
_BLOCKED_NETS = tuple((ipaddress.ip_network(net), why) for net, why in _BLOCKED)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


def blocked_reason(address: str | IPAddress) -> str | None:
    """Why the proxy must not connect to `address` unless pinned, or None if it is a
    global unicast address."""
    addr = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(addr, ipaddress.IPv6Address):
        # Addresses that carry an IPv4 address inside are judged by that address:
        # `::ffff:127.0.0.1` reaches 127.0.0.1 on a dual-stack host.
        if addr.ipv4_mapped is not None:
            # No resolver hands these out for a real host; they exist to confuse checks.
            inner = blocked_reason(addr.ipv4_mapped)
            return f"{inner} (IPv4-mapped)" if inner else "an IPv4-mapped IPv6 address"
        embedded = addr.sixtofour
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None:
            inner = blocked_reason(embedded)
            if inner:
                return f"{inner} (embedded in {addr})"
        if addr in _NAT64_LOCAL:
            return "a local-use NAT64 address"
    for net, why in _BLOCKED_NETS:
        if addr.version == net.version and addr in net:
            return why
    if not addr.is_global:
        return "a non-global address"
    return None


@dataclass(frozen=True)
class Rule:
    """One allow or deny entry. `ports` None means the default: 80 and 443 for an allow
    entry, every port for a deny entry (a deny is meant to be total)."""

    host: Host
    wildcard: bool
    ports: frozenset[int] | None
    deny: bool
    source: str  # where it came from, for reasons: "allowed-domains.txt:3", "--allow-domain"

    def host_matches(self, host: Host) -> bool:
        if self.wildcard:
            return host.kind == "name" and host.text.endswith("." + self.host.text)
        return host == self.host

    def port_matches(self, port: int) -> bool:
        if self.ports is None:
            return self.deny or port in DEFAULT_PORTS
        return port in self.ports

    def text(self) -> str:
        name = ("*." if self.wildcard else "") + self.host.display()
        ports = "" if self.ports is None else ":" + ",".join(str(p) for p in sorted(self.ports))
        return ("!" if self.deny else "") + name + ports


@dataclass(frozen=True)
class Pin:
    """`--resolve NAME:PORT:ADDR[,ADDR...]`: connect NAME:PORT to these addresses."""

    host: Host
    port: int
    addresses: tuple[str, ...]


def _parse_port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"invalid port {text!r} (1-65535)")
    return int(text)


def _split_host_port(text: str) -> tuple[str, str | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {text!r}")
        rest = text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after ']'")
        return text[: end + 1], rest[1:] if rest else None
    if text.count(":") > 1:
        raise ValueError(f"write IPv6 addresses in brackets: [{text}]")
    host, sep, port = text.partition(":")
    return host, port if sep else None


def parse_entry(text: str, source: str) -> Rule:
    """Parse one entry (`[!]host[:port]`, host exact, `*.suffix` or an IP literal).
    Raises ValueError with a plain message."""
    entry = text.strip()
    deny = entry.startswith("!")
    if deny:
        entry = entry[1:].strip()
    if not entry:
        raise ValueError("empty entry")
    host_text, port_text = _split_host_port(entry)
    ports = None if port_text is None else frozenset({_parse_port(port_text)})
    wildcard = host_text.startswith("*.")
    if wildcard:
        host_text = host_text[2:]
    if "*" in host_text:
        raise ValueError(f"{text.strip()!r}: '*' is only allowed as a leading '*.' label")
    try:
        host = normalize_host(host_text)
    except HostError as e:
        raise ValueError(str(e)) from None
    if wildcard and host.kind != "name":
        raise ValueError(f"{text.strip()!r}: a wildcard needs a domain name, not an address")
    if wildcard and "." not in host.text:
        # `*.com` would open a whole top-level domain; almost surely a mistake.
        raise ValueError(f"{text.strip()!r}: a wildcard needs at least two labels (*.example.com)")
    return Rule(host=host, wildcard=wildcard, ports=ports, deny=deny, source=source)


def parse_rules_text(text: str, filename: str) -> tuple[Rule, ...]:
    """Parse the contents of an allowed-domains.txt. Errors name the file and line."""
    rules = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        try:
            rules.append(parse_entry(content, f"{filename}:{lineno}"))
        except ValueError as e:
            raise StepError(
                STEP,
                f"parse {filename}:{lineno}",
                detail=str(e),
                fix=f"edit line {lineno} of {filename}: one entry a line, like example.com, "
                "*.example.com, example.com:8443 or !deny.example.com",
            ) from None
    return tuple(rules)


def parse_rules_file(path: str | Path) -> tuple[Rule, ...]:
    """Read and parse an allowed-domains.txt; a missing file is no rules."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ()
    except OSError as e:
        raise StepError(STEP, f"read {p}", e.errno) from e
    except UnicodeDecodeError as e:
        raise StepError(STEP, f"read {p}", detail=f"not UTF-8 text: {e}") from None
    return parse_rules_text(text, str(p))


def parse_cli_entries(entries: Iterable[str], flag: str = "--allow-domain") -> tuple[Rule, ...]:
    rules = []
    for entry in entries:
        try:
            rules.append(parse_entry(entry, flag))
        except ValueError as e:
            raise StepError(
                STEP, f"parse {flag} {entry!r}", detail=str(e), fix=f"{flag} example.com[:PORT]"
            ) from None
    return tuple(rules)


def parse_resolve(spec: str) -> Pin:
    """Parse curl's `--resolve NAME:PORT:ADDR[,ADDR...]` (ADDR IPv4, or IPv6 bare or in
    brackets). Raises StepError."""

    def fail(detail: str) -> StepError:
        return StepError(
            STEP, f"parse --resolve {spec!r}", detail=detail, fix="--resolve NAME:PORT:ADDR, "
            "e.g. --resolve api.example.test:443:127.0.0.1"
        )

    try:
        if spec.startswith("["):
            end = spec.find("]")
            host_text, rest = spec[: end + 1], spec[end + 1 :]
            if end < 0 or not rest.startswith(":"):
                raise ValueError("expected [IPV6]:PORT:ADDR")
            port_text, _, addr_text = rest[1:].partition(":")
        else:
            parts = spec.split(":", 2)
            if len(parts) != 3:
                raise ValueError("expected NAME:PORT:ADDR")
            host_text, port_text, addr_text = parts
        port = _parse_port(port_text)
        host = normalize_host(host_text)
    except (ValueError, HostError) as e:
        raise fail(str(e)) from None
    addresses = []
    for item in addr_text.split(","):
        item = item.strip()
        if item.startswith("[") and item.endswith("]"):
            item = item[1:-1]
        try:
            # Strict parse: a pin is typed by a person, and `0177.0.0.1` there is a typo.
            addresses.append(str(ipaddress.ip_address(item)))
        except ValueError:
            raise fail(f"{item!r} is not an IP address") from None
    return Pin(host=host, port=port, addresses=tuple(addresses))


def parse_pins(specs: Iterable[str]) -> tuple[Pin, ...]:
    pins: dict[tuple[Host, int], Pin] = {}
    for spec in specs:
        pin = parse_resolve(spec)
        key = (pin.host, pin.port)
        if key in pins and pins[key] != pin:
            raise StepError(
                STEP,
                f"parse --resolve {spec!r}",
                detail=f"{pin.host.display()}:{pin.port} is already pinned to "
                + ",".join(pins[key].addresses),
                fix="pin each NAME:PORT once; list several addresses as ADDR1,ADDR2",
            )
        pins[key] = pin
    return tuple(pins.values())


class ResolveError(Exception):
    pass


def host_resolver(host: str, port: int) -> list[str]:
    """getaddrinfo on the host, TCP only; unique addresses in the resolver's order."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        raise ResolveError(str(e)) from None
    seen: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        addr = str(ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0]))
        if addr not in seen:
            seen.append(addr)
    return seen


@dataclass(frozen=True)
class Decision:
    """The answer for one host:port. `addresses` are what the proxy connects to (and only
    those). `code` is a stable word for logs and status mapping: allowed, pinned,
    malformed, denied-rule, not-allowed, port-not-allowed, localhost, literal-ip,
    blocked-address, unresolvable. `fix` tells the user how to allow it, if they can."""

    allowed: bool
    reason: str
    addresses: tuple[str, ...] = ()
    host: str = ""
    port: int = 0
    code: str = "allowed"
    fix: str | None = None


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    pins: tuple[Pin, ...] = ()
    _pin_map: dict[tuple[Host, int], tuple[str, ...]] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pin_map", {(p.host, p.port): p.addresses for p in self.pins})

    def decide(self, host: str, port: int, resolver: Resolver | None = None) -> Decision:
        """Decide whether the sandbox may open a connection to host:port."""
        try:
            h = normalize_host(host)
        except HostError as e:
            return Decision(False, str(e), host=host, port=port, code="malformed")
        name = h.display()
        if not 1 <= port <= 65535:
            return Decision(False, f"invalid port {port}", host=name, port=port, code="malformed")

        def deny(code: str, reason: str, fix: str | None) -> Decision:
            return Decision(False, reason, host=name, port=port, code=code, fix=fix)

        for rule in self.rules:
            if rule.deny and rule.host_matches(h) and rule.port_matches(port):
                return deny(
                    "denied-rule",
                    f"{name}:{port} is denied by the entry {rule.text()!r} ({rule.source})",
                    f"remove the entry {rule.text()!r} ({rule.source})",
                )
        allows = [r for r in self.rules if not r.deny and r.host_matches(h)]
        if not any(r.port_matches(port) for r in allows):
            if allows:
                ports = sorted({p for r in allows for p in (r.ports or DEFAULT_PORTS)})
                return deny(
                    "port-not-allowed",
                    f"port {port} is not allowed for {name} (allowed ports: "
                    + ", ".join(map(str, ports))
                    + ")",
                    f"nsbox run --allow-domain {name}:{port}",
                )
            return deny(
                "not-allowed",
                f"{name} is not in the allowlist",
                f"nsbox run --allow-domain {name}"
                + ("" if port in DEFAULT_PORTS else f":{port}")
                + " (or add it to allowed-domains.txt)",
            )
        pinned = self._pin_map.get((h, port))
        if pinned is not None:
            return Decision(
                True,
                f"allowed, pinned by --resolve to {','.join(pinned)}",
                pinned,
                host=name,
                port=port,
                code="pinned",
            )
        pin_fix = f"if you trust it: nsbox run --resolve {name}:{port}:ADDR"
        if h.is_literal:
            return deny("literal-ip", f"{name} is a literal IP address", pin_fix)
        if h.text == "localhost" or h.text.endswith(".localhost"):
            return deny("localhost", f"{name} names this machine (localhost)", pin_fix)
        try:
            addresses = tuple((resolver or host_resolver)(h.text, port))
        except ResolveError as e:
            return deny("unresolvable", f"{name} does not resolve on the host: {e}", None)
        if not addresses:
            return deny("unresolvable", f"{name} has no addresses", None)
        for addr in addresses:
            why = blocked_reason(addr)
            if why is not None:
                return Decision(
                    False,
                    f"{name} resolves to {addr}, {why}",
                    addresses,
                    host=name,
                    port=port,
                    code="blocked-address",
                    fix=f"if you trust it: nsbox run --resolve {name}:{port}:{addr}",
                )
        return Decision(True, "allowed", addresses, host=name, port=port, code="allowed")
