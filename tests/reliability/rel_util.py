"""Helpers for the reliability suite: budgets, process scans, host state snapshots.

Every check reads the host from the outside (/proc, /proc/self/mountinfo, the temp
directories), so a fault that leaves something behind shows up here whatever the launcher
believes it cleaned.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The CI budget is the default; NSBOX_RELIABILITY_LONG=1 selects the long one (RELIABILITY.md).
LONG = os.environ.get("NSBOX_RELIABILITY_LONG", "") not in ("", "0")


# No conftest.py here: tests/conftest.py is imported as the module `conftest`, and a second
# one would shadow it for `from conftest import ...` elsewhere in the suite.
NSBOX = [sys.executable, "-m", "nsbox"]

# Figures each test records (RELIABILITY.md quotes them); NSBOX_RELIABILITY_REPORT=FILE
# writes them as JSON when the session ends.
FIGURES: dict[str, Any] = {}


def _write_figures() -> None:
    out = os.environ.get("NSBOX_RELIABILITY_REPORT")
    if out and FIGURES:
        try:
            with open(out) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
        with open(out, "w") as f:
            json.dump({**old, **FIGURES}, f, indent=1, sort_keys=True)


atexit.register(_write_figures)


def budget(ci: int, long: int) -> int:
    return long if LONG else ci


def marker() -> str:
    """A string no other process on the host has in its command line."""
    return f"nsbox-rel-{uuid.uuid4().hex}"


def pids_with(needle: str) -> set[int]:
    """Every live (non-zombie) process whose command line contains `needle`, except us."""
    found = set()
    raw = needle.encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if raw in cmdline and state != b"Z":
            found.add(int(entry.name))
    return found


def pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def pids_in_ns(ns: str) -> set[int]:
    """Every live process of ours whose PID namespace is `ns` (e.g. 'pid:[4026532]')."""
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and pid_ns(int(entry.name)) == ns:
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                        continue
            except OSError:
                continue
            found.add(int(entry.name))
    return found


def wait_until(pred: object, timeout: float, step: float = 0.02) -> bool:
    assert callable(pred)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def mounts() -> list[str]:
    """The host's mount table as this (host) process sees it, minus the per-mount ids."""
    with open("/proc/self/mountinfo") as f:
        return sorted(" ".join(line.split()[2:]) for line in f)


def tmp_entries(tmp: str = "/tmp") -> set[str]:
    """Our own entries of a temp directory, except pytest's (other sessions may run tests)."""
    out = set()
    for e in os.scandir(tmp):
        try:
            if e.stat(follow_symlinks=False).st_uid == os.getuid() and not e.name.startswith("pytest-"):
                out.add(e.name)
        except OSError:
            continue
    return out


def lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def tree_state(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """{relative path: (mode, size, content for files)}: to prove a tree was not touched."""
    out: dict[str, tuple[int, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            data = Path(p).read_bytes() if os.path.isfile(p) and not os.path.islink(p) else b""
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, data)
    return out


@contextlib.contextmanager
def timed(figures: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    figures[key] = round(time.monotonic() - t0, 2)


def leftovers(data_home: Path) -> list[str]:
    """Temporary names nsbox may write under its data dir: none may survive a clean run."""
    out = []
    for dirpath, dirnames, filenames in os.walk(data_home):
        for n in dirnames + filenames:
            if n.startswith((".tmp-", ".trash-", ".index-", "blob-", "import-")):
                out.append(os.path.relpath(os.path.join(dirpath, n), data_home))
        dirnames[:] = [d for d in dirnames if d not in ("home", "data", "work") and not d.startswith(".tmp-")]
    return sorted(out)
