"""caps.drop and nnp.enable against the real kernel.

The probe runs inside `unshare --user --map-root-user`, where it is uid 0 with every
capability of its namespace: the strongest case, since without NOROOT an execve as uid 0
would hand the full set straight back.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nsbox.layers import caps, nnp

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare not installed")

ZERO = "0000000000000000"


def in_userns(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(body))
    proc = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and "unshare failed" in proc.stderr:
        pytest.skip(f"unprivileged user namespaces unavailable: {proc.stderr.strip()}")
    return proc


def status_fields(text: str) -> dict[str, str]:
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def test_caps_exist_before_the_drop(tmp_path: Path) -> None:
    # Without this the test below could pass because there was nothing to drop.
    proc = in_userns(tmp_path, 'import os; os.execv("/bin/cat", ["cat", "/proc/self/status"])\n')
    fields = status_fields(proc.stdout)
    assert fields["CapBnd"] != ZERO and fields["CapEff"] != ZERO


def test_drop_leaves_every_set_empty_after_execve_even_as_uid0(tmp_path: Path) -> None:
    proc = in_userns(tmp_path, """
        import os
        from nsbox.layers import caps, nnp
        caps.drop(caps.plan())
        nnp.enable(nnp.plan())
        assert os.getuid() == 0
        os.execv("/bin/sh", ["sh", "-c", "cat /proc/self/status; sh -c 'cat /proc/self/status' | sed s/^/child-/"])
    """)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    own = status_fields("\n".join(line for line in lines if not line.startswith("child-")))
    child = status_fields("\n".join(line[6:] for line in lines if line.startswith("child-")))
    expected = {**caps.plan().expected_status(), **nnp.plan().expected_status()}
    for fields in (own, child):
        assert {k: fields[k] for k in expected} == expected


def test_securebits_are_locked_so_caps_cannot_come_back(tmp_path: Path) -> None:
    proc = in_userns(tmp_path, """
        import errno
        from nsbox import syscalls
        from nsbox.layers import caps
        caps.drop()
        print(syscalls.prctl(27))  # PR_GET_SECUREBITS
        try:
            syscalls.prctl(caps.PR_SET_SECUREBITS, 0)
        except OSError as e:
            print(errno.errorcode[e.errno])
    """)
    assert proc.returncode == 0, proc.stderr
    bits, refused = proc.stdout.split()
    assert int(bits) == caps.SECUREBITS and refused == "EPERM"
