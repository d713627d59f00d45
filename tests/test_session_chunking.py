"""However the client's bytes are chunked, the session answers and forwards the same.

Whole dialogues (attacks included) are fed as one chunk, one byte at a time and in random
chunkings; the client output and the backend traffic (commands, each message as the backend got
it, refusals, aborts, ended transactions) must be identical. See ``session_driver.Digest`` for the
one normalization: body bytes streamed before an abort are not compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgeproxy.smtp import events as ev
from tests.session_driver import (
    END,
    MAIL,
    RCPT,
    RCPT2,
    RELAY,
    SMTP,
    Digest,
    Driver,
    digest,
    make_session,
)
from tests.session_driver import settings as smtp_settings


@dataclass(frozen=True)
class Dialogue:
    data: bytes
    env: dict[str, str] = field(default_factory=dict)
    script: dict[tuple[str, int], tuple[int, bytes]] = field(default_factory=dict)
    received_header: bool = True


def txn(body: bytes, rcpts: bytes = RCPT) -> bytes:
    return MAIL + rcpts + b"DATA\r\n" + body + END


SMUGGLED = b"MAIL FROM:<evil@far.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nsmuggled\r\n"
SMALL = {"max_message_size": "1000", "max_recipients": "3", "max_errors": "6"}

DIALOGUES: dict[str, Dialogue] = {
    "transaction": Dialogue(SMTP + txn(b"Subject: x\r\n\r\n..dot\r\nline") + b"QUIT\r\n"),
    "several-transactions": Dialogue(SMTP + txn(b"one") + txn(b"two", RCPT2) + txn(b"three") + b"QUIT\r\n"),
    "helo-no-received": Dialogue(b"HELO c\r\n" + txn(b"plain") + b"QUIT\r\n", received_header=False),
    "empty-body": Dialogue(SMTP + MAIL + RCPT + b"DATA\r\n.\r\nQUIT\r\n"),
    "dot-stuffing": Dialogue(SMTP + txn(b"..\r\n...\r\n. \r\n.x\r\n\r\n..\r\n") + b"QUIT\r\n"),
    "pipelined-with-relay": Dialogue(
        SMTP + MAIL + RCPT + RELAY + RCPT2 + b"DATA\r\nbody\r\n.\r\n" + MAIL + RCPT2 + b"NOOP\r\nDATA\r\nb2"
        + END + b"QUIT\r\n"
    ),
    "backend-refuses-mail": Dialogue(
        SMTP + MAIL + RCPT + RELAY + RCPT2 + b"RSET\r\n" + txn(b"ok") + b"QUIT\r\n",
        script={(ev.Command.MAIL, 0): (550, b"550 5.7.1 no\r\n"), (ev.Command.RCPT, 0): (503, b"503 5.5.1 seq\r\n"),
                (ev.Command.RCPT, 1): (503, b"503 5.5.1 seq\r\n")},
    ),
    "backend-refuses-data": Dialogue(
        SMTP + MAIL + RCPT + b"DATA\r\nRSET\r\nNOOP\r\nBOGUS\r\n" + txn(b"again") + b"QUIT\r\n",
        script={(ev.Command.DATA, 0): (554, b"554 5.5.1 no valid recipients\r\n")},
    ),
    "backend-refuses-message": Dialogue(
        SMTP + txn(b"spam") + txn(b"ham") + b"QUIT\r\n",
        script={(ev.Command.END, 0): (554, b"554 5.7.0 spam\r\n")},
    ),
    "smuggling-lf-dot-crlf": Dialogue(SMTP + txn(b"x\n.\r\n" + SMUGGLED) + b"QUIT\r\n"),
    "smuggling-cr-dot-crlf": Dialogue(SMTP + txn(b"x\r.\r\n" + SMUGGLED) + b"QUIT\r\n"),
    "smuggling-lf-dot-lf": Dialogue(SMTP + txn(b"x\n.\n" + SMUGGLED) + b"QUIT\r\n"),
    "smuggling-crlf-dot-lf": Dialogue(SMTP + txn(b"x\r\n.\n" + SMUGGLED) + b"QUIT\r\n"),
    "smuggling-crlf-dot-cr": Dialogue(SMTP + txn(b"x\r\n.\r" + SMUGGLED) + b"QUIT\r\n"),
    "bare-cr-in-body": Dialogue(SMTP + txn(b"a\rb") + txn(b"fine") + b"QUIT\r\n"),
    "bare-lf-in-body": Dialogue(SMTP + txn(b"a\nb") + txn(b"fine") + b"QUIT\r\n"),
    "bare-cr-lf-in-commands": Dialogue(SMTP + b"MAIL FROM:<a@b.test>\rRSET\r\nNOOP\nRSET\r\nNOOP\r\r\nQUIT\r\n"),
    "nul-and-8bit-in-commands": Dialogue(
        b"HELO c\r\nNOOP \x00\r\n" + "NOOP ü\r\n".encode() + b"NOOP \xff\r\nQUIT\r\n"
    ),
    "smtputf8": Dialogue(
        SMTP + "MAIL FROM:<jü@b.test> SMTPUTF8\r\nRCPT TO:<u@bücher.test>\r\n".encode() + RCPT
        + b"DATA\r\n" + "Grüße".encode() + END + b"\xff\xfe\r\nQUIT\r\n"
    ),
    "long-command-line": Dialogue(SMTP + b"NOOP " + b"a" * 700 + b"\r\nNOOP\r\nQUIT\r\n"),
    "long-line-hides-a-command": Dialogue(SMTP + b"X" * 600 + MAIL + RCPT + b"QUIT\r\n"),
    "line-at-the-limit": Dialogue(
        SMTP + b"NOOP " + b"a" * 505 + b"\r\n" + b"NOOP " + b"a" * 506 + b"\r\n" + b"NOOP " + b"a" * 505
        + b"\r\r\nQUIT\r\n"
    ),
    "long-body-line": Dialogue(SMTP + txn(b"ok\r\n" + b"z" * 1500 + b"\r\nmore") + b"QUIT\r\n"),
    "body-line-at-the-limit": Dialogue(
        SMTP + txn(b"z" * 2046 + b"\r\n" + b"y" * 2046 + b"\r") + txn(b"z" * 2047) + b"QUIT\r\n"
    ),
    "body-too-big": Dialogue(SMTP + txn(b"0123456789" * 110) + txn(b"x" * 998) + b"QUIT\r\n", env=SMALL),
    "size-at-mail": Dialogue(SMTP + b"MAIL FROM:<a@b.test> SIZE=1001\r\nMAIL FROM:<a@b.test> SIZE=999\r\n"
                             + b"QUIT\r\n", env=SMALL),
    "recipient-flood": Dialogue(SMTP + MAIL + RCPT * 5 + b"DATA\r\nbody" + END + b"QUIT\r\n", env=SMALL),
    "error-flood": Dialogue(SMTP + b"BOGUS\r\n" * 10 + b"QUIT\r\n", env=SMALL),
    "relay-probe-flood": Dialogue(SMTP + MAIL + RELAY * 10, env=SMALL),
    "data-without-rcpt": Dialogue(SMTP + MAIL + b"DATA\r\n" + RELAY + b"DATA\r\nbody\r\n.\r\nRSET\r\nQUIT\r\n"),
    "encapsulations": Dialogue(
        SMTP + MAIL
        + b"".join(
            f"RCPT TO:<{address}>\r\n".encode()
            for address in ("a%b@example.test", "b!a@example.test", "@x.test:a@example.test",
                            '"a@b"@example.test', "a@b@example.test", "a@example.test.", "a@[192.0.2.1]",
                            "IMCEASMTP-a+40b+2Etest@example.test")
        )
        + b"DATA\r\nQUIT\r\n"
    ),
    "pipeline-bound": Dialogue(SMTP + MAIL + RCPT + b"NOOP\r\n" * 40 + b"DATA\r\nbody" + END + b"QUIT\r\n",
                               env={"max_pipeline": "4"}),
    "sequence-errors": Dialogue(SMTP + RCPT + b"DATA\r\n" + MAIL + MAIL + b"RSET x\r\nVRFY\r\nHELP\r\nQUIT\r\n"),
    "rset-and-ehlo-mid-transaction": Dialogue(
        SMTP + MAIL + RCPT + b"RSET\r\n" + MAIL + RCPT + SMTP + txn(b"after") + b"QUIT\r\n"
    ),
}


def run(dialogue: Dialogue, chunks: list[bytes]) -> Digest:
    session = make_session(smtp_settings(**dialogue.env), received_header=dialogue.received_header)
    driver = Driver(session, script=dialogue.script)
    driver.feed_chunks(chunks)
    assert driver.lost == 0
    return digest(driver)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({min(point, len(data)) for point in points})
    return [data[start:end] for start, end in zip([0, *points], [*points, len(data)], strict=True)]


@pytest.mark.parametrize("name", DIALOGUES)
def test_one_byte_at_a_time_is_one_chunk(name: str) -> None:
    dialogue = DIALOGUES[name]
    whole = run(dialogue, [dialogue.data])
    assert whole.output.startswith(b"220 ") and whole.closed
    assert run(dialogue, [dialogue.data[i : i + 1] for i in range(len(dialogue.data))]) == whole


@pytest.mark.parametrize("name", [name for name, dialogue in DIALOGUES.items() if len(dialogue.data) <= 2500])
def test_two_chunks_at_every_point_are_one_chunk(name: str) -> None:
    dialogue = DIALOGUES[name]
    whole = run(dialogue, [dialogue.data])
    for point in range(1, len(dialogue.data)):
        assert run(dialogue, cut(dialogue.data, [point])) == whole, point


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(DIALOGUES)), st.lists(st.integers(0, 4000), max_size=12))
def test_random_chunkings_are_one_chunk(name: str, points: list[int]) -> None:
    dialogue = DIALOGUES[name]
    assert run(dialogue, cut(dialogue.data, points)) == run(dialogue, [dialogue.data])


@pytest.mark.parametrize("name", [name for name in DIALOGUES if name.startswith("smuggling-")])
def test_smuggled_commands_never_reach_the_backend(name: str) -> None:
    dialogue = DIALOGUES[name]
    for chunks in ([dialogue.data], [dialogue.data[i : i + 1] for i in range(len(dialogue.data))]):
        session = make_session(smtp_settings(**dialogue.env), received_header=dialogue.received_header)
        driver = Driver(session, script=dialogue.script)
        driver.feed_chunks(chunks)
        assert not any(b"evil@far.test" in command for command in driver.commands())
        assert driver.aborts, "the smuggling body was refused, so its backend connection is dropped"


# -- generated bodies ----------------------------------------------------------------------------

BODY_TOKENS = [b"a", b"word ", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n", b"\r\n.\r\n", b"\r\n..\r\n",
               b"\n.\r\n", b"\r.\r\n", b"\x00", b"\xff", b"RSET\r\n", b"x" * 300]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(BODY_TOKENS), max_size=40), st.lists(st.integers(0, 10_000), max_size=10))
@example([b"x" * 300] * 4, [])  # a body line over the length limit
def test_generated_bodies_any_chunking(tokens: list[bytes], points: list[int]) -> None:
    data = SMTP + MAIL + RCPT + b"DATA\r\n" + b"".join(tokens) + END + txn(b"next") + b"QUIT\r\n"
    dialogue = Dialogue(data, env={"max_body_line_length": "1000"})
    whole = run(dialogue, [data])
    assert run(dialogue, cut(data, points)) == whole
    assert whole.closed  # the real end marker was found, the next transaction and QUIT ran


@pytest.mark.parametrize(
    "body",
    [b"x" * 200 + b"\ny", b"x" * 1500],
    ids=["too-big-then-bare-lf", "too-big-then-long-line"],
)
def test_body_refusal_reason_does_not_depend_on_chunking(body: bytes) -> None:
    data = SMTP + txn(body) + b"QUIT\r\n"
    dialogue = Dialogue(data, env={"max_message_size": "100", "max_body_line_length": "1000"})
    whole = run(dialogue, [data])
    assert run(dialogue, [data[i : i + 1] for i in range(len(data))]) == whole
