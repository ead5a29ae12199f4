"""nsbox.net: the allowlist proxy that is the sandbox's only way out, and the API key
that stays on the host.

What it isolates: with `--network allowlist` the sandbox's network namespace has only
`lo`; the one thing listening there is the proxy socket, served by the launcher from the
host's namespace. Names resolve on the host only (rules.py decides host:port, including
every SSRF form); proxy.py speaks HTTP/1.1 CONNECT and absolute-URI forward requests and
injects the real API key into plain-HTTP requests to the API host.

The launcher's part:

    config = ProxyConfig(rules=parse_rules_file(xdg / "allowed-domains.txt")
                               + parse_cli_entries(spec.allow_domains),
                         pins=parse_pins(spec.resolve),
                         api=ApiKeyInjection(key=os.environ["ANTHROPIC_API_KEY"]))
    server = ProxyServer(sock_from_init, config, on_event=events.write)   # after the last fork
    server.start()
    env.update(proxy_env(port))          # inside the sandbox
    env.update(api_key_env())            # placeholder key + ANTHROPIC_BASE_URL=http://api.anthropic.com
    ...
    server.stop()

Events (`on_event`, called from the proxy's threads, one per request or tunnel, when it
ends): {"event": "proxy", "method", "host", "port", "decision": "allowed"|"denied",
"allowed", "code" (rules.Decision.code, or malformed/overloaded/internal-error),
"reason", "status" (HTTP status sent, or None), "address" (what was connected to),
"bytes_up" (from the sandbox), "bytes_down" (to the sandbox), "api_key_injected",
"duration_ms", "error"}. No key, no URL path.

Order: config is parsed before the first fork (errors are StepError("net.rules")); the
server's threads start only after the last fork; `stop()` at teardown.
Verify: tests/test_net_rules.py, tests/test_net_proxy.py.
"""

from __future__ import annotations

from nsbox.net.proxy import ApiKeyInjection, EventSink, Limits, ProxyConfig, ProxyServer
from nsbox.net.rules import (
    Decision,
    Pin,
    Policy,
    Rule,
    blocked_reason,
    normalize_host,
    parse_cli_entries,
    parse_pins,
    parse_resolve,
    parse_rules_file,
    parse_rules_text,
)

# The agent's key inside the sandbox: shaped like a real key so clients accept it, and
# worthless anywhere else. The proxy replaces it (whatever its value) on the way out.
PLACEHOLDER_API_KEY = "sk-ant-api03-nsbox-placeholder-the-real-key-stays-on-the-host-AA"
API_BASE_URL = "http://api.anthropic.com"


def proxy_env(port: int) -> dict[str, str]:
    """The environment that sends every HTTP client inside the sandbox to the proxy.
    Both spellings: curl reads only lowercase http_proxy, others only uppercase."""
    url = f"http://127.0.0.1:{port}"
    no_proxy = "localhost,127.0.0.1"
    return {
        "HTTP_PROXY": url,
        "HTTPS_PROXY": url,
        "http_proxy": url,
        "https_proxy": url,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


def api_key_env(placeholder: str = PLACEHOLDER_API_KEY) -> dict[str, str]:
    """What the agent sees instead of the real key: requests go as plain HTTP to the
    proxy, which swaps in the key and speaks TLS to the real host."""
    return {"ANTHROPIC_API_KEY": placeholder, "ANTHROPIC_BASE_URL": API_BASE_URL}


__all__ = [
    "API_BASE_URL",
    "PLACEHOLDER_API_KEY",
    "ApiKeyInjection",
    "Decision",
    "EventSink",
    "Limits",
    "Pin",
    "Policy",
    "ProxyConfig",
    "ProxyServer",
    "Rule",
    "api_key_env",
    "blocked_reason",
    "normalize_host",
    "parse_cli_entries",
    "parse_pins",
    "parse_resolve",
    "parse_rules_file",
    "parse_rules_text",
    "proxy_env",
]
