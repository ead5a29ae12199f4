"""The Claude Code image (rootfs/claude-code): imported, it runs bash, git and claude inside nsbox.

Building it takes a Debian mirror, npm (or the binary scripts/setup installs) and about a
minute, so these tests use an already-built layout when one exists and build one only when
asked (NSBOX_TEST_CLAUDE_IMAGE=1); otherwise they skip and say how to enable them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import NSBOX, REPO, Run

RECIPE = tomllib.loads((REPO / "rootfs" / "claude-code" / "recipe.toml").read_text())
VERSION = RECIPE["claude"]["version"]
ENABLE = "NSBOX_TEST_CLAUDE_IMAGE"
USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nsbox" / "claude-code-layout"
SYSTEM_CACHE = Path("/var/cache/nsbox/claude-code-layout")  # scripts/setup builds it there, as root

pytestmark = pytest.mark.timeout(900)


def layout_version(layout: Path) -> str | None:
    """The Claude Code version a built layout holds (its config label), or None if it is not one."""
    try:
        index = json.loads((layout / "index.json").read_text())
        blob = layout / "blobs" / "sha256"
        manifest = json.loads((blob / index["manifests"][0]["digest"].split(":")[1]).read_text())
        config = json.loads((blob / manifest["config"]["digest"].split(":")[1]).read_text())
        return config["config"]["Labels"]["org.nsbox.claude-code.version"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


@pytest.fixture(scope="module")
def claude_layout() -> Path:
    candidates = [Path(p) for p in (os.environ.get("NSBOX_CLAUDE_LAYOUT"),) if p] + [USER_CACHE, SYSTEM_CACHE]
    for layout in candidates:
        if layout_version(layout) == VERSION:
            return layout
    if os.environ.get(ENABLE) != "1":
        pytest.skip(f"no Claude Code {VERSION} image layout in {', '.join(map(str, candidates))}; "
                    f"set {ENABLE}=1 to build one into {USER_CACHE} (about a minute: needs mmdebstrap, "
                    "a Debian mirror and a subuid range), or build it with scripts/make-claude-image DIR "
                    "and set NSBOX_CLAUDE_LAYOUT=DIR")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "make-claude-image"), str(USER_CACHE)],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    assert layout_version(USER_CACHE) == VERSION
    return USER_CACHE


@pytest.fixture(scope="module")
def store_env(tmp_path_factory: pytest.TempPathFactory, claude_layout: Path) -> dict[str, str]:
    """One store for the module, with the image imported (unpacking ~400 MB once, not per test)."""
    tmp = tmp_path_factory.mktemp("claude-image")
    e = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "NSBOX_"))}
    e.update(XDG_DATA_HOME=str(tmp / "xdg-data"), XDG_CONFIG_HOME=str(tmp / "xdg-config"),
             XDG_CACHE_HOME=str(tmp / "xdg-cache"))
    r = subprocess.run([*NSBOX, "image", "import", str(claude_layout)], env=e, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == RECIPE["name"]
    return e


@pytest.fixture
def run_image(store_env: dict[str, str], project: Path) -> Iterator[object]:
    def run(*args: str, cmd: list[str] | None = None, sub: str = "run") -> Run:
        argv = [*NSBOX, sub, "--image", "claude-code", *args, str(project)] + (["--", *cmd] if cmd else [])
        p = subprocess.run(argv, env=store_env, capture_output=True, text=True, timeout=300,
                           stdin=subprocess.DEVNULL)
        return Run(p.returncode, p.stdout, p.stderr)

    yield run


def test_bash_git_and_claude_run_from_the_image(run_image):
    r = run_image(cmd=["sh", "-c", "bash --version | head -1; git --version; claude --version; "
                                   "command -v claude; test -s /etc/ssl/certs/ca-certificates.crt && echo certs"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("GNU bash, version 5.2"), r.stdout
    assert lines[1].startswith("git version 2.39"), r.stdout
    assert lines[2] == f"{VERSION} (Claude Code)", r.stdout
    assert lines[3:] == ["/usr/local/bin/claude", "certs"], r.stdout


def test_git_works_in_the_project(run_image, project):
    r = run_image(cmd=["bash", "-c", f"cd {project} && git init -q && echo ok"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ok\n"
    assert (project / ".git" / "HEAD").is_file()  # written through to the host's project


def test_without_a_command_the_image_runs_the_agent(run_image):
    plan = run_image(sub="plan")
    assert plan.returncode == 0, plan.stderr
    assert "execve ['claude', '--dangerously-skip-permissions']" in plan.stdout
    # No prompt, stdin not a terminal: claude itself answers (so it was found and ran inside).
    r = run_image("--network", "none")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Input must be provided" in r.stdout + r.stderr
