"""``edgeproxy check-relay --server``: the remote relay tester against real servers on loopback.

edgeproxy itself (in-process, on its own loop thread, in front of an aiosmtpd sink), aiosmtpd
alone (an open relay: it accepts any recipient), a scripted server that hangs up or refuses the
sender on cue, and a private Postfix configured open, closed, and closed with the holes this tool
exists to find. Every probe is MAIL, RCPT, RSET: the tests check that no message reached any
backend or queue.
"""

from __future__ import annotations

import contextlib
import json
import socketserver
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.servers import PrivatePostfix
from edgeproxy import cli, relaycheck
from edgeproxy.refusals import POLICY_DEFAULTS
from edgeproxy.smtp import replies as r
from edgeproxy.tls import make_self_signed
from tests import postfix
from tests.backends import AiosmtpdSink
from tests.conftest import IN_CI, ProxyThread, wait_for
from tests.test_proxy_faults import closed_port

ROOT = Path(__file__).resolve().parent.parent
LOCAL = "example.test"
FOREIGN = relaycheck.DEFAULT_FOREIGN_DOMAIN
RELAY_DENIED = str(POLICY_DEFAULTS["RELAY_DENIED"])
PROBE_COUNT = len(relaycheck.build_probes(LOCAL, FOREIGN, "127.0.0.1"))


def check(capsys: pytest.CaptureFixture[str], port: int, *extra: str) -> tuple[int, str]:
    """``check-relay --server`` in this process (the servers run on threads or processes of their
    own), with a short timeout so a failure cannot hang the suite."""
    code = cli.main(["check-relay", "--server", f"127.0.0.1:{port}", "--local-domain", LOCAL, "--timeout", "5",
                     *extra], {})
    return code, capsys.readouterr().out


def check_json(capsys: pytest.CaptureFixture[str], port: int, *extra: str) -> tuple[int, dict]:
    code, out = check(capsys, port, "--json", *extra)
    return code, json.loads(out)


def verdicts(document: dict) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for probe in document["probes"]:
        found.setdefault(probe["verdict"], set()).add(probe["form"])
    return found


def table_rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.split(" ", 1)[0] in ("closed", "OPEN", "error")]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeproxy", "check-relay", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.fixture
def relay_proxy(make_proxy, sink: AiosmtpdSink) -> Callable[..., ProxyThread]:
    def start(**env: str) -> ProxyThread:
        return make_proxy(sink.address, local_domains=LOCAL, **env)

    return start


# -- the probes themselves ---------------------------------------------------------------------------


def test_every_probe_names_a_foreign_destination_never_a_plain_local_one() -> None:
    probes = relaycheck.build_probes(LOCAL, FOREIGN, "127.0.0.1")
    foreign_marks = (FOREIGN, FOREIGN.upper(), relaycheck.FOREIGN_LITERAL, relaycheck.FOREIGN_LITERAL6)
    for probe in probes:
        assert any(mark in probe.argument for mark in foreign_marks), probe
        assert probe.recipient != f"<{relaycheck.USER}@{LOCAL}>"
    assert {probe.sender_kind for probe in probes if probe.form == "plain foreign"} == {"null", "local", "foreign"}
    forms = {probe.argument for probe in probes}
    for form in (f"TO:<relaytest%{FOREIGN}@{LOCAL}>", f"TO:<{FOREIGN}!relaytest@{LOCAL}>",
                 f"TO:<@{LOCAL}:relaytest@{FOREIGN}>", f"TO:<relaytest@{FOREIGN}@{LOCAL}>",
                 f'TO:<"relaytest@{FOREIGN}"@{LOCAL}>', f'TO:<"relaytest%{FOREIGN}"@{LOCAL}>',
                 "TO:<relaytest@[192.0.2.1]>", f"TO:<relaytest%{FOREIGN}@[127.0.0.1]>",
                 f"TO:<relaytest@{FOREIGN}.>", f"TO:<postmaster@{FOREIGN}>"):
        assert form in forms


@pytest.mark.parametrize(("greeting", "domain"), [
    ("mail.example.com ESMTP Postfix", "example.com"),
    ("example.org ESMTP", "example.org"),
    ("MX1.Corp.Example.COM. Microsoft ESMTP MAIL Service ready", "corp.example.com"),
    ("localhost ESMTP", None),
    ("192.0.2.7 ESMTP", None),
    ("", None),
])
def test_the_local_domain_is_guessed_from_the_greeting(greeting: str, domain: str | None) -> None:
    assert relaycheck.domain_from_greeting(greeting) == domain


def test_address_literals() -> None:
    assert relaycheck.address_literal("127.0.0.1") == "[127.0.0.1]"
    assert relaycheck.address_literal("::1") == "[IPv6:::1]"
    assert relaycheck.address_literal("::ffff:192.0.2.1") == "[192.0.2.1]"


# -- against edgeproxy -------------------------------------------------------------------------------


def test_edgeproxy_is_closed_and_the_backend_never_hears_of_the_probes(relay_proxy, sink, capsys) -> None:
    proxy = relay_proxy()
    connections = sink.connections  # the pool's start-up probe
    code, out = check(capsys, proxy.port)
    assert code == 0, out
    rows = table_rows(out)
    assert len(rows) == PROBE_COUNT
    assert all(row.startswith("closed ") for row in rows)
    assert all(row.endswith((RELAY_DENIED, str(r.BAD_RECIPIENT_SYNTAX))) for row in rows), out
    assert "in plaintext" in out
    assert f"{PROBE_COUNT} probes in plaintext: 0 open, {PROBE_COUNT} closed, 0 not completed. No relay found" in out
    proxy.wait_quiet()
    assert sink.connections == connections
    assert sink.messages == []


def test_edgeproxy_json_lists_every_probe_as_closed(relay_proxy, capsys) -> None:
    code, document = check_json(capsys, relay_proxy().port)
    assert code == 0
    assert len(document["probes"]) == PROBE_COUNT
    assert document["summary"] | {"text": ""} == {"probes": PROBE_COUNT, "open": 0, "closed": PROBE_COUNT,
                                                  "errors": 0, "open_relay": False, "text": ""}
    assert document["tls"] is None and document["local_domain"] == LOCAL and document["foreign_domain"] == FOREIGN
    plain = [probe for probe in document["probes"] if probe["form"] == "plain foreign"]
    assert [probe["sender"] for probe in plain] == ["", f"postmaster@{LOCAL}", f"relaytest@{FOREIGN}"]
    assert all(probe["stage"] == "RCPT" and probe["code"] == 554 and probe["reply"] == RELAY_DENIED[4:]
               for probe in plain)
    percent = next(probe for probe in document["probes"] if probe["form"] == "percent hack")
    assert percent["command"] == f"RCPT TO:<relaytest%{FOREIGN}@{LOCAL}>"


def test_a_server_hanging_up_after_a_few_errors_does_not_turn_probes_into_errors(relay_proxy, capsys) -> None:
    # MAX_ERRORS=3: the proxy says 421 and closes at the third refusal; every probe after that
    # must be run again on a new connection, not reported as an error.
    code, document = check_json(capsys, relay_proxy(max_errors="3").port)
    assert code == 0, document["summary"]
    assert verdicts(document) == {"closed": {probe["form"] for probe in document["probes"]}}


def test_source_address_is_bound(relay_proxy, sink, capsys) -> None:
    # Only 127.0.0.2 may relay: the probes find the proxy open from there, closed from 127.0.0.1.
    proxy = relay_proxy(relay_allow="127.0.0.2/32")
    code, document = check_json(capsys, proxy.port, "--source", "127.0.0.2")
    assert code == 1
    assert "plain foreign" in verdicts(document)["open"]
    code, document = check_json(capsys, proxy.port, "--source", "127.0.0.1")
    assert code == 0
    proxy.wait_quiet()
    assert sink.messages == []  # RCPTs reached the backend, never DATA


def test_aiosmtpd_accepting_everything_is_found_open(sink, capsys) -> None:
    code, out = check(capsys, sink.port)
    assert code == 1
    assert "OPEN RELAY" in out
    assert any(row.startswith("OPEN ") and "plain foreign" in row for row in table_rows(out))
    assert sink.messages == []


class ScriptedServer(socketserver.ThreadingTCPServer):
    """A minimal SMTP server on a thread: ``answer(command, rcpt_number)`` gives each command's
    reply line, or None to hang up without one (``rcpt_number`` counts RCPTs over all connections)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, answer: Callable[[bytes, int], bytes | None]) -> None:
        super().__init__(("127.0.0.1", 0), _Scripted)
        self.answer = answer
        self.rcpts = self.connections = 0
        self.commands: list[bytes] = []
        self.lock = threading.Lock()
        self.port = self.server_address[1]

    def __enter__(self) -> ScriptedServer:
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _Scripted(socketserver.StreamRequestHandler):
    server: ScriptedServer

    def handle(self) -> None:
        server = self.server
        with server.lock:
            server.connections += 1
        self.wfile.write(b"220 scripted.example.org ESMTP\r\n")
        for line in self.rfile:
            with server.lock:
                server.commands.append(line.rstrip(b"\r\n"))
                if line[:4].upper() == b"RCPT":
                    server.rcpts += 1
                reply = server.answer(line.rstrip(b"\r\n"), server.rcpts)
            if reply is None:
                return
            self.wfile.write(reply + b"\r\n")
            if line[:4].upper() == b"QUIT":
                return


def refuse_and_hang_up_at_every(nth: int) -> Callable[[bytes, int], bytes | None]:
    def answer(command: bytes, rcpts: int) -> bytes | None:
        if command[:4].upper() != b"RCPT":
            return b"250 ok"
        return None if rcpts % nth == 0 else b"550 5.7.1 no relaying"

    return answer


def test_probes_cut_off_by_a_hang_up_are_run_again_on_a_new_connection(capsys) -> None:
    with ScriptedServer(refuse_and_hang_up_at_every(3)) as server:
        code, document = check_json(capsys, server.port)
    assert code == 0, document["summary"]
    assert document["summary"]["closed"] == PROBE_COUNT
    assert server.rcpts - server.rcpts // 3 == PROBE_COUNT  # each hang-up cost one RCPT more, no probe lost
    assert not any(command.upper().startswith(b"DATA") for command in server.commands)


def test_a_server_hanging_up_at_every_rcpt_is_inconclusive_exit_2(capsys) -> None:
    with ScriptedServer(refuse_and_hang_up_at_every(1)) as server:
        code, out = check(capsys, server.port)
    assert code == 2
    assert "Inconclusive" in out
    assert len(table_rows(out)) == PROBE_COUNT and all(row.startswith("error ") for row in table_rows(out))
    assert server.rcpts == 2 * PROBE_COUNT  # each probe tried twice, no more


def test_a_refused_sender_is_reported_as_refused_at_mail(capsys) -> None:
    def answer(command: bytes, rcpts: int) -> bytes | None:
        return b"553 5.1.8 no bounces here" if command.upper() == b"MAIL FROM:<>" else b"250 ok"

    with ScriptedServer(answer) as server:
        code, out = check(capsys, server.port)
    assert code == 1  # the other senders were accepted for a foreign recipient
    null = next(row for row in table_rows(out) if " null <> " in row)
    assert null.startswith("closed ") and null.endswith("MAIL refused: 553 5.1.8 no bounces here")
    assert "1 refused at MAIL" in out
    assert f"local domain {LOCAL}" in out


def test_the_local_domain_defaults_to_the_greeting_host_name_domain(capsys) -> None:
    with ScriptedServer(refuse_and_hang_up_at_every(10_000)) as server:
        code = cli.main(["check-relay", "--server", f"127.0.0.1:{server.port}", "--json", "--helo", "probe.example",
                         "--foreign-domain", "Relay.Example."], {})
    document = json.loads(capsys.readouterr().out)
    assert code == 0 and document["local_domain"] == "example.org" and document["foreign_domain"] == "relay.example"
    assert server.commands[0] == b"ehlo probe.example"
    assert b"RCPT TO:<relaytest%relay.example@example.org>" in server.commands
    assert server.connections == -(-PROBE_COUNT // relaycheck.PROBES_PER_CONNECTION)
    assert [command.upper() for command in server.commands].count(b"QUIT") == server.connections


# -- STARTTLS ----------------------------------------------------------------------------------------


def test_starttls_probes_run_inside_tls(relay_proxy, tmp_path, capsys) -> None:
    # Self-signed for a name the tool never checks: a diagnosis tool does not verify.
    cert, key = make_self_signed("not-the-server-name.test", str(tmp_path))
    proxy = relay_proxy(tls_cert=cert, tls_key=key)
    code, out = check(capsys, proxy.port, "--starttls")
    assert code == 0, out
    assert "inside TLS (TLSv1.3, certificate not verified)" in out.splitlines()[0]
    assert f"{PROBE_COUNT} probes inside TLS" in out
    assert all(row.startswith("closed ") for row in table_rows(out))
    code, document = check_json(capsys, proxy.port, "--starttls")
    assert code == 0 and document["tls"] == "TLSv1.3"


def test_starttls_against_a_server_not_offering_it_exits_2(relay_proxy, capsys) -> None:
    code = cli.main(["check-relay", "--server", f"127.0.0.1:{relay_proxy().port}", "--starttls"], {})
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert "does not offer STARTTLS" in captured.err


# -- errors ------------------------------------------------------------------------------------------


def test_an_unreachable_server_exits_2(capsys) -> None:
    port = closed_port()
    assert cli.main(["check-relay", "--server", f"127.0.0.1:{port}", "--timeout", "2"], {}) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"127.0.0.1:{port}" in captured.err


@pytest.mark.parametrize("argv", [
    [],
    ["192.0.2.7"],
    ["--server", "127.0.0.1"],
    ["--server", "127.0.0.1:99999"],
    ["--server", "127.0.0.1:25", "192.0.2.7", "user@example.net"],
    ["--server", "127.0.0.1:25", "--authenticated"],
    ["--server", "127.0.0.1:25", "--source", "not-an-address"],
    ["--server", "127.0.0.1:25", "--timeout", "0"],
    ["--server", "127.0.0.1:25", "--local-domain", FOREIGN],
    ["192.0.2.7", "user@example.net", "--starttls"],
    ["192.0.2.7", "user@example.net", "--timeout", "0"],
    ["--server", "127.0.0.1:25", "--helo", "two words"],
    ["--server", "127.0.0.1:25", "--foreign-domain", "a b.example"],
])
def test_usage_errors_exit_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["check-relay", *argv], {})
    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_usage_error_from_the_command_line_exits_2_and_the_positional_mode_still_works() -> None:
    result = run_cli("--server", "127.0.0.1")
    assert result.returncode == 2
    assert "expected host:port" in result.stderr
    result = run_cli("192.0.2.7", "user@elsewhere.test")
    assert (result.returncode, result.stdout) == (2, f"refused (relay_denied): {RELAY_DENIED}\n")


# -- against Postfix ---------------------------------------------------------------------------------


@contextlib.contextmanager
def private_postfix(main_cf: str) -> Iterator[PrivatePostfix]:
    if not postfix.available():
        if IN_CI:
            pytest.fail("Postfix is not installed, but .ci/run installs it")
        pytest.skip("Postfix is not installed (apt-get install postfix)")
    with PrivatePostfix(main_cf) as server:
        yield server


def queued(server: PrivatePostfix) -> list[Path]:
    """Files in the queues a message passes through: none, when no DATA was ever sent. Postfix
    opens a queue file in ``incoming`` at the first accepted RCPT and its cleanup server removes
    it after RSET, a moment after smtpd answered: wait (bounded) for it to go."""
    def files() -> list[Path]:
        return [path for name in ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")
                for path in (server.root / "queue" / name).rglob("*") if path.is_file()]

    wait_for(lambda: not files())
    return files()


# 127.0.0.1 is not in mynetworks: the probes come from an untrusted client.
UNTRUSTED = "mynetworks = 127.255.255.255/32\nsmtpd_relay_restrictions = reject_unauth_destination\n"
# A relay domain with a recipient list, as a backup MX or a gateway should have (edgeproxy's
# EDGEPROXY_RECIPIENTS). Postfix's defaults already refuse the %, ! and quoted forms from untrusted
# clients (allow_untrusted_routing = no; resolve_dequoted_address = yes looks inside quotes), and
# allow_percent_hack / swap_bangpath would only rewrite them for mydestination domains; they are
# spelled out so this test does not depend on the defaults. Without the recipient list Postfix
# takes any local part of a relay domain, Exchange's IMCEASMTP-user+40foreign@local included,
# which an Exchange next hop decodes into a relay (see the hole tests below).
CLOSED = (f"{UNTRUSTED}relay_domains = {LOCAL}\nrelay_recipient_maps = inline:{{ alice@{LOCAL}=ok }}\n"
          "allow_untrusted_routing = no\nallow_percent_hack = no\nswap_bangpath = no\n")


@pytest.mark.postfix
def test_an_open_postfix_is_found_open_and_nothing_is_queued(capsys) -> None:
    with private_postfix("mynetworks = 127.0.0.0/8\nsmtpd_relay_restrictions = permit_mynetworks, reject\n") as server:
        code, document = check_json(capsys, server.port)
        assert code == 1
        assert document["summary"]["open_relay"] is True
        plain = [probe for probe in document["probes"] if probe["form"] == "plain foreign"]
        assert [(probe["verdict"], probe["code"]) for probe in plain] == [("open", 250)] * 3
        assert queued(server) == []
        log = server.log_text()
        assert "to=<relaytest@example.net>" not in log  # nothing was ever queued for it ...
        assert "message-id=" not in log and "status=" not in log  # ... nor delivered


@pytest.mark.postfix
def test_a_closed_postfix_is_found_closed(capsys) -> None:
    with private_postfix(CLOSED) as server:
        code, out = check(capsys, server.port)
        assert code == 0, out
        rows = table_rows(out)
        assert len(rows) == PROBE_COUNT and all(row.startswith("closed ") for row in rows)
        assert "Relay access denied" in rows[0]
        assert queued(server) == []


@pytest.mark.postfix
@pytest.mark.parametrize(("extra", "holes"), [
    # No recipient list for the relay domain: only the Exchange encoding gets through.
    ("", {"Exchange IMCEA"}),
    # Sender-specified routing allowed towards relay domains: the next hop decides.
    ("allow_untrusted_routing = yes\n", {"Exchange IMCEA", "percent hack", "bang path", "double @", 'quoted "@"',
                                         'quoted "%"', 'quoted "!"'}),
], ids=["no-recipient-list", "untrusted-routing"])
def test_the_holes_of_a_relay_domain_without_care_are_found(extra: str, holes: set[str], capsys) -> None:
    with private_postfix(f"{UNTRUSTED}relay_domains = {LOCAL}\n{extra}") as server:
        code, document = check_json(capsys, server.port)
        assert code == 1
        assert verdicts(document)["open"] == holes
        assert queued(server) == []
