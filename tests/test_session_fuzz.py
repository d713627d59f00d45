"""Fuzzing the session core and the backend reply parser (design.md §5).

Any input gives replies and events, or closes the session; never an exception. On the way, the
invariants that keep client and backend in step are checked: well-formed replies to the client,
one well-formed line per command to the backend, no command inside an open body, every message
the backend is asked to accept ending at its one and only CRLF.CRLF with no bare CR or LF, every
client 250 for a message matching a backend 250, and no reply owed forever.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeproxy.smtp import events as ev
from edgeproxy.smtp.replyparser import ReplyError, ReplyParser
from tests.session_driver import END, MAIL, RCPT, RCPT2, RELAY, SMTP, Driver, make_session, well_formed
from tests.session_driver import settings as smtp_settings

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONFIG = smtp_settings(max_message_size="2000", max_recipients="4", max_errors="12")

TOKENS = [
    SMTP, b"HELO c\r\n", MAIL, b"MAIL FROM:<>\r\n", RCPT, RCPT2, RELAY, b"RCPT TO:<a%b@example.test>\r\n",
    b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"VRFY x\r\n", b"EXPN x\r\n", b"BDAT 5 LAST\r\n",
    b"MAIL FROM:<a@b.test> SIZE=99999\r\n", b".\r\n", b"..\r\n", END, b"\r\n", b"\r", b"\n", b"\n.\r\n",
    b"\r.\r\n", b"\x00", b"\xc3\xbc", b"x" * 600, b"body text\r\n",
]
BODY_TOKENS = [b"text", b".", b"..", b"\r\n", b"\r", b"\n", b"\r\n.", b".\r\n", b"\n.\r\n", b"\r.\r\n",
               b"\r\n.\n", b"RSET\r\n", b"\x00\xff", b"y" * 1200]
RCPTS = [RCPT, RCPT2, RELAY, b"RCPT TO:<a%b@example.test>\r\n", b"RCPT TO:<u@example.test> NOTIFY=NEVER\r\n",
         b"RCPT TO:<>\r\n"]
# Mostly-valid transactions, so that bodies, pipelining and final replies are reached.
TRANSACTIONS = st.builds(
    lambda mail, rcpts, body: mail + b"".join(rcpts) + b"DATA\r\n" + b"".join(body) + END,
    st.sampled_from([MAIL, b"MAIL FROM:<>\r\n", b"MAIL FROM:<a@b.test> SIZE=10\r\n"]),
    st.lists(st.sampled_from(RCPTS), max_size=5),
    st.lists(st.sampled_from(BODY_TOKENS), max_size=8),
)
CHUNKS = st.one_of(st.binary(max_size=80), st.sampled_from(TOKENS), TRANSACTIONS)
COMMAND_LINE = re.compile(rb"[^\r\n\x00]*\r\n")

# Backend answers per kind, including refusals and the 421 of a backend going away.
ANSWERS = {
    ev.Command.MAIL: [(250, b"250 2.1.0 ok\r\n"), (451, b"451 4.3.0 later\r\n"), (550, b"550 5.7.1 no\r\n"),
              (421, b"421 4.3.2 bye\r\n")],
    ev.Command.RCPT: [(250, b"250 2.1.5 ok\r\n"), (450, b"450 4.2.0 busy\r\n"), (550, b"550 5.1.1 unknown\r\n"),
              (503, b"503 5.5.1 sequence\r\n"), (421, b"421 4.3.2 bye\r\n")],
    ev.Command.DATA: [(354, b"354 go\r\n"), (554, b"554 5.5.1 no recipients\r\n"), (451, b"451 4.3.0 later\r\n"),
              (421, b"421 4.3.2 bye\r\n")],
    ev.Command.END: [(250, b"250 2.0.0 queued\r\n"), (451, b"451 4.3.0 later\r\n"), (554, b"554 5.7.0 spam\r\n"),
             (421, b"421 4.3.2 bye\r\n")],
    ev.Command.RSET: [(250, b"250 2.0.0 ok\r\n")],
    ev.Command.EXPN: [(250, b"250 2.1.5 list\r\n"), (502, b"502 5.5.1 no\r\n")],
    ev.Command.ETRN: [(250, b"250 2.0.0 ok\r\n")],
}

OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("feed"), CHUNKS),
        st.tuples(st.just("answer"), st.integers(0, 4)),
        st.tuples(st.just("fail"), st.none()),
    ),
    max_size=30,
)


def new_driver(auto: bool = True, hello: bytes = SMTP) -> Driver:
    driver = Driver(make_session(CONFIG, received_header=True, enable_expn=True), auto=auto)
    driver.feed(hello)
    return driver


def check_invariants(driver: Driver) -> None:
    assert driver.output.startswith(b"220 ")
    assert well_formed(bytes(driver.output)), bytes(driver.output)
    assert driver.lost_at_abort == 0, "an abort left replies owed by a dropped backend"
    for connection in driver.connections:
        check_connection(connection)
    delivered = [event for event in driver.ended if event.delivered]
    assert len(delivered) == sum(1 for kind, code in driver.answers if kind == ev.Command.END and 200 <= code < 300)


def check_connection(sends: list[ev.BackendSend]) -> None:
    """One backend connection's traffic: well-formed commands, bodies only after DATA and
    closed by their one end marker before any further command."""
    body: bytearray | None = None  # the message being sent, once DATA was
    after_data = False
    for send in sends:
        if send.command in (ev.Command.BODY, ev.Command.END):
            assert after_data or body is not None, f"body bytes without DATA: {send}"
            body = bytearray() if body is None else body
            body += send.data
            if send.command == ev.Command.END:
                check_message(bytes(body))
                body, after_data = None, False
            continue
        assert body is None, f"command {send.data!r} inside an open body"
        assert COMMAND_LINE.fullmatch(send.data), send.data
        after_data = send.command == ev.Command.DATA


def check_message(message: bytes) -> None:
    """What the backend is asked to accept: one CRLF.CRLF, at the end, no bare CR or LF."""
    framed = b"\r\n" + message  # the DATA line's CRLF starts the first body line
    assert framed.endswith(b"\r\n.\r\n"), message
    assert framed.find(b"\r\n.\r\n") == len(framed) - 5, message
    assert framed.count(b"\r") == framed.count(b"\n") == framed.count(b"\r\n"), message


def answer(driver: Driver, choice: int) -> None:
    kind = driver.pending[0].command
    options = ANSWERS[kind]
    code, raw = options[choice % len(options)]
    driver.answer(reply=(code, raw))
    if code == 421:  # the backend said goodbye: its connection goes next
        driver.fail_backend()


def settle(driver: Driver) -> None:
    """Let the backend answer everything still owed, as a healthy one would."""
    driver.auto = True
    driver.pump()


@FUZZ
@given(st.binary(max_size=3000))
def test_any_bytes_in_one_chunk(data: bytes) -> None:
    driver = new_driver(hello=b"")
    driver.feed(data)
    check_invariants(driver)
    assert driver.session.closed or driver.session.output_complete


@FUZZ
@given(st.binary(max_size=2000))
def test_any_bytes_after_ehlo_and_a_transaction_start(data: bytes) -> None:
    driver = new_driver()
    driver.feed(SMTP + MAIL + RCPT + b"DATA\r\n" + data)
    driver.feed(END + b"QUIT\r\n")
    check_invariants(driver)
    assert driver.session.closed or driver.session.output_complete


@FUZZ
@given(st.lists(CHUNKS, max_size=40))
def test_any_sequence_of_writes(chunks: list[bytes]) -> None:
    driver = new_driver()
    for chunk in chunks:
        driver.feed(chunk)
        check_invariants(driver)
    assert driver.session.closed or driver.session.output_complete


@FUZZ
@given(OPERATIONS, st.booleans())
def test_any_interleaving_of_client_backend_and_failures(operations: list[tuple[str, object]], vanish: bool) -> None:
    driver = new_driver(auto=False)
    for operation, argument in operations:
        if operation == "feed":
            assert isinstance(argument, bytes)
            driver.feed(argument)
        elif operation == "answer" and driver.pending:
            assert isinstance(argument, int)
            answer(driver, argument)
        elif operation == "fail" and (driver.pending or driver.session.in_transaction):
            driver.fail_backend()
        check_invariants(driver)
    if vanish:
        driver.lose_client()
    settle(driver)
    check_invariants(driver)
    if not vanish:
        assert driver.session.closed or driver.session.output_complete, "a reply is owed forever"


# -- the backend reply parser --------------------------------------------------------------------

REPLY_LINES = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda code, sep, text, end: b"%d%s%s%s" % (code, sep, text, end),
        st.integers(100, 700),
        st.sampled_from([b" ", b"-", b"", b"x"]),
        st.binary(max_size=20).filter(lambda text: b"\n" not in text),
        st.sampled_from([b"\r\n", b"\n", b"\r", b""]),
    ),
)


def parse_all(chunks: list[bytes]) -> list[tuple[int, bytes]] | None:
    """Every reply, or None when the parser refused the stream (with ReplyError only)."""
    parser = ReplyParser()
    replies = []
    try:
        for chunk in chunks:
            replies.extend(parser.feed(chunk))
    except ReplyError:
        return None
    return replies


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=500))
def test_reply_parser_on_arbitrary_bytes(data: bytes) -> None:
    replies = parse_all([data])
    for code, raw in replies or []:
        assert 200 <= code <= 599
        assert raw.endswith(b"\r\n")
        assert all(line.startswith(b"%d" % code) for line in raw.splitlines())


@settings(max_examples=300, deadline=None)
@given(st.lists(REPLY_LINES, max_size=12), st.lists(st.integers(0, 600), max_size=6))
def test_reply_parser_any_chunking(lines: list[bytes], points: list[int]) -> None:
    data = b"".join(lines)
    cuts = sorted({min(point, len(data)) for point in points})
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    whole = parse_all([data])
    chunked = parse_all(chunks)
    if whole is not None and chunked is not None:
        assert chunked == whole
    for code, raw in whole or []:
        assert 200 <= code <= 599 and raw.endswith(b"\r\n")


def test_reply_parser_rejects_what_is_no_reply() -> None:
    for bad in (b"hello\r\n", b"199 x\r\n", b"600 x\r\n", b"250-a\r\n251 b\r\n", b"250x\r\n",
                b"2" * 5000, b"250-a\r\n" * 300):
        assert parse_all([bad]) is None, bad


def test_reply_parser_keeps_multi_line_replies_whole() -> None:
    assert parse_all([b"250-a\r\n250-b\n", b"250 c\r\n354 go\r\n"]) == [
        (250, b"250-a\r\n250-b\r\n250 c\r\n"),
        (354, b"354 go\r\n"),
    ]


def test_reply_parser_never_yields_a_bare_cr() -> None:
    replies = parse_all([b"250 2.0.0 queued\rinjected\r\n"])
    assert replies is None or all(raw.count(b"\r") == raw.count(b"\r\n") for _, raw in replies)


# -- addresses: whatever the client writes, no relay for a stranger ---------------------------------

ADDRESS_TEXT = st.lists(
    st.sampled_from([*'abXY09.@%!"\\:,[]<> -_+=/;', "ü", "ß", "\u200b", "．", "＠", "IMCEA", "IMCEASMTP-"]),
    max_size=20,
).map("".join)
ADDRESSES = st.builds(
    lambda text, tail: text + tail,
    ADDRESS_TEXT,
    st.sampled_from(["", "@example.test", "@EXAMPLE.test", "@far.test", "@[192.0.2.1]", "@example.test.",
                     "@example.test@", "@far.test@example.test", "@bücher.test"]),
)
IMCEA = re.compile(r"IMCEA[A-Z0-9]*-", re.IGNORECASE)
FORWARDED_RCPT = re.compile(rb"RCPT TO:<([^\r\n]*)>( [A-Z0-9-]+(=[^ \r\n]+)?)*\r\n")


@FUZZ
@given(ADDRESSES, st.sampled_from(["", " NOTIFY=NEVER", " SMTPUTF8", " x=y"]), st.booleans())
def test_a_stranger_never_gets_a_foreign_recipient_forwarded(address: str, params: str, utf8: bool) -> None:
    driver = new_driver()
    driver.feed(b"MAIL FROM:<a@b.test>" + (b" SMTPUTF8" if utf8 else b"") + b"\r\n")
    driver.feed(f"RCPT TO:<{address}>{params}\r\n".encode())
    driver.feed(f"MAIL FROM:<{address}>{params}\r\n".encode())
    check_invariants(driver)
    for line in driver.commands(ev.Command.RCPT):
        match = FORWARDED_RCPT.fullmatch(line)
        assert match, line
        forwarded = match.group(1).decode()
        if forwarded.lower() == "postmaster":
            continue
        local, _, domain = forwarded.rpartition("@")
        assert domain == "example.test", (address, forwarded)
        assert not set(local) & set("@%!"), (address, forwarded)
        assert not IMCEA.match(local), (address, forwarded)
