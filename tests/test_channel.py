"""The sync channel between the roles: message order across processes, and EOF on failure.

Real sockets and real forks; these are the two properties a launch under load depends on
(scripts/bench's 32 concurrent runs found both missing: init's "root-ready" can overtake
the holder's "init-forked", and a launcher that stopped early then waited forever for a
holder that waited for init, which waited for a message that never came).
"""

from __future__ import annotations

import os
import signal
import time

from nsbox import process
from nsbox.process import Channel, ErrorPipe


def test_expect_each_takes_messages_from_two_senders_in_either_order():
    for order in (("root-ready", "init-forked"), ("init-forked", "root-ready")):
        mine, theirs = Channel.pair()
        r, w = os.pipe()
        for kind in order:  # as the holder and init do: one end, two writers
            theirs.send(kind, (r,) if kind == "root-ready" else (), n=order.index(kind))
        theirs.send("event", event="step.ok")  # events in between are kept, not lost
        got = mine.expect_each("init-forked", "root-ready")
        assert set(got) == {"init-forked", "root-ready"}
        assert got["root-ready"][0]["n"] == order.index("root-ready")
        assert len(got["root-ready"][1]) == 1  # the fd came with its message
        for fd in (r, w, *got["root-ready"][1]):
            os.close(fd)
        mine.close()
        theirs.close()


def test_expect_each_stops_at_eof_with_what_came_before():
    mine, theirs = Channel.pair()
    theirs.send("init-forked", init_pid=5)
    theirs.close()
    got = mine.expect_each("init-forked", "root-ready")
    assert set(got) == {"init-forked", "eof"}
    mine.close()


def test_a_child_waiting_on_the_channel_reads_eof_when_the_parent_closes_its_end():
    mine, theirs = Channel.pair()
    errors = ErrorPipe()

    def child() -> int:
        msg, _ = theirs.expect("go")  # the launcher stopped early: "go" never comes
        return 3 if msg["kind"] == "eof" else 4

    pid = process.fork_role("testchild", child, errors, parent_end=mine)
    theirs.close()
    errors.close_write()
    time.sleep(0.05)
    mine.close()  # what the launcher's failure path does before it waits
    deadline = time.monotonic() + 10
    done, status = 0, 0
    while not done and time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)
    if not done:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert done, "the child still waits: it holds a copy of the parent's end, so no EOF comes"
    assert os.waitstatus_to_exitcode(status) == 3
