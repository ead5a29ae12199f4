"""Network namespace: the agent's own network stack, with only a loopback interface.

A new network namespace has one interface, `lo`, and it is down. init brings it up
(through netlink, with pyroute2), so programs inside can talk to themselves on
127.0.0.1. Nothing else exists: the host's interfaces, its loopback (a service on the
host's 127.0.0.1 is a different address space), its routes and abstract unix sockets
are all out of reach.

Kernel docs: network_namespaces(7), rtnetlink(7).
Order:       unshared by the holder; lo brought up by init while it still holds
             CAP_NET_ADMIN in the user namespace that owns this network namespace.
Verify:      /proc/net/dev lists only lo; lo is UP; connecting to a listener on the
             host's 127.0.0.1 fails with ECONNREFUSED.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyroute2 import IPRoute  # untyped library (mypy override in pyproject.toml); used here only

from nsbox.errors import acting


@dataclass(frozen=True)
class NetNsPlan:
    mode: str  # "none": loopback only

    def describe(self) -> list[str]:
        return ["new network namespace: only lo, brought up; no route out (--network none)"]


def plan(mode: str) -> NetNsPlan:
    return NetNsPlan(mode)


def bring_up_loopback(p: NetNsPlan) -> None:
    with acting("netns.bring_up_loopback", "RTM_NEWLINK lo up (pyroute2 IPRoute.link)"), IPRoute() as ipr:
        index = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=index, state="up")
