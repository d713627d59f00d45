"""One named regression test per attack, through the running proxy to a real backend."""

from __future__ import annotations

import socket

import pytest

from edgeproxy.refusals import POLICY_DEFAULTS
from edgeproxy.smtp import replies as r
from tests.backends import PipeliningSink
from tests.conftest import wait_for
from tests.test_proxy_e2e import raw_session, reply_codes

SMUGGLED = b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nSmuggled!\r\n"


class Client:
    """A raw SMTP client that waits for each reply, as a careful attacker's script would."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        self.read_reply()

    def read_reply(self) -> bytes:
        while True:
            end = self._complete_reply_end()
            if end:
                reply, self.buffer = self.buffer[:end], self.buffer[end:]
                return reply
            chunk = self.sock.recv(65536)
            if not chunk:
                reply, self.buffer = self.buffer, b""
                return reply
            self.buffer += chunk

    def _complete_reply_end(self) -> int:
        position = 0
        while True:
            newline = self.buffer.find(b"\r\n", position)
            if newline < 0:
                return 0
            if self.buffer[position + 3 : position + 4] == b" ":
                return newline + 2
            position = newline + 2

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line)
        return self.read_reply()

    def close(self) -> None:
        self.sock.close()


def start_message(port: int) -> Client:
    client = Client(port)
    assert client.command(b"EHLO attacker.test\r\n").startswith(b"250")
    assert client.command(b"MAIL FROM:<a@attacker.test>\r\n").startswith(b"250")
    assert client.command(b"RCPT TO:<user@example.test>\r\n").startswith(b"250")
    assert client.command(b"DATA\r\n").startswith(b"354")
    return client


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\r\n", b"\r.\r\n", b"\n.\n", b"\r\n.\n", b"\r\n.\r", b"\n.\r"],
    ids=["lf-dot-crlf", "cr-dot-crlf", "lf-dot-lf", "crlf-dot-lf", "crlf-dot-cr", "lf-dot-cr"],
)
def test_smtp_smuggling_never_reaches_the_backend_as_two_messages(make_proxy, fake_end: bytes) -> None:
    with PipeliningSink() as backend:
        proxy = make_proxy(backend.address)
        client = start_message(proxy.port)
        final = client.command(b"Subject: x\r\n\r\nfirst" + fake_end + SMUGGLED + b"\r\n.\r\n")
        assert final == r.BODY_BARE_LINE_END.encode()
        assert client.command(b"QUIT\r\n").startswith(b"221")
        client.close()
        proxy.wait_quiet()
        assert backend.messages == []
        assert not any(b"evil@attacker.test" in line for line in backend.commands)


def test_bare_cr_in_body_refuses_the_message(make_proxy, sink) -> None:
    proxy = make_proxy(sink.address)
    client = start_message(proxy.port)
    assert client.command(b"Subject: x\r\n\r\nab\rcd\r\n.\r\n") == r.BODY_BARE_LINE_END.encode()
    client.close()
    proxy.wait_quiet()
    assert sink.messages == []


def test_bare_lf_in_command_is_refused(make_proxy, sink) -> None:
    proxy = make_proxy(sink.address)
    reply = raw_session(proxy.port, b"EHLO c\nNOOP\r\nQUIT\r\n")
    assert reply_codes(reply) == [r.BARE_LINE_END.code, 250, 221]


def test_over_long_command_line_is_refused_and_the_session_recovers(make_proxy, sink) -> None:
    proxy = make_proxy(sink.address)
    reply = raw_session(proxy.port, b"NOOP " + b"A" * 5000 + b"\r\nNOOP\r\nQUIT\r\n")
    assert reply.startswith(r.LINE_TOO_LONG.encode())
    assert reply_codes(reply)[-2:] == [250, 221]


def test_over_long_body_line_refuses_the_message(make_proxy, sink) -> None:
    proxy = make_proxy(sink.address, max_body_line_length="1000")
    client = start_message(proxy.port)
    assert client.command(b"x" * 1200 + b"\r\n.\r\n") == r.BODY_LINE_TOO_LONG.encode()
    client.close()
    proxy.wait_quiet()
    assert sink.messages == []


def test_message_over_the_size_limit_is_refused_and_not_delivered(make_proxy, sink) -> None:
    proxy = make_proxy(sink.address, max_message_size="2000")
    ehlo = raw_session(proxy.port, b"EHLO c\r\nQUIT\r\n")
    assert b"250-SIZE 2000\r\n" in ehlo
    client = start_message(proxy.port)
    client.sock.sendall((b"z" * 78 + b"\r\n") * 60 + b".\r\n")
    assert client.read_reply() == POLICY_DEFAULTS["MESSAGE_TOO_BIG"].encode()
    client.close()
    proxy.wait_quiet()
    assert sink.messages == []


def test_recipient_flood_gets_452_past_the_limit(make_proxy, sink) -> None:
    proxy = make_proxy(sink.address, max_recipients="3")
    rcpts = b"".join(b"RCPT TO:<u%d@example.test>\r\n" % n for n in range(5))
    reply = raw_session(proxy.port, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n" + rcpts + b"QUIT\r\n")
    too_many = POLICY_DEFAULTS["TOO_MANY_RECIPIENTS"].code
    assert reply_codes(reply)[-6:] == [250, 250, 250, too_many, too_many, 221]


def test_error_flood_is_disconnected(make_proxy, sink) -> None:
    proxy = make_proxy(sink.address, max_errors="3")
    reply = raw_session(proxy.port, b"BOGUS\r\n" * 10, read_until=b"421")
    assert reply_codes(reply) == [500, 500, 500, r.TOO_MANY_ERRORS.code]


def test_early_talker_is_refused(make_proxy, sink) -> None:
    proxy = make_proxy(sink.address, greeting_delay="0.5")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"EHLO impatient.test\r\n")
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert received == r.EARLY_TALKER.encode()


def test_patient_client_gets_the_delayed_greeting(make_proxy, sink) -> None:
    proxy = make_proxy(sink.address, greeting_delay="0.3")
    with proxy.client() as client:
        assert client.noop()[0] == 250


def test_starttls_is_not_offered_and_commands_after_it_are_not_smuggled_into_tls(make_proxy, sink) -> None:
    proxy = make_proxy(sink.address)
    ehlo = raw_session(proxy.port, b"EHLO c\r\nQUIT\r\n")
    assert b"STARTTLS" not in ehlo
    reply = raw_session(proxy.port, b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<a@b.test>\r\nQUIT\r\n")
    assert reply_codes(reply)[-3:] == [r.NOT_IMPLEMENTED.code, 250, 221]


def test_auth_is_not_offered_before_tls(make_proxy, sink) -> None:
    proxy = make_proxy(sink.address)
    assert b"AUTH" not in raw_session(proxy.port, b"EHLO c\r\nQUIT\r\n")
    reply = raw_session(proxy.port, b"EHLO c\r\nAUTH PLAIN AGFAYg==\r\nQUIT\r\n")
    assert reply_codes(reply)[-2:] == [r.NOT_IMPLEMENTED.code, 221]


def test_eight_bit_command_is_refused_where_smtputf8_is_not_offered(make_proxy, pipelining_sink) -> None:
    proxy = make_proxy(pipelining_sink.address)  # this backend does not offer SMTPUTF8
    reply = raw_session(proxy.port, "EHLO c\r\nMAIL FROM:<jörg@b.test>\r\nQUIT\r\n".encode())
    assert b"250-SMTPUTF8" not in reply
    assert reply_codes(reply)[-2:] == [r.EIGHT_BIT_COMMAND.code, 221]


def test_utf8_address_needs_the_smtputf8_parameter(make_proxy, sink) -> None:
    proxy = make_proxy(sink.address)  # aiosmtpd offers SMTPUTF8, so the proxy does too
    reply = raw_session(proxy.port, "EHLO c\r\nMAIL FROM:<jörg@b.test>\r\nMAIL FROM:<jörg@b.test> SMTPUTF8\r\n"
                        "RCPT TO:<jörg@example.test>\r\nQUIT\r\n".encode())
    assert b"250-SMTPUTF8" in reply
    assert reply_codes(reply)[-4:] == [r.SMTPUTF8_REQUIRED.code, 250, 250, 221]


def test_pipelined_body_before_354_is_not_read_as_commands(make_proxy) -> None:
    """A client that sends DATA and its body without waiting must not desync the pipeline."""
    with PipeliningSink() as backend:
        proxy = make_proxy(backend.address)
        payload = (
            b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n"
            b"RSET\r\nMAIL FROM:<evil@attacker.test>\r\n.\r\nQUIT\r\n"
        )
        reply = raw_session(proxy.port, payload)
        assert reply_codes(reply)[-3:] == [354, 250, 221]
        assert wait_for(lambda: len(backend.messages) == 1)
        assert b"MAIL FROM:<evil@attacker.test>" in backend.messages[0].data
        assert not any(b"evil@attacker.test" in line for line in backend.commands if line.startswith(b"MAIL"))
