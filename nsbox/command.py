"""`nsbox run` as a function of its parsed options, and the console entry point.

Why this module exists: importing click costs 25-40 ms, several times a whole bubblewrap
launch (about 5 ms), and `nsbox run` is the command that runs most often, usually from
scripts. So the common `nsbox run` is parsed and run here, without click; click stays the
command line for everything else (`--help`, error messages, the other subcommands).

How the two stay one command line:

- `RUN_OPTIONS` is the only definition of run's options, as data. `cli.py` builds the
  click options of `run`, `plan` and `verify` from it, and `parse_run` below reads argv
  with it.
- `parse_run` answers only when it is certain to agree with click: it returns exactly the
  params dict click would pass to the `run` command, or None, and then `main` hands the
  whole argv to click, which parses it again and prints its help or its error. So a
  mistake in this parser can only cost speed, never change what a command line means;
  tests/test_cli_fastpath.py checks that property against click itself.
- `run` is the body of `nsbox run`, fed the same dict from either parser.

Nothing here imports click (only `cli.py` does), and the launcher's modules load inside
`run` and `build_spec`, once a run is certain, so `import nsbox.command` stays cheap.
(pyroute2, pyseccomp and cgroupspy are not on a run's path at all: tests/test_imports.py.)
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, NoReturn

from nsbox.errors import ExitCode, StepError

if TYPE_CHECKING:
    from nsbox.spec import SandboxSpec


class Opt(NamedTuple):
    """One option of `nsbox run` (and of `plan` and `verify`, which take the same ones).

    `flags` are its spellings, the first one the name shown in help ("--cpus", then its
    alias "--cpu"); `dest` is its key in the params dict. `kind` says what it takes:
    "flag" nothing (False unless given), "value" one value (the last one given wins;
    `default` when absent, shown in --help), "multiple" one value per use, collected in
    order into a tuple (() when absent). A value is checked and converted by `type`:
    "str" as is, "int" a decimal integer, "path" a pathlib.Path; and must be one of
    `choices` when those are given.
    """

    flags: tuple[str, ...]
    dest: str
    kind: Literal["flag", "value", "multiple"]
    help: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    type: Literal["str", "int", "path"] = "str"
    default: str | int | None = None

    def absent(self) -> Any:
        """The value click gives when the option is not on the command line."""
        if self.kind == "flag":
            return False
        if self.kind == "multiple":
            return ()
        return self.default


# Besides these options, run/plan/verify take two arguments (built in cli.py, read by
# parse_run): PROJECT (optional, a path) and COMMAND... (the rest, unprocessed).
RUN_OPTIONS: tuple[Opt, ...] = (
    Opt(("--uid",), "uid", "value", type="int", default=1000, help="Your uid inside (non-root by default)."),
    Opt(("--name",), "name", "value",
        help="Sandbox name: selects the persistent $HOME (default: from the project path)."),
    Opt(("--fresh",), "fresh", "flag", help="Wipe this sandbox's $HOME before starting."),
    Opt(("--hostname",), "hostname", "value", default="nsbox"),
    Opt(("--env",), "env", "multiple", metavar="NAME[=VALUE]",
        help="Pass NAME from your environment, or set it (repeatable)."),
    Opt(("--api-key-mode",), "api_key_mode", "value", choices=("inject", "env", "none"),
        help="inject (default): the proxy adds ANTHROPIC_API_KEY, the agent holds a placeholder; "
             "env: pass the key itself (it can leak); none: no key."),
    Opt(("--no-api-key",), "no_api_key", "flag", help="Same as --api-key-mode none."),
    Opt(("--api-upstream",), "api_upstream", "value", metavar="URL",
        help="Where injected API requests go (default: https://api.anthropic.com); for a gateway, or a test server."),
    Opt(("--writable-git",), "writable_git", "flag", help="Leave .git/hooks and .git/config writable."),
    Opt(("--ro-bind",), "ro_binds", "multiple", metavar="HOST[:INSIDE]",
        help="Also show a host path, read-only (at the same path, or at INSIDE)."),
    Opt(("--network",), "network", "value", choices=("none", "allowlist", "host"),
        help="none: only loopback; allowlist: HTTP(S) through nsbox's proxy to allowed domains; "
             "host: the host's network, unfiltered. Default: allowlist for the agent, none otherwise."),
    Opt(("--allow-domain",), "allow_domains", "multiple", metavar="NAME[:PORT]",
        help="Allow NAME (or *.suffix) through the proxy; !NAME denies (repeatable)."),
    Opt(("--resolve",), "resolve", "multiple", metavar="NAME:PORT:ADDR",
        help="Pin NAME:PORT to ADDR, as curl does (also allows private addresses for it)."),
    Opt(("--seccomp-profile",), "seccomp_profile", "value", metavar="NAME|FILE",
        help="default, permissive, or a profile file (our TOML, or Docker/OCI JSON)."),
    Opt(("--no-landlock",), "no_landlock", "flag", help="Opt out of Landlock (same as --without landlock)."),
    Opt(("--without",), "without", "multiple", metavar="LAYER",
        help="Study mode: run with LAYER removed (caps, landlock, seccomp). Loudly unsafe."),
    Opt(("--image",), "image", "value", metavar="REF",
        help="Use an image of the local store as / (an overlay: writes persist per --name, --fresh discards "
             "them). Default: the host's system dirs."),
    Opt(("--memory",), "memory", "value", metavar="SIZE", help="Memory limit (cgroup memory.max, no swap), e.g. 2G."),
    Opt(("--cpus", "--cpu"), "cpus", "value", metavar="N", help="CPU limit, fractional (cgroup cpu.max), e.g. 1.5."),
    Opt(("--pids",), "pids", "value", metavar="N", help="Process and thread limit (cgroup pids.max)."),
    Opt(("--limits",), "limits_mode", "value", choices=("strict", "best-effort"),
        help="strict (default): refuse a limit no cgroup can enforce; best-effort: accept weaker rlimits "
             "(said in the plan and the report)."),
    Opt(("--pull",), "pull", "value", choices=("missing", "always", "never"), default="missing",
        help="With --image: pull from its registry when missing from the store (missing), every time (always), "
             "or never."),
    Opt(("--timeout",), "timeout", "value", metavar="DURATION",
        help="End the sandbox after this long (30m, 90s); exit 124."),
    Opt(("--disk",), "disk", "value", metavar="SIZE", help="Cap /tmp and /dev/shm (tmpfs size=), e.g. 512M."),
    Opt(("--log",), "log", "value", type="path", help="Write JSON-lines events here."),
    Opt(("--verbose", "-v"), "verbose", "flag", help="Print each launch step as it completes."),
)

# `run`'s own --json (plan and verify have a --json of their own, with another help text).
RUN_JSON = Opt(("--json",), "as_json", "flag",
               help="Print the result (status, signal, flags, usage) as one JSON object, the last line of stdout.")

_RUN_BY_FLAG = {flag: opt for opt in (*RUN_OPTIONS, RUN_JSON) for flag in opt.flags}


class _AskClick(Exception):
    """parse_run cannot be certain what click would make of this argv."""


def _convert(value: str, type_: str, choices: tuple[str, ...] | None) -> Any:
    """A value as click's types convert it, or _AskClick where click might differ or fail."""
    if choices is not None and value not in choices:  # click.Choice: exact, case-sensitive
        raise _AskClick
    if type_ == "int":
        # click takes whatever int() takes (" 7", "1_000", other scripts' digits); here only
        # the plain form a person types, the rest goes to click.
        if not re.fullmatch(r"-?[0-9]+", value):
            raise _AskClick
        return int(value)
    if type_ == "path":
        # click.Path(path_type=Path): any string, but a path that exists must be readable.
        try:
            os.stat(value)
        except OSError:
            return Path(value)
        if not os.access(value, os.R_OK):
            raise _AskClick
        return Path(value)
    return value


def parse_run(argv: Sequence[str]) -> dict[str, Any] | None:
    """The params click would pass to `nsbox run` for these arguments (after "run"), or None.

    The rules are click's, for a command with allow_interspersed_args=False:

    - Options come first: `--opt value` or `--opt=value` (the value is taken as is, even
      when it starts with "-"), a flag alone (`--fresh`, `-v`).
    - "--" ends the options and is dropped.
    - Otherwise the first argument that does not start with "-" (or is "-" itself) ends
      them and is kept: it is PROJECT, and everything after it is COMMAND, untouched,
      including a "--" right after PROJECT (run drops that one: `command_argv`).

    None whenever click would not simply accept the line: --help, an unknown option,
    combined short flags (-vv), a flag given a value, a missing value, a value that is not
    one of the choices or not a plain integer, an existing path that is not readable, a
    NUL byte. `main` then lets click parse the same argv, so the user sees click's help
    or error (exit 0 or 125), exactly as before this fast path existed. None also for a
    few lines click accepts but people do not type (" 7" as an integer, a bad value
    later overridden): declining costs only click's import, agreeing wrongly would
    change a command.
    """
    if any("\0" in arg for arg in argv):  # impossible in a real argv; os.stat would raise ValueError
        return None
    params: dict[str, Any] = {opt.dest: opt.absent() for opt in _RUN_BY_FLAG.values()}
    i = 0
    try:
        while i < len(argv):
            arg = argv[i]
            if arg == "--":
                i += 1
                break
            if not arg.startswith("-") or arg == "-":
                break
            i += 1
            # Only long options take "=value": "-v=x" is click's short-option syntax, unknown here.
            name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
            opt = _RUN_BY_FLAG.get(name)
            if opt is None:
                return None
            if opt.kind == "flag":
                if eq:
                    return None
                params[opt.dest] = True
                continue
            if eq:
                value = inline
            elif i < len(argv):
                value, i = argv[i], i + 1
            else:
                return None
            converted = _convert(value, opt.type, opt.choices)
            params[opt.dest] = (*params[opt.dest], converted) if opt.kind == "multiple" else converted
        rest = argv[i:]
        params["project"] = _convert(rest[0], "path", None) if rest else None
        params["command"] = tuple(rest[1:])
    except _AskClick:
        return None
    return params


# ---- what run, plan and verify share --------------------------------------------------------------------------


# What each removable layer protects: printed when --without removes it.
UNPROTECTED = {
    "caps": "the agent keeps its bounding set and securebits are not locked",
    "landlock": "file access is limited only by the mount table and permissions",
    "seccomp": "every syscall reaches the kernel (io_uring, keyctl, bpf, ptrace, AF_VSOCK, TIOCSTI...)",
}


def _stderr(message: str) -> None:
    # Flushed at once, as click.echo does: a fork or os._exit must not lose or repeat it.
    print(message, file=sys.stderr, flush=True)


def build_spec(params: Mapping[str, Any], trace: bool) -> SandboxSpec:
    """The SandboxSpec for parsed options (from either parser), with the warnings they deserve.

    Keys that are not options of the sandbox (command, log, verbose, as_json) are ignored.
    Raises StepError for a value that is well-formed for the parser but not for nsbox
    (a size, a duration, a name).
    """
    from nsbox import limits
    from nsbox.spec import SandboxSpec

    without = tuple(params["without"])
    if params["no_landlock"] and "landlock" not in without:
        without = (*without, "landlock")
    for layer in without:
        if layer in UNPROTECTED:
            _stderr(f"nsbox: warning: --without {layer}: {UNPROTECTED[layer]}")
    if params["network"] == "host":
        _stderr("nsbox: warning: --network host: the agent shares the host's network, unfiltered "
                "(every host service on 127.0.0.1, every address)")
    key_mode = "none" if params["no_api_key"] else params["api_key_mode"]
    return SandboxSpec(
        project=params["project"] or Path.cwd(), uid=params["uid"], name=params["name"], fresh=params["fresh"],
        hostname=params["hostname"], env=params["env"], api_key_mode=key_mode, writable_git=params["writable_git"],
        network=params["network"], allow_domains=params["allow_domains"], resolve=params["resolve"],
        api_upstream=params["api_upstream"], ro_binds=params["ro_binds"], trace=trace,
        seccomp_profile=params["seccomp_profile"], without=without,
        timeout=limits.parse_duration(params["timeout"]) if params["timeout"] else None,
        disk=limits.parse_size(params["disk"]) if params["disk"] else None,
        image=params["image"], pull=params["pull"],
        memory=limits.parse_size(params["memory"]) if params["memory"] else None,
        cpus=limits.parse_cpus(params["cpus"]) if params["cpus"] else None,
        pids=limits.parse_pids(params["pids"]) if params["pids"] else None,
        limits=params["limits_mode"])


def fail(e: StepError) -> NoReturn:
    """Print an nsbox error with its why and fix lines, and exit with its code (125 for nsbox's own)."""
    from nsbox import hints

    _stderr(hints.explain(e).render())
    sys.exit(e.exit_code)


def command_argv(command: tuple[str, ...]) -> list[str] | None:
    """COMMAND as the argv to run, or None for the default (the agent).

    `nsbox run PROJECT -- CMD ...`: the parser keeps a "--" that follows PROJECT (it ends
    the options only before it), so it is dropped here.
    """
    args = list(command)
    if args and args[0] == "--":
        args = args[1:]
    return args or None


# ---- nsbox run ----------------------------------------------------------------------------------------------


def run(params: Mapping[str, Any]) -> NoReturn:
    """`nsbox run`, given its params (from parse_run or from click): run, report, exit with the status."""
    import json

    from nsbox.events import redact
    from nsbox.sandbox import Sandbox

    log: Path | None = params["log"]
    verbose: bool = params["verbose"]
    try:
        spec = build_spec(params, trace=bool(log or verbose))
        _reexec_in_a_delegated_scope_if_needed(spec)
    except StepError as e:
        fail(e)
    sandbox = Sandbox(spec)
    secrets = sandbox.secrets()
    log_file = open(log, "a", buffering=1) if log else None  # noqa: SIM115 - open for the whole run

    def on_event(event: dict[str, Any]) -> None:
        if verbose and event.get("event") == "step.ok":
            _stderr(f"nsbox: {event.get('role')}: {event.get('step')} ok")
        if event.get("event") == "warning":
            _stderr(f"nsbox: warning: {event['message']}")
        if event.get("event") == "limits":
            for line in event["lines"] if verbose else event["weaker"]:
                _stderr(f"nsbox: {'limit' if verbose else 'warning'}: {line}")
        if log_file is not None:
            log_file.write(redact(event, secrets) + "\n")

    try:
        result = sandbox.run(command_argv(params["command"]), on_event=on_event)
        summary = {"event": "sandbox.exit", "status": result.status, "signal": result.signal,
                   "flags": sorted(result.flags), "usage": result.usage, "error": result.error}
        if log_file is not None:
            log_file.write(redact(summary, secrets) + "\n")
    finally:
        if log_file is not None:
            log_file.close()
    if result.error:
        _stderr(result.error)
    if verbose and result.usage:
        u = result.usage
        peak = f"{u['memory_peak'] / 2**20:.1f} MiB" if u.get("memory_peak") is not None else "unknown"
        cpu = f"{(u.get('cpu_usec') or 0) / 1e6:.2f}s"
        _stderr(f"nsbox: usage ({u['mechanism']}): cpu {cpu}, peak memory {peak}, "
                f"oom kills {u.get('oom_kills', 0)}, pids-limit hits {u.get('pids_max_hits', 0)}")
    for violation in result.violations:  # for the user, and for an agent that reads our stderr
        _stderr(f"nsbox: {violation['message']}")
    if params["as_json"]:  # for CI runners: one object, the last line of stdout
        print(json.dumps(summary))
    # Everything is reported and closed (the proxy stopped, the log written): skip the
    # interpreter's teardown, which costs more than the launch itself (scripts/bench).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(result.status)


def _reexec_in_a_delegated_scope_if_needed(spec: SandboxSpec) -> None:
    """Limits only a systemd user scope can enforce: re-execute nsbox inside one.

    The new process runs `python -m nsbox` with the same arguments, so it takes the same
    path through `main` (nsbox/__main__.py calls it too).
    """
    from nsbox.layers import cgroups

    if spec.memory is None and spec.cpus is None and spec.pids is None:
        return
    plan = cgroups.plan(spec.memory, spec.cpus, spec.pids, best_effort=True)
    argv = cgroups.scope_reexec_argv([sys.executable, "-m", "nsbox", *sys.argv[1:]])
    if plan.backend == cgroups.SCOPE and argv is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp(argv[0], argv)


# ---- the entry point --------------------------------------------------------------------------------------------


def _completing() -> bool:
    # click answers shell completion (_NSBOX_COMPLETE=bash_complete nsbox ...) before it
    # parses anything: such a call must reach click even when it looks like a run.
    return any(k.startswith("_") and k.endswith("_COMPLETE") and v for k, v in os.environ.items())


def main() -> Any:
    """The `nsbox` console script and `python -m nsbox`: a run parse_run is sure of runs here, the rest goes to click.

    Returns what click's main returns (the console script passes it to sys.exit); a run
    never returns.
    """
    args = sys.argv[1:]
    if args[:1] == ["run"] and not _completing():
        params = parse_run(args[1:])
        if params is not None:
            try:
                run(params)
            except (KeyboardInterrupt, EOFError):
                # What click does with these: a newline on stderr, then (cli._Group) exit 125.
                print(file=sys.stderr, flush=True)
                sys.exit(ExitCode.NSBOX)
    from nsbox import cli

    return cli.main()
