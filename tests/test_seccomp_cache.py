"""The cache of compiled seccomp plans ($XDG_CACHE_HOME/nsbox/seccomp/<key>.json).

A launch whose profile is already compiled must not pay for loading libseccomp
(pyseccomp) or the TOML parser, nor for parsing and resolving the profile: the whole plan
comes from the cache. And since the entry decides which filter the agent gets, nothing in
it is trusted: a damaged, foreign or stale entry is compiled again, to the same BPF as a
fresh compile. Everything here compiles for real; what a hit imports is checked in a
fresh interpreter, since pytest's own has long since imported pyseccomp.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nsbox.layers import seccomp

PERMISSIVE = seccomp.resolve_profile("permissive")

# Runs seccomp.plan() in a fresh interpreter and says what it had to import.
PLAN_SCRIPT = """
import json, sys
from nsbox.layers import seccomp
plan = seccomp.plan()
print(json.dumps({"cached": plan.cached, "bpf": plan.bpf.hex(), "libseccomp": plan.libseccomp,
                  "loaded": sorted(m for m in ("pyseccomp", "tomllib") if m in sys.modules)}))
"""


def plan_in_a_fresh_process(cache_home: Path, **env: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", PLAN_SCRIPT], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "XDG_CACHE_HOME": str(cache_home), **env})
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def entry_file(cache: Path) -> Path:
    (entry,) = cache.iterdir()
    return entry


def fresh_bpf(tmp_path: Path, profile: Path | None = None) -> bytes:
    """The profile compiled now, into a cache of its own."""
    plan = seccomp.plan(profile, cache=tmp_path / "fresh", write_cache=False)
    assert not plan.cached
    return plan.bpf


def sign(entry: Path, body: object) -> None:
    """Write `body` as an entry with a valid digest: what a careless (or foreign) writer would leave."""
    raw = json.dumps(body).encode()
    entry.write_bytes(hashlib.sha256(raw).hexdigest().encode() + b"\n" + raw)


def rewrite(entry: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change an entry's JSON, keeping its digest valid."""
    body = json.loads(entry.read_bytes().split(b"\n", 1)[1])
    change(body)
    sign(entry, body)


# --- a hit is cheap ------------------------------------------------------------------------


def test_importing_the_layer_loads_neither_libseccomp_nor_the_toml_parser() -> None:
    code = "import sys, nsbox.layers.seccomp; print(sorted(m for m in ('pyseccomp', 'tomllib') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_hit_loads_neither_libseccomp_nor_the_toml_parser(tmp_path: Path) -> None:
    first = plan_in_a_fresh_process(tmp_path)
    second = plan_in_a_fresh_process(tmp_path)
    assert (first["cached"], second["cached"]) == (False, True)
    assert first["loaded"] == ["pyseccomp", "tomllib"]  # the check can see them when they are there
    assert second["loaded"] == []
    assert (second["bpf"], second["libseccomp"]) == (first["bpf"], first["libseccomp"])


@pytest.mark.parametrize("profile", [None, PERMISSIVE, seccomp.BUILTIN_DIR.parent / "tests" / "profiles" /
                                     "econnrefused.toml"])
def test_a_hit_is_the_plan_a_compile_gives(tmp_path: Path, profile: Path | None) -> None:
    compiled = seccomp.plan(profile, cache=tmp_path)
    hit = seccomp.plan(profile, cache=tmp_path)
    assert (compiled.cached, hit.cached) == (False, True)
    assert hit._replace(cached=False) == compiled  # the BPF, rules, whys, skipped names...
    assert hit.describe()[2].endswith("(from cache); the agent installs them last, just before execve")


def test_plan_without_write_cache_reads_but_never_writes(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert not seccomp.plan(None, cache=cache, write_cache=False).cached
    assert not cache.exists()
    seccomp.plan(None, cache=cache)
    before = entry_file(cache).stat()
    assert seccomp.plan(None, cache=cache, write_cache=False).cached
    assert entry_file(cache).stat().st_mtime_ns == before.st_mtime_ns


# --- nothing in an entry is trusted --------------------------------------------------------


def _truncate(entry: Path) -> None:
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])


def _flip_a_byte_of_the_bpf(entry: Path) -> None:
    raw = bytearray(entry.read_bytes())
    at = raw.index(b'"bpf":"') + len(b'"bpf":"') + 40
    raw[at] = ord("A") if raw[at] != ord("A") else ord("B")
    entry.write_bytes(bytes(raw))


def _drop_an_instruction(body: dict[str, Any]) -> None:
    body["bpf"] = base64.b64encode(base64.b64decode(body["bpf"])[:-8]).decode()


def _nested_too_deep(entry: Path) -> None:
    body = b"[" * 100_000 + b"]" * 100_000  # json.loads gives up with RecursionError
    entry.write_bytes(hashlib.sha256(body).hexdigest().encode() + b"\n" + body)


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "empty": lambda e: e.write_bytes(b""),
    "truncated": _truncate,
    "not an entry": lambda e: e.write_bytes(b"\x00\xff" * 100),
    "the BPF damaged (digest no longer matches)": _flip_a_byte_of_the_bpf,
    "an instruction short": lambda e: rewrite(e, _drop_an_instruction),
    "instructions = true": lambda e: rewrite(e, lambda b: b.update(instructions=True)),
    "bpf not base64": lambda e: rewrite(e, lambda b: b.update(bpf="not base64!")),
    "no BPF at all": lambda e: rewrite(e, lambda b: b.update(bpf="", instructions=0)),
    "a rule that is a string": lambda e: rewrite(e, lambda b: b["rules"].append("keyctl")),
    "syscalls as one string": lambda e: rewrite(e, lambda b: b["rules"][0].update(syscalls="read")),
    "rule_count wrong": lambda e: rewrite(e, lambda b: b.update(rule_count=b["rule_count"] + 1)),
    "another compiler's": lambda e: rewrite(e, lambda b: b.update(compiler="nsbox-seccomp-2")),
    "another architecture's": lambda e: rewrite(e, lambda b: b.update(architecture="aarch64")),
    "an empty object": lambda e: rewrite(e, lambda b: b.clear()),
    "a JSON list": lambda e: sign(e, [1, 2, 3]),
    "nested too deep to parse": _nested_too_deep,
    "a symlink to a good entry": lambda e: (shutil.copy(e, e.with_name("good")), e.unlink(),
                                            e.symlink_to(e.with_name("good"))),
    "a directory": lambda e: (e.unlink(), e.mkdir()),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_damaged_entry_is_compiled_again(tmp_path: Path, corrupt: Callable[[Path], None]) -> None:
    cache = tmp_path / "cache"
    seccomp.plan(None, cache=cache)
    entry = entry_file(cache)
    corrupt(entry)
    again = seccomp.plan(None, cache=cache)
    assert not again.cached
    assert again.bpf == fresh_bpf(tmp_path)
    if entry.is_dir():
        return  # cannot replace a directory with a file; every run compiles, and that is all
    assert seccomp.plan(None, cache=cache).cached  # the compile wrote a good entry back


def test_another_profiles_entry_under_this_name_is_not_used(tmp_path: Path) -> None:
    """A foreign entry, of valid digest and shape, would be a wrong filter: the key inside gives it away."""
    default_cache, permissive_cache = tmp_path / "d", tmp_path / "p"
    seccomp.plan(None, cache=default_cache)
    permissive = seccomp.plan(PERMISSIVE, cache=permissive_cache)
    shutil.copy(entry_file(permissive_cache), entry_file(default_cache))
    plan = seccomp.plan(None, cache=default_cache)
    assert not plan.cached and plan.bpf == fresh_bpf(tmp_path)
    assert plan.bpf != permissive.bpf


def test_a_changed_profile_is_compiled_again(tmp_path: Path) -> None:
    profile = tmp_path / "p.toml"
    profile.write_bytes(seccomp.DEFAULT_PROFILE.read_bytes())
    assert not seccomp.plan(profile, cache=tmp_path / "c").cached
    assert seccomp.plan(profile, cache=tmp_path / "c").cached
    profile.write_bytes(PERMISSIVE.read_bytes())
    changed = seccomp.plan(profile, cache=tmp_path / "c")
    assert not changed.cached and changed.bpf == fresh_bpf(tmp_path, PERMISSIVE)


# --- libseccomp changed ----------------------------------------------------------------------


def test_a_recorded_libseccomp_that_changed_is_compiled_again(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    seccomp.plan(None, cache=cache)
    for change in ({"mtime_ns": 1}, {"size": 1}, {"ino": 1}, {"path": str(tmp_path / "libseccomp.so.2.0.0")}):
        rewrite(entry_file(cache), lambda b, change=change: b["libseccomp"].update(change))
        plan = seccomp.plan(None, cache=cache)
        assert not plan.cached, change
        assert plan.bpf == fresh_bpf(tmp_path)


def test_an_upgraded_libseccomp_is_noticed(tmp_path: Path) -> None:
    """A real library swap: the loader takes a copy of libseccomp from LD_LIBRARY_PATH, which we replace."""
    seccomp.libseccomp_version()  # loads it in this process
    system_lib = seccomp._loaded_libseccomp()
    assert system_lib is not None
    libdir = tmp_path / "lib"
    libdir.mkdir()
    ours = libdir / "libseccomp.so.2"
    shutil.copy(system_lib["path"], ours)
    cache_home = tmp_path / "xdg-cache"
    first = plan_in_a_fresh_process(cache_home, LD_LIBRARY_PATH=str(libdir))
    (entry,) = (cache_home / "nsbox" / "seccomp").iterdir()
    assert json.loads(entry.read_bytes().split(b"\n", 1)[1])["libseccomp"]["path"] == str(ours)
    assert plan_in_a_fresh_process(cache_home, LD_LIBRARY_PATH=str(libdir))["cached"]
    upgraded = libdir / "new"
    shutil.copy(system_lib["path"], upgraded)  # a package upgrade: a new file renamed into place
    upgraded.replace(ours)
    again = plan_in_a_fresh_process(cache_home, LD_LIBRARY_PATH=str(libdir))
    assert not again["cached"] and again["loaded"] == ["pyseccomp", "tomllib"]
    assert again["bpf"] == first["bpf"]
