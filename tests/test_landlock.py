"""landlock.plan and landlock.restrict against the real kernel (ABI 7 on these machines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from nsbox.errors import StepError
from nsbox.layers import landlock

ABI, WHY_NOT = landlock.probe_abi()
needs_landlock = pytest.mark.skipif(ABI == 0, reason=f"no Landlock here: {WHY_NOT}")


def test_plan_without_landlock_says_so_plainly() -> None:
    plan = landlock.plan(writable=["/tmp"], readable=["/"], abi=0)
    assert not plan.enabled
    assert plan.describe()[0].startswith("Landlock NOT applied")
    landlock.restrict(plan)  # a no-op: this process is not restricted afterwards
    assert Path("/proc/self/status").read_text()


def test_plan_handles_every_right_of_the_abi_and_grants_devices_minimally() -> None:
    plan = landlock.plan(writable=["/project"], readable=["/"], abi=7)
    assert plan.handled_fs == (1 << 16) - 1
    assert plan.scoped == landlock.SCOPE_ABSTRACT_UNIX_SOCKET | landlock.SCOPE_SIGNAL
    rights = dict(plan.rules)
    assert rights["/"] == landlock.READ_EXEC
    assert rights["/project"] == plan.handled_fs
    assert not rights["/dev"] & (landlock.MAKE_CHAR | landlock.MAKE_REG | landlock.REMOVE_FILE)
    assert landlock.plan(writable=[], readable=["/"], abi=3).scoped == 0
    assert landlock.plan(writable=[], readable=["/"], abi=1).handled_fs == (1 << 13) - 1


def test_relative_paths_are_refused() -> None:
    with pytest.raises(StepError, match="absolute"):
        landlock.plan(writable=["tmp"], readable=["/"])


@needs_landlock
def test_writes_outside_the_writable_roots_get_eacces(tmp_path: Path) -> None:
    writable, outside = tmp_path / "w", tmp_path / "outside"
    writable.mkdir()
    outside.mkdir()
    (writable / "moveme").write_text("x")
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(f"""
        import errno, json, os, sys
        from nsbox.layers import landlock, nnp
        def attempt(fn):
            try:
                fn()
                return "ok"
            except OSError as e:
                return errno.errorcode[e.errno]
        plan = landlock.plan(writable=[{str(writable)!r}], readable=["/"])
        nnp.enable()
        landlock.restrict(plan)
        print(json.dumps({{
            "write_inside": attempt(lambda: open({str(writable / "new")!r}, "w").close()),
            "write_outside": attempt(lambda: open({str(outside / "new")!r}, "w").close()),
            "mkdir_outside": attempt(lambda: os.mkdir({str(outside / "d")!r})),
            "rename_out": attempt(lambda: os.rename({str(writable / "moveme")!r}, {str(outside / "moved")!r})),
            "read_outside": attempt(lambda: open("/etc/passwd").read()),
            "signal_parent": attempt(lambda: os.kill(os.getppid(), 0)),
        }}))
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    r: dict[str, Any] = json.loads(proc.stdout)
    assert r["write_inside"] == "ok" and r["read_outside"] == "ok"
    assert (r["write_outside"], r["mkdir_outside"]) == ("EACCES", "EACCES")
    assert r["rename_out"] in ("EXDEV", "EACCES")  # ABI 2 REFER: no moving files out
    assert r["signal_parent"] == ("EPERM" if ABI >= 6 else "ok")  # pytest is outside the domain
    assert not (outside / "new").exists() and (writable / "moveme").exists()
    assert os.listdir(outside) == []
