"""Real clients through the real proxy to a real backend, over loopback, on both event loops."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import subprocess

import aiosmtplib
import pytest

from edgeproxy.refusals import POLICY_DEFAULTS
from edgeproxy.smtp import replies as r
from tests.backends import AiosmtpdSink, PipeliningSink
from tests.conftest import require_tool, wait_for

MESSAGE = b"From: a@sender.test\r\nTo: user@example.test\r\nSubject: hello\r\n\r\nHello.\r\n.dot line\r\n"
RELAY_DENIED = POLICY_DEFAULTS["RELAY_DENIED"]


def raw_session(port: int, payload: bytes, read_until: bytes = b"221", timeout: float = 10) -> bytes:
    """Send ``payload`` in one write after the greeting; read until ``read_until`` or close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        greeting = sock.recv(4096)
        assert greeting.startswith(b"220 ")
        sock.sendall(payload)
        received = b""
        while read_until not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def reply_codes(data: bytes) -> list[int]:
    """The code of each complete reply (multi-line replies counted once)."""
    return [int(line[:3]) for line in data.split(b"\r\n") if len(line) >= 4 and line[3:4] == b" "]


@pytest.fixture(params=["aiosmtpd", "pipelining"])
def any_sink(request: pytest.FixtureRequest):
    backend = AiosmtpdSink() if request.param == "aiosmtpd" else PipeliningSink()
    with backend:
        yield backend


class TestDelivery:
    def test_smtplib_delivers_through_the_proxy(self, make_proxy, any_sink) -> None:
        proxy = make_proxy(any_sink.address)
        with proxy.client() as client:
            client.ehlo("client.test")
            refused = client.sendmail("a@sender.test", ["user@EXAMPLE.test"], MESSAGE)
        assert refused == {}
        assert wait_for(lambda: len(any_sink.messages) == 1)
        message = any_sink.messages[0]
        assert message.mail_from == "a@sender.test"
        assert message.rcpt_tos == ["user@example.test"]
        # The Received: header names the real client and its HELO, and the body arrives intact,
        # dot-stuffing undone by the backend exactly once.
        assert message.data.startswith(b"Received: from client.test ([127.0.0.1])")
        assert message.data.endswith(b"Hello.\r\n.dot line\r\n")

    def test_aiosmtplib_delivers_several_messages_in_one_session(self, make_proxy, sink) -> None:
        proxy = make_proxy(sink.address)

        async def deliver() -> list[int]:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=proxy.port, timeout=10)
            await client.connect()
            codes = []
            for number in range(3):
                _, response = await client.sendmail(
                    "a@sender.test", [f"user{number}@example.test"], MESSAGE
                )
                codes.append(int(response.split()[0]) if response[:3].isdigit() else 250)
            await client.quit()
            return codes

        asyncio.run(deliver())
        assert wait_for(lambda: len(sink.messages) == 3)
        assert sorted(m.rcpt_tos[0] for m in sink.messages) == [f"user{n}@example.test" for n in range(3)]

    def test_received_header_can_be_turned_off(self, make_proxy, sink) -> None:
        proxy = make_proxy(sink.address, received_header="no")
        with proxy.client() as client:
            client.sendmail("a@sender.test", ["user@example.test"], MESSAGE)
        assert wait_for(lambda: len(sink.messages) == 1)
        assert not sink.messages[0].data.startswith(b"Received:")

    def test_backend_connections_are_pooled_across_sessions(self, make_proxy, pipelining_sink) -> None:
        proxy = make_proxy(pipelining_sink.address)
        for _ in range(3):
            with proxy.client() as client:
                client.sendmail("a@sender.test", ["user@example.test"], MESSAGE)
        assert wait_for(lambda: len(pipelining_sink.messages) == 3)
        assert pipelining_sink.connections == 1  # the probe's connection, reset and reused

    def test_backend_refusal_of_mail_reaches_the_client(self, make_proxy) -> None:
        with PipeliningSink(mail_reply=b"550 5.7.1 Sender blocked by backend\r\n") as backend:
            proxy = make_proxy(backend.address)
            with proxy.client() as client, pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                client.sendmail("a@sender.test", ["user@example.test"], MESSAGE)
            code, text = refused.value.recipients["user@example.test"]
            assert code == 550 and b"blocked by backend" in text
            assert backend.messages == []

    def test_xclient_announces_the_real_client(self, make_proxy) -> None:
        with PipeliningSink(xclient=True) as backend:
            proxy = make_proxy(backend.address)
            with proxy.client() as client:
                client.ehlo("client.example")
                client.sendmail("a@sender.test", ["user@example.test"], MESSAGE)
            assert wait_for(lambda: len(backend.messages) == 1)
            announced = backend.messages[0].xclient
            assert announced["ADDR"] == "127.0.0.1"
            assert announced["HELO"] == "client.example"
            assert announced["PROTO"] == "ESMTP"

    def test_swaks_delivers_and_is_refused_relay(self, make_proxy, sink) -> None:
        swaks = require_tool("swaks")
        proxy = make_proxy(sink.address)
        server = f"127.0.0.1:{proxy.port}"
        ok = subprocess.run([swaks, "--server", server, "--to", "user@example.test", "--from", "a@sender.test"],
                            capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stdout
        denied = subprocess.run([swaks, "--server", server, "--to", "user@elsewhere.test"],
                                capture_output=True, text=True, timeout=30)
        assert denied.returncode != 0
        assert str(RELAY_DENIED) in denied.stdout
        assert wait_for(lambda: len(sink.messages) == 1)


class TestRelayRefusal:
    def test_relay_attempt_is_refused_and_costs_the_backend_nothing(self, make_proxy, pipelining_sink) -> None:
        proxy = make_proxy(pipelining_sink.address)
        connections_after_probe = pipelining_sink.connections
        with proxy.client() as client, pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("a@sender.test", ["victim@elsewhere.test"], MESSAGE)
        code, text = refused.value.recipients["victim@elsewhere.test"]
        assert (code, text.decode()) == (RELAY_DENIED.code, f"{RELAY_DENIED.enhanced} {RELAY_DENIED.text}")
        assert pipelining_sink.connections == connections_after_probe
        assert pipelining_sink.commands.count(b"RCPT TO:<victim@elsewhere.test>") == 0

    @pytest.mark.parametrize(
        "recipient",
        [
            "user%elsewhere.test@example.test",
            "elsewhere.test!user@example.test",
            "@example.test:user@elsewhere.test",
            '"user@elsewhere.test"@example.test',
            "user@elsewhere.test@example.test",
            "user@example.test.",
            "user@[192.0.2.99]",
            "IMCEASMTP-user+40elsewhere+2Etest@example.test",
        ],
        ids=["percent", "bang", "source_route", "quoted_at", "multiple_at", "trailing_dot", "ip_literal", "imcea"],
    )
    def test_encapsulated_address_is_a_relay_attempt(self, make_proxy, pipelining_sink, recipient: str) -> None:
        proxy = make_proxy(pipelining_sink.address)
        reply = raw_session(proxy.port, f"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<{recipient}>\r\nQUIT\r\n".encode())
        assert reply_codes(reply)[-2:] == [RELAY_DENIED.code, 221]
        assert not any(line.startswith(b"RCPT") for line in pipelining_sink.commands)

    def test_relay_listener_and_allow_list_may_relay(self, make_proxy, sink) -> None:
        proxy = make_proxy(sink.address)
        with proxy.client(relay_listener=True) as client:
            assert client.sendmail("a@sender.test", ["friend@elsewhere.test"], MESSAGE) == {}
        allowed = make_proxy(sink.address, relay_allow="127.0.0.0/8")
        with allowed.client() as client:
            assert client.sendmail("a@sender.test", ["friend@elsewhere.test"], MESSAGE) == {}
        assert wait_for(lambda: len(sink.messages) == 2)

    def test_never_list_beats_allow_list_but_not_local_delivery(self, make_proxy, sink) -> None:
        proxy = make_proxy(sink.address, relay_allow="127.0.0.0/8", relay_never="127.0.0.1/32")
        reply = raw_session(
            proxy.port,
            b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@elsewhere.test>\r\nRCPT TO:<u@example.test>\r\nQUIT\r\n",
        )
        assert reply_codes(reply)[-3:] == [RELAY_DENIED.code, 250, 221]

    def test_pipelined_relay_rcpt_among_local_ones_keeps_reply_order(self, make_proxy, pipelining_sink) -> None:
        proxy = make_proxy(pipelining_sink.address)
        payload = (
            b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<one@example.test>\r\nRCPT TO:<x@elsewhere.test>\r\n"
            b"RCPT TO:<two@example.test>\r\nDATA\r\n"
        )
        reply = raw_session(proxy.port, payload, read_until=b"354")
        assert reply_codes(reply) == [250, 250, 250, RELAY_DENIED.code, 250, 354]
        rcpts = [line for line in pipelining_sink.commands if line.startswith(b"RCPT")]
        assert rcpts == [b"RCPT TO:<one@example.test>", b"RCPT TO:<two@example.test>"]

    def test_data_without_valid_recipient_is_refused(self, make_proxy, sink) -> None:
        proxy = make_proxy(sink.address)
        reply = raw_session(proxy.port, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nDATA\r\nQUIT\r\n")
        assert reply_codes(reply)[-2:] == [r.NO_VALID_RECIPIENTS.code, 221]
        reply = raw_session(
            proxy.port, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@elsewhere.test>\r\nDATA\r\nQUIT\r\n"
        )
        assert reply_codes(reply)[-2:] == [r.NO_VALID_RECIPIENTS_AFTER_REJECTS.code, 221]
