"""Every EDGEPROXY_* variable: its default, a good value and a bad one; and the config command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeproxy.config import VARIABLES, Settings
from edgeproxy.errors import ConfigError
from edgeproxy.smtp.replies import Reply

BAD_VALUES = {
    "LISTEN": "::1:25",
    "RELAY_LISTEN": "10.0.0.5:99999",
    "BACKEND": "mail.example.com",
    "HOSTNAME": "mx 1.example.com",
    "SINK_DIR": "/etc/passwd",
    "LOCAL_DOMAINS": "not a domain",
    "RELAY_DOMAINS": "-bad-.example",
    "RELAY_ALLOW": "10.0.0.0/33",
    "RELAY_NEVER": "300.1.1.1",
    "CONNECT_ALLOW": "2001:db8::/129",
    "CONNECT_DENY": "banana",
    "RECIPIENTS": "no-at-sign",
    "REWRITE": "dec.com",
    "SENDER_DENY": "a b@c.test",
    "SOFT_REJECT": "maybe",
    "MAX_RECIPIENTS": "0",
    "MAX_MESSAGE_SIZE": "ten",
    "MAX_LINE_LENGTH": "100",
    "MAX_BODY_LINE_LENGTH": "999",
    "MAX_ERRORS": "-1",
    "MAX_CONNECTIONS": "1.5",
    "MAX_CONNECTIONS_PER_IP": "-2",
    "CONNECTION_RATE": "fast",
    "GREETING_DELAY": "-1",
    "TIMEOUT": "0",
    "DATA_TIMEOUT": "inf",
    "BACKEND_TIMEOUT": "soon",
    "BACKEND_CONNECT_TIMEOUT": "0",
    "BACKEND_POOL_SIZE": "-1",
    "BACKEND_IDLE_TIMEOUT": "nan",
    "XCLIENT": "on",
    "RECEIVED_HEADER": "2",
    "ENABLE_EXPN": "",
    "ENABLE_ETRN": "y",
    "LOOP": "trio",
    "WORKERS": "many",
    "DRAIN_TIMEOUT": "-5",
    "LOG_LEVEL": "verbose",
    "LOG_FORMAT": "xml",
    "NO_EXTENSIONS": "perhaps",
}
BAD_REPLIES = ["250 2.0.0 Fine", "554 4.7.1 Mismatched class", "554 Relay denied", "554 5.7.1 Caf\u00e9", "6xx"]


def problems(env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as error:
        Settings.from_env(env)
    return error.value.problems


def test_every_variable_has_a_bad_value_case() -> None:
    names = {variable.name for variable in VARIABLES if not variable.name.startswith("REPLY_")}
    assert names == set(BAD_VALUES)


@pytest.mark.parametrize("variable", VARIABLES, ids=lambda variable: variable.env)
def test_default_and_example_parse(variable) -> None:
    Settings.from_env({})  # every default at once
    if variable.example.startswith("@"):
        pytest.skip("the example names an operator's file; list files are tested below")
    Settings.from_env({variable.env: variable.example})


@pytest.mark.parametrize("variable", [v for v in VARIABLES if not v.name.startswith("REPLY_")],
                         ids=lambda variable: variable.env)
def test_bad_value_is_reported_naming_variable_and_value(variable) -> None:
    bad = BAD_VALUES[variable.name]
    [line] = problems({variable.env: bad})
    assert line.startswith(f"{variable.env}={bad!r}: ")


@pytest.mark.parametrize("bad", BAD_REPLIES)
@pytest.mark.parametrize("rule", ["RELAY_DENIED", "UNKNOWN_USER", "ENCAPSULATED"])
def test_reply_validation(rule: str, bad: str) -> None:
    [line] = problems({f"EDGEPROXY_REPLY_{rule}": bad})
    assert line.startswith(f"EDGEPROXY_REPLY_{rule}={bad!r}: ")


def test_good_values() -> None:
    settings = Settings.from_env({
        "EDGEPROXY_LISTEN": "0.0.0.0:25,[::]:25",
        "EDGEPROXY_BACKEND": "mail.example.com:2525",
        "EDGEPROXY_SOFT_REJECT": "TRUE",
        "EDGEPROXY_WORKERS": "auto",
        "EDGEPROXY_REWRITE": "dec.com=compaq.com, old.test = new.test",
        "EDGEPROXY_REPLY_RELAY_DENIED": "550 5.7.1 Not here",
        "EDGEPROXY_GREETING_DELAY": "2.5",
    })
    assert settings.listen == (("0.0.0.0", 25), ("::", 25))
    assert settings.backend == ("mail.example.com", 2525)
    assert settings.soft_reject is True
    assert settings.workers == (os.cpu_count() or 1)
    assert settings.rewrite == (("dec.com", "compaq.com"), ("old.test", "new.test"))
    assert settings.replies["RELAY_DENIED"] == Reply(450, "4.7.1", "Not here")  # soft mode applies
    assert settings.greeting_delay == 2.5


@pytest.mark.parametrize(("text", "value"), [("1", True), ("yes", True), ("True", True), ("0", False),
                                             ("no", False), ("FALSE", False)])
def test_booleans(text: str, value: bool) -> None:
    assert Settings.from_env({"EDGEPROXY_XCLIENT": text}).xclient is value


def test_every_bad_variable_is_reported_at_once() -> None:
    lines = problems({"EDGEPROXY_RELAY_ALLOW": "10.0.0.0/33", "EDGEPROXY_LOOP": "trio", "EDGEPROXY_FOO": "1"})
    assert len(lines) == 3
    assert any(line.startswith("EDGEPROXY_FOO='1': unknown variable") for line in lines)


def test_list_files_with_comments(tmp_path: Path) -> None:
    listing = tmp_path / "allow"
    listing.write_text("# office\n10.0.0.0/8   # the LAN\n\n2001:db8::/32\n")
    assert Settings.from_env({"EDGEPROXY_RELAY_ALLOW": f"@{listing}"}).relay_allow == ("10.0.0.0/8", "2001:db8::/32")
    [line] = problems({"EDGEPROXY_RELAY_ALLOW": f"@{tmp_path}/missing"})
    assert line.startswith("EDGEPROXY_RELAY_ALLOW=") and "cannot read" in line


def test_from_env_reads_only_the_mapping_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPROXY_RELAY_ALLOW", "10.0.0.0/33")
    assert Settings.from_env({}).relay_allow == ()


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_")}
    return subprocess.run([sys.executable, "-m", "edgeproxy", *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


def test_config_command_exits_1_naming_the_bad_variable() -> None:
    result = run_cli("config", EDGEPROXY_RELAY_ALLOW="10.0.0.0/33")
    assert result.returncode == 1
    assert "EDGEPROXY_RELAY_ALLOW='10.0.0.0/33'" in result.stderr
    assert result.stdout == ""


def test_config_command_prints_every_variable() -> None:
    result = run_cli("config", EDGEPROXY_LOCAL_DOMAINS="example.com")
    assert result.returncode == 0
    for variable in VARIABLES:
        assert variable.env in result.stdout
    assert "example.com" in result.stdout


def test_check_relay_command() -> None:
    refused = run_cli("check-relay", "192.0.2.7", "user@elsewhere.test")
    assert refused.returncode == 2 and "relay_denied" in refused.stdout
    local = run_cli("check-relay", "192.0.2.7", "user@example.test")
    assert local.returncode == 0 and "accepted (local)" in local.stdout
