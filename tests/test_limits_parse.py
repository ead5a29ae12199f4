"""nsbox.limits: sizes, durations, CPUs and process counts, parsed strictly.

Pure functions: plain unit tests. Every refusal must be a usage error of step
spec.validate (exit 125) before anything on the system changes.
"""

from __future__ import annotations

import pytest

from nsbox import limits
from nsbox.errors import ExitCode, StepError

MiB = 1 << 20


@pytest.mark.parametrize(("text", "size"), [
    ("4096", 4096),
    ("1b", 1),
    ("64M", 64 * MiB),
    ("64m", 64 * MiB),
    ("64MB", 64 * MiB),
    ("64MiB", 64 * MiB),
    ("512k", 512 * 1024),
    ("2G", 2 << 30),
    ("1.5GiB", 1610612736),
    ("1.5K", 1536),
    ("1T", 1 << 40),
    (" 16M ", 16 * MiB),
])
def test_sizes(text: str, size: int) -> None:
    assert limits.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1M", "+1M", "1..5G", "1.G", ".5G", "1e3", "12X", "1 G", "0", "0M",
                                  "0.0001K", "nan", "inf", "1GG", "1Gi", "١٢M"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(StepError) as e:
        limits.parse_size(text)
    assert e.value.step == "spec.validate"
    assert e.value.exit_code == ExitCode.NSBOX
    assert repr(text) in e.value.render()


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90.0),
    ("90s", 90.0),
    ("30m", 1800.0),
    ("1h30m", 5400.0),
    ("1h30m15s", 5415.0),
    ("1.5s", 1.5),
    ("500ms", 0.5),
    ("2m500ms", 120.5),
    ("1H", 3600.0),
    ("0.25", 0.25),
])
def test_durations(text: str, seconds: float) -> None:
    assert limits.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "m30", "30m1h", "1m1m", "1h 30m", "10x", "-5s", "0", "0s", "1d",
                                  "1.5.2s", "30mm", "5sms"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(StepError) as e:
        limits.parse_duration(text)
    assert e.value.step == "spec.validate"


@pytest.mark.parametrize(("text", "cpus"), [("0.5", 0.5), ("1", 1.0), ("2.25", 2.25), ("0.01", 0.01)])
def test_cpus(text: str, cpus: float) -> None:
    assert limits.parse_cpus(text) == cpus


@pytest.mark.parametrize("text", ["", "0", "0.009", "-1", "half", "1/2", "1e0", "inf", "nan", ".5"])
def test_bad_cpus_are_refused(text: str) -> None:
    with pytest.raises(StepError) as e:
        limits.parse_cpus(text)
    assert e.value.step == "spec.validate"


def test_pids() -> None:
    assert limits.parse_pids("64") == 64
    for bad in ["0", "-1", "1.5", "", "x", "٣"]:
        with pytest.raises(StepError):
            limits.parse_pids(bad)
