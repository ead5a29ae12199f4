"""The Python API: `Sandbox(spec).run(argv) -> Result`. The CLI is a thin layer over it.

    from nsbox import Sandbox, SandboxSpec
    result = Sandbox(SandboxSpec(project="/src/app")).run(["make", "test"])
    if not result.ok:
        print(result.error or f"exit {result.status}")

`run` forks (the launcher's children), so call it from a single-threaded process, as
with os.fork. It never raises for a failed launch: the error is in `Result.error`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

from nsbox import events, hints, launch
from nsbox.errors import ExitCode
from nsbox.spec import SandboxSpec


class Result(NamedTuple):
    status: int  # the exit status nsbox returns: the agent's, 128+N, or 125/126/127
    signal: int | None = None  # the signal that killed the agent, if one did
    error: str | None = None  # the rendered nsbox error (first line `nsbox: <step>: ...`)
    flags: frozenset[str] = frozenset()  # e.g. {"launch-failed", "signaled"}
    events: tuple[dict[str, Any], ...] = ()  # every audit event; left out of repr (long)
    checks: tuple[dict[str, Any], ...] = ()  # nsbox verify: (layer, check, expected, actual, ok)
    usage: dict[str, Any] | None = None  # cgroup counters: memory_peak, cpu_usec, oom_kills, ...
    violations: tuple[dict[str, Any], ...] = ()  # what was refused or stopped: {"kind", "message", ...}

    def __repr__(self) -> str:
        return (f"Result(status={self.status!r}, signal={self.signal!r}, error={self.error!r}, flags={self.flags!r}, "
                f"checks={self.checks!r}, usage={self.usage!r}, violations={self.violations!r})")

    @property
    def ok(self) -> bool:
        return self.status == 0


class Sandbox:
    def __init__(self, spec: SandboxSpec) -> None:
        self.spec = spec

    def plan(self, argv: list[str] | None = None) -> list[tuple[str, list[str]]]:
        """What `run` would do, layer by layer, without changing anything.

        Nothing is created: not the sandbox's home or upper layer (their paths are only
        named), not the image's unpacked tree, not the compiled-BPF cache (the profile is
        compiled, and its cache only read).
        """
        spec = self.spec.resolved()
        assert spec.name is not None
        from nsbox import config

        home = config.sandbox_dir(spec.name) / "home"
        image = _planned_image(spec) if spec.image else None
        plans = launch.make_plans(spec, tuple(argv) if argv else None, False, str(home), image, dry_run=True)
        return plans.describe()

    def secrets(self) -> tuple[str, ...]:
        """Values that must never be written to a log: the API key, and what --env passed."""
        values = [os.environ.get("ANTHROPIC_API_KEY", "")]
        for item in self.spec.env:
            name, sep, value = item.partition("=")
            values.append(value if sep else os.environ.get(name, ""))
        return tuple(v for v in values if v)

    def run(self, argv: list[str] | None = None, stdin_is_tty: bool | None = None,
            on_event: Callable[[dict[str, Any]], None] | None = None) -> Result:
        """Run argv (default: the agent) in a new sandbox and wait for it.

        `on_event` sees every audit event as it happens (see nsbox.events), the violations
        last; they are all in Result.events too.
        """
        outcome = launch.launch(self.spec, tuple(argv) if argv else None, stdin_is_tty, on_event)
        flags: set[str] = set()
        error = None
        if outcome.error is not None:
            error = hints.explain(outcome.error).render()
            if outcome.status is None or outcome.error.exit_code in (ExitCode.NOT_FOUND, ExitCode.NOT_EXECUTABLE):
                flags.add("launch-failed")
        sig = outcome.status.signal if outcome.status is not None else None
        if sig is not None:
            flags.add("signaled")
        if outcome.timed_out:
            flags.add("timeout")
        if outcome.usage and outcome.usage.get("oom_kills"):
            flags.add("oom")
        if outcome.usage and outcome.usage.get("pids_max_hits"):
            flags.add("pids-limit")
        if outcome.error is not None:
            outcome.events.append({"event": "step.fail", "step": outcome.error.step,
                                   "error": outcome.error.headline()})
        found = events.violations(sig, outcome.timed_out, outcome.timeout, outcome.usage, list(outcome.events),
                                  outcome.kill_rules, outcome.seccomp_kills)
        for v in found:
            outcome.events.append({"event": "violation", **v})
        return Result(outcome.exit_code, sig, error, frozenset(flags), tuple(outcome.events),
                      tuple(outcome.probe or ()), outcome.usage, tuple(found))

    def verify(self) -> Result:
        """Build this sandbox and run the self-checks inside it, after every layer."""
        return Sandbox(self.spec._replace(probe=True)).run(["true"])


def _planned_image(spec: SandboxSpec) -> launch.ImageRoot:
    """The image root `run` would use, read from the store without unpacking or locking."""
    from nsbox import config
    from nsbox.errors import usage_error
    from nsbox.image import store as image_store

    assert spec.image is not None and spec.name is not None
    if not image_store.default_root().is_dir():  # Store() would create it
        raise usage_error("image.materialize", f"no image store at {image_store.default_root()}",
                          fix=f"nsbox image import ARCHIVE --name {spec.image}")
    store = image_store.Store()
    ref = store.resolve(spec.image)
    rootfs = store.rootfs_dir / store._chain_hex(ref.digest)  # the unpacked tree; unpacked on the first run
    return launch.ImageRoot(str(rootfs), store.config(ref), str(config.sandbox_dir(spec.name) / "upper"))
