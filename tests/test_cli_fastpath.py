"""The click-free `nsbox run` (nsbox/command.py) against click itself.

`command.parse_run` may decline any command line (click then parses it), but when it
answers, its answer must be exactly click's, and it must decline every line click would
reject. The property tests check both against the real click command built from the same
option table; the subprocess tests check that the installed CLI really skips click on a
plain run and still gives click's help and errors otherwise.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import pytest
from conftest import NSBOX
from hypothesis import given, settings
from hypothesis import strategies as st

from nsbox import cli
from nsbox.command import RUN_JSON, RUN_OPTIONS, Opt, parse_run

# The console script pip installed next to this interpreter (pyproject's [project.scripts]).
NSBOX_SCRIPT = str(Path(sys.executable).with_name("nsbox"))


def click_parse(argv: Sequence[str]) -> dict[str, Any] | None:
    """The params click's `run` command gets for argv, or None where click refuses it (or prints help)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # --help prints, then raises Exit
            return dict(cli.run.make_context("run", list(argv)).params)
    except (click.UsageError, click.exceptions.Exit):
        return None


# ---- generated command lines ------------------------------------------------------------------------------------

# "@D" stands for a directory of this module's fixture: it holds "readable/" and
# "unreadable/" (mode 000: click.Path refuses an existing path it cannot read).
PATHS = ["proj", "@D/readable", "@D/unreadable", "@D/missing", "-", "--", "-x", "", "a=b", "/tmp"]
JUNK = ["--help", "-h", "-vv", "-v=1", "--bogus", "--fresh=1", "--json=yes", "--cpus=", "--", "-", "--=x", "---uid"]
# A real argv holds no NUL, and no lone surrogate but those of surrogateescape (undecodable bytes).
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=6)


def values_for(opt: Opt) -> st.SearchStrategy[str]:
    """Values for a value option: good ones, near misses, and ones that look like options."""
    good = (st.sampled_from(opt.choices) if opt.choices else
            st.integers(-5, 70000).map(str) if opt.type == "int" else
            st.sampled_from(PATHS) if opt.type == "path" else
            st.sampled_from(["x", "512M", "1.5", "90s", "A=1", "example.com:443", "seccomp", "busybox"]))
    odd = st.sampled_from(["", " 7", "+3", "1_000", "٣", "NONE", "--fresh", "-v", "--", "none ", "x=y", "\udcff"])
    return st.one_of(good, good, odd, text)


def spellings(opt: Opt) -> st.SearchStrategy[list[str]]:
    """One use of an option, in each of the forms click accepts: `--opt v`, `--opt=v`, a flag alone."""
    flag = st.sampled_from(opt.flags)
    if opt.kind == "flag":
        return flag.map(lambda f: [f])
    long_flags = st.sampled_from([f for f in opt.flags if f.startswith("--")])
    return st.one_of(st.tuples(flag, values_for(opt)).map(list),
                     st.tuples(long_flags, values_for(opt)).map(lambda fv: [f"{fv[0]}={fv[1]}"]))


OPTIONS = st.one_of(*(spellings(opt) for opt in (*RUN_OPTIONS, RUN_JSON)))
WORDS = st.one_of(st.sampled_from(PATHS + JUNK + ["/bin/true", "sh", "-c", "echo hi"]), text)

# Anything: options, paths, junk and text in any order, so the positional rules are hit too.
ANY_ARGV = st.lists(st.one_of(OPTIONS, WORDS.map(lambda w: [w])), max_size=8).map(
    lambda parts: [arg for part in parts for arg in part])


@st.composite
def plain_argv(draw: st.DrawFn) -> list[str]:
    """A command line as people write them: valid options, then PROJECT, "--" and a command."""
    argv: list[str] = []
    for opt in draw(st.lists(st.sampled_from((*RUN_OPTIONS, RUN_JSON)), max_size=6)):
        flag = draw(st.sampled_from([f for f in opt.flags if f.startswith("--")]))
        if opt.kind == "flag":
            argv.append(flag)
            continue
        value = (draw(st.sampled_from(opt.choices)) if opt.choices else
                 str(draw(st.integers(0, 65535))) if opt.type == "int" else
                 draw(st.sampled_from(["x", "/tmp/nsbox.log", "512M", "a.example.com", "NAME=v v"])))
        argv += [f"{flag}={value}"] if draw(st.booleans()) else [flag, value]
    if draw(st.booleans()):
        argv.append(draw(st.sampled_from(["proj", "@D/readable", "/tmp", "@D/missing"])))
        if draw(st.booleans()):
            argv += ["--", *draw(st.lists(st.sampled_from(["sh", "-c", "--json", "--", "-v", "x y"]), max_size=4))]
    return argv


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("paths")
    (d / "readable").mkdir()
    (d / "unreadable").mkdir(mode=0o000)
    yield d
    (d / "unreadable").chmod(0o700)


def resolve(argv: list[str], d: Path) -> list[str]:
    return [arg.replace("@D", str(d)) for arg in argv]


@settings(max_examples=1500, deadline=None, database=None)  # the test user cannot write the repo
@given(argv=ANY_ARGV)
def test_parse_run_agrees_with_click_or_declines(paths, argv):
    argv = resolve(argv, paths)
    ours, clicks = parse_run(argv), click_parse(argv)
    if clicks is None:
        assert ours is None, f"click refuses {argv!r}, parse_run accepted it"
    if ours is not None:
        assert ours == clicks


@settings(max_examples=500, deadline=None, database=None)
@given(argv=plain_argv())
def test_plain_command_lines_take_the_fast_path(paths, argv):
    argv = resolve(argv, paths)
    ours = parse_run(argv)
    assert ours is not None, argv
    assert ours == click_parse(argv)


@pytest.mark.parametrize("line", [
    "--network none PROJ -- /bin/true",
    "PROJ -- sh -c x",
    "--json --memory 512M --pids 64 PROJ -- true",
    "--image busybox --name x --fresh PROJ -- ls",
    "",
    "PROJ",
    "PROJ -- bash",
    "-v --log /tmp/nsbox.jsonl --timeout 90s --disk 64M PROJ -- true",
    "--env A=1 --env B --allow-domain example.com --resolve example.com:443:127.0.0.1 PROJ -- curl x",
    "--without seccomp --no-landlock --cpu 1.5 --limits best-effort --uid 0 PROJ -- id",
    "--api-key-mode=env --ro-bind /etc/hosts:/h --writable-git --hostname box PROJ -- cat /h",
    "--seccomp-profile permissive --pull never --network=allowlist PROJ -- --json",
])
def test_the_common_forms_take_the_fast_path(tmp_path, line):
    argv = line.replace("PROJ", str(tmp_path)).split(" ") if line else []
    ours = parse_run(argv)
    assert ours is not None
    assert ours == click_parse(argv)


def test_one_option_table_for_run_plan_and_verify():
    table = {opt.dest: opt for opt in RUN_OPTIONS}
    for command, json_help in ((cli.run, RUN_JSON.help), (cli.plan, "Machine-readable output."),
                               (cli.verify, "Machine-readable output.")):
        params = {p.name: p for p in command.params}
        assert list(params) == ["project", "command", *table, "as_json"]
        for name, opt in table.items():
            assert tuple(params[name].opts) == opt.flags
        assert params["as_json"].help == json_help


# ---- the installed CLI ----------------------------------------------------------------------------------------


def imported_modules(stderr: str) -> list[str]:
    """Module names from PYTHONPROFILEIMPORTTIME's lines ("import time: self | cumulative | name")."""
    return [line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")]


def is_click(module: str) -> bool:
    return module == "click" or module.startswith("click.")


@pytest.mark.parametrize("nsbox", [[NSBOX_SCRIPT], NSBOX], ids=["script", "python-m"])
def test_a_plain_run_does_not_import_click(env, project, nsbox):
    r = subprocess.run([*nsbox, "run", "--network", "none", str(project), "--", "/bin/true"],
                       env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    modules = imported_modules(r.stderr)
    assert "nsbox.sandbox" in modules  # the profile is there: the run did import the launcher
    assert not [m for m in modules if is_click(m)]


def test_help_is_still_clicks(env):
    r = subprocess.run([NSBOX_SCRIPT, "run", "--help"], env={**env, "PYTHONPROFILEIMPORTTIME": "1"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: nsbox run [OPTIONS] [PROJECT] [COMMAND]...")
    assert "--cpus, --cpu N" in r.stdout
    assert any(is_click(m) for m in imported_modules(r.stderr))


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "No such option '--bogus'"),
    (["--uid", "notanumber"], "'notanumber' is not a valid integer"),
    (["--network", "bogus"], "'bogus' is not one of 'none', 'allowlist', 'host'"),
    (["--fresh=1"], "Option '--fresh' does not take a value"),
    (["--name"], "Option '--name' requires an argument"),
])
def test_bad_command_lines_get_clicks_error(env, project, args, message):
    argv = [NSBOX_SCRIPT, "run", *args] if args == ["--name"] else [NSBOX_SCRIPT, "run", *args, str(project)]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 125, r.stderr
    assert r.stderr.startswith("nsbox: cli.parse: "), r.stderr
    assert message in r.stderr
    assert "fix: nsbox run --help" in r.stderr


def test_shell_completion_still_reaches_click(env, project):
    # click answers completion from COMP_WORDS, whatever argv says: nothing may run.
    completing = {**env, "_NSBOX_COMPLETE": "bash_complete", "COMP_WORDS": "nsbox run --netw", "COMP_CWORD": "2"}
    r = subprocess.run([NSBOX_SCRIPT, "run", str(project), "--", "/bin/sh", "-c", "echo ran"], env=completing,
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "--network" in r.stdout and "ran" not in r.stdout


def test_a_failure_on_the_fast_path_reads_as_before(env, tmp_path):
    r = subprocess.run([NSBOX_SCRIPT, "run", str(tmp_path / "nope"), "--", "true"], env=env, capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 125
    assert r.stderr.startswith("nsbox: spec.validate: "), r.stderr
    assert "fix:" in r.stderr
