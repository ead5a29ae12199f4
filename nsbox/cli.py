"""The command line: a thin layer over the Python API. Nothing else imports click."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from nsbox import __version__, hints, limits
from nsbox.errors import ExitCode, StepError
from nsbox.events import redact
from nsbox.sandbox import Sandbox
from nsbox.spec import SandboxSpec


class _Group(click.Group):
    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        # click's own usage errors exit 2; nsbox promises 125 for every failure of its own.
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.format_message() if hasattr(e, "format_message") else str(e))
            sys.exit(0)
        except click.UsageError as e:
            click.echo(f"nsbox: cli.parse: {e.format_message()}", err=True)
            click.echo("  fix: nsbox run --help", err=True)
            sys.exit(ExitCode.NSBOX)
        except click.exceptions.Abort:
            sys.exit(ExitCode.NSBOX)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="nsbox")
def main() -> None:
    """nsbox: run a coding agent (or any command) on one project, in a rootless sandbox."""


def _run_options(f: click.decorators.FC) -> click.decorators.FC:
    options = [
        click.argument("project", required=False, type=click.Path(path_type=Path)),
        click.argument("command", nargs=-1, type=click.UNPROCESSED),
        click.option("--uid", type=int, default=1000, show_default=True, help="Your uid inside (non-root by default)."),
        click.option("--name", help="Sandbox name: selects the persistent $HOME (default: from the project path)."),
        click.option("--fresh", is_flag=True, help="Wipe this sandbox's $HOME before starting."),
        click.option("--hostname", default="nsbox", show_default=True),
        click.option("--env", "env", multiple=True, metavar="NAME[=VALUE]",
                     help="Pass NAME from your environment, or set it (repeatable)."),
        click.option("--api-key-mode", type=click.Choice(["inject", "env", "none"]),
                     help="inject (default): the proxy adds ANTHROPIC_API_KEY, the agent holds a placeholder; "
                          "env: pass the key itself (it can leak); none: no key."),
        click.option("--no-api-key", is_flag=True, help="Same as --api-key-mode none."),
        click.option("--api-upstream", metavar="URL", help="Where injected API requests go (default: "
                     "https://api.anthropic.com); for a gateway, or a test server."),
        click.option("--writable-git", is_flag=True, help="Leave .git/hooks and .git/config writable."),
        click.option("--ro-bind", "ro_binds", multiple=True, metavar="HOST[:INSIDE]",
                     help="Also show a host path, read-only (at the same path, or at INSIDE)."),
        click.option("--network", type=click.Choice(["none", "allowlist", "host"]),
                     help="none: only loopback; allowlist: HTTP(S) through nsbox's proxy to allowed domains; "
                          "host: the host's network, unfiltered. Default: allowlist for the agent, none otherwise."),
        click.option("--allow-domain", "allow_domains", multiple=True, metavar="NAME[:PORT]",
                     help="Allow NAME (or *.suffix) through the proxy; !NAME denies (repeatable)."),
        click.option("--resolve", "resolve", multiple=True, metavar="NAME:PORT:ADDR",
                     help="Pin NAME:PORT to ADDR, as curl does (also allows private addresses for it)."),
        click.option("--seccomp-profile", metavar="NAME|FILE",
                     help="default, permissive, or a profile file (our TOML, or Docker/OCI JSON)."),
        click.option("--no-landlock", is_flag=True, help="Opt out of Landlock (same as --without landlock)."),
        click.option("--without", "without", multiple=True, metavar="LAYER",
                     help="Study mode: run with LAYER removed (caps, landlock, seccomp). Loudly unsafe."),
        click.option("--image", metavar="REF", help="Use an image of the local store as / (an overlay: "
                     "writes persist per --name, --fresh discards them). Default: the host's system dirs."),
        click.option("--memory", metavar="SIZE", help="Memory limit (cgroup memory.max, no swap), e.g. 2G."),
        click.option("--cpus", "--cpu", "cpus", metavar="N", help="CPU limit, fractional (cgroup cpu.max), e.g. 1.5."),
        click.option("--pids", metavar="N", help="Process and thread limit (cgroup pids.max)."),
        click.option("--limits", "limits_mode", type=click.Choice(["strict", "best-effort"]),
                     help="strict (default): refuse a limit no cgroup can enforce; best-effort: accept "
                     "weaker rlimits (said in the plan and the report)."),
        click.option("--pull", type=click.Choice(["missing", "always", "never"]), default="missing",
                     show_default=True, help="With --image: pull from its registry when missing from the store "
                     "(missing), every time (always), or never."),
        click.option("--timeout", metavar="DURATION", help="End the sandbox after this long (30m, 90s); exit 124."),
        click.option("--disk", metavar="SIZE", help="Cap /tmp and /dev/shm (tmpfs size=), e.g. 512M."),
        click.option("--log", "log", type=click.Path(path_type=Path), help="Write JSON-lines events here."),
        click.option("--verbose", "-v", is_flag=True, help="Print each launch step as it completes."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


# What each removable layer protects: printed when --without removes it.
UNPROTECTED = {
    "caps": "the agent keeps its bounding set and securebits are not locked",
    "landlock": "file access is limited only by the mount table and permissions",
    "seccomp": "every syscall reaches the kernel (io_uring, keyctl, bpf, ptrace, AF_VSOCK, TIOCSTI...)",
}


def _spec(opts: dict[str, Any], trace: bool) -> SandboxSpec:
    if opts.pop("no_landlock") and "landlock" not in opts["without"]:
        opts["without"] = (*opts["without"], "landlock")
    for layer in opts["without"]:
        if layer in UNPROTECTED:
            click.echo(f"nsbox: warning: --without {layer}: {UNPROTECTED[layer]}", err=True)
    if opts["network"] == "host":
        click.echo("nsbox: warning: --network host: the agent shares the host's network, unfiltered "
                   "(every host service on 127.0.0.1, every address)", err=True)
    key_mode = "none" if opts["no_api_key"] else opts["api_key_mode"]
    timeout = limits.parse_duration(opts["timeout"]) if opts["timeout"] else None
    disk = limits.parse_size(opts["disk"]) if opts["disk"] else None
    return SandboxSpec(project=opts["project"] or Path.cwd(), uid=opts["uid"], name=opts["name"],
                       fresh=opts["fresh"], hostname=opts["hostname"], env=opts["env"],
                       api_key_mode=key_mode, writable_git=opts["writable_git"], network=opts["network"],
                       allow_domains=opts["allow_domains"], resolve=opts["resolve"],
                       api_upstream=opts["api_upstream"], ro_binds=opts["ro_binds"], trace=trace,
                       seccomp_profile=opts["seccomp_profile"], without=opts["without"], timeout=timeout, disk=disk,
                       image=opts["image"], pull=opts["pull"],
                       memory=limits.parse_size(opts["memory"]) if opts["memory"] else None,
                       cpus=limits.parse_cpus(opts["cpus"]) if opts["cpus"] else None,
                       pids=limits.parse_pids(opts["pids"]) if opts["pids"] else None,
                       limits=opts["limits_mode"])


def _fail(e: StepError) -> NoReturn:
    click.echo(hints.explain(e).render(), err=True)
    sys.exit(e.exit_code)


def _command(command: tuple[str, ...]) -> list[str] | None:
    # `nsbox run PROJECT -- CMD ...`: click keeps a "--" that follows the first argument.
    args = list(command)
    if args and args[0] == "--":
        args = args[1:]
    return args or None


@main.command(context_settings={"allow_interspersed_args": False})
@_run_options
@click.option("--json", "as_json", is_flag=True, help="Print the result (status, signal, flags, usage) as one "
              "JSON object, the last line of stdout.")
def run(command: tuple[str, ...], log: Path | None, verbose: bool, as_json: bool, **opts: Any) -> None:
    """Run COMMAND (default: claude --dangerously-skip-permissions) on PROJECT (default: .).

    \b
    Examples:
      nsbox run                      the agent, on the current directory
      nsbox run ~/src/app -- bash    a shell, on ~/src/app
    """
    try:
        spec = _spec(opts, trace=bool(log or verbose))
        _reexec_in_a_delegated_scope_if_needed(spec)
    except StepError as e:
        _fail(e)
    sandbox = Sandbox(spec)
    secrets = sandbox.secrets()
    log_file = open(log, "a", buffering=1) if log else None  # noqa: SIM115 - open for the whole run

    def on_event(event: dict[str, Any]) -> None:
        if verbose and event.get("event") == "step.ok":
            click.echo(f"nsbox: {event.get('role')}: {event.get('step')} ok", err=True)
        if event.get("event") == "warning":
            click.echo(f"nsbox: warning: {event['message']}", err=True)
        if event.get("event") == "limits":
            for line in event["lines"] if verbose else event["weaker"]:
                click.echo(f"nsbox: {'limit' if verbose else 'warning'}: {line}", err=True)
        if log_file is not None:
            log_file.write(redact(event, secrets) + "\n")

    try:
        result = sandbox.run(_command(command), on_event=on_event)
        summary = {"event": "sandbox.exit", "status": result.status, "signal": result.signal,
                   "flags": sorted(result.flags), "usage": result.usage, "error": result.error}
        if log_file is not None:
            log_file.write(redact(summary, secrets) + "\n")
    finally:
        if log_file is not None:
            log_file.close()
    if result.error:
        click.echo(result.error, err=True)
    if verbose and result.usage:
        u = result.usage
        peak = f"{u['memory_peak'] / 2**20:.1f} MiB" if u.get("memory_peak") is not None else "unknown"
        cpu = f"{(u.get('cpu_usec') or 0) / 1e6:.2f}s"
        click.echo(f"nsbox: usage ({u['mechanism']}): cpu {cpu}, peak memory {peak}, "
                   f"oom kills {u.get('oom_kills', 0)}, pids-limit hits {u.get('pids_max_hits', 0)}", err=True)
    for violation in result.violations:  # for the user, and for an agent that reads our stderr
        click.echo(f"nsbox: {violation['message']}", err=True)
    if as_json:  # for CI runners: one object, the last line of stdout
        click.echo(json.dumps(summary))
    # Everything is reported and closed (the proxy stopped, the log written): skip the
    # interpreter's teardown, which costs more than the launch itself (scripts/bench).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(result.status)


def _reexec_in_a_delegated_scope_if_needed(spec: SandboxSpec) -> None:
    """Limits only a systemd user scope can enforce: re-execute nsbox inside one."""
    from nsbox.layers import cgroups

    if spec.memory is None and spec.cpus is None and spec.pids is None:
        return
    plan = cgroups.plan(spec.memory, spec.cpus, spec.pids, best_effort=True)
    argv = cgroups.scope_reexec_argv([sys.executable, "-m", "nsbox", *sys.argv[1:]])
    if plan.backend == cgroups.SCOPE and argv is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp(argv[0], argv)


@main.command()
@_run_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan(command: tuple[str, ...], log: Path | None, verbose: bool, as_json: bool, **opts: Any) -> None:
    """Print what `nsbox run` would do, layer by layer. Changes nothing."""
    from nsbox.launch import SEQUENCE
    from nsbox.spec import REMOVABLE_LAYERS

    try:
        spec = _spec(opts, trace=False)
        layers = Sandbox(spec).plan(_command(command))
    except StepError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps({
            "sequence": [{"n": i, "who": s.who, "step": s.id, "why": s.why} for i, s in enumerate(SEQUENCE, 1)],
            "layers": {name: lines for name, lines in layers},
            "removable": list(REMOVABLE_LAYERS),
            "without": list(spec.without),
        }, indent=2))
        return
    click.echo("Launch sequence:")
    for i, s in enumerate(SEQUENCE, 1):
        click.echo(f"  {i:2} {s.who:8} {s.id:26} {s.why}")
    for layer, lines in layers:
        click.echo(f"\n{layer}:")
        for line in lines:
            click.echo(f"  {line}")
    click.echo(f"\nRemovable for study (--without LAYER): {', '.join(REMOVABLE_LAYERS)}")


# The order `nsbox verify` prints its layers in: the order the sandbox is built.
VERIFY_LAYERS = ("userns", "pidns", "mountns", "netns", "utsns", "caps", "nnp", "seccomp", "landlock", "execve")


def _by_layer(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {name: i for i, name in enumerate(VERIFY_LAYERS)}
    return sorted(rows, key=lambda r: order.get(str(r["layer"]), len(order)))  # stable: the probe's order


def _verify_once(spec: SandboxSpec) -> list[dict[str, Any]]:
    result = Sandbox(spec).verify()
    if result.error and not result.checks:
        click.echo(result.error, err=True)
        sys.exit(result.status)
    return _by_layer(list(result.checks))


def _changes(full: list[dict[str, Any]], study: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose answer differs between the full sandbox and the study run, by (layer, check)."""
    before = {(r["layer"], r["check"]): r for r in full}
    changed = []
    for r in study:
        f = before.get((r["layer"], r["check"]))
        if f is None or (f["actual"], f["ok"]) != (r["actual"], r["ok"]):
            changed.append({"layer": r["layer"], "check": r["check"], "expected": r["expected"],
                            "full": f["actual"] if f else "(not checked)", "full_ok": bool(f and f["ok"]),
                            "without": r["actual"], "without_ok": r["ok"]})
    return changed


def _table(rows: list[dict[str, Any]]) -> None:
    w_check = max(len("check"), *(len(str(r["check"])) for r in rows))
    layer, w_exp = None, 0
    for r in rows:
        if r["layer"] != layer:
            layer = r["layer"]
            w_exp = min(40, max(len("expected"), *(len(str(x["expected"])) for x in rows if x["layer"] == layer)))
            removed = "   (REMOVED with --without)" if r.get("removed") else ""
            click.echo(f"\n{layer}{removed}\n  {'check':{w_check}}  {'expected':{w_exp}}  {'actual':{w_exp}}  ok")
        click.echo(f"  {r['check']!s:{w_check}}  {r['expected']!s:{w_exp}}  {r['actual']!s:{w_exp}}  "
                   f"{'ok' if r['ok'] else 'FAIL'}")


@main.command()
@_run_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify(command: tuple[str, ...], log: Path | None, verbose: bool, as_json: bool, **opts: Any) -> None:
    """Build a sandbox with these options and check every layer from inside it.

    Each layer's checks and the battery's escape attempts run in the agent process,
    after every layer is applied, in place of the command. Exit 0 only when every
    check holds. With --without LAYER (study mode) the full sandbox is verified too,
    and the checks whose answer changed are listed: the lesson of that layer.
    """
    try:
        spec = _spec(opts, trace=False)
    except StepError as e:
        _fail(e)
    rows = _verify_once(spec)
    changed = None
    if spec.without:
        import dataclasses

        changed = _changes(_verify_once(dataclasses.replace(spec, without=())), rows)
    failed = [r for r in rows if not r["ok"]]
    ok = bool(rows) and not failed
    if as_json:
        out: dict[str, Any] = {"ok": ok, "checks": rows}
        if changed is not None:
            out["study"] = {"without": list(spec.without), "changed": changed}
        click.echo(json.dumps(out, indent=2))
        sys.exit(0 if ok else 1)
    _table(rows)
    if changed is not None:
        click.echo(f"\nChanged by --without {' --without '.join(spec.without)} "
                   "(the full sandbox, then this run): what the layer was doing")
        for c in changed:
            click.echo(f"  {c['layer']:8} {c['check']:32} {c['full']} -> {c['without']}"
                       f"{'' if c['without_ok'] else '   FAIL'}")
        if not changed:
            click.echo("  nothing: every check answers the same")
    layers = sorted({str(r["layer"]) for r in failed}, key=lambda x: VERIFY_LAYERS.index(x)
                    if x in VERIFY_LAYERS else len(VERIFY_LAYERS))
    verdict = ("every check holds" if ok else
               f"{len(failed)} of {len(rows)} checks FAILED ({', '.join(layers)})")
    removed = f"; removed: {', '.join(spec.without)}" if spec.without else ""
    click.echo(f"\nnsbox verify: {len(rows)} checks, {verdict}{removed}")
    sys.exit(0 if ok else 1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json: bool) -> None:
    """What this host allows nsbox to do, one line each, with the exact fix for each gap.

    Probes in throwaway child processes only: nothing on the system changes. Exit 0
    when everything nsbox needs to run is there (optional features may be missing).
    """
    from nsbox import host

    facts = host.probe()
    report = host.as_json(facts)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        width = max(len(f["name"]) for f in report["facts"])
        for f in report["facts"]:
            mark = "ok  " if f["ok"] else ("MISSING" if f["required"] else "no  ")
            click.echo(f"{mark:7} {f['name']:{width}}  {f['summary']}")
            if f["fix"]:
                for i, line in enumerate(str(f["fix"]).split("\n")):
                    click.echo(f"{'':7} {'':{width}}  {'fix: ' if i == 0 else '     '}{line}")
        click.echo(f"nsbox doctor: {'nsbox can run here' if report['ok'] else 'nsbox CANNOT run here'}")
    sys.exit(0 if report["ok"] else 1)


@main.group()
def seccomp() -> None:
    """Seccomp profiles as data: the rules and their reasons, libseccomp's PFC, the BPF, OCI JSON."""


@seccomp.command("show")
@click.argument("profile", default="default")
@click.option("--pfc", "form", flag_value="pfc", help="libseccomp's pseudo filter code.")
@click.option("--bpf", "form", flag_value="bpf", help="The compiled classic BPF, raw bytes on stdout.")
@click.option("--oci", "form", flag_value="oci", help="The profile as OCI linux.seccomp JSON.")
def seccomp_show(profile: str, form: str | None) -> None:
    """Show PROFILE (default, permissive, or a TOML/JSON file): rules with their why by default."""
    from nsbox.layers import seccomp as layer

    try:
        path = layer.resolve_profile(profile)
        if form == "pfc":
            click.echo(layer.export_pfc(layer.load_profile(path)), nl=False)
        elif form == "bpf":
            sys.stdout.buffer.write(layer.plan(path).bpf)
        elif form == "oci":
            click.echo(json.dumps(layer.to_oci(layer.load_profile(path)), indent=2))
        else:
            for line in layer.plan(path).describe():
                click.echo(line)
    except StepError as e:
        _fail(e)


# ---- nsbox image ------------------------------------------------------------------------


@main.group()
def image() -> None:
    """The local image store ($XDG_DATA_HOME/nsbox): pull, import, list, inspect, remove, unpack."""


def _store_call(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except StepError as e:
        _fail(e)


@image.command("import")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--name", metavar="NAME[:TAG]", help="Name the image (default: the archive's own name).")
def image_import(path: Path, name: str | None) -> None:
    """Import an OCI image layout (directory or tar) or a `docker save` archive."""
    from nsbox.image import store

    click.echo(str(_store_call(store.import_image, path, name)))


@image.command("pull")
@click.argument("ref")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]", help="From a multi-platform image, this one "
              "(default: this machine's, e.g. linux/amd64).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Verify the registry's TLS certificate with this CA bundle (PEM).")
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST[:PORT]",
              help="Allow plain HTTP, or HTTPS without verification, to this registry (repeatable).")
def image_pull(ref: str, platform: str | None, tls_ca: Path | None, insecure: tuple[str, ...]) -> None:
    """Pull REF (debian:bookworm-slim, HOST[:PORT]/NAME[:TAG], NAME@sha256:...) from its registry."""
    from nsbox.image import registry

    pulled = _store_call(registry.pull, ref, platform, tls_ca, insecure)
    click.echo(f"{pulled.name or ref} {pulled.digest}")


@image.command("ls")
@click.option("--json", "as_json", is_flag=True)
def image_ls(as_json: bool) -> None:
    """List the images in the store."""
    from nsbox.image import store

    infos = _store_call(store.list_images)
    if as_json:
        click.echo(json.dumps([{"digest": i.ref.digest, "names": list(i.names), "size": i.size, "layers": i.layers,
                                "created": i.created, "unpacked": i.unpacked} for i in infos], indent=2))
        return
    click.echo(f"{'NAME':30} {'DIGEST':19} {'LAYERS':>6} {'SIZE':>10}  UNPACKED")
    for i in infos:
        for n in i.names or ("<none>",):
            click.echo(f"{n:30} {i.ref.digest[:19]} {i.layers:>6} {i.size:>10}  {'yes' if i.unpacked else 'no'}")


@image.command("inspect")
@click.argument("ref")
def image_inspect(ref: str) -> None:
    """Manifest, config, layers and sizes of an image, as JSON."""
    from nsbox.image import store

    click.echo(json.dumps(_store_call(store.inspect, ref), indent=2, default=str))


@image.command("rm")
@click.argument("ref")
def image_rm(ref: str) -> None:
    """Remove an image (refused while a sandbox uses it); unreferenced blobs go too."""
    from nsbox.image import store

    for gone in _store_call(store.remove, ref):
        click.echo(f"removed {gone}")


@image.command("unpack")
@click.argument("ref")
@click.argument("dest", type=click.Path(path_type=Path))
def image_unpack(ref: str, dest: Path) -> None:
    """Write an image's root filesystem into DEST (new or empty), with nsbox's unpacker."""
    from nsbox.image import store

    report = _store_call(store.unpack_to, ref, dest)
    click.echo(f"{report.entries} entries, {report.bytes} bytes -> {dest}")
    for warning in report.warnings:
        click.echo(f"nsbox: warning: {warning}", err=True)


# ---- nsbox gc ---------------------------------------------------------------------------


@main.command()
@click.option("--dry-run", is_flag=True, help="Only print what would be removed.")
def gc(dry_run: bool) -> None:
    """Remove what a killed nsbox left behind (partial unpacks, imports, --fresh wipes).

    Never touches anything in use: it takes the same locks as the runs and the image
    store, without waiting, and skips (and names) what is locked.
    """
    from nsbox import gc as gc_module

    try:
        report = gc_module.collect(dry_run)
    except StepError as e:
        _fail(e)
    verb = "would remove" if dry_run else "removed"
    for path, what in report.removed:
        click.echo(f"{verb} {path} ({what})")
    for path, why in report.skipped:
        click.echo(f"skipped {path}: {why}")
    if not report.removed:
        click.echo("nothing to remove")
