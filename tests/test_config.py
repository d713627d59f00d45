"""Every ``EDGEPROXY_*`` variable: its default, a good value and a bad one; list files, host:port,
booleans, the reply table; and the ``config`` and ``check-relay`` commands.

The tables below are keyed by variable name and checked against :data:`edgeproxy.config.VARIABLES`,
so a new variable without a good and a bad case fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeproxy import cli, tls
from edgeproxy.config import VARIABLES, Settings, Variable
from edgeproxy.errors import ConfigError, EdgeproxyError
from edgeproxy.parsers import parse_bool
from edgeproxy.refusals import POLICY_DEFAULTS, POLICY_RULES
from edgeproxy.reply import Reply

ROOT = Path(__file__).resolve().parent.parent
BASE = {"EDGEPROXY_HOSTNAME": "mx.example.test"}  # so that no test asks DNS for the host's FQDN
BY_NAME = {variable.name: variable for variable in VARIABLES}
BOOLEANS = [variable for variable in VARIABLES if variable.parse is parse_bool]


def ids(variable: Variable) -> str:
    return variable.env


def load(**environ: str) -> Settings:
    return Settings.from_env({**BASE, **environ})


def value_of(settings: Settings, variable: Variable) -> object:
    if variable.name.startswith("REPLY_"):
        return settings.replies[variable.name.removeprefix("REPLY_")]
    return getattr(settings, variable.attribute)


def problems(**environ: str) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({**BASE, **environ})
    return raised.value.problems


def assert_one_problem(env: str, bad: str, **others: str) -> str:
    [line] = problems(**{env: bad}, **others)
    assert line.startswith(f"{env}={bad!r}: "), line
    assert line.removeprefix(f"{env}={bad!r}: ").strip(), "the problem line should say what is wrong"
    assert "\n" not in line
    return line


# -- the tables ---------------------------------------------------------------------------------

# What each variable's example parses to. Examples that name an operator's list file ("@/etc/...")
# are replaced by a file holding FILE_EXAMPLES[name].
# The TLS variables name PEM files; their examples are stood in for by a pair made in the test.
MADE_FILE = object()
PEM_VARIABLES = {"TLS_CERT", "TLS_KEY", "BACKEND_TLS_CA"}
USERS = ("# mail users\nalice:$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo\n\n"
         "bob:$2b$12$" + "a" * 53 + "\n")

EXAMPLE_VALUES: dict[str, object] = {
    "LISTEN": (("0.0.0.0", 25), ("::", 25)),
    "RELAY_LISTEN": (("10.0.0.5", 25),),
    "SUBMISSION_LISTEN": (("0.0.0.0", 587),),
    "SUBMISSIONS_LISTEN": (("0.0.0.0", 465),),
    "PROXY_PROTOCOL_FROM": ("10.0.0.2/32", "10.0.0.3/32"),
    "PROXY_PROTOCOL_TIMEOUT": 2.0,
    "REDIS_URL": "redis://10.0.0.20:6379/0",
    "REDIS_TIMEOUT": 0.02,
    "METRICS_LISTEN": ("127.0.0.1", 9525),
    "TLS_CERT": MADE_FILE,
    "TLS_KEY": MADE_FILE,
    "TLS_MIN_VERSION": "1.3",
    "TLS_HANDSHAKE_TIMEOUT": 10.0,
    "AUTH": "file",
    "AUTH_USERS": MADE_FILE,
    "AUTH_FAILURE_DELAY": 3.0,
    "AUTH_FAILURE_LIMIT": 5,
    "BACKEND_TLS": "required",
    "BACKEND_TLS_VERIFY": "no",
    "BACKEND_TLS_CA": MADE_FILE,
    "BACKEND": ("10.0.0.10", 25),
    "HOSTNAME": "mx1.example.com",
    "LOCAL_DOMAINS": ("example.com", ".example.com"),
    "RELAY_DOMAINS": ("partner.example",),
    "RELAY_ALLOW": ("10.0.0.0/8", "2001:db8::/32"),
    "RELAY_NEVER": ("10.66.0.0/16",),
    "CONNECT_ALLOW": ("192.0.2.0/24", "2001:db8::/32"),
    "CONNECT_DENY": ("192.0.2.0/24",),
    "RECIPIENTS": ("ken@example.com", "bob@example.com"),
    "VERIFY_RECIPIENTS": True,
    "VERIFY_NEGATIVE_TTL": 3600.0,
    "VERIFY_POSITIVE_TTL": 86400.0,
    "VERIFY_CACHE_SIZE": 1000000,
    "HARVEST_LIMIT": 3,
    "HARVEST_DELAY": 10.0,
    "REWRITE": (("dec.com", "compaq.com"),),
    "SENDER_DENY": ("spam@bad.example", ".bad.example"),
    "SOFT_REJECT": True,
    "MAX_RECIPIENTS": 1000,
    "MAX_MESSAGE_SIZE": 52428800,
    "MAX_LINE_LENGTH": 2048,
    "MAX_BODY_LINE_LENGTH": 1000,
    "MAX_ERRORS": 50,
    "RECIPIENT_OVERSHOOT_LIMIT": 100,
    "JUNK_COMMAND_LIMIT": 20,
    "MAX_PENDING_INPUT": 262144,
    "MAX_PIPELINE": 1000,
    "MAX_CONNECTIONS": 20000,
    "MAX_CONNECTIONS_PER_IP": 20,
    "CONNECTION_RATE": 120,
    "GREETING_DELAY": 2.0,
    "TIMEOUT": 120.0,
    "DATA_TIMEOUT": 180.0,
    "SESSION_TIMEOUT": 1800.0,
    "BACKEND_TIMEOUT": 120.0,
    "BACKEND_CONNECT_TIMEOUT": 5.0,
    "BACKEND_MAX_CONNECTIONS": 50,
    "BACKEND_QUEUE_TIMEOUT": 10.0,
    "BACKEND_IDLE_TIMEOUT": 60.0,
    "BACKEND_RETRY_INTERVAL": 5.0,
    "XCLIENT": False,
    "RECEIVED_HEADER": False,
    "ENABLE_EXPN": True,
    "ENABLE_ETRN": True,
    "LOOP": "asyncio",
    "WORKERS": os.cpu_count() or 1,
    "DRAIN_TIMEOUT": 60.0,
    "SINK_DIR": "/var/tmp/edgeproxy-sink",
    "LOG_LEVEL": "debug",
    "LOG_FORMAT": "json",
    "NO_EXTENSIONS": True,
    **{f"REPLY_{rule}": Reply(450, "4.7.1", "Try later") for rule in POLICY_RULES},
}
FILE_EXAMPLES = {
    "CONNECT_ALLOW": "# offices\n192.0.2.0/24   # Paris\n\n2001:db8::/32\n",
    "RECIPIENTS": "# staff\nKen@Example.COM\n\n   bob@example.com   # on leave\n",
}

BAD_VALUES: dict[str, str] = {
    "LISTEN": "::1:25",
    "RELAY_LISTEN": "10.0.0.5:99999",
    "SUBMISSION_LISTEN": "0.0.0.0:99999",
    "SUBMISSIONS_LISTEN": "465",
    "PROXY_PROTOCOL_FROM": "10.0.0.300/32",
    "PROXY_PROTOCOL_TIMEOUT": "0",
    "REDIS_URL": "http://10.0.0.20:6379",
    "REDIS_TIMEOUT": "0",
    "METRICS_LISTEN": "9525",
    "TLS_CERT": "/nonexistent/cert.pem",
    "TLS_KEY": "/nonexistent/key.pem",
    "TLS_MIN_VERSION": "1.1",
    "TLS_HANDSHAKE_TIMEOUT": "0",
    "AUTH": "sasl",
    "AUTH_USERS": "/nonexistent/users",
    "AUTH_FAILURE_DELAY": "-1",
    "AUTH_FAILURE_LIMIT": "0",
    "BACKEND_TLS": "maybe",
    "BACKEND_TLS_VERIFY": "sometimes",
    "BACKEND_TLS_CA": "/nonexistent/ca.pem",
    "BACKEND": "mail.example.com",
    "HOSTNAME": "mx 1.example.com",
    "LOCAL_DOMAINS": "not a domain",
    "RELAY_DOMAINS": "-bad-.example",
    "RELAY_ALLOW": "10.0.0.0/33",
    "RELAY_NEVER": "300.1.1.1",
    "CONNECT_ALLOW": "2001:db8::/129",
    "CONNECT_DENY": "banana",
    "RECIPIENTS": "no-at-sign",
    "VERIFY_RECIPIENTS": "maybe",
    "VERIFY_NEGATIVE_TTL": "0",
    "VERIFY_POSITIVE_TTL": "-1",
    "VERIFY_CACHE_SIZE": "0",
    "HARVEST_LIMIT": "-1",
    "HARVEST_DELAY": "soon",
    "REWRITE": "dec.com",
    "SENDER_DENY": "a b@c.test",
    "SOFT_REJECT": "maybe",
    "MAX_RECIPIENTS": "0",
    "MAX_MESSAGE_SIZE": "ten",
    "MAX_LINE_LENGTH": "100",
    "MAX_BODY_LINE_LENGTH": "999",
    "MAX_ERRORS": "-1",
    "RECIPIENT_OVERSHOOT_LIMIT": "-1",
    "JUNK_COMMAND_LIMIT": "0",
    "MAX_PENDING_INPUT": "1024",
    "MAX_PIPELINE": "0",
    "MAX_CONNECTIONS": "1.5",
    "MAX_CONNECTIONS_PER_IP": "-2",
    "CONNECTION_RATE": "fast",
    "GREETING_DELAY": "-1",
    "TIMEOUT": "0",
    "DATA_TIMEOUT": "inf",
    "SESSION_TIMEOUT": "0.5",
    "BACKEND_TIMEOUT": "soon",
    "BACKEND_CONNECT_TIMEOUT": "0",
    "BACKEND_MAX_CONNECTIONS": "0",
    "BACKEND_QUEUE_TIMEOUT": "0",
    "BACKEND_IDLE_TIMEOUT": "nan",
    "BACKEND_RETRY_INTERVAL": "-1",
    "XCLIENT": "on",
    "RECEIVED_HEADER": "2",
    "ENABLE_EXPN": "",
    "ENABLE_ETRN": "y",
    "LOOP": "trio",
    "WORKERS": "0",
    "DRAIN_TIMEOUT": "-5",
    "SINK_DIR": str(Path(__file__).resolve()),  # a file, not a directory
    "LOG_LEVEL": "verbose",
    "LOG_FORMAT": "xml",
    "NO_EXTENSIONS": "perhaps",
    "REPLY_CONNECT_DENIED": "250 2.0.0 Welcome",
    "REPLY_TOO_MANY_CONNECTIONS": "421 5.7.0 Mismatched class",
    "REPLY_RATE_LIMITED": "421 Too fast",
    "REPLY_SENDER_DENIED": "550 5.7.1 Exp\u00e9diteur refus\u00e9",
    "REPLY_RELAY_DENIED": "654 6.7.1 No such class",
    "REPLY_UNKNOWN_USER": "550 4.1.1 Mismatched class",
    "REPLY_TOO_MANY_RECIPIENTS": "452 4.5.3 Too many\tof them",
    "REPLY_MESSAGE_TOO_BIG": "552 5.3 Too big",
    "REPLY_ENCAPSULATED": "554 5.7.1 ok\r\n250 2.0.0 smuggled",
    "REPLY_RELAY_NEVER": "354 3.0.0 Go ahead",
}


def test_every_variable_has_a_good_and_a_bad_case() -> None:
    names = {variable.name for variable in VARIABLES}
    assert set(BAD_VALUES) == names, "add a bad value for each new variable (and drop removed ones)"
    assert set(EXAMPLE_VALUES) == names, "add the expected value of each new variable's example"
    assert set(FILE_EXAMPLES) == {variable.name for variable in VARIABLES
                                  if variable.example.startswith("@")
                                  and variable.name not in (*PEM_VARIABLES, "AUTH_USERS")}


def test_every_variable_is_documented() -> None:
    for variable in VARIABLES:
        assert variable.env.startswith("EDGEPROXY_") and variable.meaning and variable.example, variable.name
    assert len({variable.env for variable in VARIABLES}) == len(VARIABLES)


# -- per variable: default, good value, bad value -----------------------------------------------


def test_all_defaults_at_once() -> None:
    settings = Settings.from_env({})
    assert settings.hostname  # the host's FQDN
    assert dict(settings.replies) == {
        **POLICY_DEFAULTS, "ENCAPSULATED": POLICY_DEFAULTS["RELAY_DENIED"],
        "RELAY_NEVER": POLICY_DEFAULTS["RELAY_DENIED"],
    }


@pytest.mark.parametrize("variable", VARIABLES, ids=ids)
def test_default_parses(variable: Variable) -> None:
    unset = Settings.from_env({})
    explicit = Settings.from_env({variable.env: variable.default})
    assert value_of(explicit, variable) == value_of(unset, variable)


@pytest.mark.parametrize("variable", VARIABLES, ids=ids)
def test_example_parses_to_the_expected_value(variable: Variable, tmp_path: Path) -> None:
    if variable.name in ("AUTH", "AUTH_USERS"):
        users = tmp_path / "users"
        users.write_text(USERS, encoding="utf-8")
        settings = load(EDGEPROXY_AUTH="file", EDGEPROXY_AUTH_USERS=f"@{users}")
        assert value_of(settings, variable) == ("file" if variable.name == "AUTH" else str(users))
        return
    if variable.name in PEM_VARIABLES:
        cert, key = tls.make_self_signed("proxy.test", str(tmp_path))
        settings = load(EDGEPROXY_TLS_CERT=cert, EDGEPROXY_TLS_KEY=key, EDGEPROXY_BACKEND_TLS_CA=f"@{cert}")
        assert value_of(settings, variable) == (key if variable.name == "TLS_KEY" else cert)
        return
    text = variable.example
    if text.startswith("@"):
        listing = tmp_path / "list"
        listing.write_text(FILE_EXAMPLES[variable.name], encoding="utf-8")
        text = f"@{listing}"
    assert value_of(load(**{variable.env: text}), variable) == EXAMPLE_VALUES[variable.name]


@pytest.mark.parametrize("variable", VARIABLES, ids=ids)
def test_bad_value_is_reported_naming_the_variable_and_the_value(variable: Variable) -> None:
    assert_one_problem(variable.env, BAD_VALUES[variable.name])


def test_several_bad_variables_are_reported_at_once_one_line_each() -> None:
    chosen = ["RELAY_ALLOW", "LOOP", "MAX_RECIPIENTS", "REPLY_RELAY_DENIED", "XCLIENT"]
    lines = problems(**{BY_NAME[name].env: BAD_VALUES[name] for name in chosen}, EDGEPROXY_FOO="1")
    assert len(lines) == len(chosen) + 1
    for name in chosen:
        env, bad = BY_NAME[name].env, BAD_VALUES[name]
        assert sum(line.startswith(f"{env}={bad!r}: ") for line in lines) == 1, name
    assert all("\n" not in line for line in lines)
    with pytest.raises(EdgeproxyError) as raised:  # the one root exception
        load(EDGEPROXY_LOOP="trio")
    assert "EDGEPROXY_LOOP='trio'" in str(raised.value)


@pytest.mark.parametrize("name", ["EDGEPROXY_FOO", "EDGEPROXY_REPLY_FOO", "EDGEPROXY_local_domains",
                                  "EDGEPROXY_RELAY_ALLOWED"])
def test_unknown_variable_is_reported(name: str) -> None:
    [line] = problems(**{name: "1"})
    assert line.startswith(f"{name}='1': ") and "unknown" in line


def test_variables_without_the_prefix_are_ignored() -> None:
    load(PATH="/bin", HOME="/root", EDGEPROXYFOO="x", MY_EDGEPROXY_FOO="x")


# -- booleans -----------------------------------------------------------------------------------

TRUE_TEXTS = ["1", "true", "yes", "TRUE", "Yes", "tRuE"]
FALSE_TEXTS = ["0", "false", "no", "FALSE", "No", "nO"]
NOT_BOOLEANS = ["on", "off", "2", "", "y", "n", "t", "f", "-1", "enabled", "yess", "10", "1.0", "none"]


@pytest.mark.parametrize("variable", BOOLEANS, ids=ids)
def test_booleans_accept_exactly_1_true_yes_0_false_no(variable: Variable) -> None:
    for text in TRUE_TEXTS:
        assert value_of(load(**{variable.env: text}), variable) is True, text
    for text in FALSE_TEXTS:
        assert value_of(load(**{variable.env: text}), variable) is False, text


@pytest.mark.parametrize("text", NOT_BOOLEANS)
@pytest.mark.parametrize("variable", BOOLEANS, ids=ids)
def test_booleans_refuse_anything_else(variable: Variable, text: str) -> None:
    assert_one_problem(variable.env, text)


# -- lists, inline and from files ---------------------------------------------------------------


def test_inline_list_ignores_blanks_and_empty_entries() -> None:
    assert load(EDGEPROXY_RELAY_ALLOW=" 10.0.0.0/8 ,, 2001:db8::/32 ,").relay_allow == ("10.0.0.0/8", "2001:db8::/32")
    assert load(EDGEPROXY_RELAY_ALLOW="").relay_allow == ()


def test_list_file_with_comments_and_blank_lines(tmp_path: Path) -> None:
    listing = tmp_path / "relay-allow"
    listing.write_text("# the offices\n\n10.0.0.0/8   # the LAN\n   \n  2001:db8::/32\r\n# end\n", encoding="utf-8")
    assert load(EDGEPROXY_RELAY_ALLOW=f"@{listing}").relay_allow == ("10.0.0.0/8", "2001:db8::/32")
    domains = tmp_path / "domains"
    domains.write_text("example.com\n.example.com # and every subdomain\n", encoding="utf-8")
    assert load(EDGEPROXY_LOCAL_DOMAINS=f" @{domains} ").local_domains == ("example.com", ".example.com")


def test_empty_list_file(tmp_path: Path) -> None:
    listing = tmp_path / "empty"
    listing.write_text("# nothing yet\n\n", encoding="utf-8")
    assert load(EDGEPROXY_CONNECT_DENY=f"@{listing}").connect_deny == ()


def test_big_list_file(tmp_path: Path) -> None:
    listing = tmp_path / "recipients"
    listing.write_text("".join(f"user{n}@example.test\n" for n in range(20_000)), encoding="utf-8")
    recipients = load(EDGEPROXY_RECIPIENTS=f"@{listing}").recipients
    assert len(recipients) == 20_000 and recipients[-1] == "user19999@example.test"


@pytest.mark.parametrize("name", ["RELAY_ALLOW", "LOCAL_DOMAINS", "RECIPIENTS", "SENDER_DENY", "LISTEN"])
def test_missing_list_file_names_the_variable(name: str, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    line = assert_one_problem(BY_NAME[name].env, f"@{missing}")
    assert "cannot read" in line


def test_a_directory_is_not_a_list_file(tmp_path: Path) -> None:
    assert_one_problem("EDGEPROXY_RELAY_ALLOW", f"@{tmp_path}")


def test_a_bad_entry_in_a_list_file_names_the_variable(tmp_path: Path) -> None:
    listing = tmp_path / "relay-allow"
    listing.write_text("10.0.0.0/8\n10.0.0.0/33\n", encoding="utf-8")
    line = assert_one_problem("EDGEPROXY_RELAY_ALLOW", f"@{listing}")
    assert "10.0.0.0/33" in line


# -- host:port ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:25", ("127.0.0.1", 25)), ("[::1]:25", ("::1", 25)),
     ("mail.example.com:2525", ("mail.example.com", 2525)), ("[2001:db8::1]:587", ("2001:db8::1", 587)),
     ("localhost:65535", ("localhost", 65535)),
     (" 10.0.0.10:25 ", ("10.0.0.10", 25))],
    ids=["ipv4", "ipv6", "hostname", "ipv6-long", "highest-port", "blanks"],
)
def test_host_port_forms(text: str, expected: tuple[str, int]) -> None:
    assert load(EDGEPROXY_BACKEND=text).backend == expected
    assert load(EDGEPROXY_LISTEN=text).listen == (expected,)


def test_port_0_listens_on_any_free_port() -> None:
    assert load(EDGEPROXY_LISTEN="127.0.0.1:0").listen == (("127.0.0.1", 0),)


def test_empty_backend_means_the_embedded_sink() -> None:
    assert load(EDGEPROXY_BACKEND="").backend is None


@pytest.mark.parametrize(
    "text",
    ["::1:25", "127.0.0.1:70000", "127.0.0.1:65536", "127.0.0.1", "127.0.0.1:", ":25", "[::1]", "[::1]25",
     "[::1:25", "[mail.example.com]:25", "host:-1", "host:2x5", "host:25:25"],
    ids=["ipv6-unbracketed", "port-70000", "port-65536", "no-port", "empty-port", "no-host", "bracket-no-port",
         "bracket-no-colon", "unclosed-bracket", "bracketed-name", "negative-port", "letters-in-port", "two-ports"],
)
@pytest.mark.parametrize("name", ["LISTEN", "RELAY_LISTEN", "BACKEND"])
def test_bad_host_port(name: str, text: str) -> None:
    assert_one_problem(BY_NAME[name].env, text)


@pytest.mark.parametrize("text", ["bad host:25", "mail..example.com:25", "host:\u0662\u0665"],
                         ids=["space-in-host", "empty-label", "arabic-indic-digits"])
def test_bad_host_port_is_refused(text: str) -> None:
    assert_one_problem("EDGEPROXY_BACKEND", text)


# -- the reply table ----------------------------------------------------------------------------

BAD_REPLIES = {
    "bad-code-class": "654 6.7.1 No such class",
    "3xx-code": "354 3.0.0 Go ahead",
    "2xx-code": "250 2.0.0 Fine",
    "mismatched-class-5-4": "554 4.7.1 Mismatched class",
    "mismatched-class-4-5": "454 5.7.1 Mismatched class",
    "non-ascii-text": "554 5.7.1 Caf\u00e9",
    "control-character": "554 5.7.1 Tab\there",
    "crlf-injection": "554 5.7.1 ok\r\n250 2.0.0 smuggled",
    "no-enhanced-code": "554 Relay access denied",
    "short-enhanced-code": "554 5.7 Relay access denied",
    "two-digit-code": "55 5.7.1 Short",
    "words": "relay denied",
}


@pytest.mark.parametrize("bad", BAD_REPLIES.values(), ids=BAD_REPLIES.keys())
@pytest.mark.parametrize("rule", POLICY_RULES)
def test_reply_validation(rule: str, bad: str) -> None:
    assert_one_problem(f"EDGEPROXY_REPLY_{rule}", bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("550 5.7.1 No relaying here", Reply(550, "5.7.1", "No relaying here")),
     ("451 4.7.1 Greylisted, try again", Reply(451, "4.7.1", "Greylisted, try again")),
     ("  554 5.7.1 Padded  ", Reply(554, "5.7.1", "Padded")),
     ("554 5.7.1", Reply(554, "5.7.1", "")),
     ("599 5.999.999 Edge", Reply(599, "5.999.999", "Edge"))],
    ids=["5xx", "4xx", "blanks", "no-text", "widest"],
)
def test_good_replies(text: str, expected: Reply) -> None:
    assert load(EDGEPROXY_REPLY_RELAY_DENIED=text).replies["RELAY_DENIED"] == expected


def test_inheriting_replies_follow_relay_denied() -> None:
    replies = load(EDGEPROXY_REPLY_RELAY_DENIED="550 5.7.1 No").replies
    assert replies["ENCAPSULATED"] == replies["RELAY_NEVER"] == Reply(550, "5.7.1", "No")
    replies = load(EDGEPROXY_REPLY_RELAY_DENIED="550 5.7.1 No", EDGEPROXY_REPLY_ENCAPSULATED="").replies
    assert replies["ENCAPSULATED"] == Reply(550, "5.7.1", "No")


@pytest.mark.parametrize("rule", [rule for rule in POLICY_RULES if rule in POLICY_DEFAULTS])
def test_empty_reply_variable_means_the_default_or_is_reported(rule: str) -> None:
    env = f"EDGEPROXY_REPLY_{rule}"
    try:
        settings = load(**{env: ""})
    except ConfigError as error:
        assert any(line.startswith(f"{env}=''") for line in error.problems)
        return
    assert settings.replies[rule] == POLICY_DEFAULTS[rule]
    settings.describe()


def test_soft_reject_applies_to_the_reply_table() -> None:
    replies = load(EDGEPROXY_SOFT_REJECT="yes", EDGEPROXY_REPLY_SENDER_DENIED="553 5.7.1 Go away").replies
    assert replies["SENDER_DENIED"] == Reply(453, "4.7.1", "Go away")
    assert replies["RELAY_DENIED"] == POLICY_DEFAULTS["RELAY_DENIED"].softened()
    assert all(reply.code < 500 and reply.enhanced.startswith("4.") for reply in replies.values())


# -- purity -------------------------------------------------------------------------------------


def test_from_env_does_not_read_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPROXY_RELAY_ALLOW", "10.0.0.0/33")
    monkeypatch.setenv("EDGEPROXY_FOO", "1")
    monkeypatch.setenv("EDGEPROXY_LOCAL_DOMAINS", "other.test")
    settings = Settings.from_env({})
    assert settings.relay_allow == ()
    assert settings.local_domains == load().local_domains


def test_describe_lists_every_variable_once() -> None:
    rows = load(EDGEPROXY_LOCAL_DOMAINS="example.com,.example.com").describe()
    assert [name for name, _ in rows] == [variable.env for variable in VARIABLES]
    assert dict(rows)["EDGEPROXY_LOCAL_DOMAINS"] == "example.com,.example.com"


# -- the commands -------------------------------------------------------------------------------


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m edgeproxy`` in a clean environment (the fast-path switch is kept)."""
    clean = {key: value for key, value in os.environ.items()
             if not key.startswith("EDGEPROXY_") or key == "EDGEPROXY_NO_EXTENSIONS"}
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "edgeproxy", *args], env={**clean, **BASE, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def test_config_command_exits_1_naming_the_bad_variable() -> None:
    result = run_cli("config", EDGEPROXY_RELAY_ALLOW="10.0.0.0/33")
    assert result.returncode == 1
    assert "EDGEPROXY_RELAY_ALLOW='10.0.0.0/33'" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_config_command_reports_every_bad_variable() -> None:
    result = run_cli("config", EDGEPROXY_RELAY_ALLOW="10.0.0.0/33", EDGEPROXY_LOOP="trio", EDGEPROXY_FOO="1")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 3
    for text in ("EDGEPROXY_RELAY_ALLOW='10.0.0.0/33'", "EDGEPROXY_LOOP='trio'", "EDGEPROXY_FOO='1'"):
        assert sum(text in line for line in lines) == 1, text


def test_config_command_prints_every_variable() -> None:
    result = run_cli("config", EDGEPROXY_LOCAL_DOMAINS="example.com", EDGEPROXY_RELAY_ALLOW="10.0.0.0/8")
    assert result.returncode == 0, result.stderr
    printed = dict(line.split(None, 1) if " " in line.strip() else (line.strip(), "")
                   for line in result.stdout.splitlines() if line.startswith("EDGEPROXY_"))
    assert set(printed) == {variable.env for variable in VARIABLES}
    assert printed["EDGEPROXY_LOCAL_DOMAINS"] == "example.com"
    assert printed["EDGEPROXY_RELAY_ALLOW"] == "10.0.0.0/8"
    assert printed["EDGEPROXY_REPLY_RELAY_DENIED"] == str(POLICY_DEFAULTS["RELAY_DENIED"])


def test_config_markdown_table_names_every_variable() -> None:
    result = run_cli("config", "--markdown")
    assert result.returncode == 0
    for variable in VARIABLES:
        assert f"`{variable.env}`" in result.stdout


def test_check_relay_command_refuses_a_relay_attempt() -> None:
    result = run_cli("check-relay", "192.0.2.7", "user@elsewhere.test")
    assert result.returncode == 2
    assert result.stdout == f"refused (relay_denied): {POLICY_DEFAULTS['RELAY_DENIED']}\n"


def test_check_relay_command_accepts_a_local_recipient() -> None:
    result = run_cli("check-relay", "192.0.2.7", "user@example.test")
    assert result.returncode == 0
    assert result.stdout == "accepted (local): forwarded as <user@example.test>\n"


def test_check_relay_command_with_a_bad_config_exits_1() -> None:
    result = run_cli("check-relay", "192.0.2.7", "user@example.test", EDGEPROXY_RELAY_ALLOW="10.0.0.0/33")
    assert result.returncode == 1
    assert "EDGEPROXY_RELAY_ALLOW='10.0.0.0/33'" in result.stderr


@pytest.mark.parametrize(
    ("argv", "env", "code", "output"),
    [
        (["192.0.2.7", "user%elsewhere.test@example.test"], {}, 2,
         f"refused (encapsulated): {POLICY_DEFAULTS['RELAY_DENIED']}"),
        (["192.0.2.7", "user@elsewhere.test", "--authenticated"], {}, 0,
         "accepted (relay_authenticated): forwarded as <user@elsewhere.test>"),
        (["192.0.2.7", "user@elsewhere.test", "--relay-listener"], {}, 0,
         "accepted (relay_listener): forwarded as <user@elsewhere.test>"),
        (["10.1.2.3", "user@elsewhere.test"], {"EDGEPROXY_RELAY_ALLOW": "10.0.0.0/8"}, 0,
         "accepted (relay_allow_list): forwarded as <user@elsewhere.test>"),
        (["10.66.1.1", "user@elsewhere.test", "--authenticated"],
         {"EDGEPROXY_RELAY_ALLOW": "10.0.0.0/8", "EDGEPROXY_RELAY_NEVER": "10.66.0.0/16"}, 2,
         f"refused (relay_never): {POLICY_DEFAULTS['RELAY_DENIED']}"),
        (["192.0.2.7", "ken@DEC.com"], {"EDGEPROXY_LOCAL_DOMAINS": "compaq.com",
                                        "EDGEPROXY_REWRITE": "dec.com=compaq.com"}, 0,
         "accepted (local): forwarded as <ken@compaq.com>"),
        (["192.0.2.7", "bob@example.test"], {"EDGEPROXY_RECIPIENTS": "ken@example.test"}, 2,
         f"refused (unknown_user): {POLICY_DEFAULTS['UNKNOWN_USER']}"),
        (["192.0.2.7", "x@partner.example"], {"EDGEPROXY_RELAY_DOMAINS": "partner.example"}, 0,
         "accepted (relay_domain): forwarded as <x@partner.example>"),
        (["192.0.2.7", "no spaces@example.test"], {}, 2, "syntax error (syntax)"),
        (["192.0.2.7", "user@example.test"], {"EDGEPROXY_CONNECT_DENY": "192.0.2.0/24"}, 2,
         f"connect refused (connect_deny): {POLICY_DEFAULTS['CONNECT_DENIED']}"),
        (["192.0.2.7", "user@elsewhere.test"], {"EDGEPROXY_SOFT_REJECT": "yes"}, 2,
         f"refused (relay_denied): {POLICY_DEFAULTS['RELAY_DENIED'].softened()}"),
    ],
    ids=["encapsulated", "authenticated", "relay-listener", "allow-list", "never", "rewrite", "unknown-user",
         "relay-domain", "syntax-error", "connect-denied", "soft"],
)
def test_check_relay_outcomes(argv: list[str], env: dict[str, str], code: int, output: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-relay", *argv], {**BASE, **env}) == code
    assert capsys.readouterr().out == output + "\n"


# -- README -------------------------------------------------------------------------------------


def test_readme_names_every_variable() -> None:
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md does not exist yet at the repository root")
    text = readme.read_text(encoding="utf-8")
    missing = [variable.env for variable in VARIABLES if variable.env not in text]
    assert not missing, f"README.md does not mention {missing}"


# -- TLS: the pair is loaded as the server will load it ------------------------------------------


def test_a_key_that_does_not_match_the_certificate_is_reported(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    cert, _ = tls.make_self_signed("proxy.test", str(tmp_path / "one"))
    _, other_key = tls.make_self_signed("proxy.test", str(tmp_path / "two"))
    with pytest.raises(ConfigError) as error:
        load(EDGEPROXY_TLS_CERT=cert, EDGEPROXY_TLS_KEY=other_key)
    assert error.value.problems[0].startswith("EDGEPROXY_TLS_KEY=")
    assert "does not match the certificate" in error.value.problems[0]


@pytest.mark.parametrize("given", ["TLS_CERT", "TLS_KEY"])
def test_half_a_pair_is_reported(given: str, tmp_path: Path) -> None:
    cert, key = tls.make_self_signed("proxy.test", str(tmp_path))
    with pytest.raises(ConfigError) as error:
        load(**{f"EDGEPROXY_{given}": cert if given == "TLS_CERT" else key})
    missing = "TLS_KEY" if given == "TLS_CERT" else "TLS_CERT"
    assert error.value.problems == [f"EDGEPROXY_{missing}='': needed with EDGEPROXY_{given}"]


@pytest.mark.parametrize("name", ["SUBMISSION_LISTEN", "SUBMISSIONS_LISTEN"])
def test_submission_with_a_real_backend_needs_a_certificate(name: str) -> None:
    with pytest.raises(ConfigError) as error:
        load(EDGEPROXY_BACKEND="127.0.0.1:25", **{f"EDGEPROXY_{name}": "127.0.0.1:5870"})
    expected = f"EDGEPROXY_{name}='127.0.0.1:5870': needs EDGEPROXY_TLS_CERT and EDGEPROXY_TLS_KEY"
    assert error.value.problems == [expected]


# -- AUTH ----------------------------------------------------------------------------------------


def test_auth_file_needs_a_users_file() -> None:
    with pytest.raises(ConfigError) as error:
        load(EDGEPROXY_AUTH="file")
    assert error.value.problems == ["EDGEPROXY_AUTH_USERS='': needed with EDGEPROXY_AUTH=file"]


def test_a_users_file_with_a_plaintext_password_is_refused_without_showing_it(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("alice:hunter2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load(EDGEPROXY_AUTH="file", EDGEPROXY_AUTH_USERS=f"@{users}")
    assert "line 1: expected user:<argon2id or bcrypt hash>" in error.value.problems[0]
    assert "hunter2" not in str(error.value)


def test_auth_with_a_real_backend_needs_a_certificate() -> None:
    with pytest.raises(ConfigError) as error:
        load(EDGEPROXY_AUTH="backend", EDGEPROXY_BACKEND="127.0.0.1:25")
    assert error.value.problems == ["EDGEPROXY_AUTH='backend': needs EDGEPROXY_TLS_CERT and EDGEPROXY_TLS_KEY"]


def test_held_input_must_fit_the_longest_command_line(tmp_path: Path) -> None:
    # Else a legal line could never be held whole, and the session would wait for its end forever.
    with pytest.raises(ConfigError) as error:
        load(EDGEPROXY_MAX_LINE_LENGTH="8192", EDGEPROXY_MAX_PENDING_INPUT="4096")
    assert error.value.problems == ["EDGEPROXY_MAX_PENDING_INPUT='4096': must be at least the longest command "
                                    "line (8192 octets)"]
    users = tmp_path / "users"
    users.write_text(USERS, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"longest command line \(12290 octets\)"):
        load(EDGEPROXY_AUTH="file", EDGEPROXY_AUTH_USERS=f"@{users}", EDGEPROXY_MAX_PENDING_INPUT="8192")


def test_proxy_protocol_is_refused_with_an_implicit_tls_listener() -> None:
    # The TLS layer owns the first byte there, where a balancer's header would be.
    with pytest.raises(ConfigError) as error:
        load(EDGEPROXY_PROXY_PROTOCOL_FROM="10.0.0.2/32", EDGEPROXY_SUBMISSIONS_LISTEN="127.0.0.1:4650")
    assert error.value.problems == ["EDGEPROXY_PROXY_PROTOCOL_FROM='10.0.0.2/32': not supported with "
                                    "EDGEPROXY_SUBMISSIONS_LISTEN (balance 465 without it, or use 587)"]


def test_kubernetes_service_links_for_a_service_named_edgeproxy_are_not_refused() -> None:
    # A Service "edgeproxy" makes Kubernetes inject these into every pod of the namespace.
    links = {"EDGEPROXY_SERVICE_HOST": "10.96.0.10", "EDGEPROXY_SERVICE_PORT": "25",
             "EDGEPROXY_SERVICE_PORT_SMTP": "25", "EDGEPROXY_PORT": "tcp://10.96.0.10:25",
             "EDGEPROXY_PORT_25_TCP": "tcp://10.96.0.10:25", "EDGEPROXY_PORT_25_TCP_PROTO": "tcp",
             "EDGEPROXY_PORT_25_TCP_PORT": "25", "EDGEPROXY_PORT_25_TCP_ADDR": "10.96.0.10"}
    load(**links)
    with pytest.raises(ConfigError) as error:
        load(EDGEPROXY_PORTS="25", **links)  # a real misspelling is still one
    assert error.value.problems == ["EDGEPROXY_PORTS='25': unknown variable (misspelt?)"]
