"""Seccomp: which system calls the agent may make at all, and with which arguments.

A seccomp filter is a small classic-BPF program the kernel runs on every system call the
process (and every process it starts) makes. It sees the call number, the architecture
and the six raw argument registers, never the memory they point to, and answers allow,
an errno, or kill. Once installed it can never be removed or loosened; further filters
only add restrictions.

nsbox keeps filters as data in `seccomp/` (TOML with a `why` for every rule; Docker/OCI
JSON profiles are accepted unchanged) and compiles them here, in the launcher, with
libseccomp (pyseccomp) into finished BPF. The agent installs those bytes with one
seccomp(2) call as its very last step: no libseccomp runs after fork.

Compiling costs tens of milliseconds (loading libseccomp, resolving every name), so the
whole compiled plan is cached per user (`plan`, `_read_cache`): a launch whose profile,
libseccomp and kernel have not changed neither parses the profile nor loads libseccomp.

    profile.toml ──parse──▶ rules ──libseccomp (launcher)──▶ BPF bytes ──seccomp(2) (agent)──▶ kernel

An unprivileged process may install a filter once no_new_privs is set (otherwise a
filter could confuse a setuid program into misbehaving).

Two details decide whether a filter can be bypassed, and both are handled here:

- Architecture. A 64-bit x86 process can still enter the kernel through the i386
  (`int 0x80`) and x32 syscall tables, where the numbers mean different calls. The
  filter lists the native architecture only and kills the process on any other
  (libseccomp's bad-arch action KILL_PROCESS).
- Overlapping rules. libseccomp does not define which of two overlapping rules with
  different actions wins, and an unconditional rule silently swallows conditional ones
  for the same call. In our TOML a conditional rule is an *exception* to the
  unconditional rule for the same call (`ioctl` is allowed, except TIOCSTI); the
  compiler turns the unconditional rule into the exact complement of its exceptions, so
  no two emitted rules overlap and the order cannot matter.

Kernel docs: seccomp(2); Documentation/userspace-api/seccomp_filter.rst;
             seccomp_rule_add(3), seccomp_export_bpf(3), seccomp_attr_set(3).
Order:       `compile` (plan) in the LAUNCHER before any fork; `install` in the AGENT as
             its last step before execve, after caps.drop, nnp.enable, landlock.restrict
             and execve.prepare (the filter would refuse the calls they make).
Verify:      /proc/self/status shows "Seccomp: 2" and "Seccomp_filters: 1" (or more: the
             agent may add its own); a denied call returns the profile's errno, never
             EFAULT/EBADF/EINVAL (which would mean the kernel was reached).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno as errno_mod
import fcntl
import hashlib
import json
import os
import signal
import stat
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from nsbox import syscalls
from nsbox.errors import StepError, acting

STEP = "seccomp.compile"

# seccomp/ lives at the top of the source tree, next to the nsbox package.
BUILTIN_DIR = Path(__file__).resolve().parents[2] / "seccomp"
DEFAULT_PROFILE = BUILTIN_DIR / "default.toml"

# Bump when the translation from profile to rules, or the cache entry's layout, changes, so
# old cache entries are not reused. 2: kills go through SECCOMP_RET_USER_NOTIF (named in
# reports); 3: the whole plan is cached (a JSON entry), not only the BPF.
_COMPILER_VERSION = "nsbox-seccomp-3"

_MACHINE = os.uname().machine  # platform.machine(), without importing platform (launch time)
_NATIVE_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}.get(_MACHINE, 0)
# Docker/OCI profiles name architectures the Go way ("amd64") in `includes.arches`.
_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "riscv64": "riscv64", "s390x": "s390x",
            "ppc64le": "ppc64le"}.get(_MACHINE, _MACHINE)

_ALL64 = (1 << 64) - 1
_BPF_MAXINSNS = 4096  # the kernel refuses longer classic-BPF programs
_T = TypeVar("_T")


def _libseccomp() -> Any:
    """pyseccomp, imported on first use: the only door to libseccomp in nsbox.

    Importing it loads libseccomp and costs 15-30 ms, which a launch whose filter is
    already cached never pays. Only compiling, exporting and naming syscalls call this,
    all in the launcher (never in the agent: no libseccomp runs after fork). pyseccomp is
    an untyped ctypes binding, hence Any (pyproject's mypy override).
    """
    import pyseccomp  # deliberately lazy, see above

    return pyseccomp

# ---------------------------------------------------------------------------------------
# The profile as data
# ---------------------------------------------------------------------------------------

TOML_ACTIONS = ("allow", "errno", "kill_process", "log")
# Comparisons by name; each is pyseccomp's constant of the same name in capitals (EQ, MASKED_EQ...).
_OPS = ("eq", "ne", "lt", "le", "gt", "ge", "masked_eq")
_OCI_OPS = {f"SCMP_CMP_{name.upper()}": name for name in _OPS}
_OCI_ACTIONS = {
    "SCMP_ACT_ALLOW": "allow", "SCMP_ACT_ERRNO": "errno", "SCMP_ACT_KILL": "kill_thread",
    "SCMP_ACT_KILL_THREAD": "kill_thread", "SCMP_ACT_KILL_PROCESS": "kill_process",
    "SCMP_ACT_TRAP": "trap", "SCMP_ACT_LOG": "log",
}


class Action(NamedTuple):
    """What the filter answers: allow, errno N, kill_process, kill_thread, trap or log."""

    kind: str
    errno: int | None = None

    def __str__(self) -> str:
        if self.kind == "errno" and self.errno is not None:
            return f"errno {errno_mod.errorcode.get(self.errno, str(self.errno))}"
        return self.kind

    def to_libseccomp(self) -> int:
        lib = _libseccomp()
        if self.kind == "errno":
            return int(lib.ERRNO(self.errno if self.errno is not None else errno_mod.EPERM))
        return int({
            # Kills are decided by the filter and carried out by the launcher, which is told
            # the call (seccomp_unotify(2)) and can name it; see Supervisor below.
            "allow": lib.ALLOW, "kill_process": lib.NOTIFY,
            "kill_thread": lib.NOTIFY, "trap": lib.TRAP, "log": lib.LOG,
        }[self.kind])


class Condition(NamedTuple):
    """One argument comparison. masked_eq means (arg & mask) == value."""

    index: int  # type: ignore[assignment]  # the argument's number; shadows tuple.index, deliberately
    op: str
    value: int
    mask: int = 0

    def __str__(self) -> str:
        if self.op == "masked_eq":
            return f"(arg{self.index} & {self.mask:#x}) == {self.value:#x}"
        sym = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}[self.op]
        return f"arg{self.index} {sym} {self.value:#x}"

    def to_libseccomp(self) -> Any:
        lib = _libseccomp()
        op = getattr(lib, self.op.upper())
        if self.op == "masked_eq":
            return lib.Arg(self.index, op, self.mask, self.value)
        return lib.Arg(self.index, op, self.value)


class Rule(NamedTuple):
    """One rule of a profile; `number` counts from 1 in file order (for error messages)."""

    number: int
    syscalls: tuple[str, ...]
    action: Action
    conditions: tuple[Condition, ...] = ()
    optional: bool = False  # skip names this arch (or this libseccomp) does not know
    why: str = ""


class Profile(NamedTuple):
    path: Path
    format: str  # "toml" or "oci-json"
    description: str
    default_action: Action
    rules: tuple[Rule, ...]


# ---------------------------------------------------------------------------------------
# Errors: the file, the rule, and a fix
# ---------------------------------------------------------------------------------------


def display_path(path: Path) -> str:
    """`seccomp/default.toml` for the built-in profiles, the path as given otherwise."""
    try:
        return f"seccomp/{path.resolve().relative_to(BUILTIN_DIR)}"
    except ValueError:
        return str(path)


def _bad(path: Path, rule: int | None, detail: str, fix: str) -> StepError:
    where = display_path(path) + (f", rule {rule}" if rule is not None else "")
    return StepError(STEP, where, detail=detail, fix=fix)


def _errno_number(path: Path, rule: int | None, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 4096:
        return value
    if isinstance(value, str) and value in errno_mod.errorcode.values():
        return int(getattr(errno_mod, value))
    raise _bad(path, rule, f"unknown errno {value!r}",
               'use a name from errno(3) such as "EPERM", "ENOSYS" or "EAFNOSUPPORT"')


# ---------------------------------------------------------------------------------------
# Parsing: our TOML, and Docker/OCI JSON unchanged
# ---------------------------------------------------------------------------------------

_TOML_TOP_KEYS = {"description", "default_action", "default_errno", "architectures", "rule"}
_TOML_RULE_KEYS = {"syscalls", "action", "errno", "args", "optional", "why"}
_TOML_ARG_KEYS = {"index", "op", "value", "mask"}


def load_profile(path: Path) -> Profile:
    """Read and validate a profile. Raises StepError(step="seccomp.compile") naming the rule."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise StepError(STEP, f"reading {display_path(path)}", e.errno,
                        fix="pass an existing file to --seccomp-profile, or a built-in name "
                            "(default, permissive)") from e
    return parse_profile(path, raw)


def parse_profile(path: Path, raw: bytes) -> Profile:
    """Parse profile bytes; JSON if the file name ends in .json, else our TOML."""
    if path.suffix == ".json":
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(path, None, f"not valid JSON: {e}", "check the file with `python3 -m json.tool`") from e
        if not isinstance(data, dict):
            raise _bad(path, None, "a JSON profile must be an object", "see the OCI linux.seccomp format")
        return _parse_oci(path, data)
    import tomllib  # here, not at the top: 3 ms a cached plan never needs

    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise _bad(path, None, f"not valid TOML: {e}", "see seccomp/README.md for the format") from e
    return _parse_toml(path, data)


def _parse_toml(path: Path, data: Mapping[str, Any]) -> Profile:
    unknown = set(data) - _TOML_TOP_KEYS
    if unknown:
        raise _bad(path, None, f"unknown key(s) {sorted(unknown)}",
                   f"top-level keys are {sorted(_TOML_TOP_KEYS)}")
    arches = data.get("architectures", ["native"])
    if arches != ["native"]:
        raise _bad(path, None, f"architectures = {arches!r} is not supported",
                   'use ["native"]: other ABIs (i386 int 0x80, x32) are always killed')
    default = _toml_action(path, None, data.get("default_action"), data.get("default_errno"))
    rules_data = data.get("rule", [])
    if not isinstance(rules_data, list) or not rules_data:
        raise _bad(path, None, "no [[rule]] tables", "add at least one [[rule]] (see seccomp/README.md)")
    rules = tuple(_toml_rule(path, n, r) for n, r in enumerate(rules_data, start=1))
    return Profile(path, "toml", str(data.get("description", "")), default, rules)


def _toml_action(path: Path, rule: int | None, kind: object, errno_name: object) -> Action:
    if kind not in TOML_ACTIONS:
        what = "default_action" if rule is None else "action"
        raise _bad(path, rule, f"bad {what} {kind!r}", f"use one of {', '.join(TOML_ACTIONS)}")
    if kind == "errno":
        if errno_name is None:
            raise _bad(path, rule, 'action "errno" needs an errno name',
                       'add errno = "EPERM" (or another name from errno(3))')
        return Action("errno", _errno_number(path, rule, errno_name))
    if errno_name is not None:
        raise _bad(path, rule, f'an errno is only meaningful with action "errno", not {kind!r}',
                   'remove the errno line, or set action = "errno"')
    return Action(str(kind))


def _toml_rule(path: Path, n: int, r: object) -> Rule:
    if not isinstance(r, dict):
        raise _bad(path, n, "a rule must be a table", "write it as [[rule]] with key = value lines")
    unknown = set(r) - _TOML_RULE_KEYS
    if unknown:
        raise _bad(path, n, f"unknown key(s) {sorted(unknown)}", f"rule keys are {sorted(_TOML_RULE_KEYS)}")
    why = r.get("why")
    if not isinstance(why, str) or not why.strip():
        raise _bad(path, n, "missing `why`", 'every rule says why it exists: why = "..."')
    names = r.get("syscalls")
    if not isinstance(names, list) or not names or not all(isinstance(s, str) and s for s in names):
        raise _bad(path, n, "`syscalls` must be a non-empty list of names", 'e.g. syscalls = ["keyctl"]')
    action = _toml_action(path, n, r.get("action"), r.get("errno"))
    optional = r.get("optional", False)
    if not isinstance(optional, bool):
        raise _bad(path, n, "`optional` must be true or false", "optional = true")
    args = r.get("args", [])
    if not isinstance(args, list):
        raise _bad(path, n, "`args` must be a list of tables", "args = [{ index = 0, op = \"eq\", value = 1 }]")
    conditions = tuple(_toml_condition(path, n, a) for a in args)
    return Rule(n, tuple(names), action, conditions, optional, why.strip())


def _toml_condition(path: Path, n: int, a: object) -> Condition:
    if not isinstance(a, dict) or set(a) - _TOML_ARG_KEYS:
        raise _bad(path, n, f"bad argument condition {a!r}",
                   "each condition is { index = 0..5, op = \"eq\"|..., value = N, mask = N (masked_eq) }")
    index, op, value, mask = a.get("index"), a.get("op"), a.get("value"), a.get("mask")
    if not isinstance(index, int) or not 0 <= index <= 5:
        raise _bad(path, n, f"argument index {index!r} out of range", "system calls have arguments 0..5")
    if op not in _OPS:
        raise _bad(path, n, f"unknown comparison {op!r}", f"use one of {', '.join(_OPS)}")
    if not isinstance(value, int) or not 0 <= value <= _ALL64:
        raise _bad(path, n, f"bad value {value!r}", "values are integers 0..2**64-1 (hex allowed: 0x5412)")
    if op == "masked_eq":
        if not isinstance(mask, int) or not 0 < mask <= _ALL64 or value & ~mask:
            raise _bad(path, n, f"masked_eq needs a mask covering the value (mask={mask!r})",
                       "e.g. { index = 1, op = \"masked_eq\", mask = 0xffffffff, value = 0x5412 }")
        return Condition(index, "masked_eq", value, mask)
    if mask is not None:
        raise _bad(path, n, f"`mask` is only used with masked_eq, not {op!r}", "remove the mask")
    return Condition(index, str(op), value)


def _kernel_at_least(version: str) -> bool:
    def parts(s: str) -> tuple[int, ...]:
        return tuple(int(p) for p in s.split("-")[0].split(".")[:2] if p.isdigit())
    return parts(os.uname().release) >= parts(version)


def _parse_oci(path: Path, data: Mapping[str, Any]) -> Profile:
    """Docker/OCI `linux.seccomp` JSON, read the way runc does for a container without added caps.

    Rules whose `includes.caps` is non-empty are dropped (we grant no capability);
    `excludes.caps` therefore never excludes; `includes/excludes.arches` and
    `includes.minKernel` are evaluated for this machine. `architectures`/`archMap` are
    ignored: only the native architecture is ever allowed. Unknown syscall names are
    skipped, as runc does (profiles list calls of every architecture).
    """
    default = _oci_action(path, None, data.get("defaultAction"),
                          data.get("defaultErrnoRet", data.get("defaultErrno")))
    rules: list[Rule] = []
    entries = data.get("syscalls") or []
    if not isinstance(entries, list):
        raise _bad(path, None, "`syscalls` must be a list", "see the OCI linux.seccomp format")
    for n, s in enumerate(entries, start=1):
        if not isinstance(s, dict):
            raise _bad(path, n, "a syscalls[] entry must be an object", "see the OCI linux.seccomp format")
        includes, excludes = s.get("includes") or {}, s.get("excludes") or {}
        for part, value in (("includes", includes), ("excludes", excludes)):
            if not isinstance(value, dict) or not all(
                    isinstance(value.get(k, []), list) and all(isinstance(x, str) for x in value.get(k, []))
                    for k in ("caps", "arches")):
                raise _bad(path, n, f"`{part}` must be an object whose caps and arches are lists of names",
                           "see the OCI linux.seccomp format")
        if includes.get("caps"):
            continue  # granted only with a capability nsbox never gives
        if includes.get("arches") and _GO_ARCH not in includes["arches"]:
            continue
        if includes.get("minKernel") and not _kernel_at_least(str(includes["minKernel"])):
            continue
        if _GO_ARCH in (excludes.get("arches") or []):
            continue
        names = s.get("names") or ([s["name"]] if s.get("name") else [])
        # A string here would be read letter by letter: a deny rule covering nothing.
        if not isinstance(names, list) or not names or not all(isinstance(x, str) for x in names):
            raise _bad(path, n, "`names` must be a non-empty list of syscall names", 'write "names": ["..."]')
        action = _oci_action(path, n, s.get("action"),
                             s.get("errnoRet", s.get("errno", data.get("defaultErrnoRet"))))
        conditions = tuple(_oci_condition(path, n, a) for a in (s.get("args") or []))
        why = str(s.get("comment") or f"from {display_path(path)}")
        rules.append(Rule(n, tuple(names), action, conditions, optional=True, why=why))
    return Profile(path, "oci-json", f"OCI/Docker profile {path.name}", default, tuple(rules))


def _oci_action(path: Path, rule: int | None, name: object, errno_value: object) -> Action:
    if name == "SCMP_ACT_NOTIFY":
        raise _bad(path, rule, "SCMP_ACT_NOTIFY needs a seccomp supervisor, which nsbox does not run",
                   "use SCMP_ACT_ERRNO or SCMP_ACT_LOG instead")
    if not isinstance(name, str) or name not in _OCI_ACTIONS:
        raise _bad(path, rule, f"bad action {name!r}", f"use one of {', '.join(_OCI_ACTIONS)}")
    kind = _OCI_ACTIONS[str(name)]
    if kind == "errno":
        # runc's default for SCMP_ACT_ERRNO without errnoRet is EPERM.
        return Action("errno", errno_mod.EPERM if errno_value is None else _errno_number(path, rule, errno_value))
    return Action(kind)


def _oci_condition(path: Path, n: int, a: object) -> Condition:
    if (not isinstance(a, dict) or not isinstance(a.get("op"), str) or a["op"] not in _OCI_OPS
            or not isinstance(a.get("index"), int) or isinstance(a.get("index"), bool)):
        raise _bad(path, n, f"bad argument condition {a!r}", f"op is one of {', '.join(_OCI_OPS)}")
    op = _OCI_OPS[a["op"]]
    raw, raw_two = a.get("value", 0), a.get("valueTwo", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64 for v in (raw, raw_two)):
        raise _bad(path, n, f"bad argument condition {a!r}: value and valueTwo are 64-bit unsigned integers",
                   "write numbers, e.g. \"value\": 2114060288")
    value, value_two = int(raw), int(raw_two)
    if op == "masked_eq":  # OCI: `value` is the mask, `valueTwo` the expected result
        return Condition(int(a["index"]), op, value_two & value, value)
    return Condition(int(a["index"]), op, value)


# ---------------------------------------------------------------------------------------
# Resolving names, and turning exceptions into non-overlapping rules
# ---------------------------------------------------------------------------------------


class Emitted(NamedTuple):
    """One rule exactly as handed to libseccomp."""

    nr: int
    name: str
    action: Action
    conditions: tuple[Condition, ...]
    rule: int  # the profile rule it came from


Pattern = tuple[int, int]  # (mask, value): the set of x with (x & mask) == value


def _pattern(c: Condition) -> Pattern:
    return (c.mask, c.value) if c.op == "masked_eq" else (_ALL64, c.value)


def _intersect(a: Pattern, b: Pattern) -> Pattern | None:
    (m1, v1), (m2, v2) = a, b
    if (v1 ^ v2) & m1 & m2:
        return None  # they disagree on a bit both fix: empty
    return (m1 | m2, v1 | v2)


def _complement(p: Pattern) -> list[Pattern]:
    """Every x not matching p, as disjoint patterns: one per fixed bit, from the top.

    x differs from p first at fixed bit b (agrees above it): mask = fixed bits >= b,
    value = p's bits above b plus the flipped bit b.
    """
    mask, value = p
    out: list[Pattern] = []
    above = 0
    for bit in reversed(range(64)):
        b = 1 << bit
        if mask & b:
            out.append((above | b, (value & above) | (~value & b)))
            above |= b
    return out


def complement_of_union(patterns: Iterable[Pattern]) -> list[Pattern]:
    """Disjoint patterns covering exactly the values that match none of `patterns`."""
    result: list[Pattern] = [(0, 0)]  # everything
    for p in patterns:
        result = [r for x in result for c in _complement(p) if (r := _intersect(x, c)) is not None]
    return result


def _resolve(profile: Profile) -> tuple[list[Emitted], list[str]]:
    """Names -> numbers for this arch; returns the rules to emit and the names skipped."""
    lib = _libseccomp()
    emitted: list[Emitted] = []
    skipped: list[str] = []
    for rule in profile.rules:
        for name in rule.syscalls:
            nr = int(lib.resolve_syscall(lib.Arch.NATIVE, name))
            if nr < 0:  # -1: unknown to libseccomp; other negatives: not on this arch
                if rule.optional:
                    skipped.append(name)
                    continue
                raise _bad(profile.path, rule.number, f'unknown syscall "{name}" on {_MACHINE}',
                           "check the spelling (`ausyscall --dump`), or add `optional = true` "
                           "to skip names this arch lacks")
            emitted.append(Emitted(nr, name, rule.action, rule.conditions, rule.number))
    if profile.format == "toml":
        emitted = _apply_exceptions(profile.path, emitted)
    return emitted, skipped


def _apply_exceptions(path: Path, emitted: list[Emitted]) -> list[Emitted]:
    """Make every syscall's rules disjoint: an unconditional rule yields to conditional ones.

    libseccomp would let an unconditional rule swallow the conditional rules of the same
    syscall, and does not define an order between overlapping conditional rules. So the
    unconditional rule is rewritten as masked_eq rules covering exactly the argument
    values no exception matches.
    """
    by_nr: dict[int, list[Emitted]] = {}
    for e in emitted:
        by_nr.setdefault(e.nr, []).append(e)
    out: list[Emitted] = []
    for entries in by_nr.values():
        plain = [e for e in entries if not e.conditions]
        if len({e.action for e in plain}) > 1:
            a, b = plain[0], next(e for e in plain if e.action != plain[0].action)
            raise _bad(path, b.rule, f'"{b.name}" already has action {a.action} in rule {a.rule}',
                       "give each system call one unconditional action; use `args` for exceptions")
        if not plain:
            out.extend(entries)
            continue
        base = plain[0]
        exceptions = [e for e in entries if e.conditions and e.action != base.action]
        if not exceptions:
            out.append(base)  # conditional rules with the same action add nothing
            continue
        indexes = {c.index for e in exceptions for c in e.conditions}
        for e in exceptions:
            if len(e.conditions) != 1 or e.conditions[0].op not in ("eq", "masked_eq") or len(indexes) != 1:
                raise _bad(path, e.rule, f'exception for "{e.name}" to rule {base.rule} cannot be compiled',
                           "an exception to an unconditional rule needs exactly one eq or masked_eq "
                           "condition, on the same argument as the other exceptions")
        index = indexes.pop()
        out.extend(exceptions)
        for mask, value in complement_of_union(_pattern(e.conditions[0]) for e in exceptions):
            out.append(Emitted(base.nr, base.name, base.action,
                               (Condition(index, "masked_eq", value, mask),), base.rule))
    return out


# ---------------------------------------------------------------------------------------
# Compiling (launcher only)
# ---------------------------------------------------------------------------------------


def _new_filter(profile: Profile, emitted: list[Emitted]) -> Any:
    lib = _libseccomp()
    f = lib.SyscallFilter(profile.default_action.to_libseccomp())
    # Only the native architecture is in the filter; any other ABI kills the whole process
    # (through the launcher, which names the call: Supervisor).
    f.set_attr(lib.Attr.ACT_BADARCH, lib.NOTIFY)
    # A binary tree over syscall numbers (libseccomp >= 2.5); an older one builds a linear
    # list instead: the same decisions, just slower.
    with contextlib.suppress(OSError):
        f.set_attr(lib.Attr.CTL_OPTIMIZE, 2)
    for e in emitted:
        if e.action == profile.default_action:
            # libseccomp refuses such a rule (EACCES) and it would change nothing; runc skips
            # it too. Exact here: after _apply_exceptions no other rule covers its values.
            continue
        try:
            f.add_rule(e.action.to_libseccomp(), e.nr, *(c.to_libseccomp() for c in e.conditions))
        except OSError as err:
            if profile.format == "oci-json" and err.errno == errno_mod.EEXIST:
                continue  # OCI: when a syscall matches several entries, the first one wins
            raise _bad(profile.path, e.rule, f'libseccomp refused the rule for "{e.name}": {err.strerror}',
                       "each argument may be compared once per rule; split such rules") from err
    return f


def _export(f: Any, method: str) -> bytes:
    # A memfd, not a pipe: a large filter would fill a pipe before anyone reads it.
    fd = os.memfd_create("nsbox-seccomp", os.MFD_CLOEXEC)
    with os.fdopen(fd, "w+b") as out:
        getattr(f, method)(out)
        out.seek(0)
        return out.read()


def compile_bpf(profile: Profile) -> bytes:
    """The profile as a finished classic-BPF program (struct sock_filter[], 8 bytes each)."""
    emitted, _ = _resolve(profile)
    return _export(_new_filter(profile, emitted), "export_bpf")


def export_pfc(profile: Profile) -> str:
    """libseccomp's pseudo filter code: the compiled decision tree, readable (`seccomp show --pfc`)."""
    emitted, _ = _resolve(profile)
    return _export(_new_filter(profile, emitted), "export_pfc").decode()


def libseccomp_version() -> str:
    """libseccomp's runtime version, e.g. "2.5.4". Loads pyseccomp: nsbox doctor checks both."""
    try:
        _libseccomp()
    except (ImportError, RuntimeError) as e:  # no pyseccomp, or pyseccomp found no libseccomp
        raise OSError(errno_mod.ENOENT, f"cannot load libseccomp through pyseccomp: {e}") from e
    return ".".join(str(p) for p in syscalls.libseccomp_version())


# ---------------------------------------------------------------------------------------
# The cache of compiled plans
# ---------------------------------------------------------------------------------------
#
# One file per profile: $XDG_CACHE_HOME/nsbox/seccomp/<key>.json, holding the whole plan
# (the BPF and what describe() prints), so that a hit costs one read and one stat(2) and
# neither parses the profile nor loads libseccomp.
#
# The key (_cache_key) is everything the plan depends on that is known without loading
# libseccomp. Which libseccomp compiled it cannot be part of the key: finding out means
# loading it, the very cost the cache saves. So the entry records the shared object the
# compiler had mapped (its real path, from /proc/self/maps) with that file's inode, size
# and mtime, and a hit requires the file to be unchanged. An upgrade replaces the file (a
# new inode, and usually a new versioned name), and the next plan compiles again.
# Not noticed: a second libseccomp elsewhere that the loader would now prefer while the
# first stays untouched (LD_LIBRARY_PATH, a build in /usr/local/lib). The BPF reused then is
# still this profile, compiled by the libseccomp that was in use when the entry was written.
#
# The file is `<sha256 of the body, hex>\n<body: JSON>`; the digest catches a truncated or
# damaged entry. Anything doubtful is a miss, and a miss costs one compile, nothing more.

_CACHE_MAX_BYTES = 1 << 20  # an entry is tens of KiB; a larger file is not one of ours


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"  # XDG: ignore relative
    return root / "nsbox" / "seccomp"


def _cache_key(path: Path, content: bytes) -> str:
    """What a compiled plan depends on, computed without libseccomp.

    The profile's bytes; its path as displayed (JSON or TOML goes by the suffix, and an
    OCI profile's description and default `why` name the file); the compiler's version;
    the architecture; and the kernel release (a Docker profile's minKernel depends on it).
    """
    h = hashlib.sha256()
    for part in (_COMPILER_VERSION.encode(), display_path(path).encode("utf-8", "surrogateescape"), content,
                 _MACHINE.encode(), os.uname().release.encode()):
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


def _loaded_libseccomp() -> dict[str, Any] | None:
    """The libseccomp this process has mapped: {"path", "ino", "size", "mtime_ns"}, or None.

    Called after compiling, so the library is loaded. None if no such mapping is found or
    its file was replaced since it was loaded (maps then says "(deleted)"): with nothing
    on disk identifying the compiler, the plan is not cached.
    """
    try:
        with open("/proc/self/maps") as maps:
            # address perms offset dev inode path; the path is the mapped file's real path
            paths = (fields[5] for line in maps if len(fields := line.rstrip("\n").split(maxsplit=5)) == 6)
            path = next((p for p in paths if os.path.basename(p).startswith("libseccomp.so")), None)
        if path is None or path.endswith(" (deleted)"):
            return None
        st = os.stat(path)
    except OSError:
        return None
    return {"path": path, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _same_file(lib: dict[str, Any]) -> bool:
    """True if the libseccomp recorded in an entry is still the same file on disk."""
    try:
        st = os.stat(lib["path"])
    except OSError:
        return False  # removed: libseccomp was upgraded (or moved)
    return (st.st_ino, st.st_size, st.st_mtime_ns) == (lib["ino"], lib["size"], lib["mtime_ns"])


def _cache_entry(key: str, compiled: SeccompPlan, lib: dict[str, Any]) -> bytes:
    body = json.dumps({
        "key": key,
        "compiler": _COMPILER_VERSION,
        "libseccomp": {"version": compiled.libseccomp, **lib},
        "architecture": compiled.architecture,
        "default_action": compiled.default_action,
        "description": compiled.description,
        "rule_count": compiled.rule_count,
        "rules": [{"number": r.number, "syscalls": list(r.syscalls), "action": r.action,
                   "conditions": list(r.conditions), "why": r.why} for r in compiled.rules],
        "skipped": list(compiled.skipped),
        "instructions": compiled.instructions,
        "bpf": base64.b64encode(compiled.bpf).decode(),
    }, separators=(",", ":")).encode()
    return hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def _field(obj: object, key: str, kind: type[_T]) -> _T:
    """obj[key] if obj is a dict and that value is a `kind` (a bool is no int here); else ValueError."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"cache entry: bad {key!r}")
    return value


def _strings(obj: object, key: str) -> tuple[str, ...]:
    values = _field(obj, key, list)
    if not all(isinstance(v, str) for v in values):
        raise ValueError(f"cache entry: bad {key!r}")
    return tuple(values)


def _read_cache(file: Path, key: str, profile: Path, digest: str) -> SeccompPlan | None:
    """The plan cached in `file` for this key, or None: missing, foreign, damaged or stale.

    Nothing in the file is taken on trust, since it decides which filter the agent gets:
    the file must be a regular file of our own (another user's could choose our filter),
    its digest must match, every field must have its type, the key, compiler and
    architecture must be ours, the BPF must be exactly `instructions` 8-byte instructions
    (1..4096), and the libseccomp that compiled it must still be the same file.
    """
    try:
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                return None
            raw = f.read(_CACHE_MAX_BYTES + 1)
    except OSError:
        return None
    head, newline, body = raw.partition(b"\n")
    if len(raw) > _CACHE_MAX_BYTES or not newline or head != hashlib.sha256(body).hexdigest().encode():
        return None
    try:
        return _plan_from_entry(json.loads(body), key, profile, digest)
    except (ValueError, RecursionError, binascii.Error):  # UnicodeDecodeError is a ValueError
        return None


def _plan_from_entry(entry: object, key: str, profile: Path, digest: str) -> SeccompPlan | None:
    """The SeccompPlan an entry's JSON describes; ValueError if malformed, None if stale."""
    if (_field(entry, "key", str), _field(entry, "compiler", str), _field(entry, "architecture", str)) != (
            key, _COMPILER_VERSION, _MACHINE):
        return None
    lib = _field(entry, "libseccomp", dict)
    version = _field(lib, "version", str)
    _field(lib, "path", str)
    for k in ("ino", "size", "mtime_ns"):
        _field(lib, k, int)
    if not _same_file(lib):
        return None  # libseccomp changed since: compile again
    instructions = _field(entry, "instructions", int)
    bpf = base64.b64decode(_field(entry, "bpf", str), validate=True)
    if not 0 < instructions <= _BPF_MAXINSNS or len(bpf) != 8 * instructions:
        raise ValueError("cache entry: the BPF is not `instructions` instructions long")
    rules = tuple(RuleSummary(_field(r, "number", int), _strings(r, "syscalls"), _field(r, "action", str),
                              _strings(r, "conditions"), _field(r, "why", str))
                  for r in _field(entry, "rules", list))
    if _field(entry, "rule_count", int) != len(rules):
        raise ValueError("cache entry: rule_count does not match the rules")
    return SeccompPlan(
        profile=profile,
        sha256=digest,
        rule_count=len(rules),
        default_action=_field(entry, "default_action", str),
        description=_field(entry, "description", str),
        architecture=_MACHINE,
        libseccomp=version,
        cached=True,
        rules=rules,
        skipped=_strings(entry, "skipped"),
        bpf=bpf,
    )


def _write_cache(path: Path, entry: bytes) -> None:
    """Atomically: a reader sees the old file or the whole new one, never half of it."""
    import tempfile  # here, not at the top: 9 ms of imports a cache hit never needs

    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False) as f:
            tmp = f.name
            f.write(entry)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        # A cache we cannot write costs one compile per run, nothing more.
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# ---------------------------------------------------------------------------------------
# The plan and the two steps
# ---------------------------------------------------------------------------------------


class RuleSummary(NamedTuple):
    number: int
    syscalls: tuple[str, ...]
    action: str
    conditions: tuple[str, ...]
    why: str


class SeccompPlan(NamedTuple):
    profile: Path
    sha256: str  # of the profile file's bytes
    rule_count: int
    default_action: str
    description: str
    architecture: str
    libseccomp: str
    cached: bool  # True if the whole plan came from the cache (nothing was parsed or compiled)
    rules: tuple[RuleSummary, ...]
    skipped: tuple[str, ...]  # names not on this arch or unknown to this libseccomp
    bpf: bytes  # the filter itself: left out of repr (thousands of bytes), counted in `instructions`

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in zip(self._fields, self, strict=True) if name != "bpf")
        return f"SeccompPlan({shown})"

    @property
    def instructions(self) -> int:
        return len(self.bpf) // 8

    def describe(self) -> list[str]:
        lines = [
            f"seccomp profile {display_path(self.profile)} (sha256 {self.sha256[:12]}): "
            f"{self.rule_count} rules, default {self.default_action}",
            f"native architecture {self.architecture} only: any other ABI (i386 int 0x80, x32) "
            "kills the process",
            f"compiled by libseccomp {self.libseccomp} (binary tree) to {self.instructions} BPF "
            f"instructions{' (from cache)' if self.cached else ''}; the agent installs them last, "
            "just before execve",
        ]
        if self.skipped:
            lines.append(f"{len(self.skipped)} names skipped (not on {self.architecture} or unknown to "
                         f"libseccomp {self.libseccomp}); they get the default action")
        for r in self.rules:
            if r.action != "allow":
                cond = f" when {' and '.join(r.conditions)}" if r.conditions else ""
                lines.append(f"  {', '.join(r.syscalls)}{cond} -> {r.action}: {r.why}")
        return lines

    def why(self, syscall: str) -> str | None:
        """The `why` of the first non-allow rule naming `syscall` (to explain a SIGSYS death)."""
        return next((r.why for r in self.rules if syscall in r.syscalls and r.action != "allow"), None)

    def expected_status(self) -> dict[str, str]:
        """/proc/self/status fields that prove the filter is installed (verify)."""
        return {"Seccomp": "2", "NoNewPrivs": "1"}


def resolve_profile(name_or_path: str) -> Path:
    """`default` or `permissive` name a built-in profile; anything else is a path."""
    builtin = BUILTIN_DIR / f"{name_or_path}.toml"
    if "/" not in name_or_path and not name_or_path.endswith((".toml", ".json")) and builtin.exists():
        return builtin
    return Path(name_or_path)


def plan(profile: Path | None = None, *, cache: Path | None = None, write_cache: bool = True) -> SeccompPlan:
    """Load, validate and compile a profile (LAUNCHER, before any fork), or take it from the cache.

    The whole plan is cached under $XDG_CACHE_HOME/nsbox/seccomp/ (see "The cache of
    compiled plans" above). A hit neither parses the profile nor loads libseccomp: an
    entry is written only after these very bytes were validated and compiled, by the
    libseccomp still installed. So a broken profile is never cached, and its errors come
    on every run. write_cache=False (`nsbox plan`) reads the cache but never writes it.
    """
    path = profile if profile is not None else DEFAULT_PROFILE
    with acting(STEP, f"reading {display_path(path)}"):
        content = path.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    key = _cache_key(path, content)
    cache_file = (cache if cache is not None else cache_dir()) / f"{key}.json"
    hit = _read_cache(cache_file, key, path, digest)
    if hit is not None:
        return hit
    parsed = parse_profile(path, content)
    emitted, skipped = _resolve(parsed)
    compiled = SeccompPlan(
        profile=path,
        sha256=digest,
        rule_count=len(parsed.rules),
        default_action=str(parsed.default_action),
        description=parsed.description,
        architecture=_MACHINE,
        libseccomp=libseccomp_version(),
        cached=False,
        rules=tuple(RuleSummary(r.number, r.syscalls, str(r.action), tuple(str(c) for c in r.conditions), r.why)
                    for r in parsed.rules),
        skipped=tuple(skipped),
        bpf=_export(_new_filter(parsed, emitted), "export_bpf"),
    )
    if write_cache and (lib := _loaded_libseccomp()) is not None:
        _write_cache(cache_file, _cache_entry(key, compiled, lib))
    return compiled


def install(plan: SeccompPlan) -> int:  # role: AGENT, the very last step before execve
    """Load the finished BPF with seccomp(2); return the listener fd for the launcher.

    No libseccomp here; no_new_privs is already set. The filter's kill decisions arrive
    on the listener (SECCOMP_FILTER_FLAG_NEW_LISTENER), which the agent hands to the
    launcher before execve: a call waits there until the launcher has killed its caller.
    """
    action = f"seccomp(SECCOMP_SET_MODE_FILTER, FLAG_NEW_LISTENER, {plan.instructions} instructions)"
    with acting("seccomp.install", action):
        return syscalls.install_seccomp_filter(plan.bpf, listener=True)


# ---------------------------------------------------------------------------------------
# The launcher's side: carrying out kills, and naming the call (seccomp_unotify(2))
# ---------------------------------------------------------------------------------------

SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100  # _IOWR('!', 0, struct seccomp_notif), 80 bytes
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101  # _IOWR('!', 1, struct seccomp_notif_resp), 24 bytes
_NOTIF = struct.Struct("<QIIiIQ6Q")  # id, pid, flags, data.nr, data.arch, data.ip, data.args[6]
_RESP = struct.Struct("<QqiI")  # id, val, error, flags
_AUDIT_ARCH = {0xC000003E: "x86_64", 0x40000003: "i386", 0xC00000B7: "aarch64", 0x40000028: "arm"}
_X32_BIT = 0x40000000
_SIGSYS_BIT = 1 << (signal.SIGSYS - 1)


class Supervisor:
    """Role LAUNCHER: receives the filter's kill decisions, kills, and says which call.

    A kill_process rule or a call from another ABI stops its caller in the kernel until
    this answers. The launcher sends SIGSYS, as SECCOMP_RET_KILL_PROCESS would (SIGKILL if
    the program catches, ignores or blocks SIGSYS), then refuses the call with ENOSYS: it
    never runs. If the launcher is gone, the kernel refuses such calls with ENOSYS itself.
    """

    def __init__(self, fd: int, plan: SeccompPlan) -> None:
        self.fd = fd
        self.plan = plan
        self.kills: list[dict[str, Any]] = []

    def handle(self) -> None:
        """One notification (the fd was readable)."""
        buf = bytearray(_NOTIF.size)  # the kernel wants it zeroed
        try:
            fcntl.ioctl(self.fd, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
        except OSError:
            return  # the caller died meanwhile (ENOENT) or the filter is gone
        notif_id, pid, _flags, nr, arch, *_ = _NOTIF.unpack(buf)
        name, abi = self._name(nr, arch)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL if self._sigsys_handled(pid) else signal.SIGSYS)
        with contextlib.suppress(OSError):  # ENOENT: the signal already ended it
            fcntl.ioctl(self.fd, SECCOMP_IOCTL_NOTIF_SEND, _RESP.pack(notif_id, 0, -errno_mod.ENOSYS, 0))
        native = arch == _NATIVE_AUDIT_ARCH and not nr & _X32_BIT
        why = self.plan.why(name) if native else f"only the native {_MACHINE} ABI is allowed"
        self.kills.append({"pid": pid, "syscall": name, "nr": nr, "abi": abi, "why": why or ""})

    @staticmethod
    def _name(nr: int, arch: int) -> tuple[str, str]:
        abi = _AUDIT_ARCH.get(arch, hex(arch))
        if arch == 0xC000003E and nr & _X32_BIT:
            abi, nr = "x32", nr & ~_X32_BIT
        try:
            # Loads libseccomp on the first kill only. The launcher is still in the host's
            # mount namespace, so the library is where it was; if not, the number will do.
            name = _libseccomp().resolve_syscall(arch, nr)
            return (name.decode() if isinstance(name, bytes) else str(name)), abi
        except Exception:
            return f"syscall {nr}", abi

    @staticmethod
    def _sigsys_handled(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            return False
        return any(int(fields.get(k, "0").strip(), 16) & _SIGSYS_BIT for k in ("SigBlk", "SigIgn", "SigCgt"))

    def close(self) -> None:
        os.close(self.fd)


# ---------------------------------------------------------------------------------------
# The profile as OCI `linux.seccomp` JSON (nsbox seccomp show --oci), for comparison with
# what runc, crun, podman or Docker would be given
# ---------------------------------------------------------------------------------------

_OCI_ACTION_NAMES = {kind: name for name, kind in _OCI_ACTIONS.items() if name != "SCMP_ACT_KILL"}


def _oci_action_fields(action: Action, key: str) -> dict[str, Any]:
    fields: dict[str, Any] = {key: _OCI_ACTION_NAMES[action.kind]}
    if action.kind == "errno" and action.errno is not None:
        fields["defaultErrnoRet" if key == "defaultAction" else "errnoRet"] = action.errno
    return fields


def to_oci(profile: Profile) -> dict[str, Any]:
    """The profile in the OCI runtime spec's `linux.seccomp` shape (native architecture only).

    It exports the rules exactly as nsbox hands them to libseccomp: exceptions already
    made disjoint (an unconditional rule becomes the masked_eq patterns no exception
    matches), because OCI runtimes give overlapping entries no order. Our masked_eq
    (arg & mask) == value is SCMP_CMP_MASKED_EQ with value=mask and valueTwo=value; each
    entry's `comment` is its rule's `why`.
    """
    why = {rule.number: rule.why for rule in profile.rules}
    syscalls = []
    for e in _resolve(profile)[0]:
        entry: dict[str, Any] = {"names": [e.name], **_oci_action_fields(e.action, "action")}
        if e.conditions:
            entry["args"] = [
                {"index": c.index, "op": f"SCMP_CMP_{c.op.upper()}",
                 "value": c.mask if c.op == "masked_eq" else c.value,
                 "valueTwo": c.value if c.op == "masked_eq" else 0}
                for c in e.conditions
            ]
        if why.get(e.rule):
            entry["comment"] = why[e.rule]
        syscalls.append(entry)
    return {**_oci_action_fields(profile.default_action, "defaultAction"),
            "architectures": [f"SCMP_ARCH_{_MACHINE.upper()}"], "syscalls": syscalls}
