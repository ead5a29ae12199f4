"""What the agent starts with: a clean environment, no inherited fds, default signals."""

from __future__ import annotations

import os
import subprocess

from conftest import NSBOX, sh

SECRET = "sk-canary-7f1b2c9d"


def test_an_extra_fd_of_the_caller_is_absent_inside(env, project):
    fd = os.open(str(project), os.O_RDONLY)  # a host directory, open in nsbox's caller
    try:
        out = subprocess.run([*NSBOX, "run", str(project), "--", "/bin/sh", "-c", "ls /proc/self/fd"], env=env,
                             capture_output=True, text=True, timeout=60, pass_fds=(fd,), stdin=subprocess.DEVNULL)
    finally:
        os.close(fd)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1", "2", "3"]  # 3 is ls's own directory fd


def test_a_secret_in_the_callers_environment_is_nowhere_inside(nsbox):
    script = "cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n'; env"
    r = nsbox(cmd=sh(script), extra_env={"NSBOX_TEST_SECRET": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET})
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout
    assert "nsbox:init" in r.stdout  # init's cmdline was readable, and scrubbed


def test_environment_is_an_allowlist(nsbox):
    r = nsbox("--env", "FOO=bar", "--env", "PASSED", cmd=["env"],
              extra_env={"PASSED": "yes", "SSH_AUTH_SOCK": "/tmp/x", "LANG": "C.UTF-8", "LD_PRELOAD": "/x.so"})
    names = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in r.stdout.splitlines()}
    assert names["FOO"] == "bar" and names["PASSED"] == "yes" and names["LANG"] == "C.UTF-8"
    assert "SSH_AUTH_SOCK" not in names and "LD_PRELOAD" not in names
    assert set(names) <= {"FOO", "PASSED", "LANG", "TERM", "PATH", "HOME", "USER", "LOGNAME", "SHELL", "PWD",
                          "LC_CTYPE", "LC_ALL", "COLORTERM", "TZ", "SHLVL", "_"}


def test_the_real_api_key_enters_only_with_api_key_mode_env(nsbox):
    key = {"ANTHROPIC_API_KEY": "sk-ant-test"}
    assert "ANTHROPIC" not in nsbox(cmd=["env"], extra_env=key).stdout  # network none: nothing to inject into
    assert "sk-ant-test" not in nsbox("--network", "allowlist", cmd=["env"], extra_env=key).stdout
    assert "ANTHROPIC_API_KEY=sk-ant-test" in nsbox("--api-key-mode", "env", cmd=["env"], extra_env=key).stdout
    assert "ANTHROPIC" not in nsbox("--no-api-key", "--network", "allowlist", cmd=["env"], extra_env=key).stdout


def test_signals_are_default_and_a_new_session_without_a_terminal(nsbox):
    r = nsbox(cmd=sh("grep -E '^Sig(Ign|Blk)' /proc/self/status; ps -o sid= -p $$; echo $$; tty"))
    lines = r.stdout.split()
    assert lines[1] == "0000000000000000" and lines[3] == "0000000000000000", r.stdout
    assert lines[4] == lines[5] == "2"  # the agent leads its own session
    assert "not a tty" in r.stdout


def test_cwd_is_the_project(nsbox, project):
    assert nsbox(cmd=["pwd"]).stdout.strip() == str(project)


def test_default_command_is_the_agent_found_on_the_callers_path(nsbox, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "claude"
    fake.write_text("#!/bin/sh\necho \"claude-stand-in $*\"; echo \"at $0\"\n")
    fake.chmod(0o755)
    r = nsbox(extra_env={"PATH": f"{bindir}:/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["claude-stand-in --dangerously-skip-permissions", "at /run/nsbox/bin/claude"]
    r = nsbox(extra_env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 127
    assert "claude" in r.stderr and "fix:" in r.stderr
