"""The audit log and violation reports: one JSON-lines schema, no secret, a sentence per event."""

from __future__ import annotations

import json
import platform
import socket
import subprocess

import pytest
from conftest import sh

KEY = "sk-ant-api03-audit-canary-0123456789"
TOKEN = "tok-audit-canary-9876"


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_of_a_denied_domain_a_timeout_and_steps_has_no_secret(nsbox, project, tmp_path):
    log = tmp_path / "audit.jsonl"
    code = ("import urllib.request as u\n"
            "try:\n    u.urlopen('http://denied.test/')\nexcept Exception as e:\n    print('denied', e)\n"
            "import time; time.sleep(60)\n")
    r = nsbox("--network", "allowlist", "--timeout", "3s", "--env", f"TOKEN={TOKEN}", "--log", str(log),
              cmd=["/usr/bin/python3", "-c", code], extra_env={"ANTHROPIC_API_KEY": KEY})
    assert r.returncode == 124, r.stderr
    text = log.read_text()
    assert KEY not in text and TOKEN not in text
    events = read_log(log)  # every line is JSON
    kinds = [e["event"] for e in events]
    assert kinds[0] == "step.start" and "plan" in kinds and kinds[-1] == "sandbox.exit"
    assert {"step.start", "step.ok", "proxy", "violation"} <= set(kinds)
    proxy = [e for e in events if e["event"] == "proxy"]
    assert proxy[0]["host"] == "denied.test" and proxy[0]["decision"] == "denied"
    violations = {e["kind"]: e["message"] for e in events if e["event"] == "violation"}
    assert set(violations) == {"proxy", "timeout"}
    assert "--allow-domain denied.test" in violations["proxy"]
    # The same sentences on stderr, one line each.
    assert f"nsbox: {violations['proxy']}" in r.stderr.splitlines()
    assert f"nsbox: {violations['timeout']}" in r.stderr.splitlines()
    assert events[-1]["status"] == 124 and "timeout" in events[-1]["flags"]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the i386 ABI probe is x86_64's")
def test_a_sigsys_is_reported_and_logged(nsbox, project, tmp_path):
    src = project / "abi.c"
    src.write_text('int main(void){long r; __asm__ volatile("int $0x80" : "=a"(r) : "a"(20L)); return 0;}\n')
    subprocess.run(["gcc", "-o", str(project / "abi"), str(src)], check=True)
    log = tmp_path / "audit.jsonl"
    r = nsbox("--log", str(log), cmd=[str(project / "abi")])
    assert r.returncode == 159
    assert "nsbox: the agent was killed by seccomp (SIGSYS)" in r.stderr
    assert any(e["event"] == "violation" and e["kind"] == "seccomp" for e in read_log(log))


def test_a_failed_step_is_logged(nsbox, tmp_path):
    log = tmp_path / "audit.jsonl"
    r = nsbox("--log", str(log), cmd=["no-such-command"])
    assert r.returncode == 127
    fails = [e for e in read_log(log) if e["event"] == "step.fail"]
    assert fails and fails[0]["step"] == "execve.execve"


def test_json_result_is_the_last_line_of_stdout(nsbox):
    r = nsbox("--json", cmd=sh("echo agent-output; exit 3"))
    lines = r.stdout.splitlines()
    assert lines[0] == "agent-output"
    result = json.loads(lines[-1])
    assert result["status"] == 3 and result["event"] == "sandbox.exit" and result["error"] is None


def test_verbose_prints_steps(nsbox):
    r = nsbox("--verbose", cmd=["true"])
    assert "nsbox: launcher: process.fork_holder ok" in r.stderr
    assert "nsbox: agent: seccomp.install ok" in r.stderr


def test_no_listener_needed_for_proxy_denials(nsbox):
    # (Sanity of the fixture above: denied.test never resolves; the proxy refuses before any lookup.)
    with pytest.raises(OSError):
        socket.getaddrinfo("denied.test", 80)
