"""Fuzzing with Hypothesis: every parser of untrusted input fails only with nsbox's own error.

Targets: tar layers (the unpacker), image layouts (manifest, config, index), seccomp
profiles (TOML and OCI JSON), config.toml, allowed-domains.txt, --resolve, sizes and
durations, and the proxy's request-line parsers (the proxy's end-to-end fuzz over a socket
is tests/test_net_proxy.py::test_fuzzed_requests_get_a_status_or_a_close_never_a_crash).

Budget: NSBOX_FUZZ_EXAMPLES examples per target if set, else 200 (CI) or 5000 with
NSBOX_RELIABILITY_LONG=1. No example database: the suite's user cannot write the repo.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import string
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import rel_util as ru
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsbox import config, limits
from nsbox.errors import StepError
from nsbox.image import layout
from nsbox.image.store import Store, remove_tree
from nsbox.image.unpack import Budget, Layer, unpack_layers
from nsbox.layers import seccomp
from nsbox.net import proxy, rules

EXAMPLES = int(os.environ.get("NSBOX_FUZZ_EXAMPLES") or ru.budget(200, 5000))
FUZZ = settings(database=None, max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
COUNTS: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _record(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    name = request.node.name.removeprefix("test_")
    if COUNTS[name]:
        ru.FIGURES[f"fuzz.{name}.examples"] = COUNTS[name]


def only_step_errors(fn: Callable[[], object]) -> StepError | None:
    """Run fn: success or a StepError that renders; any other exception fails the test."""
    try:
        fn()
    except StepError as e:
        assert e.render().startswith("nsbox: "), e.render()
        return e
    return None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)


def maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the valid value, sometimes any JSON value instead."""
    return st.one_of(valid, valid, valid, json_values)


# ---- tar layers ----------------------------------------------------------------------------

NAMES = st.lists(st.sampled_from(["a", "b", "..", ".", "", ".wh.a", ".wh..wh..opq", ".wh.", "victim", "x" * 300,
                                  "\udcff", "dev"]), min_size=1, max_size=4).map("/".join)
LINKS = st.one_of(NAMES, st.sampled_from(["/", "/etc", "../victim", "../../victim/f", "a", "/proc/self/root"]))
TYPES = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE,
                         tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.CONTTYPE, b"Z"])
ENTRY = st.tuples(st.one_of(NAMES, st.just("/abs"), st.just("./a/./b")), TYPES, LINKS,
                  st.integers(0, 0o7777), st.binary(max_size=64),
                  st.dictionaries(st.sampled_from(["SCHILY.xattr.user.x", "SCHILY.xattr.security.capability",
                                                   "path", "linkpath", "size", "mtime"]),
                                  st.text(string.printable, max_size=8), max_size=2))


def _tar(entries: list[tuple[str, bytes, str, int, bytes, dict[str, str]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for name, kind, link, mode, data, pax in entries:
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname, ti.mode, ti.pax_headers = kind, link, mode, dict(pax)
            ti.size = len(data) if kind in (tarfile.REGTYPE, tarfile.CONTTYPE) else 0
            try:
                tf.addfile(ti, io.BytesIO(data) if ti.size else None)
            except (ValueError, UnicodeError, tarfile.HeaderError):
                continue  # tarfile cannot write it; the raw-bytes mutations cover that ground
    return buf.getvalue()


@st.composite
def layers(draw: st.DrawFn) -> list[bytes]:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        data = _tar(draw(st.lists(ENTRY, max_size=8)))
        mutation = draw(st.sampled_from(["none", "none", "flip", "truncate", "append", "raw"]))
        if mutation == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
        elif mutation == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif mutation == "append":
            data += draw(st.binary(max_size=600))
        elif mutation == "raw":
            data = draw(st.binary(max_size=2048))
        out.append(data)
    return out


@FUZZ
@given(layers(), st.booleans(), st.booleans())
def test_tar_layers(tmp_path: Path, tars: list[bytes], compress: bool, honest: bool) -> None:
    COUNTS["tar_layers"] += 1
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    victim = base / "victim"
    victim.mkdir()
    (victim / "f").write_text("precious")
    target = base / "target"
    target.mkdir()
    blobs = base / "blobs"
    blobs.mkdir()
    before = sorted(os.listdir(base)), ru.tree_state(victim), os.stat(victim).st_mtime_ns
    layer_list = []
    for i, t in enumerate(tars):
        blob = gzip.compress(t, mtime=0) if compress else t
        (blobs / str(i)).write_bytes(blob)
        diff_id = layout.sha256_digest(t) if honest or i else "sha256:" + "0" * 64
        layer_list.append(Layer(layout.sha256_digest(blob), diff_id, blobs / str(i)))
    try:
        only_step_errors(lambda: unpack_layers(layer_list, target, Budget(max_bytes=1 << 20, max_entries=64)))
        assert (sorted(os.listdir(base)), ru.tree_state(victim), os.stat(victim).st_mtime_ns) == before, \
            "a write outside the target"
    finally:
        remove_tree(base)


# ---- image layouts ---------------------------------------------------------------------------

LAYER_TAR = _tar([("bin", tarfile.DIRTYPE, "", 0o755, b"", {}), ("bin/x", tarfile.REGTYPE, "", 0o755, b"x", {})])


@st.composite
def image_layouts(draw: st.DrawFn) -> dict[str, bytes]:
    """{path in the layout: content}: an OCI layout whose documents are valid or fuzzed, field by field."""
    files: dict[str, bytes] = {}

    def put(data: bytes) -> str:
        d = layout.sha256_digest(data)
        files["blobs/sha256/" + d.split(":")[1]] = data
        return d

    def desc(data: bytes, media: str) -> dict[str, Any]:
        d = put(data)
        return {"mediaType": draw(maybe(st.just(media))), "digest": draw(maybe(st.just(d))),
                "size": draw(maybe(st.just(len(data))))}

    layer = gzip.compress(LAYER_TAR, mtime=0) if draw(st.booleans()) else LAYER_TAR
    config_doc = {"architecture": draw(maybe(st.just(layout.native_platform()[1]))),
                  "os": draw(maybe(st.just("linux"))),
                  "config": draw(maybe(st.fixed_dictionaries({}, optional={
                      "Env": maybe(st.lists(st.text(max_size=10), max_size=3)),
                      "Cmd": maybe(st.lists(st.text(max_size=10), max_size=3)),
                      "Entrypoint": maybe(st.lists(st.text(max_size=10), max_size=3)),
                      "WorkingDir": maybe(st.text(max_size=10)), "User": maybe(st.text(max_size=10))}))),
                  "rootfs": draw(maybe(st.just({"type": "layers", "diff_ids": [layout.sha256_digest(LAYER_TAR)]})))}
    raw_config = draw(st.one_of(st.just(json.dumps(config_doc).encode()), st.binary(max_size=50)))
    manifest = {"schemaVersion": draw(maybe(st.just(2))), "mediaType": draw(maybe(st.just(layout.OCI_MANIFEST))),
                "config": draw(maybe(st.just(desc(raw_config, layout.OCI_CONFIG)))),
                "layers": draw(maybe(st.just([desc(layer, layout.LAYER_TAR + "+gzip")])))}
    raw_manifest = draw(st.one_of(st.just(json.dumps(manifest).encode()), st.binary(max_size=50)))
    entry = desc(raw_manifest, layout.OCI_MANIFEST)
    entry["annotations"] = draw(maybe(st.just({layout.REF_NAME: draw(st.sampled_from(["fuzz", "a:b", "", "/x"]))})))
    if draw(st.booleans()):
        entry["platform"] = draw(maybe(st.just({"os": "linux", "architecture": layout.native_platform()[1]})))
    index = {"schemaVersion": draw(maybe(st.just(2))), "manifests": draw(maybe(st.just([entry])))}
    files["index.json"] = draw(st.one_of(st.just(json.dumps(index).encode()), st.binary(max_size=50)))
    files["oci-layout"] = draw(maybe(st.just({"imageLayoutVersion": "1.0.0"}))).__repr__().encode() \
        if draw(st.booleans()) else b'{"imageLayoutVersion": "1.0.0"}'
    return files


@FUZZ
@given(image_layouts(), st.booleans())
def test_image_layouts(tmp_path: Path, files: dict[str, bytes], as_tar: bool) -> None:
    COUNTS["image_layouts"] += 1
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        src = base / "layout"
        for rel, data in files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        if as_tar:
            shutil.make_archive(str(base / "layout"), "tar", src)
            src = base / "layout.tar"
        store = Store(base / "store")
        ref = None

        def imp() -> None:
            nonlocal ref
            ref = store.import_image(src)

        if only_step_errors(imp) is None:
            assert ref is not None
            for call in (lambda: store.config(ref), store.list_images, lambda: store.inspect(ref),
                         lambda: store.rootfs_for(ref)):
                only_step_errors(call)
            only_step_errors(lambda: store.remove(ref))
    finally:
        remove_tree(base)


@FUZZ
@given(st.binary(max_size=4096))
def test_image_archives_of_random_bytes(tmp_path: Path, data: bytes) -> None:
    COUNTS["image_archives_of_random_bytes"] += 1
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        (base / "a.tar").write_bytes(data)
        only_step_errors(lambda: Store(base / "store").import_image(base / "a.tar"))
    finally:
        remove_tree(base)


# ---- seccomp profiles ----------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if v == v and abs(v) != float("inf") else "0.0"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return '""'


def _toml(top: dict[str, Any], rule_tables: list[dict[str, Any]]) -> bytes:
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in top.items()]
    for r in rule_tables:
        lines.append("[[rule]]")
        lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in r.items()]
    return ("\n".join(lines) + "\n").encode()


SYSCALLS = st.lists(st.sampled_from(["read", "keyctl", "ioctl", "nosuchcall", "", "clone", "socket", "\x00"]),
                    max_size=3)
TOML_RULE = st.fixed_dictionaries({"why": maybe(st.just("because"))}, optional={
    "syscalls": maybe(SYSCALLS), "action": maybe(st.sampled_from(list(seccomp.TOML_ACTIONS))),
    "errno": maybe(st.sampled_from(["EPERM", "ENOSYS", "EBOGUS", 1, -1, 5000])), "optional": maybe(st.booleans()),
    "args": maybe(st.lists(st.fixed_dictionaries({}, optional={
        "index": maybe(st.integers(-1, 7)), "op": maybe(st.sampled_from(["eq", "ne", "masked_eq", "lt", "bad"])),
        "value": maybe(st.integers(-1, 2**64)), "mask": maybe(st.integers(-1, 2**64))}), max_size=2)),
    "bogus": st.integers()})
TOML_TOP = st.fixed_dictionaries({}, optional={
    "description": maybe(st.text(max_size=10)), "default_action": maybe(st.sampled_from(list(seccomp.TOML_ACTIONS))),
    "default_errno": maybe(st.sampled_from(["EPERM", "ENOSYS", 38])), "architectures": maybe(st.just(["native"]))})


@FUZZ
@given(st.one_of(st.tuples(TOML_TOP, st.lists(TOML_RULE, max_size=3)).map(lambda t: _toml(*t)),
                 st.binary(max_size=300)))
def test_seccomp_toml_profiles(raw: bytes) -> None:
    COUNTS["seccomp_toml_profiles"] += 1
    only_step_errors(lambda: seccomp.parse_profile(Path("fuzz.toml"), raw))


OCI_ACTIONS = ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_LOG",
               "SCMP_ACT_TRACE", "SCMP_ACT_NOTIFY", "SCMP_ACT_BOGUS"]
OCI_ENTRY = st.fixed_dictionaries({}, optional={
    "names": maybe(SYSCALLS), "name": maybe(st.sampled_from(["read", ""])),
    "action": maybe(st.sampled_from(OCI_ACTIONS)),
    "errnoRet": maybe(st.integers(-1, 5000)),
    "args": maybe(st.lists(st.fixed_dictionaries({}, optional={
        "index": maybe(st.integers(-1, 7)), "op": maybe(st.sampled_from(["SCMP_CMP_EQ", "SCMP_CMP_MASKED_EQ", "X"])),
        "value": maybe(st.integers(-1, 2**64)), "valueTwo": maybe(st.integers(-1, 2**64))}), max_size=2)),
    "includes": maybe(st.fixed_dictionaries({}, optional={
        "caps": maybe(st.lists(st.just("CAP_SYS_ADMIN"))),
        "arches": maybe(st.lists(st.sampled_from(["amd64", "s390x"]))),
        "minKernel": maybe(st.sampled_from(["4.8", "99.0", "x"]))})),
    "excludes": maybe(st.fixed_dictionaries({}, optional={"arches": maybe(st.lists(st.just("amd64")))})),
    "comment": maybe(st.text(max_size=5))})
OCI_PROFILE = st.fixed_dictionaries({"defaultAction": maybe(st.sampled_from(OCI_ACTIONS))}, optional={
    "defaultErrnoRet": maybe(st.integers(-1, 5000)), "architectures": maybe(st.just(["SCMP_ARCH_X86_64"])),
    "syscalls": maybe(st.lists(OCI_ENTRY, max_size=3))})


# Wrongly typed JSON values that once escaped _parse_oci as TypeError/AttributeError/ValueError
# (found by this fuzzer); each must now be a StepError naming the file and the rule.
OCI_CRASHES = [
    {"defaultAction": []},
    {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                                                      "includes": {"arches": 5}}]},
    {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                                                      "includes": ["caps"]}]},
    {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                                                      "args": [{"index": 0, "op": "SCMP_CMP_EQ", "value": "x"}]}]},
    # "names" as a string would be read letter by letter: a deny rule that covers nothing.
    {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": "keyctl", "action": "SCMP_ACT_ERRNO"}]},
]


@pytest.mark.parametrize("profile", OCI_CRASHES,
                         ids=["action-list", "arches-int", "includes-list", "value-str", "names-string"])
def test_seccomp_oci_once_crashing_inputs_are_step_errors(profile: dict[str, Any]) -> None:
    with pytest.raises(StepError, match=r"seccomp\.compile"):
        seccomp.parse_profile(Path("fuzz.json"), json.dumps(profile).encode())


@settings(FUZZ, report_multiple_bugs=False)  # one exception, so that `raises` judges it
@given(st.one_of(OCI_PROFILE.map(lambda d: json.dumps(d).encode()), json_values.map(lambda v: json.dumps(v).encode()),
                 st.binary(max_size=200)))
def test_seccomp_oci_json_profiles(raw: bytes) -> None:
    COUNTS["seccomp_oci_json_profiles"] += 1
    only_step_errors(lambda: seccomp.parse_profile(Path("fuzz.json"), raw))


# ---- config.toml, allowed-domains.txt, --resolve, sizes and durations --------------------------------------

CONFIG = st.fixed_dictionaries({}, optional={k: maybe(st.sampled_from(["none", "allowlist", "default", "x"]))
                                             for k in config.CONFIG_KEYS} | {"other": st.integers()})


@FUZZ
@given(st.one_of(CONFIG.map(lambda d: _toml(d, [])), st.binary(max_size=200),
                 st.text(max_size=100).map(str.encode)))
def test_config_toml(tmp_path: Path, raw: bytes) -> None:
    COUNTS["config_toml"] += 1
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "config.toml"
    path.write_bytes(raw)
    if only_step_errors(lambda: config.load_config(path)) is None:
        settings_ = config.load_config(path)
        assert set(settings_) <= set(config.CONFIG_KEYS)


DOMAIN_PIECES = st.sampled_from(["example.com", "*.example.com", "*", "*.com", "!deny.test", "a..b", "[::1]", "1.2.3.4",
                                 ":443", "x:99999", "x:0", "xn--80ak6aa92e.com", "ex ample.com", "#c", "é.test",
                                 "a" * 70 + ".com", ".", "-a.com", "a:80:90", "0x7f.1", "localhost"])


@FUZZ
@given(st.lists(st.one_of(DOMAIN_PIECES, st.text(max_size=30)), max_size=6).map("\n".join))
def test_allowed_domains_txt(text: str) -> None:
    COUNTS["allowed_domains_txt"] += 1
    only_step_errors(lambda: rules.parse_rules_text(text, "allowed-domains.txt"))


@FUZZ
@given(st.one_of(st.tuples(st.sampled_from(["api.test", "", "*.x", "a b", "é"]), st.sampled_from(["443", "0", "x", ""]),
                           st.sampled_from(["127.0.0.1", "[::1]", "::1", "1.2.3.4,::1", "999.1.1.1", "", "a"]))
                 .map(":".join), st.text(max_size=40)))
def test_resolve(spec: str) -> None:
    COUNTS["resolve"] += 1
    only_step_errors(lambda: rules.parse_resolve(spec))


SIZEISH = st.one_of(st.text(alphabet="0123456789.kKmMgGtTiIbBhsS -+e_١", max_size=12),
                    st.text(max_size=12))


@FUZZ
@given(SIZEISH)
def test_sizes_and_durations(text: str) -> None:
    COUNTS["sizes_and_durations"] += 1
    for parse in (limits.parse_size, limits.parse_duration, limits.parse_cpus, limits.parse_pids):
        try:
            value = parse(text)
        except StepError as e:
            assert e.step == "spec.validate" and e.action == "invalid request", e.render()
            continue
        assert value > 0, (parse.__name__, text, value)


# ---- the proxy's request line and target --------------------------------------------------------------------


@FUZZ
@given(st.one_of(st.text(max_size=60), st.tuples(st.sampled_from(["GET", "CONNECT", "G\x00T", ""]),
                                                 st.sampled_from(["http://a.test/", "a.test:443", "http://[::1", "*",
                                                                  "http://a@b/", "http://a:99999/", "http://a:/"]),
                                                 st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/9.9", "HTTP/1.1x"]))
                 .map(" ".join)))
def test_proxy_request_lines(line: str) -> None:
    COUNTS["proxy_request_lines"] += 1
    try:
        _method, target, _version = proxy._parse_request_line(line)
    except proxy._HttpError as e:
        assert 400 <= e.status < 600
        return
    for parse in (proxy._parse_absolute_uri, lambda t: proxy._split_authority(t, None)):
        with contextlib.suppress(proxy._HttpError, ValueError):
            parse(target)
