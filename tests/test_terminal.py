"""The terminal: a pty of the sandbox's devpts, resizes relayed, no path to the caller's tty.

These tests run nsbox on a real terminal: a pty this test owns, made the launcher's
controlling terminal with `setsid --ctty`, as a login shell would.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

from conftest import NSBOX

TIOCSTI_PROBE = r"""
import errno, fcntl, os, termios
try:
    fcntl.ioctl(1, termios.TIOCSTI, b"Z")
    print("TIOCSTI-on-stdout: injected")
except OSError as e:
    print("TIOCSTI-on-stdout:", errno.errorcode[e.errno])
"""


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Terminal:
    """A pty whose slave is the launcher's controlling terminal; we hold the master."""

    def __init__(self, argv: list[str], env: dict[str, str], stdin_devnull: bool = False) -> None:
        self.master, self.slave = os.openpty()
        _set_size(self.master, 24, 80)
        if stdin_devnull:  # the pty stays the controlling terminal; only stdin is redirected
            argv = ["/bin/sh", "-c", 'exec "$@" < /dev/null', "sh", *argv]
        self.proc = subprocess.Popen(["setsid", "--ctty", *argv], stdin=self.slave, stdout=self.slave,
                                     stderr=self.slave, env={**env, "TERM": "xterm"})
        self.output = b""

    def read_until(self, needle: bytes, timeout: float = 20) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.output:
            left = deadline - time.monotonic()
            assert left > 0, f"{needle!r} not seen; output so far: {self.output!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:
                    break
        return self.output

    def finish(self, timeout: float = 20) -> int:
        code = self.proc.wait(timeout)
        while select.select([self.master], [], [], 0.2)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.output += chunk
        os.close(self.master)
        os.close(self.slave)
        return code


def test_tty_inside_is_a_pty_of_the_sandbox(env, project):
    t = Terminal([*NSBOX, "run", str(project), "--", "/bin/sh", "-c",
                  "tty; stat -c 'dev=%d' /proc/self/fd/0; exit 3"], env)
    callers_devpts = os.fstat(t.slave).st_dev
    assert t.finish() == 3
    text = t.output.decode()
    assert "/dev/pts/0" in text, text
    # The agent's terminal is on another devpts instance than the caller's (st_dev differs).
    assert int(text.split("dev=")[1].split()[0]) != callers_devpts


def test_the_terminal_is_restored_after_the_run(env, project):
    t = Terminal([*NSBOX, "run", str(project), "--", "/bin/sh", "-c", "stty -a | grep -o -- '-icanon'; exit 0"], env)
    before = termios.tcgetattr(t.slave)
    assert t.proc.wait(20) == 0
    after = termios.tcgetattr(t.slave)
    assert after == before
    t.finish()
    assert b"-icanon" not in t.output  # inside, the sandbox pty is cooked: the program sees a normal tty


def test_a_resize_reaches_the_agent(env, project):
    script = (f"trap 'stty size > {project}/size; exit 0' WINCH; stty size > {project}/size0; "
              "while :; do sleep 0.05; done")
    t = Terminal([*NSBOX, "run", str(project), "--", "/bin/bash", "-c", script], env)
    deadline = time.monotonic() + 20
    while not (project / "size0").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (project / "size0").read_text().strip() == "24 80"
    _set_size(t.master, 40, 100)  # the kernel sends SIGWINCH to the launcher's process group
    assert t.finish() == 0
    assert Path(project / "size").read_text().strip() == "40 100"


def test_tiocsti_cannot_reach_the_callers_terminal(env, project):
    # stdin is not a terminal, stdout is the caller's: fds pass through, but the agent is
    # in a new session without a controlling terminal, so TIOCSTI is refused.
    t = Terminal([*NSBOX, "run", str(project), "--", "/usr/bin/python3", "-c", TIOCSTI_PROBE], env,
                 stdin_devnull=True)
    assert t.proc.wait(20) == 0
    # Nothing was queued as input on the caller's terminal.
    queued = struct.unpack("i", fcntl.ioctl(t.slave, termios.FIONREAD, b"\0" * 4))[0]
    assert t.finish() == 0, t.output
    assert b"TIOCSTI-on-stdout: EPERM" in t.output, t.output
    assert queued == 0


def test_tiocsti_inside_feeds_only_the_sandbox_pty(env, project):
    probe = ("import errno, fcntl, termios, os, select\n"
             "try:\n"
             "    for c in b'Q\\n': fcntl.ioctl(0, termios.TIOCSTI, bytes([c]))\n"
             "except OSError as e:\n"
             "    print('TIOCSTI:', errno.errorcode[e.errno]); raise SystemExit(0)\n"
             "print('read-back:', os.read(0, 1).decode() if select.select([0], [], [], 2)[0] else 'nothing')\n")
    # The default seccomp profile refuses TIOCSTI outright.
    t = Terminal([*NSBOX, "run", str(project), "--", "/usr/bin/python3", "-c", probe], env)
    assert t.finish() == 0, t.output
    assert b"TIOCSTI: EPERM" in t.output, t.output
    # Without seccomp, the injected byte goes into the sandbox's own pty and comes back to
    # the agent itself: the caller's terminal is not reachable from inside.
    t = Terminal([*NSBOX, "run", "--without", "seccomp", str(project), "--", "/usr/bin/python3", "-c", probe], env)
    assert t.finish() == 0, t.output
    assert b"read-back: Q" in t.output, t.output
