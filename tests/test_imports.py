"""What a plain `nsbox run` imports: nothing it does not use.

A launch's start-up is mostly imports, paid on every run. Each module below is kept off
the path of `nsbox run --network none PROJECT -- CMD` on purpose:

- dataclasses: building a dataclass compiles its methods at import, and the module pulls
  in inspect, ast and tokenize; records on the launch path are NamedTuples
  (nsbox/layers/__init__.py says why).
- click: a plain command line is parsed by nsbox/command.py (tests/test_cli_fastpath.py).
- pyroute2: only `nsbox verify` lists links (nsbox/layers/netns.py).
- pyseccomp: a seccomp plan found in the cache needs no libseccomp (tests/test_seccomp_cache.py).
- cgroupspy: only a run with limits on cgroup v1 needs it (nsbox/layers/cgroups.py).

With `--image` and the image already in the store and unpacked, also none of what pulling
or unpacking needs: the registry client (ssl, http.client, threads) and the unpacker
(tarfile, gzip, subprocess) are loaded only for a pull or a first unpack
(nsbox/image/reference.py, nsbox/image/store.py).

The real entry points run as the test user, with PYTHONPROFILEIMPORTTIME: every import
of the launcher and of its forked children (holder, init) is reported on stderr.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NSBOX

NSBOX_SCRIPT = str(Path(sys.executable).with_name("nsbox"))  # the console script pip installed
NOT_ON_THE_LAUNCH_PATH = ("dataclasses", "click", "pyroute2", "pyseccomp", "cgroupspy")
NOT_ON_THE_IMAGE_PATH = (*NOT_ON_THE_LAUNCH_PATH, "nsbox.image.registry", "nsbox.image.unpack", "ssl",
                         "http.client", "concurrent.futures", "threading", "tarfile", "gzip", "subprocess")


def imported_modules(stderr: str) -> list[str]:
    """Module names from PYTHONPROFILEIMPORTTIME's lines ("import time: self | cumulative | name")."""
    return [line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")]


def unwanted(modules: list[str], slow: tuple[str, ...] = NOT_ON_THE_LAUNCH_PATH) -> list[str]:
    return sorted({m for m in modules for top in slow if m == top or m.startswith(top + ".")})


def run_profiled(nsbox: list[str], env: dict[str, str], *args: str) -> list[str]:
    """The modules `nsbox run ARGS -- /bin/true` imported (launcher, holder, init)."""
    r = subprocess.run([*nsbox, "run", "--network", "none", *args, "--", "/bin/true"],
                       env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    modules = imported_modules(r.stderr)
    assert "nsbox.launch" in modules  # the profile is there: the run did import the launcher
    return modules


@pytest.mark.parametrize("nsbox", [[NSBOX_SCRIPT], NSBOX], ids=["script", "python-m"])
def test_a_plain_run_imports_none_of_the_slow_modules(env, project, nsbox):
    first = run_profiled(nsbox, env, str(project))  # compiles the seccomp profile into $XDG_CACHE_HOME
    assert "pyseccomp" in first  # the check can see a module when it is imported
    second = run_profiled(nsbox, env, str(project))  # the same XDG_CACHE_HOME: the plan comes from the cache
    assert unwanted(second) == []


def test_a_run_on_a_stored_image_loads_no_registry_and_no_unpacker(env, project, imported):
    args = ("--image", "busybox", str(project))
    first = run_profiled(NSBOX, env, *args)  # unpacks the image into the store; compiles the seccomp profile
    assert "nsbox.image.unpack" in first and "tarfile" in first  # the check can see them
    second = run_profiled(NSBOX, env, *args)  # unpacked and cached: only the store's index and JSON are read
    assert "nsbox.image.store" in second
    assert unwanted(second, NOT_ON_THE_IMAGE_PATH) == []
