"""Seccomp profiles as data: parsing, errors, the exception compiler, and default.toml vs Docker.

Pure tests: nothing here installs a filter. The comparison with Docker runs the two
compiled BPF programs through a small classic-BPF interpreter, so it checks what
libseccomp actually produced, not what the profiles say.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nsbox.errors import ExitCode, StepError
from nsbox.layers import seccomp

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "seccomp"
DOCKER = FIXTURES / "moby-profiles-seccomp-default.v0.2.3.json"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"{FIXTURES} not present (../shared)")

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
AUDIT_ARCH_X86_64 = 0xC000003E


def compile_error(tmp_path: Path, name: str, text: str) -> StepError:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(StepError) as info:
        seccomp.plan(path, cache=tmp_path / "cache")
    assert info.value.step == "seccomp.compile"
    assert info.value.exit_code == ExitCode.NSBOX == 125
    assert info.value.fix, "every profile error carries a fix line"
    return info.value


GOOD_RULE = '[[rule]]\nsyscalls = ["read"]\naction = "allow"\nwhy = "reading"\n'
HEAD = 'default_action = "errno"\ndefault_errno = "ENOSYS"\n'


# --- the built-in profiles --------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "permissive"])
def test_builtin_profiles_compile_and_every_rule_says_why(name: str, tmp_path: Path) -> None:
    plan = seccomp.plan(seccomp.resolve_profile(name), cache=tmp_path)
    assert plan.rule_count == len(plan.rules) > 5
    assert all(r.why for r in plan.rules)
    assert 0 < plan.instructions < 4096  # BPF_MAXINSNS
    assert plan.describe()[0].startswith(f"seccomp profile seccomp/{name}.toml")


def test_default_is_an_allowlist_answering_enosys() -> None:
    profile = seccomp.load_profile(seccomp.DEFAULT_PROFILE)
    assert str(profile.default_action) == "errno ENOSYS"


def test_compiled_bpf_is_cached_and_keyed_by_content(tmp_path: Path) -> None:
    first = seccomp.plan(None, cache=tmp_path)
    second = seccomp.plan(None, cache=tmp_path)
    assert (first.cached, second.cached) == (False, True)
    assert first.bpf == second.bpf
    assert [p.suffix for p in tmp_path.iterdir()] == [".json"]  # no temporary file left behind
    changed = tmp_path / "p.toml"
    changed.write_text(seccomp.DEFAULT_PROFILE.read_text() + "\n# a comment changes the key\n")
    assert not seccomp.plan(changed, cache=tmp_path).cached


# --- errors name the file, the rule and a fix ----------------------------------------------


def test_unknown_syscall_names_file_rule_and_arch(tmp_path: Path) -> None:
    err = compile_error(tmp_path, "x.toml", HEAD + GOOD_RULE
                        + '[[rule]]\nsyscalls = ["io_uring_setp"]\naction = "errno"\nerrno = "EPERM"\nwhy = "w"\n')
    first = err.render().splitlines()[0]
    assert first.startswith(f"nsbox: seccomp.compile: {tmp_path}/x.toml, rule 2: ")
    assert f'unknown syscall "io_uring_setp" on {seccomp._MACHINE}' in first
    assert "optional = true" in err.render()


def test_optional_rule_skips_unknown_names(tmp_path: Path) -> None:
    path = tmp_path / "o.toml"
    path.write_text(HEAD + '[[rule]]\nsyscalls = ["read", "no_such_call"]\naction = "allow"\noptional = true\n'
                    'why = "w"\n')
    assert seccomp.plan(path, cache=tmp_path / "c").skipped == ("no_such_call",)


@pytest.mark.parametrize(("text", "expected"), [
    (HEAD + GOOD_RULE + '[[rule]]\nsyscalls = ["bpf"]\naction = "errno"\nerrno = "EPREM"\nwhy = "w"\n',
     "rule 2: unknown errno 'EPREM'"),
    (HEAD + '[[rule]]\nsyscalls = ["bpf"]\naction = "deny"\nwhy = "w"\n', "rule 1: bad action 'deny'"),
    (HEAD + '[[rule]]\nsyscalls = ["bpf"]\naction = "allow"\n', "rule 1: missing `why`"),
    (HEAD + '[[rule]]\nsyscalls = ["bpf"]\naction = "allow"\nwhy = "  "\n', "rule 1: missing `why`"),
    (HEAD + '[[rule]]\nsyscall = ["bpf"]\naction = "allow"\nwhy = "w"\n', "rule 1: unknown key(s) ['syscall']"),
    (HEAD + GOOD_RULE + '[[rule]]\nsyscalls = ["ioctl"]\naction = "allow"\nwhy = "w"\n'
     'args = [{ index = 7, op = "eq", value = 1 }]\n', "rule 2: argument index 7 out of range"),
    (HEAD + GOOD_RULE + '[[rule]]\nsyscalls = ["ioctl"]\naction = "allow"\nwhy = "w"\n'
     'args = [{ index = 1, op = "masked_eq", value = 3 }]\n', "rule 2: masked_eq needs a mask"),
    ('default_action = "errno"\n' + GOOD_RULE, "needs an errno name"),
    ('default_action = "allow"\narchitectures = ["x86"]\n' + GOOD_RULE, "architectures = ['x86']"),
    (HEAD + "[[rule]\n", "not valid TOML"),
])
def test_bad_toml_profiles_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in compile_error(tmp_path, "bad.toml", text).render()


def test_exception_that_cannot_be_complemented_is_refused(tmp_path: Path) -> None:
    text = (HEAD + '[[rule]]\nsyscalls = ["socket"]\naction = "allow"\nwhy = "w"\n'
            '[[rule]]\nsyscalls = ["socket"]\naction = "errno"\nerrno = "EPERM"\nwhy = "w"\n'
            'args = [{ index = 0, op = "gt", value = 40 }]\n')
    assert "rule 2: exception for \"socket\" to rule 1 cannot be compiled" in compile_error(
        tmp_path, "e.toml", text).render()


@pytest.mark.parametrize(("text", "expected"), [
    ("{not json", "not valid JSON"),
    ('{"defaultAction": "SCMP_ACT_DENY", "syscalls": []}', "bad action 'SCMP_ACT_DENY'"),
    ('{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["bpf"], "action": "SCMP_ACT_NOTIFY"}]}',
     "rule 1: SCMP_ACT_NOTIFY needs a seccomp supervisor"),
    ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["bpf"], "action": "SCMP_ACT_ERRNO",'
     ' "errno": "ENOPE"}]}', "rule 1: unknown errno 'ENOPE'"),
])
def test_bad_json_profiles_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in compile_error(tmp_path, "bad.json", text).render()


# --- Docker/OCI JSON, loaded unchanged ------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.json")) if FIXTURES.is_dir() else [],
                         ids=lambda p: p.name)
def test_oci_fixture_profiles_compile(path: Path, tmp_path: Path) -> None:
    plan = seccomp.plan(path, cache=tmp_path)
    assert plan.instructions > 100
    # Entries granted only with a capability are gone (nsbox grants none); the others stay.
    raw = json.loads(path.read_text())["syscalls"]
    with_caps = {n for n, s in enumerate(raw, start=1) if (s.get("includes") or {}).get("caps")}
    kept = {r.number for r in seccomp.load_profile(path).rules}
    assert with_caps and not (with_caps & kept)


@needs_fixtures
def test_oci_reading_drops_capability_rules_and_keeps_the_rest() -> None:
    profile = seccomp.load_profile(DOCKER)
    names = {n for r in profile.rules for n in r.syscalls}
    assert "read" in names and "clone3" in names
    assert "reboot" not in names  # includes.caps CAP_SYS_BOOT
    clone3 = next(r for r in profile.rules if r.syscalls == ("clone3",))
    assert str(clone3.action) == "errno ENOSYS"  # errnoRet 38, excludes.caps CAP_SYS_ADMIN
    assert str(profile.default_action) == "errno EPERM"


# --- the exception compiler -------------------------------------------------------------------


def matches(p: tuple[int, int], x: int) -> bool:
    return (x & p[0]) == p[1]


patterns = st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)).map(lambda mv: (mv[0], mv[1] & mv[0]))


@settings(database=None)
@given(st.lists(patterns, min_size=1, max_size=4), st.lists(st.integers(0, 2**64 - 1), max_size=20))
def test_complement_of_union_is_exact_and_disjoint(exceptions: list[tuple[int, int]], xs: list[int]) -> None:
    complement = seccomp.complement_of_union(exceptions)
    # Probe the exceptions' own values and their neighbours, plus random ones.
    for x in [*xs, *(v for _, v in exceptions), *((v ^ 1) for _, v in exceptions)]:
        hits = sum(matches(c, x) for c in complement)
        assert hits == (0 if any(matches(e, x) for e in exceptions) else 1)


# --- default.toml is at least as strict as Docker's default ----------------------------------


def run_bpf(bpf: bytes, nr: int, args: tuple[int, ...] = (0,) * 6, arch: int = AUDIT_ARCH_X86_64) -> int:
    """A classic-BPF interpreter for seccomp programs (the instructions libseccomp emits)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *args)
    prog = [struct.unpack_from("<HBBI", bpf, i) for i in range(0, len(bpf), 8)]
    a = x = 0
    mem = [0] * 16
    pc = 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == 0x20:  # ld [k]
            a = struct.unpack_from("<I", data, k)[0]
        elif code == 0x00:  # ld #k
            a = k
        elif code == 0x60:  # ld M[k]
            a = mem[k]
        elif code == 0x61:  # ldx M[k]
            x = mem[k]
        elif code == 0x02:  # st M[k]
            mem[k] = a
        elif code == 0x03:  # stx M[k]
            mem[k] = x
        elif code == 0x07:  # tax
            x = a
        elif code == 0x87:  # txa
            a = x
        elif code == 0x54:  # and #k
            a &= k
        elif code == 0x05:  # ja
            pc += k
        elif code in (0x15, 0x25, 0x35, 0x45):  # jeq, jgt, jge, jset #k
            taken = {0x15: a == k, 0x25: a > k, 0x35: a >= k, 0x45: bool(a & k)}[code]
            pc += jt if taken else jf
        elif code == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"BPF opcode {code:#x} not modelled by this test")


INTERESTING = (0, 1, 8, 17, 38, 39, 40, 41, 0x80, 0x5401, 0x5412, 0x541C, 0x20000, 0x20008, 0x7E020000,
               0x10000000, 0xFFFFFFFF, (1 << 32) | 40, (1 << 32) | 0x5412, (1 << 32) | 0x10000000, 2**64 - 1)


# (x86_64 nr, argument index) the kernel declares as int/unsigned int.
KERNEL_INT_ARGS = {(16, 1), (41, 0), (135, 0)}  # ioctl cmd, socket family, personality


@needs_fixtures
@pytest.mark.skipif(seccomp._MACHINE != "x86_64", reason="the interpreter feeds x86_64 seccomp_data")
def test_default_denies_everything_docker_denies(tmp_path: Path) -> None:
    ours = seccomp.plan(None, cache=tmp_path).bpf
    docker = seccomp.plan(DOCKER, cache=tmp_path).bpf
    conditional = {e.nr for e in seccomp._resolve(seccomp.load_profile(seccomp.DEFAULT_PROFILE))[0] if e.conditions}
    conditional |= {e.nr for e in seccomp._resolve(seccomp.load_profile(DOCKER))[0] if e.conditions}
    checked = 0
    for nr in range(0, 600):
        samples = [(0,) * 6]
        if nr in conditional:
            samples += [tuple(v if i == j else 0 for j in range(6)) for i in range(3) for v in INTERESTING]
        for args in samples:
            checked += 1
            if run_bpf(docker, nr, args) != SECCOMP_RET_ALLOW and run_bpf(ours, nr, args) == SECCOMP_RET_ALLOW:
                # Allowed only if it is the very call Docker allows, as the kernel reads it: the
                # kernel takes these arguments as 32-bit ints and ignores the upper half.
                as_kernel_sees = tuple(a & 0xFFFFFFFF if (nr, i) in KERNEL_INT_ARGS else a
                                       for i, a in enumerate(args))
                assert as_kernel_sees != args, f"nr {nr} args {args} allowed by default.toml"
                assert run_bpf(docker, nr, as_kernel_sees) == SECCOMP_RET_ALLOW, f"nr {nr} args {args}"
    assert checked > 600
    # And where Docker's 64-bit comparison lets a 32-bit AF_VSOCK through, ours does not.
    vsock_high = ((1 << 32) | 40, 1, 0, 0, 0, 0)
    assert run_bpf(docker, 41, vsock_high) == SECCOMP_RET_ALLOW
    assert run_bpf(ours, 41, vsock_high) == SECCOMP_RET_ERRNO | 97  # EAFNOSUPPORT


def test_default_interpreted_decisions(tmp_path: Path) -> None:
    if seccomp._MACHINE != "x86_64":
        pytest.skip("syscall numbers below are x86_64's")
    bpf = seccomp.plan(None, cache=tmp_path).bpf
    errno_ret = SECCOMP_RET_ERRNO
    assert run_bpf(bpf, 0) == SECCOMP_RET_ALLOW  # read
    assert run_bpf(bpf, 16, (0, 0x5401, 0, 0, 0, 0)) == SECCOMP_RET_ALLOW  # ioctl TCGETS
    assert run_bpf(bpf, 16, (0, (0xFFFF << 48) | 0x5412, 0, 0, 0, 0)) == errno_ret | 1  # TIOCSTI, high bits
    assert run_bpf(bpf, 56, (0x11, 0, 0, 0, 0, 0)) == SECCOMP_RET_ALLOW  # clone(SIGCHLD): fork
    assert run_bpf(bpf, 272, (0x10000000, 0, 0, 0, 0, 0)) == errno_ret | 1  # unshare(CLONE_NEWUSER)
    assert run_bpf(bpf, 435) == errno_ret | 38  # clone3 -> ENOSYS
    assert run_bpf(bpf, 1000) == errno_ret | 38  # unknown -> ENOSYS
    assert run_bpf(bpf, 135, (0x0040000, 0, 0, 0, 0, 0)) == errno_ret | 1  # personality(ADDR_NO_RANDOMIZE)
    # i386 ABI: SECCOMP_RET_USER_NOTIF, the launcher kills and names it (test_privileges.py)
    assert run_bpf(bpf, 39, arch=0x40000003) == 0x7FC00000
