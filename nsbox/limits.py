"""Parsing the resource limits a user writes: sizes, durations, CPU counts, process counts.

Strict on purpose: a limit that nsbox misreads is a sandbox that is looser (or tighter)
than the user believes, so anything this module does not fully understand is refused
with a `usage_error` naming the accepted forms, before anything on the system changes.

    parse_size("512M")      -> 536870912      units are powers of 1024, as in docker/podman:
    parse_size("1.5GiB")    -> 1610612736       K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB; none = bytes
    parse_duration("1h30m") -> 5400.0         units h, m, s, ms, largest first, each at most once;
    parse_duration("90")    -> 90.0             a bare number is seconds, as in timeout(1)
    parse_cpus("0.5")       -> 0.5            at least 0.01 (cpu.max refuses a quota below 1 ms/100 ms)
    parse_pids("64")        -> 64             a positive whole number
"""

from __future__ import annotations

import re
from decimal import Decimal

from nsbox.errors import usage_error

STEP = "spec.validate"

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>[a-z]*)", re.ASCII)

_DURATION_UNITS = {"h": Decimal(3600), "m": Decimal(60), "s": Decimal(1), "ms": Decimal("0.001")}
_DURATION_PART = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>ms|h|m|s)", re.ASCII)
_NUMBER = re.compile(r"\d+(?:\.\d+)?", re.ASCII)  # ASCII everywhere: to \d, "١٢" is a number

MIN_CPUS = Decimal("0.01")
# Decimal rather than float: the patterns admit only digits and one dot, and "1.1G" stays exact.


def parse_size(text: str) -> int:
    """Bytes in `text` ("512M", "2G", "1.5GiB", "4096"); fractions of a byte round down."""
    m = _SIZE.fullmatch(text.strip().lower())
    if m is None or m["unit"] not in _SIZE_UNITS:
        raise usage_error(STEP, f"not a size: {text!r}",
                          fix="write a number with an optional unit: 512M, 2G, 1.5GiB, 65536 (bytes); units are x1024")
    size = int(Decimal(m["number"]) * _SIZE_UNITS[m["unit"]])
    if size < 1:
        raise usage_error(STEP, f"size must be at least 1 byte: {text!r}")
    return size


def parse_duration(text: str) -> float:
    """Seconds in `text` ("30m", "90s", "1h30m", "1.5s", "500ms", "90")."""
    s = text.strip().lower()
    bad = usage_error(STEP, f"not a duration: {text!r}",
                      fix="write e.g. 90s, 30m, 1h30m, 500ms, or a number of seconds")
    if _NUMBER.fullmatch(s):
        seconds = Decimal(s)
    else:
        seconds = Decimal(0)
        units = list(_DURATION_UNITS)
        end = 0
        last = -1
        for m in _DURATION_PART.finditer(s):
            # Contiguous parts only, largest unit first, each unit once: "30m1h" or "1m1m"
            # are more likely typos than intentions.
            if m.start() != end or units.index(m["unit"]) <= last:
                raise bad
            last = units.index(m["unit"])
            seconds += Decimal(m["number"]) * _DURATION_UNITS[m["unit"]]
            end = m.end()
        if end == 0 or end != len(s):
            raise bad
    if seconds <= 0:
        raise usage_error(STEP, f"duration must be positive: {text!r}")
    return float(seconds)


def parse_cpus(text: str) -> float:
    """CPUs as a fraction of one core per period ("0.5", "2", "1.25")."""
    s = text.strip()
    if not _NUMBER.fullmatch(s):
        raise usage_error(STEP, f"not a number of CPUs: {text!r}", fix="write e.g. 0.5, 1 or 2.5")
    cpus = Decimal(s)
    if cpus < MIN_CPUS:
        raise usage_error(STEP, f"CPUs must be at least {MIN_CPUS}: {text!r}",
                          fix="cpu.max allows at least 1 ms per 100 ms period, i.e. 0.01 CPUs")
    return float(cpus)


def parse_pids(text: str) -> int:
    """A maximum number of processes (and threads): a positive whole number."""
    s = text.strip()
    if not s.isdigit() or not s.isascii():
        raise usage_error(STEP, f"not a whole number of processes: {text!r}", fix="write e.g. 64")
    pids = int(s)
    if pids < 1:
        raise usage_error(STEP, f"the process limit must be at least 1: {text!r}")
    return pids

