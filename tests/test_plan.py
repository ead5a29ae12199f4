"""`nsbox plan`: the launch sequence and every layer's describe(), and nothing changes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import NSBOX

from nsbox.launch import SEQUENCE
from nsbox.spec import REMOVABLE_LAYERS

LAYERS = ["userns", "mountns", "pidns", "netns", "utsns", "caps", "nnp", "landlock", "seccomp", "execve"]


def plan(env: dict[str, str], project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NSBOX, "plan", *args, str(project), "--", "true"], env=env, capture_output=True,
                          text=True, timeout=60)


def tree(*roots: Path) -> list[tuple[str, int, int]]:
    out = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in sorted(dirnames + filenames):
                st = (Path(dirpath) / name).lstat()
                out.append((str(Path(dirpath) / name), st.st_mode, st.st_size))
    return sorted(out)


def test_plan_json_has_the_sequence_with_roles_and_every_layer(env, project):
    r = plan(env, project, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    steps = [(s["who"], s["step"]) for s in out["sequence"]]
    assert steps == [(s.who, s.id) for s in SEQUENCE]
    assert {who for who, _ in steps} == {"launcher", "holder", "init", "agent"}
    assert steps.index(("agent", "seccomp.install")) + 2 == steps.index(("agent", "execve.execve"))
    assert ("agent", "probe.run") in steps
    assert [name for name in out["layers"] if name in LAYERS] == LAYERS  # in order; others may join them
    assert all(out["layers"][name] and all(isinstance(x, str) for x in out["layers"][name]) for name in LAYERS)
    assert any("uid" in line for line in out["layers"]["userns"])
    assert any("bind" in line and str(project) in line for line in out["layers"]["mountns"])
    assert out["removable"] == list(REMOVABLE_LAYERS) and out["without"] == []


def test_plan_creates_nothing(env, project):
    before = tree(project)
    r = plan(env, project)
    assert r.returncode == 0, r.stderr
    assert "Launch sequence:" in r.stdout
    for var in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        assert not os.path.exists(env[var]), f"nsbox plan created {env[var]}"
    assert tree(project) == before


def test_plan_changes_nothing_that_exists(env, project):
    # With the dirs present (a sandbox ran before), plan leaves every file as it was.
    assert subprocess.run([*NSBOX, "run", str(project), "--", "true"], env=env, timeout=60).returncode == 0
    roots = [Path(env[v]) for v in ("XDG_DATA_HOME", "XDG_CACHE_HOME") if os.path.exists(env[v])]
    before = tree(*roots, project)
    assert plan(env, project, "--json").returncode == 0
    assert tree(*roots, project) == before


def test_plan_without_a_layer_says_so(env, project):
    r = plan(env, project, "--without", "seccomp", "--json")
    assert r.returncode == 0, r.stderr
    assert "warning: --without seccomp" in r.stderr
    out = json.loads(r.stdout)
    assert out["without"] == ["seccomp"]
    assert out["layers"]["seccomp"] == ["REMOVED with --without (study mode): not enforced"]


def test_plan_of_an_image_describes_the_overlay_and_unpacks_nothing(env, project, imported):
    store = Path(env["XDG_DATA_HOME"]) / "nsbox"
    before = tree(store)
    r = plan(env, project, "--image", "busybox", "--json")
    assert r.returncode == 0, r.stderr
    root = json.loads(r.stdout)["layers"]["mountns"][0]
    assert "overlay: image" in root and str(store / "rootfs") in root
    assert tree(store) == before  # no rootfs unpacked, no sandbox upper made, no lock file
