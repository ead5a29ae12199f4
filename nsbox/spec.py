"""SandboxSpec: what the user asked for, as plain frozen data, validated before anything runs.

The CLI and the Python API both build a SandboxSpec; every layer's `plan()` reads it.
Validation happens here and in the plans, before any process is forked: a bad request
never half-starts a sandbox.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

from nsbox import config
from nsbox.errors import usage_error

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# The agent's environment is built from nothing. These names pass through from the
# caller when set; everything else (SSH_AUTH_SOCK, DBUS_*, AWS_*, tokens...) stays out
# unless named with --env. LC_* is matched as a prefix.
ENV_PASSTHROUGH = ("TERM", "COLORTERM", "LANG", "LANGUAGE", "TZ", "NO_COLOR")
ENV_PASSTHROUGH_PREFIXES = ("LC_",)

NETWORK_MODES = ("none", "allowlist", "host")
API_KEY_MODES = ("inject", "env", "none")
PULL_POLICIES = ("missing", "always", "never")  # nsbox run --pull, as podman's

# Study mode (--without LAYER) may remove these; the namespaces stay (userns cannot go).
REMOVABLE_LAYERS = ("caps", "landlock", "seccomp")


class SandboxSpec(NamedTuple):
    """One sandbox run. Paths are host paths; `project` is mounted at the same path inside."""

    project: Path = Path(".")  # the current directory, made absolute by resolved()
    uid: int = 1000
    gid: int | None = None  # default: the same number as uid
    name: str | None = None  # default: derived from the project path
    fresh: bool = False
    hostname: str = "nsbox"
    env: tuple[str, ...] = ()  # NAME (take the caller's value) or NAME=VALUE
    api_key_mode: str | None = None  # inject (default) | env | none
    writable_git: bool = False
    network: str | None = None  # none | allowlist | host; default: allowlist for the agent, none otherwise
    allow_domains: tuple[str, ...] = ()  # --allow-domain NAME[:PORT], *.suffix, !deny
    resolve: tuple[str, ...] = ()  # --resolve NAME:PORT:ADDR (curl's syntax)
    api_upstream: str | None = None  # --api-upstream URL: where injected API requests go
    ro_binds: tuple[str, ...] = ()  # --ro-bind HOST[:INSIDE], read-only, nosuid, nodev
    timeout: float | None = None  # seconds; then SIGTERM, grace, SIGKILL of the whole sandbox; exit 124
    timeout_grace: float = 3.0
    disk: int | None = None  # bytes: size= of every tmpfs the agent can write (/tmp, /dev/shm)
    image: str | None = None  # an image in the local store: its tree is the root (overlay)
    pull: str = "missing"  # with image: missing | always | never (podman's --pull)
    memory: int | None = None  # bytes (cgroup memory.max, swap 0)
    cpus: float | None = None  # CPUs (cgroup cpu.max)
    pids: int | None = None  # processes and threads (cgroup pids.max)
    limits: str | None = None  # strict (default): refuse a limit no cgroup can enforce; best-effort: rlimits
    probe: bool = False  # nsbox verify: run the self-checks in the agent instead of the command
    trace: bool = False  # report every step as an event (--verbose, --log)
    seccomp_profile: str | None = None  # "default", "permissive", or a TOML/JSON file
    without: tuple[str, ...] = ()  # study mode: layers removed, loudly

    def resolved(self) -> SandboxSpec:
        """Validate and fill the defaults; raise StepError("spec.validate") on a bad request."""
        project = Path(os.path.realpath(self.project))
        if not project.is_dir():
            raise usage_error("spec.validate", f"project {str(self.project)!r} is not a directory",
                              fix="give an existing directory: nsbox run /path/to/project")
        if project == Path("/"):
            raise usage_error("spec.validate", "the project cannot be / (it would expose the whole host)",
                              fix="give the project's own directory")
        if not 0 <= self.uid <= 65534:
            raise usage_error("spec.validate", f"--uid {self.uid} is out of range 0..65534")
        gid = self.uid if self.gid is None else self.gid
        if not 0 <= gid <= 65534:
            raise usage_error("spec.validate", f"gid {gid} is out of range 0..65534")
        name = self.name or config.default_name(project)
        if not config.valid_name(name):
            raise usage_error("spec.validate", f"--name {name!r} is not a valid sandbox name",
                              fix="use letters, digits, '.', '_' and '-' (at most 64)")
        if not _HOSTNAME.match(self.hostname):
            raise usage_error("spec.validate", f"--hostname {self.hostname!r} is not a valid host name")
        for item in self.env:
            key = item.split("=", 1)[0]
            if not _ENV_NAME.match(key):
                raise usage_error("spec.validate", f"--env {item.split('=', 1)[0]!r} is not a variable name")
        if self.network not in (None, *NETWORK_MODES):
            raise usage_error("spec.validate", f"--network {self.network!r} is not a network mode",
                              fix="one of: " + ", ".join(NETWORK_MODES))
        if self.api_key_mode not in (None, *API_KEY_MODES):
            raise usage_error("spec.validate", f"--api-key-mode {self.api_key_mode!r} is not a mode",
                              fix="one of: " + ", ".join(API_KEY_MODES))
        if self.timeout is not None and self.timeout <= 0:
            raise usage_error("spec.validate", "--timeout must be positive")
        if self.disk is not None and self.disk < 1 << 20:
            raise usage_error("spec.validate", "--disk must be at least 1M")
        if self.limits not in (None, "strict", "best-effort"):
            raise usage_error("spec.validate", f"--limits {self.limits!r}", fix="--limits strict or best-effort")
        if self.pull not in PULL_POLICIES:
            raise usage_error("spec.validate", f"--pull {self.pull!r} is not a pull policy",
                              fix="one of: " + ", ".join(PULL_POLICIES))
        for layer in self.without:
            if layer not in REMOVABLE_LAYERS:
                raise usage_error("spec.validate", f"--without {layer!r}: not a layer that can be removed",
                                  fix="one of: " + ", ".join(REMOVABLE_LAYERS))
        return self._replace(project=project, gid=gid, name=name)
