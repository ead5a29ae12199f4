"""`nsbox gc`: remove what a killed nsbox can leave on the host, and nothing in use.

What a `kill -9` can leave, and why this is all of it (tests/reliability/test_gc.py checks
each by killing real launchers):

- no mount: the launcher mounts nothing on the host; every mount is made in the sandbox's
  own mount namespace, which the kernel tears down with its last process;
- no process: PDEATHSIG and the PID namespace end the sandbox with the launcher;
- no lock: the name lock and the store locks are flocks, released by the kernel; their
  files stay (harmless, reused by the next run) and gc leaves them;
- files, under `$XDG_DATA_HOME/nsbox` and `$XDG_CACHE_HOME/nsbox`, that only exist
  between a write and its rename:

    rootfs/.tmp-<chain>-<pid>     an unpack in progress (store.ensure_rootfs)
    rootfs/.trash-<chain>-<pid>   a tree `image rm` renamed away and was deleting
    tmp/*                         blobs being written, archives being read (image import);
                                  except tmp/pull-*: an interrupted pull's partial blob, kept
                                  so that the next pull resumes it (gc names it, leaves it)
    .index-*                      index.json being replaced
    sandboxes/NAME/.trash-*       a home or upper layer `--fresh` was wiping
    seccomp/.tmp-*                a compiled filter being cached (only when older than an hour:
                                  no lock guards the cache)

and one kind of file no nsbox reads any more:

    seccomp/*.bpf                 a filter cached in the format before whole plans were
                                  cached (seccomp/<key>.json); never read, safe to remove

Each is removed only under the lock its writer holds, taken without waiting: the store's
exclusive `store.lock` (every writer of the store holds it shared or exclusive), then the
`unpack-<chain>.lock`; the sandbox's name lock (`config.claim`). A lock held by a live nsbox
means "in use": gc skips it and says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nsbox import config
from nsbox.errors import StepError
from nsbox.image.store import remove_tree
from nsbox.layers import cgroups

STEP = "gc"
CACHE_TMP_AGE = 3600.0  # seconds: a seccomp cache temp file older than this is abandoned


@dataclass
class Report:
    removed: list[tuple[Path, str]] = field(default_factory=list)  # (path, what it was)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, why it stays)


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    """An exclusive flock on `path` without waiting: True if we hold it (the file is created)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _remove(path: Path, why: str, dry_run: bool, report: Report) -> None:
    if not dry_run:
        try:
            remove_tree(path)
        except OSError as e:
            raise StepError(STEP, f"remove {path}", e.errno) from e
    report.removed.append((path, why))


def _entries(directory: Path, prefix: str = "") -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StepError(STEP, f"list {directory}", e.errno) from e


def _store(root: Path, dry_run: bool, report: Report) -> None:
    locks = root / "locks"
    if not locks.is_dir():
        return
    with _try_lock(locks / "store.lock") as held:
        if not held:
            report.skipped.append((root, "the image store is in use (store.lock is held); run gc again later"))
            return
        for tmp in _entries(root / "rootfs", ".tmp-"):
            chain = tmp.name[len(".tmp-"):].split("-", 1)[0]
            with _try_lock(locks / f"unpack-{chain}.lock") as free:
                if free:
                    _remove(tmp, "an interrupted image unpack", dry_run, report)
                else:
                    report.skipped.append((tmp, "being unpacked right now"))
        for trash in _entries(root / "rootfs", ".trash-"):
            _remove(trash, "an interrupted `image rm`", dry_run, report)
        for tmp in _entries(root / "tmp"):
            if tmp.name.startswith("pull-"):  # registry.py keeps these on purpose
                report.skipped.append((tmp, "a partial download: kept, the next pull resumes it"))
                continue
            _remove(tmp, "an interrupted image import (partial blob or archive)", dry_run, report)
        for tmp in _entries(root, ".index-"):
            _remove(tmp, "an interrupted index.json update", dry_run, report)


def _sandboxes(root: Path, dry_run: bool, report: Report) -> None:
    for sandbox in _entries(root / "sandboxes"):
        trash = _entries(sandbox, ".trash-")
        if not trash or not sandbox.is_dir():
            continue
        with _try_lock(sandbox / "lock") as held:
            if not held:
                report.skipped.extend((t, f"sandbox {sandbox.name!r} is running") for t in trash)
                continue
            for t in trash:
                _remove(t, f"an interrupted --fresh of sandbox {sandbox.name!r}", dry_run, report)


def _cache(root: Path, dry_run: bool, report: Report, now: float) -> None:
    for tmp in _entries(root / "seccomp", ".tmp-"):
        try:
            age = now - tmp.lstat().st_mtime
        except FileNotFoundError:
            continue
        if age > CACHE_TMP_AGE:
            _remove(tmp, "an interrupted seccomp cache write", dry_run, report)
        else:
            report.skipped.append((tmp, "a seccomp cache write less than an hour old (may be in progress)"))
    for old in _entries(root / "seccomp"):
        if old.suffix == ".bpf":
            _remove(old, "a seccomp filter cached in the old format (no longer read)", dry_run, report)


def collect(dry_run: bool = False, now: float | None = None) -> Report:
    """Find (and unless `dry_run`, remove) what killed launchers left. Raises StepError."""
    report = Report()
    data = config.data_home()
    _store(data, dry_run, report)
    _sandboxes(data, dry_run, report)
    _cache(config.cache_home(), dry_run, report, time.time() if now is None else now)
    _cgroups(dry_run, report)
    return report


def _cgroups(dry_run: bool, report: Report) -> None:
    """Empty cgroup leaves of killed launchers beneath this process's own cgroup v2 (the next
    run with limits sweeps them too). Nothing is looked at elsewhere in the hierarchy."""
    base = cgroups.probe().v2_base
    if base is None:
        return
    if dry_run:
        for entry in _entries(Path(base), "nsbox-"):
            report.skipped.append((entry, "a cgroup leaf: removed only if its launcher is dead (not in --dry-run)"))
        return
    for path in cgroups.sweep_stale(base):
        report.removed.append((Path(path), "an empty cgroup leaf of a killed launcher"))
