"""The terminal: a pty of the sandbox's own devpts, relayed by the launcher.

When nsbox runs on a terminal, the agent does not get the caller's terminal. init opens
a pty from the sandbox's devpts instance (mounted `newinstance`), the agent makes its
slave side its controlling terminal, and the master goes to the launcher over the sync
socket (SCM_RIGHTS). The launcher puts the caller's terminal in raw mode, copies bytes
both ways, copies the window size on SIGWINCH (the kernel then signals the agent's
foreground process group), and restores the terminal however the run ends.

Nothing inside can reach the caller's terminal: TIOCSTI on the sandbox pty only feeds
the sandbox's own input. Without a terminal, fds 0-2 pass through unchanged and the
agent has no controlling terminal at all (it runs in a new session).

Kernel docs: pty(7), devpts (Documentation/filesystems/devpts.rst), tty_ioctl(4).
Verify:      `tty` inside prints /dev/pts/N; a resize reaches the agent (SIGWINCH, new
             `stty size`); TIOCSTI inside never reaches the caller's terminal.
"""

from __future__ import annotations

import errno
import fcntl
import os
import termios
import tty
from types import TracebackType
from typing import Any

_WINSIZE = b"\0" * 8


def open_pty() -> tuple[int, int]:
    """Role INIT, after pivot_root: a (master, slave) pair from the sandbox's devpts."""
    master, slave = os.openpty()  # /dev/ptmx -> pts/ptmx of our newinstance devpts
    return master, slave


class Relay:
    """Launcher side: copy between the caller's terminal and the pty master."""

    def __init__(self, master: int, stdin: int = 0, stdout: int = 1) -> None:
        self.master, self.stdin, self.stdout = master, stdin, stdout
        self.saved: list[Any] | None = None
        self.to_master = b""
        self.to_stdout = b""
        self.stdin_open = True
        self.master_open = True
        os.set_blocking(master, False)

    def __enter__(self) -> Relay:
        if os.isatty(self.stdin):
            self.saved = termios.tcgetattr(self.stdin)
            tty.setraw(self.stdin, termios.TCSANOW)
        self.copy_window_size()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.restore()

    def restore(self) -> None:
        if self.saved is not None:
            termios.tcsetattr(self.stdin, termios.TCSADRAIN, self.saved)
            self.saved = None

    def copy_window_size(self) -> None:
        try:
            size = fcntl.ioctl(self.stdin, termios.TIOCGWINSZ, _WINSIZE)
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)
        except OSError:
            pass  # stdin is not a terminal: the pty keeps its default size

    def read_fds(self) -> list[int]:
        fds = []
        if self.stdin_open and not self.to_master:
            fds.append(self.stdin)
        if self.master_open and not self.to_stdout:
            fds.append(self.master)
        return fds

    def write_fds(self) -> list[int]:
        fds = []
        if self.to_master and self.master_open:
            fds.append(self.master)
        if self.to_stdout:
            fds.append(self.stdout)
        return fds

    def on_readable(self, fd: int) -> None:
        if fd == self.stdin:
            data = os.read(self.stdin, 65536)
            if data:
                self.to_master += data
            else:
                self.stdin_open = False
        elif fd == self.master:
            try:
                data = os.read(self.master, 65536)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                data = b""  # EIO: every slave fd is closed
            if data:
                self.to_stdout += data
            else:
                self.master_open = False

    def on_writable(self, fd: int) -> None:
        if fd == self.master and self.to_master:
            try:
                n = os.write(self.master, self.to_master)
                self.to_master = self.to_master[n:]
            except BlockingIOError:
                pass
            except OSError:
                self.to_master = b""
        elif fd == self.stdout and self.to_stdout:
            n = os.write(self.stdout, self.to_stdout)
            self.to_stdout = self.to_stdout[n:]

    def drain(self) -> None:
        """After the sandbox ended: copy what the pty still holds, then stop."""
        while self.master_open:
            try:
                data = os.read(self.master, 65536)
            except (BlockingIOError, OSError):
                break
            if not data:
                break
            self.to_stdout += data
        while self.to_stdout:
            try:
                n = os.write(self.stdout, self.to_stdout)
            except BlockingIOError:
                continue
            except OSError:
                break
            self.to_stdout = self.to_stdout[n:]
        os.close(self.master)
        self.master_open = False
