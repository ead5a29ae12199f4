"""execve: the last steps of the agent process, and what it starts with.

The command starts with nothing inherited by accident:

- a clean environment, built from an allowlist (spec.ENV_PASSTHROUGH, LC_*), plus PATH,
  HOME, USER, LOGNAME, SHELL, the proxy variables of `--network allowlist`, plus what
  `--env` names. The real ANTHROPIC_API_KEY stays in the launcher (the proxy injects it;
  the agent holds a placeholder) unless `--api-key-mode env`. Secrets go through the
  environment of execve(2), never argv;
- every signal disposition back to default and none blocked (CPython ignores SIGPIPE
  and SIGXFSZ, and an ignored disposition survives exec);
- a new session (setsid), so it has no controlling terminal of the host: TIOCSTI cannot
  reach the caller's terminal. With a terminal, its controlling terminal is a pty from
  the sandbox's own devpts, relayed by the launcher;
- every fd >= 3 closed at exec (close_range(CLOSE_RANGE_CLOEXEC)), whatever the caller
  passed to nsbox;
- the working directory is the project.

Kernel docs: execve(2), setsid(2), tty_ioctl(4) TIOCSCTTY, close_range(2), signal(7).
Order:       prepare after init forks the agent; execve is the very last step.
Verify:      /proc/self/fd holds only 0, 1, 2; `grep SigIgn /proc/self/status` is all
             zero in a shell; `env` shows only the allowlist; `tty` names /dev/pts/N.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from typing import NamedTuple

from nsbox import syscalls
from nsbox.errors import ExitCode, StepError, acting, usage_error
from nsbox.layers.mountns import AGENT_BIN
from nsbox.spec import ENV_PASSTHROUGH, ENV_PASSTHROUGH_PREFIXES

AGENT_COMMAND = ("claude", "--dangerously-skip-permissions")
INSIDE_PATH = f"{AGENT_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SECRET_NAMES = ("ANTHROPIC_API_KEY",)
SHOWN_VALUES = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "ANTHROPIC_BASE_URL")
IMAGE_ENV_REFUSED_PREFIXES = ("LD_",)  # LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT...
IMAGE_ENV_REFUSED = ("HOME", "USER", "LOGNAME", "SHELL", "BASH_ENV", "ENV", "PYTHONSTARTUP")


class ExecvePlan(NamedTuple):
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str
    tty: bool  # the agent gets a pty of the sandbox's devpts
    host_binds: tuple[tuple[str, str], ...]  # (host file, inside path) resolved on the host

    def describe(self) -> list[str]:
        # Values are shown only for what nsbox itself sets; anything passed in may be a secret.
        shown = [f"{k}={v}" if k in SHOWN_VALUES or k.endswith(("_proxy", "_PROXY")) else f"{k}=<redacted>"
                 for k, v in self.env]
        return [
            f"execve {list(self.argv)} in {self.cwd}",
            "environment (nothing else): " + " ".join(shown),
            "signals default, none blocked; fds >= 3 closed; new session; "
            + ("controlling terminal: a pty of the sandbox's devpts" if self.tty else "no controlling terminal"),
        ] + [f"{host} bound read-only at {inside} (found on the host PATH)" for host, inside in self.host_binds]


def plan(
    command: tuple[str, ...] | None,
    project: str,
    home: str,
    user: str,
    shell: str,
    extra_env: tuple[str, ...],
    api_key: str | None,
    network_env: dict[str, str],
    tty: bool,
    caller_env: dict[str, str],
    image_env: tuple[str, ...] | None = None,  # image mode: the image config's Env
) -> ExecvePlan:
    host_binds: tuple[tuple[str, str], ...] = ()
    if image_env is not None:
        command = command or AGENT_COMMAND  # looked up inside the image, never on the host
    elif not command or command[0] == AGENT_COMMAND[0]:
        # The default command is the agent (and `-- claude ARGS` names it too). In host
        # mode it is found on the caller's PATH (often ~/.local/bin or an npm prefix,
        # which the sandbox does not see) and its real file is bound read-only inside.
        import shutil  # here: only the default agent needs a PATH search; shutil loads compressors

        found = shutil.which(AGENT_COMMAND[0], path=caller_env.get("PATH", os.defpath))
        if not found:
            raise StepError(
                "execve.plan", f"find {AGENT_COMMAND[0]!r} on the caller's PATH", detail="not found",
                exit_code=ExitCode.NOT_FOUND,
                fix="install Claude Code (npm install -g @anthropic-ai/claude-code), "
                    "or give a command: nsbox run PROJECT -- bash",
            )
        real = os.path.realpath(found)
        host_binds = ((real, f"{AGENT_BIN}/{AGENT_COMMAND[0]}"),)
        command = command or AGENT_COMMAND
    env: dict[str, str] = {}
    for item in image_env or ():
        key, sep, value = item.partition("=")
        # The image's Env is honoured, except what would change how every program loads.
        if sep and not key.startswith(IMAGE_ENV_REFUSED_PREFIXES) and key not in IMAGE_ENV_REFUSED:
            env[key] = value
    for key, value in caller_env.items():
        if key in ENV_PASSTHROUGH or key.startswith(ENV_PASSTHROUGH_PREFIXES):
            env[key] = value
    env.update(PATH=INSIDE_PATH if image_env is None else env.get("PATH", INSIDE_PATH),
               HOME=home, USER=user, LOGNAME=user, SHELL=shell)
    env.update(network_env)  # proxy variables, and the placeholder key when the proxy injects the real one
    if api_key:  # --api-key-mode env: the real key itself (the documented risk)
        env["ANTHROPIC_API_KEY"] = api_key
    for item in extra_env:
        key, sep, value = item.partition("=")
        if sep:
            env[key] = value
        elif key in caller_env:
            env[key] = caller_env[key]
        else:
            raise usage_error("execve.plan", f"--env {key}: {key} is not set in the caller's environment",
                              fix=f"give a value: --env {key}=VALUE")
    return ExecvePlan(tuple(command), tuple(sorted(env.items())), project, tty, host_binds)


def prepare(p: ExecvePlan, tty_fd: int | None) -> None:
    """Role AGENT: session, terminal, signals, working directory, fds."""
    step = "execve.prepare"
    with acting(step, "setsid()"):
        os.setsid()
    if tty_fd is not None:
        with acting(step, "ioctl(pty, TIOCSCTTY)"):
            fcntl.ioctl(tty_fd, syscalls.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(tty_fd, fd)  # dup2 makes 0-2 inheritable, as they must be
            if tty_fd > 2:
                os.close(tty_fd)
    with acting(step, "reset signal dispositions"):
        for sig in signal.valid_signals():
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                continue
            with contextlib.suppress(OSError, ValueError):  # signals Python refuses to touch
                signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
    with acting(step, f"chdir({p.cwd!r})"):
        os.chdir(p.cwd)
    with acting(step, "close_range(3, ~0, CLOSE_RANGE_CLOEXEC)"):
        syscalls.close_range_cloexec(3)


def _lookup(p: ExecvePlan) -> str:
    name = p.argv[0]
    if "/" in name:
        return name
    for d in dict(p.env).get("PATH", INSIDE_PATH).split(":"):
        candidate = os.path.join(d or ".", name)
        if os.path.isfile(candidate):
            return candidate
    raise StepError("execve.execve", f"execve({name!r})", 2, detail="not found on the sandbox's PATH",
                    exit_code=ExitCode.NOT_FOUND)


def execve(p: ExecvePlan) -> None:
    """Role AGENT: the last step. Success closes the error pipe (it is close-on-exec)."""
    path = _lookup(p)
    try:
        os.execve(path, list(p.argv), dict(p.env))
    except OSError as e:
        code = ExitCode.NOT_FOUND if e.errno == 2 else ExitCode.NOT_EXECUTABLE
        raise StepError("execve.execve", f"execve({path!r})", e.errno, exit_code=code) from e
