"""Where nsbox keeps things on the host (XDG base directories), and per-sandbox state.

Configuration is read only from the invoking user's `$XDG_CONFIG_HOME/nsbox/`, never from
the project: the agent can write the project, and must not loosen its own cage.

    $XDG_DATA_HOME/nsbox/sandboxes/<name>/home   the agent's private, persistent $HOME
    $XDG_CACHE_HOME/nsbox/                        compiled seccomp filters and other caches
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path


def _xdg(var: str, default: str) -> Path:
    value = os.environ.get(var, "")
    # The XDG spec says relative paths are invalid and must be ignored.
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home() / default


def data_home() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "nsbox"


def config_home() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "nsbox"


def cache_home() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache") / "nsbox"


_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def valid_name(name: str) -> bool:
    return bool(_NAME_OK.match(name)) and name not in (".", "..")


def default_name(project: Path) -> str:
    """A stable sandbox name for a project: its base name plus a hash of its full path."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", project.name or "root").lstrip(".-_") or "project"
    digest = hashlib.sha256(os.fsencode(str(project))).hexdigest()[:8]
    return f"{base[:40]}-{digest}"


def sandbox_dir(name: str) -> Path:
    return data_home() / "sandboxes" / name


def _rmtree(path: Path | str) -> None:
    # shutil is imported here, not at the top: it loads the bz2 and lzma modules, a cost
    # every run would pay at start for a removal that only --fresh and a sweep need.
    import shutil

    shutil.rmtree(path, onerror=_make_writable_and_retry)


def _make_writable_and_retry(func: object, path: str, _exc: object) -> None:
    # The agent may leave read-only directories behind; rmtree needs write permission
    # on a directory to delete its entries.
    parent = os.path.dirname(path)
    os.chmod(parent, stat.S_IRWXU)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, stat.S_IRWXU)
        _rmtree(path)
    else:
        os.unlink(path)


@contextlib.contextmanager
def claim(name: str) -> Iterator[None]:
    """Hold the sandbox NAME for one run: a second run with the same name is refused.

    An exclusive flock on sandboxes/NAME/lock, released by the kernel however the
    launcher ends (even kill -9), so it never goes stale. Two runs sharing one home or
    one upper layer would corrupt both.
    """
    from nsbox.errors import StepError

    directory = sandbox_dir(name)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise StepError("config.claim", f"flock({str(directory / 'lock')!r})", errno.EWOULDBLOCK,
                            detail=f"sandbox {name!r} is in use by another nsbox (pid {holder})",
                            fix="wait for it to end, or give this run another --name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def _wipe(path: Path) -> None:
    """Remove a home or upper layer for --fresh: first renamed away (atomic), then deleted.

    A launcher killed while deleting leaves a `.trash-*` directory beside it (the next run
    of this name, or `nsbox gc`, removes it), never a half-deleted home the next run would
    take for the real one. Called under the name's claim, like the sweep of old trash.
    """
    if path.exists():
        trash = path.parent / f".trash-{path.name}-{os.getpid()}-{os.urandom(4).hex()}"
        os.rename(path, trash)
        _rmtree(trash)


def sweep_trash(name: str) -> None:
    """Remove what an interrupted --fresh of this sandbox left (call it holding `claim(name)`)."""
    for trash in sandbox_dir(name).glob(".trash-*"):
        _rmtree(trash)


def prepare_upper(name: str, fresh: bool) -> Path:
    """The persistent upper layer of an image sandbox (`data/`, and overlayfs's `work/`)."""
    upper = sandbox_dir(name) / "upper"
    if fresh:
        _wipe(upper)
    for sub in ("data", "work"):
        (upper / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    return upper


def prepare_home(name: str, fresh: bool) -> Path:
    """Create (or with `fresh`, wipe and recreate) the agent's persistent home directory."""
    home = sandbox_dir(name) / "home"
    sweep_trash(name)
    if fresh:
        _wipe(home)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    return home


# ---- config.toml -------------------------------------------------------------------------

# Keys config.toml may set, and the type each takes. Anything else is an error: a typo in
# a security setting must not pass silently.
CONFIG_KEYS: dict[str, type] = {
    "network": str,  # default --network when the command is the agent ("allowlist", "none", "host")
    "network_for_commands": str,  # default --network for any other command ("none")
    "seccomp_profile": str,
    "api_key_mode": str,
    # Default limits, written as on the command line ("2G", "1.5", "30m"); flags win.
    "memory": str,
    "cpus": str,
    "pids": str,
    "timeout": str,
    "disk": str,
    "limits": str,  # "strict" or "best-effort"
}


def load_config(path: Path | None = None) -> dict[str, object]:
    """Read `$XDG_CONFIG_HOME/nsbox/config.toml` (absent: no settings). Never from the project."""
    from nsbox.errors import StepError

    path = path or config_home() / "config.toml"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise StepError("config.load", f"read {path}", e.errno) from e
    import tomllib  # only with a config file: most runs have none, and the parser costs ~5 ms

    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise StepError("config.load", f"parse {path}", detail=str(e), fix="fix the TOML syntax") from e
    for key, value in data.items():
        expected = CONFIG_KEYS.get(key)
        if expected is None:
            raise StepError("config.load", f"parse {path}", detail=f"unknown key {key!r}",
                            fix="known keys: " + ", ".join(CONFIG_KEYS))
        if not isinstance(value, expected):
            raise StepError("config.load", f"parse {path}", detail=f"{key} must be a {expected.__name__}")
    return data
