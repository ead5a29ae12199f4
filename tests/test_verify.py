"""`nsbox verify` through the real CLI: the battery passes, and each removed layer's checks fail."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import NSBOX

from nsbox import probe
from nsbox.layers import seccomp

LAYERS = {"userns", "pidns", "mountns", "netns", "utsns", "caps", "nnp", "seccomp", "landlock", "execve"}


def verify(env: dict[str, str], project: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NSBOX, "verify", *args, str(project)], env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]


def rows_of(r: subprocess.CompletedProcess[str]) -> tuple[dict[str, object], dict[tuple[str, str], dict[str, object]]]:
    out = json.loads(r.stdout)
    return out, {(row["layer"], row["check"]): row for row in out["checks"]}


def failing(rows: dict[tuple[str, str], dict[str, object]]) -> set[tuple[str, str]]:
    return {key for key, row in rows.items() if not row["ok"]}


def test_every_check_holds_in_host_mode(env, project):
    r = verify(env, project, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out, rows = rows_of(r)
    assert out["ok"] is True and not failing(rows)
    assert {layer for layer, _ in rows} == LAYERS
    # The battery's escapes were really tried, and answered by the layer that refuses them.
    assert rows["seccomp", "keyctl"]["actual"] == "EPERM"
    assert rows["seccomp", "socket(AF_VSOCK)"]["actual"] == "EAFNOSUPPORT"
    assert rows["seccomp", "ioctl TIOCSTI, high bits set"]["actual"] == "EPERM"
    assert rows["seccomp", "clone3"]["actual"] == "ENOSYS"
    assert rows["mountns", "create a file in /usr"]["actual"] == "EROFS"
    assert rows["pidns", "/proc/1/cmdline"]["actual"] == "nsbox:init"
    assert rows["netns", "interfaces"]["actual"] == "lo"
    # pyroute2, loaded by the launcher before the fork, reads lo back over rtnetlink.
    assert rows["netns", "lo over rtnetlink"]["actual"].startswith("UP 127.0.0.1/8")
    assert rows["caps", "after execve: all five sets"]["actual"] == "0"  # the host has /bin/sh
    assert [p.name for p in project.iterdir()] == ["README"]  # the probe removed its temp file


def test_the_table_and_the_verdict(env, project):
    r = verify(env, project)
    assert r.returncode == 0, r.stdout + r.stderr
    for layer in LAYERS:
        assert f"\n{layer}\n" in r.stdout
    assert r.stdout.rstrip().splitlines()[-1].endswith("checks, every check holds")


def test_an_fd_the_caller_leaked_is_not_kept_across_execve(env, project, tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)  # a host directory: CVE-2024-21626's shape
    try:
        r = verify(env, project, "--json", pass_fds=(fd,))
    finally:
        os.close(fd)
    assert r.returncode == 0, r.stdout + r.stderr
    assert rows_of(r)[1]["execve", "fds kept across execve"]["actual"] == "0 1 2"


def test_every_check_holds_with_the_busybox_image(env, project, imported):
    r = verify(env, project, "--image", "busybox", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    _, rows = rows_of(r)
    assert {layer for layer, _ in rows} == LAYERS
    # The image's root is its own writable overlay: no EROFS row, and its NSS code is not run.
    assert ("mountns", "create a file in /usr") not in rows
    assert rows["netns", "getaddrinfo(example.com)"]["actual"].startswith("not tried")
    # The image has no Python library: pyroute2 works there only because it was loaded before the fork.
    assert rows["netns", "lo over rtnetlink"]["ok"] and rows["netns", "lo over rtnetlink"]["actual"].startswith("UP ")
    assert rows["seccomp", "after execve: Seccomp"]["actual"] == "2"  # busybox's /bin/sh read it


def test_without_seccomp_shows_what_changed(env, project):
    r = verify(env, project, "--without", "seccomp", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "warning: --without seccomp" in r.stderr
    out, rows = rows_of(r)
    assert out["ok"] is False
    assert {layer for layer, _ in failing(rows)} == {"seccomp"}
    assert all(rows[k]["removed"] for k in failing(rows))
    changed = {(c["layer"], c["check"]): c for c in out["study"]["changed"]}
    for check in ("Seccomp", "keyctl", "bpf", "io_uring_setup", "socket(AF_VSOCK)", "clone3",
                  "ioctl TIOCSTI, high bits set", "after execve: Seccomp"):
        assert changed["seccomp", check]["full_ok"] and not changed["seccomp", check]["without_ok"], check
    # Unfiltered, the kernel itself answers: the call reached it.
    assert changed["seccomp", "clone3"]["without"].startswith("EFAULT")
    assert changed["seccomp", "socket(AF_VSOCK)"]["full"] == "EAFNOSUPPORT"
    # Nested user namespaces stay refused without seccomp, by max_user_namespaces=0 instead.
    nested = changed["userns", "unshare(CLONE_NEWUSER)"]
    assert (nested["full"], nested["without"], nested["without_ok"]) == ("EPERM", "ENOSPC", True)


def test_the_study_table_names_the_changes(env, project):
    r = verify(env, project, "--without", "seccomp")
    assert r.returncode == 1
    assert "Changed by --without seccomp" in r.stdout
    assert "clone3" in r.stdout.split("Changed by")[1] and "ENOSYS -> EFAULT" in r.stdout
    assert r.stdout.rstrip().endswith("FAILED (seccomp); removed: seccomp")


# What removing each layer really changes in the probe. The probe runs in the agent before
# execve: without caps.drop it still holds the user namespace's full permitted, effective and
# bounding sets (inheritable and ambient were never raised). execve as the non-root uid
# clears permitted and effective, but the bounding set survives: the after-execve row.
LESSONS = {
    "caps": {("caps", "CapPrm"), ("caps", "CapEff"), ("caps", "CapBnd"), ("caps", "after execve: all five sets")},
    "landlock": {("landlock", "open /proc/self/comm for writing"), ("landlock", "kill(1, 0) across the domain")},
}


@pytest.mark.parametrize("layer", ["caps", "landlock"])
def test_a_removed_layer_fails_its_own_checks_and_no_other(env, project, layer):
    r = verify(env, project, "--without", layer, "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    _, rows = rows_of(r)
    failed = failing(rows)
    if layer == "landlock":
        abi = rows.get(("landlock", "kill(1, 0) across the domain"))
        if abi is None:
            LESSONS["landlock"].discard(("landlock", "kill(1, 0) across the domain"))  # ABI < 6 kernel
    assert failed == LESSONS[layer], failed
    if layer == "caps":
        assert rows["caps", "CapInh"]["actual"] == rows["caps", "CapAmb"]["actual"] == probe.ZERO
        assert rows["caps", "after execve: all five sets"]["actual"].startswith("CapBnd=")
        assert rows["caps", "sethostname"]["actual"] == "EPERM"  # seccomp still refuses it


def test_the_probe_reads_the_profile_as_the_filter_does(tmp_path):
    plan = seccomp.plan(cache=tmp_path)
    assert probe.profile_answer(plan, "socket", (probe.AF_VSOCK, 1, 0)) == "errno EAFNOSUPPORT"
    assert probe.profile_answer(plan, "socket", (2, 1, 0)) == "allow"
    assert probe.profile_answer(plan, "ioctl", (0, probe.TIOCSTI_HIGH_BITS, 0)) == "errno EPERM"
    assert probe.profile_answer(plan, "ioctl", (0, 0x5401, 0)) == "allow"  # TCGETS
    assert probe.profile_answer(plan, "clone3", ()) == "errno ENOSYS"
    assert probe.profile_answer(plan, "no_such_call", ()) == plan.default_action == "errno ENOSYS"
