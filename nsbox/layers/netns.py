"""Network namespace: the agent's own network stack, with only a loopback interface.

A new network namespace has one interface, `lo`, and it is down. init brings it up
with the two ioctls of ifconfig (SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP) on a
plain datagram socket, so programs inside can talk to themselves on 127.0.0.1 (and
::1: the kernel gives lo both addresses as it comes up). Nothing else exists: the
host's interfaces, its loopback (a service on the host's 127.0.0.1 is a different
address space), its routes and its abstract unix sockets are all out of reach, and no
name resolves (no DNS server is reachable).

Three modes (`--network`):

    none        only lo. The default for any command but the agent.
    allowlist   only lo, plus the proxy: init binds 127.0.0.1:3128 inside and passes the
                listening socket to the launcher (SCM_RIGHTS), which serves it from the
                host's namespace (nsbox.net). HTTP_PROXY/HTTPS_PROXY point at it; names
                resolve on the host, against the allowlist. The default for the agent.
    host        no network namespace: the host's network, unfiltered. Said loudly.

Kernel docs: network_namespaces(7), rtnetlink(7), unix(7) SCM_RIGHTS.
Order:       unshared by the holder; lo brought up and the proxy socket bound by init
             while it still holds CAP_NET_ADMIN in the namespace's owner; the launcher
             serves the socket after its last fork.
Verify:      /proc/net/dev lists only lo; lo is UP; connecting to a listener on the
             host's 127.0.0.1 fails with ECONNREFUSED; through the proxy an allowed name
             answers and any other gets 403. `nsbox verify` also reads lo back over
             rtnetlink (`links()`), as `ip addr` would: UP, with its loopback addresses.

pyroute2 (rtnetlink) is for that check only. Importing it costs about 150 ms, so a run
never does: `nsbox verify` calls `load_netlink()` in the launcher before the first fork,
and the probe, in the agent after pivot_root (where an image has no Python library),
finds it already in memory.
"""

from __future__ import annotations

import fcntl
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from nsbox.errors import acting, usage_error

if TYPE_CHECKING:
    from nsbox import net

PROXY_PORT = 3128  # inside the sandbox's own network namespace: no clash with the host
# Without an allowed-domains.txt, the agent may reach its API and nothing else.
DEFAULT_ALLOWED = ("api.anthropic.com",)

# netdevice(7): the interface ioctls work on any socket; the kernel checks CAP_NET_ADMIN
# in the user namespace that owns the socket's network namespace.
SIOCGIFFLAGS = 0x8913  # linux/sockios.h
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1  # linux/if.h
# struct ifreq: ifr_name[IFNAMSIZ = 16], then a 24-byte union whose first member is the
# short ifr_flags (the union's size is that of struct ifmap): 40 bytes in all on 64-bit,
# 32 on 32-bit (where the kernel copies only those; the longer buffer is harmless).
IFREQ_FLAGS = struct.Struct("=16sH22x")

# pyroute2.IPRoute once load_netlink() has run: never imported at module load (150 ms).
_IPRoute: Any = None


class Link(NamedTuple):
    """One interface as rtnetlink reports it (RTM_GETLINK and RTM_GETADDR dumps)."""

    name: str
    up: bool  # IFF_UP, the administrative state that bring_up_loopback sets
    operstate: str  # "UNKNOWN" for lo: it has no carrier to report, up or not
    addresses: tuple[str, ...]  # "127.0.0.1/8", "::1/128": IPv4 first, then IPv6


class NetNsPlan(NamedTuple):
    mode: str
    proxy: net.ProxyConfig | None = None  # holds the real API key: never printed (see __repr__)
    rules_source: str = ""

    def __repr__(self) -> str:
        return f"NetNsPlan(mode={self.mode!r}, rules_source={self.rules_source!r})"  # no proxy: it holds the key

    @property
    def unshare(self) -> bool:
        return self.mode != "host"

    def describe(self) -> list[str]:
        if self.mode == "host":
            return ["NO network namespace (--network host): the agent uses the host's network, unfiltered"]
        lines = ["new network namespace: only lo, brought up; no route out, no DNS"]
        if self.proxy is not None:
            lines.append(f"allowlist proxy on 127.0.0.1:{PROXY_PORT} inside, served by the launcher; "
                         f"rules from {self.rules_source}:")
            for rule in self.proxy.rules:
                name = ("*." if rule.wildcard else "") + rule.host.text
                ports = ",".join(map(str, sorted(rule.ports))) if rule.ports else ("all" if rule.deny else "80,443")
                lines.append(f"  {'deny ' if rule.deny else 'allow'} {name} ports {ports}   ({rule.source})")
            for pin in self.proxy.pins:
                lines.append(f"  pinned {pin.host.text}:{pin.port} -> {', '.join(pin.addresses)} (--resolve)")
            if self.proxy.api is not None:
                a = self.proxy.api
                lines.append(f"  API key injected into http://{a.host} requests, sent to {a.upstream_scheme}://"
                             f"{a.upstream_host}:{a.upstream_port}; the agent holds a placeholder")
        return lines


def plan(mode: str, allow_domains: tuple[str, ...], resolve: tuple[str, ...], api_key: str | None,
         api_upstream: str | None, config_dir: Path) -> NetNsPlan:
    """Parse the rules (before any fork: bad input fails here, as StepError("net.rules"))."""
    if mode != "allowlist":
        if allow_domains or resolve:
            raise usage_error("spec.validate", "--allow-domain and --resolve need --network allowlist",
                              fix="add --network allowlist")
        return NetNsPlan(mode)
    # nsbox.net (the proxy: http parsing, ssl, threads) is the launcher's alone, and only
    # in allowlist mode: loaded here, not at import, so other runs start faster.
    from nsbox import net

    path = config_dir / "allowed-domains.txt"
    if path.exists():
        rules, source = net.parse_rules_file(path), str(path)
    else:
        rules, source = net.parse_cli_entries(DEFAULT_ALLOWED, flag="built-in default"), "the built-in default"
    if allow_domains:
        rules += net.parse_cli_entries(allow_domains)
        source += " and --allow-domain"
    api = None
    if api_key:
        try:
            api = (net.ApiKeyInjection.from_url(api_key, api_upstream) if api_upstream
                   else net.ApiKeyInjection(key=api_key))
        except ValueError as e:
            raise usage_error("spec.validate", str(e), fix="--api-upstream https://HOST[:PORT]") from None
    config = net.ProxyConfig(rules=rules, pins=net.parse_pins(resolve), api=api)
    return NetNsPlan(mode, config, source)


def environment(p: NetNsPlan) -> dict[str, str]:
    """What the agent's environment needs for this mode (proxy variables, placeholder key)."""
    if p.proxy is None:
        return {}
    from nsbox import net  # loaded by plan() already; allowlist mode only

    env = net.proxy_env(PROXY_PORT)
    if p.proxy.api is not None:
        env.update(net.api_key_env())
    return env


def bring_up_loopback(p: NetNsPlan) -> None:
    """Role INIT: lo up (in host mode there is nothing of ours to configure)."""
    if not p.unshare:
        return
    # ifconfig's way rather than RTM_NEWLINK: two ioctls, no netlink library to import.
    # The flags are read first so that only IFF_UP changes.
    with acting("netns.bring_up_loopback", "ioctl(SIOCSIFFLAGS, lo, IFF_UP)"), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        _, flags = IFREQ_FLAGS.unpack(fcntl.ioctl(s, SIOCGIFFLAGS, IFREQ_FLAGS.pack(b"lo", 0)))
        fcntl.ioctl(s, SIOCSIFFLAGS, IFREQ_FLAGS.pack(b"lo", flags | IFF_UP))


def load_netlink() -> None:
    """Role LAUNCHER, nsbox verify only, before any fork: import pyroute2 for `links()`.

    The probe runs in the agent after pivot_root, where nothing can be imported (an
    image has no Python library; the host root's has no venv): what it uses must already
    be in sys.modules. Importing pyroute2 loads everything its IPRoute needs (asyncio
    included); reading links and addresses imports nothing more.
    """
    global _IPRoute
    from pyroute2 import IPRoute  # untyped library (mypy override in pyproject.toml); imported here only

    _IPRoute = IPRoute


def links() -> list[Link]:
    """Every interface of this network namespace, read over rtnetlink with pyroute2.

    A second witness beside the ioctl that set the flag: the kernel's RTM_GETLINK and
    RTM_GETADDR answers, what `ip addr` shows. Needs `load_netlink()` first.
    """
    if _IPRoute is None:
        raise RuntimeError("netns.load_netlink() was not called before the fork")
    with _IPRoute() as ipr:
        addresses: dict[int, list[tuple[int, str]]] = {}
        for a in ipr.get_addr():
            addresses.setdefault(a["index"], []).append((a["family"], f"{a.get('address')}/{a['prefixlen']}"))
        return [Link(name=str(link.get("ifname")), up=bool(link["flags"] & IFF_UP),
                     operstate=str(link.get("operstate")),
                     addresses=tuple(text for _, text in sorted(addresses.get(link["index"], []))))
                for link in ipr.get_links()]


def open_proxy_socket(p: NetNsPlan) -> socket.socket | None:
    """Role INIT: the proxy's listening socket, bound inside; the launcher will serve it."""
    if p.proxy is None:
        return None
    with acting("netns.open_proxy_socket", f"bind(127.0.0.1:{PROXY_PORT}) and listen()"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", PROXY_PORT))
        sock.listen(256)
    return sock


def serve(p: NetNsPlan, fd: int, on_event: net.EventSink) -> net.ProxyServer:
    """Role LAUNCHER, after its last fork: serve the socket init passed over (threads)."""
    assert p.proxy is not None
    from nsbox import net  # loaded by plan() already, before any fork

    server = net.ProxyServer(socket.socket(fileno=fd), p.proxy, on_event)
    server.start()
    return server
