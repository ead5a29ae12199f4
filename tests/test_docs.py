"""The README's walkthrough is the output of the commands it shows: run them and compare."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO


def walkthrough() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("<!-- walkthrough:start", 1)[1].split("<!-- walkthrough:end -->", 1)[0]
    pairs = []
    for block in re.findall(r"```console\n(.*?)```", section, re.S):
        first, _, rest = block.partition("\n")
        assert first.startswith("$ "), block
        pairs.append((first[2:], rest.rstrip("\n")))
    return pairs


def test_the_walkthrough_has_commands():
    assert len(walkthrough()) >= 3


def test_the_readme_walkthrough_output_is_what_the_commands_print(env):
    path = f"{os.path.dirname(sys.executable)}:{env.get('PATH', '/usr/bin:/bin')}"
    for command, expected in walkthrough():
        out = subprocess.run(["bash", "-c", command], cwd=REPO, env={**env, "PATH": path}, capture_output=True,
                             text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert out.stdout.rstrip("\n") == expected, f"$ {command}\n{out.stdout}\n{out.stderr}"
