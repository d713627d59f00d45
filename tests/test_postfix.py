"""Integration with a real Postfix as the backend: what the client saw 250 for is in its Maildir."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest

from edgeproxy.smtp import replies as r
from tests import postfix
from tests.conftest import IN_CI
from tests.test_proxy_attacks import SMUGGLED, start_message
from tests.test_proxy_faults import numbered

pytestmark = pytest.mark.postfix


@pytest.fixture
def real_postfix() -> Iterator[postfix.PostfixBackend]:
    if not postfix.available():
        if IN_CI:
            pytest.fail("Postfix is not installed, but .ci/run installs it")
        pytest.skip("Postfix is not installed (apt-get install postfix)")
    with postfix.PostfixBackend() as backend:
        yield backend


def subjects(messages: list[bytes]) -> list[bytes]:
    lines = (line.rstrip(b"\r") for message in messages for line in message.split(b"\n"))
    return sorted(line for line in lines if line.startswith(b"Subject: message"))


def test_messages_reach_postfix_exactly_once_with_the_real_client_announced(make_proxy, real_postfix) -> None:
    proxy = make_proxy(real_postfix.address)
    with proxy.client() as client:
        client.ehlo("client.example")
        for number in range(3):
            assert client.sendmail("a@sender.test", ["user@example.test"], numbered(number)) == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("a@sender.test", ["user@elsewhere.test"], numbered(99))
    messages = real_postfix.wait_for_messages(3)
    assert len(messages) == 3
    assert subjects(messages) == [b"Subject: message %d" % n for n in range(3)]
    for message in messages:
        # Postfix believed XCLIENT: its own trace names the client's HELO and address ...
        assert b"Received: from client.example (unknown [127.0.0.1])" in message
        # ... and ours, below it, does too.
        assert b"Received: from client.example ([127.0.0.1])" in message
    assert "elsewhere.test" not in real_postfix.log_text()


def test_smuggling_never_becomes_a_second_message_in_postfix(make_proxy, real_postfix) -> None:
    proxy = make_proxy(real_postfix.address)
    client = start_message(proxy.port)
    assert client.command(b"Subject: message 50\r\n\r\nfirst\n.\r\n" + SMUGGLED + b"\r\n.\r\n") == (
        r.BODY_BARE_LINE_END.encode()
    )
    client.close()
    proxy.wait_quiet()
    assert real_postfix.messages() == []
    assert "evil@attacker.test" not in real_postfix.log_text()
