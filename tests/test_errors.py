"""Errors: the first line names the step and the call; exit 125 for nsbox's own failures."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import NSBOX

from nsbox.errors import StepError
from nsbox.hints import explain

FIRST_LINE = re.compile(r"^nsbox: [a-z]+\.[a-z_]+: ")


def test_missing_project_is_125_with_a_fix(env, tmp_path):
    r = subprocess.run([*NSBOX, "run", str(tmp_path / "nope"), "--", "true"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 125
    assert FIRST_LINE.match(r.stderr), r.stderr
    assert "spec.validate" in r.stderr and "fix:" in r.stderr


@pytest.mark.parametrize("args", [["--bogus-flag"], ["--uid", "notanumber"], ["--hostname", "bad_name!"],
                                  ["--name", "../escape"], ["--env", "1BAD=x"]])
def test_bad_flags_are_125_and_say_so(env, project, args):
    r = subprocess.run([*NSBOX, "run", *args, str(project), "--", "true"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 125, r.stderr
    assert r.stderr.startswith("nsbox: "), r.stderr
    assert "Traceback" not in r.stderr


def test_render_shape():
    err = explain(StepError("userns.unshare", "unshare(CLONE_NEWUSER)", 28))
    lines = err.render().splitlines()
    assert lines[0] == ("nsbox: userns.unshare: unshare(CLONE_NEWUSER) failed: No space left on device (ENOSPC)")
    assert lines[1].startswith("  why: ") and "max_user_namespaces" in lines[1]
    assert lines[2].startswith("  fix: ")


def test_userns_enospc_is_explained_for_real(env, project):
    # Inside an outer user namespace whose max_user_namespaces is 0, nsbox's own unshare
    # fails with the real ENOSPC, and the hint says why (bubblewrap's --disable-userns trick).
    script = (f"echo 0 > /proc/sys/user/max_user_namespaces && exec {sys.executable} -m nsbox run "
              f"{project} -- true")
    r = subprocess.run(["unshare", "--user", "--map-root-user", "/bin/sh", "-c", script], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 125, r.stderr
    assert r.stderr.startswith("nsbox: userns.unshare: unshare(CLONE_NEWUSER) failed: No space left on device (ENOSPC)")
    assert "max_user_namespaces is 0" in r.stderr
