"""Processes: forking the roles, the sync channel between them, and exit statuses.

    LAUNCHER ──fork──▶ HOLDER ──fork──▶ INIT (PID 1) ──fork──▶ AGENT ──execve──▶ the command

Rules every child follows (CPython runs a lot of code between fork and exec, so these
are what make that safe enough):

- fork only from a single-threaded process (`fork_role` checks /proc/self/task);
- a child never logs, prints, starts threads or calls subprocess; it leaves only through
  `execve` or `os._exit` (never `sys.exit`, which would run the launcher's `finally`s);
- a failing child writes one JSON record to the close-on-exec error pipe and exits;
  the launcher renders it;
- each child sets PR_SET_PDEATHSIG=SIGKILL and then checks its parent is still there,
  so a `kill -9` of the launcher takes the whole sandbox down.

Kernel docs: fork(2), prctl(2) PR_SET_PDEATHSIG, unix(7) SOCK_SEQPACKET and SCM_RIGHTS.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from nsbox import syscalls
from nsbox.errors import ExitCode, StepError


def thread_count() -> int:
    """Threads of this process as the kernel sees them (C extensions included)."""
    return len(os.listdir("/proc/self/task"))


class Channel:
    """JSON messages (and file descriptors) between two roles over a SOCK_SEQPACKET pair.

    SEQPACKET keeps message boundaries, so one send is one receive. Both ends are
    close-on-exec: the agent's exec closes its copy.
    """

    MAX = 65536

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.events: list[dict[str, Any]] = []  # step events received while waiting (the launcher's log)

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a), cls(b)

    def send(self, kind: str, fds: tuple[int, ...] = (), **data: Any) -> None:
        payload = json.dumps({"kind": kind, **data}).encode()
        if fds:
            socket.send_fds(self.sock, [payload], list(fds))
        else:
            self.sock.send(payload)

    def receive(self) -> tuple[dict[str, Any], list[int]]:
        """The next message; kind "eof" when the other side has gone."""
        payload, fds, _flags, _addr = socket.recv_fds(self.sock, self.MAX, 4)
        if not payload:
            for fd in fds:
                os.close(fd)
            return {"kind": "eof"}, []
        return json.loads(payload), fds

    def expect(self, *kinds: str) -> tuple[dict[str, Any], list[int]]:
        """Wait for a message of one of `kinds`, keeping step events that arrive first.

        Returns kind "eof" or "failed" instead when the other side died or reported an
        error; the caller then stops and lets the error pipe tell why.
        """
        while True:
            msg, fds = self.receive()
            if msg["kind"] == "event":
                self.events.append(msg)
                continue
            if msg["kind"] in (*kinds, "eof"):
                return msg, fds
            for fd in fds:
                os.close(fd)
            return {"kind": "failed", "got": msg["kind"]}, []

    def expect_each(self, *kinds: str) -> dict[str, tuple[dict[str, Any], list[int]]]:
        """One message of each of `kinds`, in whatever order they come, by kind.

        For messages sent by different processes over the same end: their order is the
        scheduler's. Stops early at "eof" or "failed", which is then in the result too.
        """
        got: dict[str, tuple[dict[str, Any], list[int]]] = {}
        while not all(k in got for k in kinds):
            msg, fds = self.expect(*(k for k in kinds if k not in got))
            got[msg["kind"]] = (msg, fds)
            if msg["kind"] in ("eof", "failed"):
                break
        return got

    def close(self) -> None:
        self.sock.close()


class ErrorPipe:
    """Close-on-exec pipe that carries a child's StepError to the launcher as JSON."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()  # PEP 446: both non-inheritable

    def report(self, err: StepError) -> None:
        # One write(2) of less than PIPE_BUF bytes is atomic: records never interleave.
        data = (json.dumps(err.to_record()) + "\n").encode()[: 4000]
        os.write(self.write_fd, data)

    def close_write(self) -> None:
        os.close(self.write_fd)

    def read_all(self) -> list[StepError]:
        chunks = []
        while True:
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(self.read_fd)
        records = []
        for line in b"".join(chunks).splitlines():
            try:
                records.append(StepError.from_record(json.loads(line)))
            except ValueError:
                continue
        return records


def fork_role(name: str, body: Callable[[], int], errors: ErrorPipe, parent_end: Channel | None = None) -> int:
    """Fork a child that runs `body` and exits with its return value. Returns the pid.

    The child dies with its parent (PDEATHSIG), and any exception becomes one record on
    the error pipe, never a traceback on the user's terminal. `parent_end`, the parent's
    end of the channel, is closed in the child at once: then, when the parent closes its
    copy or dies, the child's end reads EOF instead of waiting forever.
    """
    if thread_count() != 1:
        raise StepError(f"process.fork_{name}", "fork()", detail="refusing to fork a multi-threaded process")
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    # Every object so far goes to the collector's permanent generation: no later collection,
    # in the parent or the child, writes to their headers, so the pages the fork shares stay
    # shared instead of being copied (the PSS row of scripts/bench).
    gc.freeze()
    pid = os.fork()
    if pid != 0:
        return pid
    code: int = ExitCode.NSBOX
    try:
        if parent_end is not None:
            parent_end.close()
        syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
        # The parent may have died before PDEATHSIG was armed. (A child in a new PID
        # namespace sees getppid() == 0 because its parent lives outside it; that case
        # is covered by the channel's EOF instead.)
        if os.getppid() not in (parent, 0):
            os._exit(ExitCode.NSBOX)
        syscalls.set_process_name(f"nsbox:{name}")
        code = body()
    except StepError as e:
        errors.report(e)
        code = e.exit_code
    except BaseException as e:
        errors.report(StepError(f"process.{name}", f"{type(e).__name__}", detail=str(e)))
    finally:
        os._exit(int(code))
    raise AssertionError("unreachable")


def exit_code_of(wait_status: int) -> int:
    """The shell's convention: the exit code, or 128+N for a death by signal N."""
    if os.WIFSIGNALED(wait_status):
        return ExitCode.SIGNAL_BASE + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)


class AgentStatus(NamedTuple):
    """How the agent ended: its exit code or the signal that killed it."""

    exit_code: int
    signal: int | None

    @classmethod
    def from_wait_status(cls, status: int) -> AgentStatus:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            return cls(ExitCode.SIGNAL_BASE + sig, sig)
        return cls(os.waitstatus_to_exitcode(status), None)

