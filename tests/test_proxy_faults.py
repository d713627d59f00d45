"""Backend and client failures: no message is ever lost or doubled by the proxy.

Each test counts: every message the client saw 250 for is in the backend exactly once, and no
other message is.
"""

from __future__ import annotations

import smtplib
import socket
import time

import pytest

from edgeproxy.smtp import replies as r
from tests.backends import PipeliningSink
from tests.conftest import wait_for
from tests.test_proxy_attacks import Client, start_message


def numbered(number: int, size: int = 200) -> bytes:
    return b"Subject: message %d\r\n\r\n" % number + b"x" * size + b"\r\n"


def delivered_numbers(backend) -> list[int]:
    numbers = []
    for message in backend.messages:
        subject = next(line for line in message.data.split(b"\r\n") if line.startswith(b"Subject: message "))
        numbers.append(int(subject.split()[-1]))
    return sorted(numbers)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_backend_not_listening_gives_4xx_and_the_session_goes_on(make_proxy) -> None:
    proxy = make_proxy(("127.0.0.1", closed_port()), backend_connect_timeout="2")
    with proxy.client() as client:
        client.ehlo("c")
        client.mail("a@b.test")
        code, _ = client.rcpt("user@example.test")
        assert code == r.BACKEND_UNAVAILABLE.code
        code, _ = client.rcpt("other@example.test")
        assert code == r.BACKEND_UNAVAILABLE.code  # the transaction stays broken until RSET
        assert client.rset()[0] == 250
        assert client.noop()[0] == 250


def test_backend_closing_mid_data_gives_451_and_nothing_is_delivered(make_proxy) -> None:
    with PipeliningSink(die_after_body_bytes=5000) as backend:
        proxy = make_proxy(backend.address)
        client = start_message(proxy.port)
        client.sock.sendall(numbered(1, size=20000).replace(b"x" * 100, b"x" * 98 + b"\r\n") + b".\r\n")
        assert client.read_reply() == r.BACKEND_FAILED_DATA.encode()
        # The session is clean: a new transaction opens a new backend connection and delivers.
        backend.die_after_body_bytes = None
        for command, expected in ((b"MAIL FROM:<a@b.test>\r\n", b"250"), (b"RCPT TO:<u@example.test>\r\n", b"250"),
                                  (b"DATA\r\n", b"354"), (numbered(2) + b".\r\n", b"250")):
            assert client.command(command).startswith(expected)
        client.close()
        assert wait_for(lambda: len(backend.messages) >= 1)
        proxy.wait_quiet()
        assert delivered_numbers(backend) == [2]


def test_backend_slower_than_its_timeout_gives_451(make_proxy) -> None:
    with PipeliningSink(final_delay=4) as backend:
        proxy = make_proxy(backend.address, backend_timeout="1")
        client = start_message(proxy.port)
        started = time.monotonic()
        assert client.command(numbered(1) + b".\r\n") == r.BACKEND_FAILED_DATA.encode()
        assert time.monotonic() - started < 3.9  # the proxy gave up, the backend did not answer
        client.close()
        time.sleep(4.5)  # past the backend's delay: it must find its client gone
        assert backend.messages == []


def test_client_vanishing_mid_data_delivers_nothing(make_proxy) -> None:
    with PipeliningSink() as backend:
        proxy = make_proxy(backend.address)
        client = start_message(proxy.port)
        client.sock.sendall(numbered(1, size=50000)[:30000])
        time.sleep(0.2)
        client.sock.close()
        # The next client's message still goes through: nothing of the first was kept.
        with proxy.client() as good:
            good.sendmail("a@b.test", ["u@example.test"], numbered(2))
        assert wait_for(lambda: len(backend.messages) == 1)
        proxy.wait_quiet()
        assert delivered_numbers(backend) == [2]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining-backend", "aiosmtpd-backend"])
def test_many_messages_arrive_exactly_once(make_proxy, sink, pipelining: bool) -> None:
    with PipeliningSink() as pipelined:
        backend = pipelined if pipelining else sink
        proxy = make_proxy(backend.address)
        accepted = []
        with proxy.client() as client:
            for number in range(30):
                recipients = ["u@example.test", "x@elsewhere.test"] if number % 3 == 0 else ["u@example.test"]
                try:
                    client.sendmail("a@b.test", recipients, numbered(number))
                except smtplib.SMTPRecipientsRefused:
                    continue
                accepted.append(number)
        assert wait_for(lambda: len(backend.messages) == len(accepted))
        proxy.wait_quiet()
        assert delivered_numbers(backend) == accepted


def test_idle_client_is_timed_out(make_proxy, sink) -> None:
    proxy = make_proxy(sink.address, timeout="1")
    client = Client(proxy.port)
    started = time.monotonic()
    assert client.read_reply() == r.TIMEOUT.encode()
    assert 0.9 <= time.monotonic() - started < 5
    client.close()
