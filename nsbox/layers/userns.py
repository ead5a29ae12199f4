"""User namespace: who the agent is inside.

An unprivileged process may create a user namespace and map exactly one id: its own.
nsbox maps the caller's uid/gid to one non-root id inside (default 1000; Claude Code
refuses --dangerously-skip-permissions as uid 0):

    host uid 1001  ──uid_map "1000 1001 1"──▶  uid 1000 inside

The holder and init keep every capability *in the new namespace* (they were granted at
unshare time, whatever the mapped uid), which is what lets them mount and configure the
network. The agent loses them at execve, because its uid inside is not 0. Every other
host id shows up inside as the overflow id 65534 ("nobody"), and cannot be acted as.
`setgroups` is denied first: an unprivileged writer must do so before writing gid_map,
otherwise it could drop supplementary groups used as deny-lists (CVE-2014-8989).

Kernel docs: user_namespaces(7), Documentation/admin-guide/namespaces/.
Order:       first. The holder unshares it; every namespace created afterwards is owned
             by it. The launcher writes the maps while the holder waits.
Verify:      /proc/self/uid_map has exactly one line "<uid> <host uid> 1";
             /proc/sys/user/max_user_namespaces is 0 (no nested user namespace);
             /proc/self/setgroups is "deny"; `id -u` prints the chosen uid.
"""

from __future__ import annotations

import os
import pwd
from typing import NamedTuple

from nsbox import syscalls
from nsbox.errors import acting
from nsbox.spec import SandboxSpec
from nsbox.syscalls import CloneFlag


class UserNsPlan(NamedTuple):
    outside_uid: int
    outside_gid: int
    inside_uid: int
    inside_gid: int
    user: str  # the agent's user name inside
    home: str  # its $HOME inside
    shell: str

    def describe(self) -> list[str]:
        return [
            f"new user namespace: host uid {self.outside_uid} -> uid {self.inside_uid} inside, "
            f"host gid {self.outside_gid} -> gid {self.inside_gid} (one id each, setgroups denied)",
            f"agent runs as {self.user} (uid {self.inside_uid}), HOME={self.home}",
        ]

    def passwd(self) -> str:
        """The /etc/passwd the sandbox sees: root, the agent's user, nobody. Nothing of the host's."""
        return (
            "root:x:0:0:root:/root:/bin/sh\n"
            f"{self.user}:x:{self.inside_uid}:{self.inside_gid}:{self.user}:{self.home}:{self.shell}\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        )

    def group(self) -> str:
        return f"root:x:0:\n{self.user}:x:{self.inside_gid}:\nnogroup:x:65534:\n"


def plan(spec: SandboxSpec) -> UserNsPlan:
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = "agent"
    if spec.uid == 0:
        user = "root"
    elif user == "root" or not user.replace("-", "").replace("_", "").isalnum():
        user = "agent"
    home = "/root" if spec.uid == 0 else f"/home/{user}"
    shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
    assert spec.gid is not None
    return UserNsPlan(os.getuid(), os.getgid(), spec.uid, spec.gid, user, home, shell)


def unshare(p: UserNsPlan) -> None:
    """Role HOLDER: create the user namespace (its owner for everything that follows)."""
    with acting("userns.unshare", "unshare(CLONE_NEWUSER)"):
        syscalls.unshare(CloneFlag.CLONE_NEWUSER)


def disable_nesting(p: UserNsPlan) -> None:
    """Role HOLDER: no user namespace may be created inside this one (bubblewrap's --disable-userns).

    /proc/sys/user/max_user_namespaces is per user namespace and counts every namespace
    below it; the holder holds CAP_SYS_RESOURCE here, so it may lower it to 0. The
    seccomp profile refuses unshare/clone of namespaces too; this holds without it.
    """
    path = "/proc/sys/user/max_user_namespaces"
    with acting("userns.disable_nesting", f"write({path!r}, '0')"), open(path, "w") as f:
        f.write("0")


def write_maps(p: UserNsPlan, holder_pid: int) -> None:
    """Role LAUNCHER: deny setgroups, then map one gid and one uid, while the holder waits."""
    for name, content in (
        ("setgroups", "deny"),
        ("gid_map", f"{p.inside_gid} {p.outside_gid} 1\n"),
        ("uid_map", f"{p.inside_uid} {p.outside_uid} 1\n"),
    ):
        path = f"/proc/{holder_pid}/{name}"
        with acting("userns.write_maps", f"write({path!r}, {content.strip()!r})"), open(path, "w") as f:
            f.write(content)
