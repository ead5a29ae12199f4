"""UTS namespace: the agent's own host name (and NIS domain name).

Kernel docs: uts_namespaces(7), sethostname(2).
Order:       unshared by the holder with the other namespaces; set by init while it
             still has CAP_SYS_ADMIN in the user namespace.
Verify:      `hostname` prints the chosen name (default "nsbox"); the agent's own
             sethostname fails with EPERM (it has no capabilities).
"""

from __future__ import annotations

import socket
from typing import NamedTuple

from nsbox.errors import acting


class UtsNsPlan(NamedTuple):
    hostname: str

    def describe(self) -> list[str]:
        return [f"new UTS namespace: hostname {self.hostname!r}", "new IPC namespace: own SysV IPC and POSIX queues"]


def plan(hostname: str) -> UtsNsPlan:
    return UtsNsPlan(hostname)


def set_hostname(p: UtsNsPlan) -> None:
    with acting("utsns.set_hostname", f"sethostname({p.hostname!r})"):
        socket.sethostname(p.hostname)
