"""The sans-IO core on its own: same replies and backend traffic however the input is chunked,
and no input makes it raise.

The backend here is a script answering each command the core sends (250, 354 for DATA): a
stand-in for a server where the test is about the core's own bookkeeping.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeproxy.config import Settings
from edgeproxy.policy import Policy
from edgeproxy.smtp import events as ev
from edgeproxy.smtp import replies as r
from edgeproxy.smtp.capabilities import Capabilities
from edgeproxy.smtp.replyparser import ReplyError, ReplyParser
from edgeproxy.smtp.session import SessionLimits, SmtpSession

SETTINGS = Settings.from_env({"EDGEPROXY_MAX_RECIPIENTS": "3", "EDGEPROXY_MAX_ERRORS": "8",
                              "EDGEPROXY_HOSTNAME": "proxy.test"})
POLICY = Policy(SETTINGS)
LIMITS = SessionLimits("proxy.test", 512, 1000, SETTINGS.max_errors, True, False, False)
CAPABILITIES = Capabilities.negotiate(100_000, ["PIPELINING", "8BITMIME", "SMTPUTF8"])
BACKEND_ANSWERS = {ev.Command.MAIL: (250, b"250 2.1.0 Ok\r\n"), ev.Command.RCPT: (250, b"250 2.1.5 Ok\r\n"),
                   ev.Command.DATA: (354, b"354 Go\r\n"), ev.Command.END: (250, b"250 2.0.0 Queued\r\n"),
                   ev.Command.RSET: (250, b"250 2.0.0 Ok\r\n")}


def run(chunks: list[bytes]) -> tuple[bytes, bytes, list[object], list[object]]:
    """Feed ``chunks``; return client output, the backend's byte stream, the commands sent to it,
    and the outcomes reported (refusals, aborts, ended transactions)."""
    session = SmtpSession(LIMITS, POLICY, CAPABILITIES, "192.0.2.1", 0, "test", clock=lambda: 0.0)
    output = [session.greeting()]
    backend: list[bytes] = []
    body: list[bytes] = []
    commands: list[object] = []
    digest: list[object] = []
    for chunk in chunks:
        session.receive_data(chunk)
        events = session.take_events()
        while events:
            replies = []
            for event in events:
                if isinstance(event, ev.BackendSend):
                    # Body bytes count once the end marker went out: an aborted body never became
                    # a message, however much of it was streamed before the abort.
                    if event.command in (ev.Command.BODY, ev.Command.END):
                        body.append(event.data)
                    else:
                        backend.append(event.data)
                    if event.command == ev.Command.END:
                        backend.extend(body)
                        body.clear()
                    if event.command.expects_reply:
                        commands.append(event.command)
                        replies.append(BACKEND_ANSWERS[event.command])
                elif isinstance(event, ev.Refused):
                    digest.append(("refused", event.rule))
                elif isinstance(event, ev.BackendAbort):
                    digest.append("abort")
                    body.clear()
                elif isinstance(event, ev.TransactionEnded):
                    digest.append(("ended", event.delivered, event.recipients, event.size))
            for code, raw in replies:
                session.backend_reply(code, raw)
            events = session.take_events()
        output.append(session.take_output())
        if session.closed and session.output_complete:
            break
    return b"".join(output), b"".join(backend), commands, digest


DIALOGUES = {
    "transaction": b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n"
                   b"Subject: x\r\n\r\n..dot\r\nline\r\n.\r\nQUIT\r\n",
    "pipelined-with-relay": b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\nRCPT TO:<x@far.test>\r\n"
                            b"RCPT TO:<v@example.test>\r\nDATA\r\nbody\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<w@example.test>"
                            b"\r\nDATA\r\nsecond\r\n.\r\nQUIT\r\n",
    "smuggling": b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\nx\n.\r\n"
                 b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<v@example.test>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n",
    "bare-cr": b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\nx\r.\r\ny\r\n.\r\nQUIT\r\n",
    "long-line": b"EHLO c\r\nNOOP " + b"a" * 700 + b"\r\nNOOP\r\nQUIT\r\n",
    "body-too-big": b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n"
                    + b"0123456789" * 11000 + b"\r\n.\r\nQUIT\r\n",
    "recipient-flood": b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n" + b"RCPT TO:<u@example.test>\r\n" * 5 + b"QUIT\r\n",
    "errors": b"EHLO c\r\n" + b"BOGUS\r\n" * 10,
    "data-without-rcpt": b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@far.test>\r\nDATA\r\nRSET\r\nQUIT\r\n",
    "bare-lf-command": b"EHLO c\nNOOP\r\nQUIT\r\n",
    "rset-mid-transaction": b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\nRSET\r\nQUIT\r\n",
}


@pytest.mark.parametrize("name", DIALOGUES)
def test_one_chunk_and_one_byte_at_a_time_agree(name: str) -> None:
    data = DIALOGUES[name]
    whole = run([data])
    assert run([data[i : i + 1] for i in range(len(data))]) == whole
    assert whole[0].endswith((r.CLOSING.encode(), r.TOO_MANY_ERRORS.encode()))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(DIALOGUES)), st.lists(st.integers(0, 2000), max_size=8))
def test_any_chunking_agrees(name: str, cuts: list[int]) -> None:
    data = DIALOGUES[name]
    points = sorted({min(cut, len(data)) for cut in cuts})
    chunks = [data[start:end] for start, end in zip([0, *points], [*points, len(data)], strict=True)]
    assert run(chunks) == run([data])


def test_smuggled_commands_never_reach_the_backend_as_commands() -> None:
    output, backend, commands, digest = run([DIALOGUES["smuggling"]])
    assert b"MAIL FROM:<evil@x.test>" not in backend
    assert commands.count(ev.Command.MAIL) == 1 and "abort" in digest
    assert r.BODY_BARE_LINE_END.encode() in output


REPLY_LINE = re.compile(rb"\d{3}[ -][^\r\n]*\r\n")


def well_formed(output: bytes) -> bool:
    position = 0
    while position < len(output):
        match = REPLY_LINE.match(output, position)
        if match is None:
            return False
        position = match.end()
    return True


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=64), st.sampled_from(
    [b"EHLO x\r\n", b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<u@example.test>\r\n", b"DATA\r\n", b".\r\n",
     b"\r\n", b"\n", b"\r", b"RSET\r\n", b"RCPT TO:<x%y@example.test>\r\n", b"BDAT 10\r\n", b"\x00"])),
    max_size=20))
def test_fuzzed_input_gives_replies_never_an_exception(chunks: list[bytes]) -> None:
    output, _, _, _ = run(chunks)
    assert output.startswith(b"220 ")
    assert well_formed(output)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_reply_parser_gives_replies_or_a_reply_error(data: bytes) -> None:
    parser = ReplyParser()
    try:
        for code, raw in parser.feed(data):
            assert 200 <= code <= 599 and raw.endswith(b"\r\n")
    except ReplyError:
        pass
