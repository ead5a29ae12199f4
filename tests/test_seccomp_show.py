"""`nsbox seccomp show`: the rules with their why, libseccomp's PFC, the BPF, and OCI JSON."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess

import pytest
from conftest import NSBOX, REPO
from test_privileges import DENIED


def show(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*NSBOX, "seccomp", "show", *args], env=env, capture_output=True, timeout=120)


def test_rules_with_their_why(env):
    out = show(env).stdout.decode()
    assert out.startswith("seccomp profile seccomp/default.toml")
    assert "keyctl" in out and "any other ABI (i386 int 0x80, x32) kills the process" in out


def test_pfc_and_bpf(env):
    assert "pseudo filter code start" in show(env, "--pfc").stdout.decode()
    bpf = show(env, "--bpf").stdout
    assert len(bpf) % 8 == 0 and len(bpf) > 8 * 100  # struct sock_filter[]: 8 bytes each


def test_a_bad_profile_is_a_clear_error(env):
    r = show(env, str(REPO / "tests" / "profiles" / "broken.toml"))
    assert r.returncode == 125 and r.stderr.decode().startswith("nsbox: seccomp.compile: ")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="probe syscall numbers are x86_64's")
def test_the_oci_export_enforces_the_same_denials(env, nsbox, project, tmp_path):
    exported = tmp_path / "default.json"
    exported.write_bytes(show(env, "--oci").stdout)
    data = json.loads(exported.read_text())
    assert data["defaultAction"] == "SCMP_ACT_ERRNO" and data["defaultErrnoRet"] == 38
    shutil.copy(REPO / "tests" / "probe.py", project / "probe.py")
    r = nsbox("--seccomp-profile", str(exported), cmd=["/usr/bin/python3", str(project / "probe.py"), "syscalls"])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert {k: got[k] for k in DENIED} == DENIED
