"""The command line: a thin layer over the Python API. Nothing else imports click.

The console script does not start here but in `command.main`: a plain `nsbox run` is
parsed and run there without importing click (which costs more than a whole launch), and
every other command line (help, errors, the other subcommands) comes here. run, plan and
verify take the options of `command.RUN_OPTIONS`, the one definition of them; the click
`run` command and the fast path call the same `command.run`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.decorators import FC

import nsbox.command
from nsbox import __version__
from nsbox.command import RUN_JSON, RUN_OPTIONS, Opt, build_spec, command_argv, fail
from nsbox.errors import ExitCode, StepError
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


def _click_option(opt: Opt) -> Callable[[FC], FC]:
    """The click option for one entry of RUN_OPTIONS (see nsbox/command.py)."""
    settings: dict[str, Any] = {"help": opt.help, "metavar": opt.metavar}
    if opt.kind == "flag":
        settings["is_flag"] = True
    else:
        types: dict[str, click.ParamType[Any]] = {"int": click.INT, "path": click.Path(path_type=Path),
                                                  "str": click.STRING}
        settings["type"] = click.Choice(opt.choices) if opt.choices else types[opt.type]
        settings["multiple"] = opt.kind == "multiple"
    if opt.default is not None:
        settings.update(default=opt.default, show_default=True)
    # Only what the entry sets: click tells an absent default from default=None.
    return click.option(*opt.flags, opt.dest, **{k: v for k, v in settings.items() if v is not None})


def _run_options(f: FC) -> FC:
    """PROJECT, COMMAND... and the options of RUN_OPTIONS, in its order (the order of --help)."""
    decorators = [
        # command.parse_run reads these two the same way: PROJECT is the first argument
        # after the options, COMMAND the rest, unprocessed.
        click.argument("project", required=False, type=click.Path(path_type=Path)),
        click.argument("command", nargs=-1, type=click.UNPROCESSED),
        *(_click_option(opt) for opt in RUN_OPTIONS),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


@main.command(context_settings={"allow_interspersed_args": False})
@_run_options
@_click_option(RUN_JSON)
def run(**params: Any) -> None:
    """Run COMMAND (default: claude --dangerously-skip-permissions) on PROJECT (default: .).

    \b
    Examples:
      nsbox run                      the agent, on the current directory
      nsbox run ~/src/app -- bash    a shell, on ~/src/app
    """
    # Reached when command.parse_run left the command line to click (which accepted it)
    # or from Python (tests call cli.run); the run itself is the same function.
    nsbox.command.run(params)


@main.command()
@_run_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan(command: tuple[str, ...], log: Path | None, verbose: bool, as_json: bool, **opts: Any) -> None:
    """Print what `nsbox run` would do, layer by layer. Changes nothing."""
    from nsbox.launch import SEQUENCE
    from nsbox.spec import REMOVABLE_LAYERS

    try:
        spec = build_spec(opts, trace=False)
        layers = Sandbox(spec).plan(command_argv(command))
    except StepError as e:
        fail(e)
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
        spec = build_spec(opts, trace=False)
    except StepError as e:
        fail(e)
    rows = _verify_once(spec)
    changed = None
    if spec.without:
        changed = _changes(_verify_once(spec._replace(without=())), rows)
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
        fail(e)


# ---- nsbox image ------------------------------------------------------------------------


@main.group()
def image() -> None:
    """The local image store ($XDG_DATA_HOME/nsbox): pull, import, list, inspect, remove, unpack."""


def _store_call(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except StepError as e:
        fail(e)


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
        fail(e)
    verb = "would remove" if dry_run else "removed"
    for path, what in report.removed:
        click.echo(f"{verb} {path} ({what})")
    for path, why in report.skipped:
        click.echo(f"skipped {path}: {why}")
    if not report.removed:
        click.echo("nothing to remove")
