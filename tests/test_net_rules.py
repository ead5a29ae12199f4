"""nsbox.net.rules: entry parsing, matching, pins, and the SSRF refusals. Pure: no network
(every test injects its resolver; the default getaddrinfo resolver is never reached)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nsbox.errors import StepError
from nsbox.net import rules
from nsbox.net.rules import (
    Policy,
    blocked_reason,
    normalize_host,
    parse_cli_entries,
    parse_entry,
    parse_pins,
    parse_resolve,
    parse_rules_file,
    parse_rules_text,
)


def table(mapping: dict[str, list[str]]) -> rules.Resolver:
    def resolve(host: str, port: int) -> Sequence[str]:
        if host not in mapping:
            raise rules.ResolveError(f"{host}: Name or service not known")
        return mapping[host]

    return resolve


def no_dns(host: str, port: int) -> Sequence[str]:
    raise AssertionError(f"resolver must not be called for {host}:{port}")


PUBLIC = table(
    {
        "example.com": ["93.184.215.14"],
        "api.example.com": ["93.184.215.15", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
        "deep.sub.example.com": ["93.184.215.16"],
        "internal.example.com": ["10.1.2.3"],
        "rebind.example.com": ["93.184.215.17", "127.0.0.1"],
        "meta.example.com": ["169.254.169.254"],
        "v6meta.example.com": ["fd00:ec2::254"],
        "mapped.example.com": ["::ffff:10.0.0.1"],
        "cgnat.example.com": ["100.64.1.1"],
    }
)


def policy(*entries: str, pins: Sequence[str] = ()) -> Policy:
    return Policy(parse_cli_entries(entries), parse_pins(pins))


# -- parsing ---------------------------------------------------------------------------


def test_file_syntax_comments_blank_lines_deny_and_ports(tmp_path):
    f = tmp_path / "allowed-domains.txt"
    f.write_text(
        "# Claude Code\napi.anthropic.com\n\n  *.github.com   # trailing comment\n"
        "example.com:8443\n!ads.github.com\n[2001:4860::1]:443\n"
    )
    parsed = parse_rules_file(f)
    assert [r.text() for r in parsed] == [
        "api.anthropic.com",
        "*.github.com",
        "example.com:8443",
        "!ads.github.com",
        "[2001:4860::1]:443",
    ]
    assert parsed[1].source == f"{f}:4"
    assert parsed[3].deny and not parsed[0].deny


def test_missing_file_is_no_rules(tmp_path):
    assert parse_rules_file(tmp_path / "absent.txt") == ()


@pytest.mark.parametrize(
    "line, words",
    [
        ("exa mple.com", "invalid host"),
        ("example.com:0", "invalid port"),
        ("example.com:99999", "invalid port"),
        ("example.com:http", "invalid port"),
        ("foo.*.com", "only allowed as a leading"),
        ("*", "only allowed as a leading"),
        ("*.com", "at least two labels"),
        ("*.10.0.0.1", "needs a domain name"),
        ("ex..ample.com", "empty label"),
        ("ünïcode.de", "not ASCII"),
        ("!", "empty entry"),
        ("::1", "brackets"),
    ],
)
def test_parse_errors_name_file_and_line(tmp_path, line, words):
    with pytest.raises(StepError) as info:
        parse_rules_text(f"good.example.com\n# comment\n{line}\n", "/cfg/allowed-domains.txt")
    err = info.value
    assert err.step == "net.rules"
    assert err.action == "parse /cfg/allowed-domains.txt:3"
    assert words in (err.detail or "")
    assert "nsbox: net.rules: parse /cfg/allowed-domains.txt:3" in err.render()


def test_cli_entry_error_names_the_flag():
    with pytest.raises(StepError) as info:
        parse_cli_entries(["ok.example.com", "bad host"])
    assert "--allow-domain 'bad host'" in info.value.action


def test_entries_are_case_and_trailing_dot_insensitive():
    assert parse_entry("Example.COM.", "x").host.text == "example.com"


@pytest.mark.parametrize(
    "spec, host, port, addrs",
    [
        ("api.test:443:127.0.0.1", "api.test", 443, ("127.0.0.1",)),
        ("API.Test.:8080:127.0.0.1,[::1]", "api.test", 8080, ("127.0.0.1", "::1")),
        ("v6.test:80:::1", "v6.test", 80, ("::1",)),
        ("[::1]:80:::1", "::1", 80, ("::1",)),
        ("127.0.0.1:8080:127.0.0.1", "127.0.0.1", 8080, ("127.0.0.1",)),
    ],
)
def test_resolve_pins(spec, host, port, addrs):
    pin = parse_resolve(spec)
    assert (pin.host.text, pin.port, pin.addresses) == (host, port, addrs)


@pytest.mark.parametrize(
    "spec", ["api.test:443", "api.test:x:127.0.0.1", "api.test:443:localhost", "api.test:443:0177.0.0.1",
             "api.test:443:", "[::1:80:::1"],
)
def test_resolve_pin_errors(spec):
    with pytest.raises(StepError) as info:
        parse_resolve(spec)
    assert info.value.step == "net.rules" and "--resolve" in info.value.action


def test_conflicting_pins_are_refused():
    with pytest.raises(StepError, match="already pinned"):
        parse_pins(["a.test:443:127.0.0.1", "a.test:443:127.0.0.2"])


# -- host canonicalization -------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, kind, text",
    [
        ("127.0.0.1", "ipv4", "127.0.0.1"),
        ("0177.0.0.1", "ipv4", "127.0.0.1"),
        ("2130706433", "ipv4", "127.0.0.1"),
        ("0x7f.1", "ipv4", "127.0.0.1"),
        ("0x7F000001", "ipv4", "127.0.0.1"),
        ("127.1", "ipv4", "127.0.0.1"),
        ("127.0.1", "ipv4", "127.0.0.1"),
        ("017700000001", "ipv4", "127.0.0.1"),
        ("127.0.0.1.", "ipv4", "127.0.0.1"),
        ("[::1]", "ipv6", "::1"),
        ("[0:0:0:0:0:0:0:1]", "ipv6", "::1"),
        ("[::ffff:127.0.0.1]", "ipv6", "::ffff:7f00:1"),
        ("localhost.", "name", "localhost"),
        ("LocalHost", "name", "localhost"),
        ("Api.Example.COM.", "name", "api.example.com"),
    ],
)
def test_normalize_host(raw, kind, text):
    assert normalize_host(raw) == rules.Host(kind, text)


@pytest.mark.parametrize(
    "raw", ["", "a..b", "example.com..", "1.2.3.4.5", "256.1.1.1", "1.2.3.0x100", "08.1.1.1",
            "[::1%eth0]", "[::1", "a b", "host/x", "x" * 64 + ".com", "ex@mple.com", "abc.0x1f", "abc.123"],
)
def test_malformed_hosts(raw):
    with pytest.raises(rules.HostError):
        normalize_host(raw)


# -- decisions -------------------------------------------------------------------------


def test_exact_name_default_ports_only():
    p = policy("example.com")
    assert p.decide("example.com", 443, PUBLIC).allowed
    assert p.decide("example.com", 80, PUBLIC).allowed
    d = p.decide("example.com", 8443, PUBLIC)
    assert (d.allowed, d.code) == (False, "port-not-allowed")
    assert d.fix == "nsbox run --allow-domain example.com:8443"
    assert "allowed ports: 80, 443" in d.reason
    assert p.decide("api.example.com", 443, PUBLIC).code == "not-allowed"


def test_wildcard_matches_subdomains_not_the_apex():
    p = policy("*.example.com")
    assert p.decide("api.example.com", 443, PUBLIC).allowed
    assert p.decide("deep.sub.example.com", 443, PUBLIC).allowed
    assert not p.decide("example.com", 443, PUBLIC).allowed
    assert not p.decide("badexample.com", 443, PUBLIC).allowed


def test_explicit_port_replaces_defaults():
    p = policy("example.com:8443")
    assert p.decide("example.com", 8443, PUBLIC).allowed
    assert p.decide("example.com", 443, PUBLIC).code == "port-not-allowed"


def test_deny_wins_regardless_of_order_and_covers_every_port():
    for entries in (("*.example.com", "!api.example.com"), ("!api.example.com", "*.example.com")):
        p = policy(*entries, "api.example.com:8443")
        for port in (443, 80, 8443):
            d = p.decide("api.example.com", port, no_dns)
            assert (d.allowed, d.code) == (False, "denied-rule")
            assert "!api.example.com" in d.reason
        assert p.decide("deep.sub.example.com", 443, PUBLIC).allowed


def test_deny_with_port_only_denies_that_port():
    p = policy("example.com", "!example.com:80")
    assert p.decide("example.com", 443, PUBLIC).allowed
    assert p.decide("example.com", 80, PUBLIC).code == "denied-rule"


def test_not_allowed_tells_how_to_allow():
    d = policy("example.com").decide("other.example.org", 443, no_dns)
    assert not d.allowed and d.code == "not-allowed"
    assert d.fix is not None and "nsbox run --allow-domain other.example.org" in d.fix
    assert "other.example.org is not in the allowlist" in d.reason


def test_allowed_decision_carries_the_checked_addresses():
    d = policy("api.example.com").decide("API.example.com.", 443, PUBLIC)
    assert d.allowed and d.host == "api.example.com"
    assert d.addresses == ("93.184.215.15", "2606:2800:21f:cb07:6820:80da:af6b:8b2c")


def test_unresolvable_name_is_refused():
    d = policy("nowhere.example.com").decide("nowhere.example.com", 443, PUBLIC)
    assert (d.allowed, d.code) == (False, "unresolvable")


@pytest.mark.parametrize(
    "name, words",
    [
        ("internal.example.com", "private"),
        ("rebind.example.com", "loopback"),
        ("meta.example.com", "cloud metadata"),
        ("v6meta.example.com", "cloud metadata"),
        ("mapped.example.com", "private"),
        ("cgnat.example.com", "CGNAT"),
    ],
)
def test_allowed_name_resolving_to_a_blocked_address_is_refused(name, words):
    d = policy("*.example.com").decide(name, 443, PUBLIC)
    assert (d.allowed, d.code) == (False, "blocked-address")
    assert words in d.reason
    assert d.fix is not None and f"--resolve {name}:443:" in d.fix


def test_pin_skips_dns_and_address_checks_but_not_the_allowlist():
    pins = ["internal.example.com:443:127.0.0.1"]
    d = policy("internal.example.com", pins=pins).decide("internal.example.com", 443, no_dns)
    assert (d.allowed, d.code, d.addresses) == (True, "pinned", ("127.0.0.1",))
    # pinned but not allowed: still refused
    assert policy("example.com", pins=pins).decide("internal.example.com", 443, no_dns).code == "not-allowed"
    # a pin is per port: 80 is resolved normally (and refused: private)
    assert policy("internal.example.com", pins=pins).decide("internal.example.com", 80, PUBLIC).code == (
        "blocked-address"
    )
    # deny still wins over a pin
    d = policy("*.example.com", "!internal.example.com", pins=pins).decide("internal.example.com", 443, no_dns)
    assert d.code == "denied-rule"


# The SSRF battery (security.md #32): all refused, even when "allowed" by an entry,
# and none of them may reach the resolver.
SSRF = [
    "127.0.0.1", "0177.0.0.1", "2130706433", "0x7f.1", "0x7f000001", "127.1", "[::1]",
    "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:127.0.0.1]", "0.0.0.0", "0", "[::]",
    "169.254.169.254", "0xa9fea9fe", "[fd00:ec2::254]", "10.0.0.1", "192.168.1.1", "100.64.0.1",
    "224.0.0.1", "[fe80::1]", "[64:ff9b::7f00:1]", "[2002:7f00:1::]", "8.8.8.8", "[2001:4860::8888]",
]


@pytest.mark.parametrize("host", SSRF)
def test_ssrf_literals_are_refused(host):
    p = Policy(parse_cli_entries(["*.example.com", host.strip("[]") if ":" not in host else host]))
    for port in (80, 443):
        d = p.decide(host, port, no_dns)
        assert not d.allowed, d
        assert d.code == "literal-ip", d


@pytest.mark.parametrize("host", ["localhost", "localhost.", "LOCALHOST", "foo.localhost"])
def test_localhost_names_are_refused_without_lookup(host):
    d = policy("localhost", "foo.localhost").decide(host, 443, no_dns)
    assert (d.allowed, d.code) == (False, "localhost")


def test_literal_ip_allowed_only_when_pinned_and_listed():
    p = policy("127.0.0.1:8080", pins=["127.0.0.1:8080:127.0.0.1"])
    for spelling in ("127.0.0.1", "0177.0.0.1", "2130706433", "127.1"):
        d = p.decide(spelling, 8080, no_dns)
        assert (d.allowed, d.addresses) == (True, ("127.0.0.1",)), spelling
    assert not p.decide("127.0.0.1", 8081, no_dns).allowed


@pytest.mark.parametrize(
    "addr, blocked",
    [
        ("8.8.8.8", False), ("2606:4700::1111", False), ("1.1.1.1", False),
        ("127.0.0.53", True), ("10.255.255.53", True), ("172.31.0.1", True), ("192.168.0.1", True),
        ("169.254.1.1", True), ("100.127.255.255", True), ("0.1.2.3", True), ("255.255.255.255", True),
        ("240.0.0.1", True), ("239.1.1.1", True), ("198.18.0.1", True), ("192.0.0.170", True),
        ("::1", True), ("::", True), ("fe80::1", True), ("fc00::1", True), ("ff02::1", True),
        ("::ffff:8.8.8.8", True), ("::ffff:192.168.0.1", True), ("64:ff9b::a00:1", True),
        ("64:ff9b::808:808", False), ("2002:c0a8:1::1", True), ("2001:db8::1", True), ("::127.0.0.1", True),
    ],
)
def test_blocked_reason_table(addr, blocked):
    assert (blocked_reason(addr) is not None) == blocked


# -- properties ------------------------------------------------------------------------


def _spellings(value: int) -> st.SearchStrategy[str]:
    """Every way inet_aton and browsers read an IPv4 address: 1-4 parts, each decimal,
    octal (leading 0) or hex (0x, any case), optional trailing dot."""
    octets = value.to_bytes(4, "big")

    def parts_for(n: int) -> list[int]:
        head = list(octets[: n - 1])
        tail = int.from_bytes(octets[n - 1 :], "big")
        return [*head, tail]

    def fmt(num: int, style: str) -> str:
        if style == "dec":
            return str(num)
        if style == "oct":
            return "0" + format(num, "o")
        return ("0x" if style == "hex" else "0X") + format(num, "x" if style == "hex" else "X")

    return st.integers(1, 4).flatmap(
        lambda n: st.tuples(
            st.lists(st.sampled_from(["dec", "oct", "hex", "HEX"]), min_size=n, max_size=n),
            st.booleans(),
        ).map(lambda t: ".".join(fmt(x, s) for x, s in zip(parts_for(n), t[0], strict=True)) + ("." if t[1] else ""))
    )


loopback_v4 = st.integers(0x7F000000, 0x7FFFFFFF)


@settings(database=None)
@given(loopback_v4.flatmap(lambda v: st.tuples(st.just(v), _spellings(v))))
def test_every_ipv4_spelling_of_loopback_is_literal_and_refused(pair):
    value, spelling = pair
    host = normalize_host(spelling)
    assert host == rules.Host("ipv4", str(ipaddress.IPv4Address(value)))
    d = policy("*.example.com", str(ipaddress.IPv4Address(value))).decide(spelling, 443, no_dns)
    assert not d.allowed and d.code == "literal-ip"


@settings(database=None)
@given(loopback_v4, st.sampled_from(["::ffff:{}", "::ffff:{}", "64:ff9b::{}", "::{}"]))
def test_ipv6_embeddings_of_loopback_are_blocked(value, template):
    v4 = str(ipaddress.IPv4Address(value))
    addr = template.format(v4)
    assert blocked_reason(addr) is not None
    d = policy("*.example.com").decide(f"[{addr}]", 443, no_dns)
    assert not d.allowed


@settings(database=None)
@given(st.ip_addresses())
def test_blocked_agrees_with_is_global_for_non_global(addr):
    # Anything Python itself calls non-global must be refused; our list is a superset.
    if not addr.is_global:
        assert blocked_reason(addr) is not None


_LABEL = r"[a-z]([a-z0-9-]{0,9}[a-z0-9])?"


@settings(database=None)
@given(st.from_regex(rf"{_LABEL}(\.{_LABEL}){{0,3}}\.(com|org|test)", fullmatch=True))
def test_names_round_trip_and_match_themselves(name):
    assert normalize_host(name.upper() + ".") == rules.Host("name", name)
    p = policy(name)
    assert p.decide(name.upper(), 443, table({name: ["93.184.215.14"]})).allowed
    assert not policy(f"*.{name}").decide(name, 443, no_dns).allowed
