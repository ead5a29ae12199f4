"""The caller's terminal is restored after every kind of exit.

nsbox runs on a pty this test owns (its slave the launcher's controlling terminal, as a
login shell would arrange); the launcher puts it in raw mode to relay the sandbox's own
pty. After each way of ending, the test compares the termios of its pty with the
attributes from before the run.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import termios
import time

import pytest
import rel_util as ru


class Tty:
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 90, 0, 0))
        self.before = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(["setsid", "--ctty", *ru.NSBOX, *args], stdin=self.slave, stdout=self.slave,
                                     stderr=self.slave, env={**env, "TERM": "xterm"})
        self.output = b""

    def pump(self, until: bytes | None = None, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (until is None or until not in self.output) and time.monotonic() < deadline:
            if self.proc.poll() is not None and not select.select([self.master], [], [], 0.1)[0]:
                break
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:
                    break
        if until is not None:
            assert until in self.output, self.output

    def raw_now(self) -> bool:
        return not termios.tcgetattr(self.slave)[3] & termios.ICANON

    def end(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.pump(timeout=0.2)
        code = self.proc.wait(5)
        self.after = termios.tcgetattr(self.slave)
        winsize = fcntl.ioctl(self.slave, termios.TIOCGWINSZ, b"\0" * 8)
        os.close(self.master)
        os.close(self.slave)
        assert struct.unpack("HHHH", winsize)[:2] == (30, 90)
        return code


# The agent puts its own (sandbox) pty in raw mode first: that must not reach ours.
RAW_INSIDE = "stty raw -echo; echo up; "


@pytest.mark.parametrize("how, script, expected", [
    ("normal exit", RAW_INSIDE + "exit 3", 3),
    ("agent killed by a signal", RAW_INSIDE + "kill -KILL $$", 128 + signal.SIGKILL),
    ("agent segfaults", RAW_INSIDE + "kill -SEGV $$", 128 + signal.SIGSEGV),
])
def test_terminal_restored_when_the_agent_ends(env, project, how, script, expected):
    t = Tty(["run", str(project), "--", "/bin/sh", "-c", script], env)
    assert t.end() == expected, (how, t.output)
    assert t.after == t.before, how


def test_terminal_restored_when_the_launcher_gets_sigterm(env, project):
    t = Tty(["run", str(project), "--", "/bin/sh", "-c", RAW_INSIDE + "sleep 60"], env)
    t.pump(b"up")
    assert t.raw_now(), "while relaying, the launcher holds our terminal in raw mode"
    os.kill(t.proc.pid, signal.SIGTERM)  # forwarded to the agent through init
    assert t.end() == 128 + signal.SIGTERM
    assert t.after == t.before


def test_terminal_restored_after_a_timeout(env, project):
    t = Tty(["run", "--timeout", "1s", str(project), "--", "/bin/sh", "-c",
             RAW_INSIDE + "trap '' TERM; while :; do sleep 0.1; done"], env)
    t.pump(b"up")
    assert t.end() == 124
    assert t.after == t.before


def test_terminal_after_kill9_of_the_launcher_is_left_raw(env, project):
    """SIGKILL gives the launcher no chance to restore anything: the limit, pinned.

    The sandbox still dies (test_faults.py); the caller's shell (or `stty sane`) must
    restore the terminal, as after any program killed in raw mode.
    """
    t = Tty(["run", str(project), "--", "/bin/sh", "-c", RAW_INSIDE + "sleep 60"], env)
    t.pump(b"up")
    os.kill(t.proc.pid, signal.SIGKILL)
    assert t.end() == -signal.SIGKILL
    assert t.after != t.before and not t.after[3] & termios.ICANON
