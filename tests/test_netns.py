"""Network namespace: only lo, up; the host's loopback is another address space."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from conftest import NSBOX, sh

from nsbox.layers import netns

PROBE = """
import errno, socket, sys
s = socket.socket()
s.settimeout(5)
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
    print("connected")
except OSError as e:
    print(errno.errorcode[e.errno])
"""


def test_only_lo_exists_and_is_up(nsbox):
    r = nsbox(cmd=sh("ip -o link; tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '"))
    assert r.returncode == 0, r.stderr
    links = [line for line in r.stdout.splitlines() if ": " in line]
    assert len(links) == 1 and links[0].split(": ")[1] == "lo"
    assert "UP" in links[0].split("<")[1].split(">")[0].split(",")
    assert r.stdout.splitlines()[-1] == "lo"


def test_a_listener_on_the_hosts_loopback_is_unreachable(nsbox):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        r = nsbox(cmd=["/usr/bin/python3", "-c", PROBE, str(port)])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ECONNREFUSED"


def test_loopback_inside_works(nsbox):
    code = ("import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(); "
            "c=socket.create_connection(s.getsockname()); a,_=s.accept(); c.send(b'ok'); print(a.recv(2).decode())")
    assert nsbox(cmd=["/usr/bin/python3", "-c", code]).stdout.strip() == "ok"


@pytest.mark.skipif(not os.path.exists("/proc/sys/net/ipv6"), reason="this kernel has no IPv6")
def test_lo_comes_up_with_ipv6_too(nsbox):
    # The ioctl sets IFF_UP only; the kernel adds ::1 to lo as it comes up, as it does 127.0.0.1.
    code = ("import socket; s=socket.socket(socket.AF_INET6); s.bind(('::1',0)); s.listen(); "
            "c=socket.create_connection(s.getsockname()[:2]); a,_=s.accept(); c.send(b'ok'); print(a.recv(2).decode())")
    r = nsbox(cmd=["/usr/bin/python3", "-c", code])
    assert r.stdout.strip() == "ok", r.stderr


def test_importing_the_launcher_does_not_import_pyroute2():
    code = 'import nsbox.launch, sys; assert "pyroute2" not in sys.modules, "pyroute2 imported"'
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_a_run_imports_no_pyroute2_and_verify_does(env, project):
    # -X importtime reports every import of the launcher and of its forked children.
    def imports(*args: str, cmd: tuple[str, ...] = ()) -> str:
        r = subprocess.run([sys.executable, "-X", "importtime", *NSBOX[1:], *args, str(project), *cmd], env=env,
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stderr
    assert "pyroute2" not in imports("run", "--network", "none", cmd=("--", "/bin/true"))
    assert "pyroute2" in imports("verify")  # the check above can see pyroute2 when it is imported


def test_links_over_rtnetlink_import_nothing_after_load_netlink():
    # The probe calls links() after pivot_root, where no module can be imported: everything
    # pyroute2 needs on first use must come with load_netlink().
    code = ("import sys\n"
            "from nsbox.layers import netns\n"
            "netns.load_netlink()\n"
            "before = set(sys.modules)\n"
            "links = netns.links()\n"
            "print(sorted(set(sys.modules) - before))\n"
            "print([link.name for link in links if link.up and '127.0.0.1/8' in link.addresses])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["[]", "['lo']"]


def test_the_plan_never_prints_the_api_key(tmp_path):
    key = "sk-ant-api03-REAL-secret-key-0123456789abcdefghijklmnopqrstuvwxyz"
    plan = netns.plan("allowlist", ("example.com",), (), key, None, tmp_path)
    assert plan.proxy is not None and plan.proxy.api is not None  # the key is in there
    for shown in (repr(plan), str(plan), f"{plan}", repr((plan,)), "\n".join(plan.describe())):
        assert key not in shown
    assert repr(plan) == f"NetNsPlan(mode='allowlist', rules_source={plan.rules_source!r})"


def test_hostname_is_nsbox_and_settable(nsbox):
    assert nsbox(cmd=["hostname"]).stdout.strip() == "nsbox"
    assert nsbox("--hostname", "box-7", cmd=["hostname"]).stdout.strip() == "box-7"
    r = nsbox(cmd=sh("hostname evil 2>&1; hostname"))
    assert r.stdout.splitlines()[-1] == "nsbox"
