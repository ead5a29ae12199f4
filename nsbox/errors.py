"""Errors: one shape for every failure, and the exit codes nsbox promises.

Every failure names the step of the launch sequence it happened in (`launch.SEQUENCE`),
the exact call, and the kernel's answer:

    nsbox: mountns.pivot_root: pivot_root('.', '.') failed: Invalid argument (EINVAL)
      why: <the likely cause on this host>
      fix: <a command or a flag>

A child process (holder, init, agent) never prints: it turns its StepError into one JSON
record on the error pipe (`to_record`) and exits; the launcher rebuilds it (`from_record`),
adds `why`/`fix` from `hints.py`, and renders it.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
from collections.abc import Iterator
from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    """Exit statuses of `nsbox run`, as in podman, env(1) and bubblewrap."""

    TIMEOUT = 124  # --timeout ended the sandbox
    NSBOX = 125  # nsbox itself failed before the command ran
    NOT_EXECUTABLE = 126  # the command exists but cannot be executed
    NOT_FOUND = 127  # the command was not found inside the sandbox
    SIGNAL_BASE = 128  # 128+N: the command was killed by signal N


class StepError(Exception):
    """A launch step failed. `step` is the row id in launch.SEQUENCE.

    Mutable on purpose: hints.explain() fills `why` and `fix` in the launcher. Compared by
    identity, as any exception.
    """

    def __init__(self, step: str, action: str, errno: int | None = None, detail: str | None = None,
                 exit_code: int = ExitCode.NSBOX, why: str | None = None, fix: str | None = None) -> None:
        self.step = step
        self.action = action
        self.errno = errno
        self.detail = detail  # words for failures that are not an errno
        self.exit_code = exit_code
        self.why = why
        self.fix = fix

    def __repr__(self) -> str:
        return (f"StepError(step={self.step!r}, action={self.action!r}, errno={self.errno!r}, "
                f"detail={self.detail!r}, exit_code={self.exit_code!r}, why={self.why!r}, fix={self.fix!r})")

    def __str__(self) -> str:
        return self.render()

    def headline(self) -> str:
        if self.errno is not None:
            name = errno_mod.errorcode.get(self.errno, str(self.errno))
            line = f"nsbox: {self.step}: {self.action} failed: {os.strerror(self.errno)} ({name})"
            return f"{line}: {self.detail}" if self.detail else line
        return f"nsbox: {self.step}: {self.action}" + (f": {self.detail}" if self.detail else "")

    def render(self) -> str:
        lines = [self.headline()]
        if self.why:
            lines.append(f"  why: {self.why}")
        if self.fix:
            lines.append(f"  fix: {self.fix}")
        return "\n".join(lines)

    def to_record(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "action": self.action,
            "errno": self.errno,
            "detail": self.detail,
            "exit": int(self.exit_code),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> StepError:
        return cls(
            step=str(record.get("step", "unknown")),
            action=str(record.get("action", "?")),
            errno=record.get("errno"),
            detail=record.get("detail"),
            exit_code=int(record.get("exit", ExitCode.NSBOX)),
        )


@contextlib.contextmanager
def acting(step: str, action: str, exit_code: int = ExitCode.NSBOX) -> Iterator[None]:
    """Turn an OSError raised inside the block into a StepError naming `step` and `action`."""
    try:
        yield
    except OSError as e:
        raise StepError(step, action, e.errno, exit_code=exit_code) from e


def usage_error(step: str, detail: str, fix: str | None = None) -> StepError:
    """A request nsbox refuses before anything on the system changes."""
    return StepError(step, "invalid request", detail=detail, fix=fix)
