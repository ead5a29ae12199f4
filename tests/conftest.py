"""Shared test set-up: refuse root, run the real CLI, plant canaries.

Every test runs the real `nsbox` CLI in a subprocess against the real kernel, as an
unprivileged user. As root every layer would pass for the wrong reason, so the suite
refuses to run as root: CI runs it through scripts/test, which drops to a test user.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() == 0:
        pytest.exit(
            "nsbox tests must run unprivileged: as root every layer passes for the wrong reason.\n"
            "Run scripts/test (it creates a test user and drops to it).",
            returncode=2,
        )


def pytest_report_header(config: pytest.Config) -> list[str]:
    def read(p: str) -> str:
        try:
            return Path(p).read_text().strip()
        except OSError:
            return "absent"

    return [
        f"nsbox tests as uid {os.getuid()}, kernel {os.uname().release}",
        f"user.max_user_namespaces={read('/proc/sys/user/max_user_namespaces')}",
    ]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The launcher's environment: private XDG dirs per test, nothing else of ours."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "NSBOX_"))}
    e["XDG_DATA_HOME"] = str(tmp_path / "xdg-data")
    e["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")
    e["XDG_CACHE_HOME"] = str(tmp_path / "xdg-cache")
    return e


@pytest.fixture
def project(tmp_path: Path) -> Path:
    p = tmp_path / "project"
    p.mkdir()
    (p / "README").write_text("a project\n")
    return p


NSBOX = [sys.executable, "-m", "nsbox"]


@pytest.fixture
def nsbox(env: dict[str, str], project: Path) -> Iterator[object]:
    """`nsbox(*args, cmd=...)` runs `nsbox run [args] PROJECT -- cmd` and returns a Run."""

    def run(*args: str, cmd: list[str] | None = None, proj: Path | None = None, timeout: float = 60,
            extra_env: dict[str, str] | None = None, **kw: object) -> Run:
        argv = [*NSBOX, "run", *args, str(proj or project)]
        if cmd is not None:
            argv += ["--", *cmd]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                           env={**env, **(extra_env or {})}, **kw)  # type: ignore[call-overload]
        return Run(p.returncode, p.stdout, p.stderr)

    yield run


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def start_nsbox(env: dict[str, str], project: Path, script: str, *args: str) -> subprocess.Popen[str]:
    """`nsbox run ARGS PROJECT -- /bin/sh -c SCRIPT` in the background, for tests that act on it."""
    return subprocess.Popen([*NSBOX, "run", *args, str(project), "--", "/bin/sh", "-c", script], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_file(path: Path, timeout: float = 30) -> None:
    """Wait until a sandboxed command has created `path` (its way of saying "I am running")."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(scope="session")
def busybox_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rootfs/busybox test image as an OCI layout, built once per test session."""
    out = tmp_path_factory.mktemp("busybox") / "layout"
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "make-busybox-image"), "--offline", str(out)],
                         capture_output=True, text=True, timeout=300)
    if run.returncode == 75:
        pytest.skip(f"busybox-static .deb not cached (scripts/setup fetches it as root): {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    return out


@pytest.fixture
def imported(env: dict[str, str], busybox_layout: Path) -> str:
    """The busybox image, imported into this test's store (its XDG_DATA_HOME)."""
    r = subprocess.run([*NSBOX, "image", "import", str(busybox_layout)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()
