"""The SMTP session core (design.md §2, §3), driven sans-IO: the test is the client and a fake
backend (tests/session_driver.py) answers what the core forwards.

Replies are compared with the constants of ``edgeproxy.smtp.replies`` and with
``settings.replies`` for the configurable policy replies; the backend's answers carry texts of
their own, so a test can tell a relayed backend reply from one the proxy made up.
"""

from __future__ import annotations

import pytest

from edgeproxy import fastpath_common as fc
from edgeproxy.smtp import events as ev
from edgeproxy.smtp import replies as r
from tests.session_driver import (
    DATA_GO,
    END,
    EXPN_OK,
    FULL_BACKEND,
    HOSTNAME,
    MAIL,
    QUEUED,
    RCPT,
    RCPT2,
    RCPT_OK,
    RELAY,
    SMTP,
    Driver,
    make_session,
    settings,
    split_replies,
    started,
)

BODY = b"Subject: test\r\n\r\nHello.\r\n..a stuffed dot\r\nbye"
DEFAULTS = settings()
RELAY_DENIED = DEFAULTS.replies["RELAY_DENIED"].encode()


def transaction(body: bytes = BODY, mail: bytes = MAIL, rcpts: bytes = RCPT) -> bytes:
    return mail + rcpts + b"DATA\r\n" + body + END


def ehlo_keywords(output: bytes) -> list[str]:
    (reply,) = split_replies(output)
    lines = [line[4:].decode() for line in reply.splitlines()]
    assert lines[0] == HOSTNAME
    return lines[1:]


# -- the greeting and the session commands ----------------------------------------------------


def test_greeting_names_the_host() -> None:
    session = make_session()
    assert session.greeting() == f"220 {HOSTNAME} ESMTP edgeproxy\r\n".encode()


def test_a_full_transaction_goes_to_the_backend_and_its_replies_come_back() -> None:
    driver = started()
    assert driver.feed(MAIL) == r.SENDER_OK.encode()
    assert driver.sent == []  # nothing for the backend until a recipient passes policy
    assert driver.feed(RCPT) == RCPT_OK[1]
    assert driver.feed(b"DATA\r\n") == DATA_GO[1]
    assert driver.feed(BODY + END) == QUEUED[1]
    assert driver.commands() == [b"MAIL FROM:<sender@remote.test>\r\n", b"RCPT TO:<user@example.test>\r\n",
                                 b"DATA\r\n"]
    assert driver.messages() == [BODY + END]  # dot-stuffing is the backend's to undo, as sent
    assert [(e.delivered, e.recipients, e.size, e.reply_code) for e in driver.ended] == [
        (True, 1, len(BODY) + 2, 250)
    ]
    assert not driver.session.in_transaction
    assert driver.feed(b"QUIT\r\n") == r.CLOSING.encode()


def test_several_transactions_per_session() -> None:
    driver = started()
    for number in range(3):
        output = driver.feed(transaction(body=f"message {number}".encode()))
        assert split_replies(output) == [r.SENDER_OK.encode(), RCPT_OK[1], DATA_GO[1], QUEUED[1]]
    assert driver.commands(ev.Command.MAIL) == [MAIL] * 3
    assert driver.messages() == [f"message {number}".encode() + END for number in range(3)]
    assert [event.delivered for event in driver.ended] == [True] * 3
    assert driver.session.stats.messages == 3


def test_helo_gets_a_plain_reply_and_no_extensions() -> None:
    driver = Driver()
    assert driver.feed(b"HELO client.test\r\n") == f"250 {HOSTNAME}\r\n".encode()
    assert not driver.session.esmtp
    assert driver.feed(b"MAIL FROM:<a@remote.test> SIZE=10\r\n") == r.PARAMETER_UNRECOGNIZED.encode()
    assert driver.feed(b"MAIL FROM:<a@remote.test>\r\n") == r.SENDER_OK.encode()


def test_helo_needs_a_domain() -> None:
    assert Driver().feed(b"EHLO\r\n") == r.HELO_NEEDS_DOMAIN.encode()


FULL_SIZE = DEFAULTS.max_message_size


@pytest.mark.parametrize(
    ("backend", "size", "extras"),
    [
        (FULL_BACKEND, FULL_SIZE, ["8BITMIME", "SMTPUTF8", "DSN"]),
        (("PIPELINING", "8BITMIME"), FULL_SIZE, ["8BITMIME"]),
        (("SMTPUTF8",), FULL_SIZE, ["SMTPUTF8"]),
        (("DSN", "SIZE 1000"), 1000, ["DSN"]),  # the smaller limit is offered
        ((), FULL_SIZE, []),
        (None, FULL_SIZE, []),  # backend not probed yet: the safe minimum
    ],
    ids=["full", "8bitmime", "smtputf8", "dsn", "bare", "unprobed"],
)
def test_ehlo_offers_what_proxy_and_backend_both_support(
    backend: tuple[str, ...] | None, size: int, extras: list[str]
) -> None:
    driver = Driver(make_session(backend_ehlo=backend))
    keywords = ehlo_keywords(driver.feed(SMTP))
    assert "PIPELINING" in keywords and "ENHANCEDSTATUSCODES" in keywords
    assert f"SIZE {size}" in keywords
    assert [k for k in keywords if k in ("8BITMIME", "SMTPUTF8", "DSN")] == extras
    assert not {"STARTTLS", "AUTH", "CHUNKING"} & {k.split()[0] for k in keywords}
    assert driver.session.esmtp


def test_rset_mid_transaction_resets_the_backend_too() -> None:
    driver = started()
    driver.feed(MAIL + RCPT)
    assert driver.feed(b"RSET\r\n") == r.RESET_OK.encode()
    assert driver.kinds() == [ev.Command.MAIL, ev.Command.RCPT, ev.Command.RSET]
    assert not driver.session.in_transaction
    assert driver.feed(MAIL) == r.SENDER_OK.encode()  # not a nested MAIL


def test_rset_before_anything_was_forwarded_costs_the_backend_nothing() -> None:
    driver = started()
    assert driver.feed(MAIL + b"RSET\r\n") == r.SENDER_OK.encode() + r.RESET_OK.encode()
    assert driver.sent == []


def test_ehlo_mid_transaction_abandons_it() -> None:
    driver = started()
    driver.feed(MAIL + RCPT)
    ehlo_keywords(driver.feed(SMTP))
    assert driver.kinds() == [ev.Command.MAIL, ev.Command.RCPT, ev.Command.RSET]
    assert driver.feed(b"DATA\r\n") == r.NEED_MAIL_BEFORE_DATA.encode()


def test_noop() -> None:
    assert started().feed(b"NOOP\r\n") == r.OK.encode()


def test_quit_replies_221_then_closes() -> None:
    driver = started()
    assert driver.feed(b"QUIT\r\n") == r.CLOSING.encode()
    assert driver.session.closed and driver.session.output_complete
    assert driver.feed(b"NOOP\r\n") == b""


def test_quit_waits_for_the_replies_owed_before_it() -> None:
    driver = started(auto=False)
    assert driver.feed(MAIL + RCPT + b"QUIT\r\n") == r.SENDER_OK.encode()
    assert driver.session.closed and not driver.session.output_complete
    assert driver.answer(2) == RCPT_OK[1] + r.CLOSING.encode()
    assert driver.session.output_complete


def test_help() -> None:
    assert started().feed(b"HELP\r\n") == r.HELP.encode()


def test_vrfy_is_answered_252_without_asking_anyone() -> None:
    driver = started()
    assert driver.feed(b"VRFY user@example.test\r\n") == r.VRFY_CANNOT.encode()
    assert r.VRFY_CANNOT.code == 252
    assert driver.feed(b"VRFY\r\n") == r.SYNTAX_ERROR.encode()
    assert driver.sent == []


@pytest.mark.parametrize("command", [b"EXPN staff\r\n", b"ETRN example.test\r\n", b"TURN\r\n"])
def test_expn_etrn_turn_are_not_implemented_by_default(command: bytes) -> None:
    driver = started()
    assert driver.feed(command) == r.NOT_IMPLEMENTED.encode()
    assert r.NOT_IMPLEMENTED.code == 502
    assert driver.sent == []


def test_expn_when_enabled_is_passed_to_the_backend() -> None:
    driver = started(make_session(enable_expn=True))
    assert driver.feed(b"EXPN staff\r\n") == EXPN_OK[1]
    assert driver.commands() == [b"EXPN staff\r\n"]
    driver.feed(MAIL)
    assert driver.feed(b"EXPN staff\r\n") == r.BAD_SEQUENCE.encode()


@pytest.mark.parametrize("command", [b"STARTTLS\r\n", b"AUTH PLAIN AGFiYwBkZWY=\r\n", b"BDAT 10 LAST\r\n"])
def test_commands_not_offered_are_refused(command: bytes) -> None:
    assert started().feed(command) == r.NOT_IMPLEMENTED.encode()


def test_unknown_verb() -> None:
    driver = started()
    assert driver.feed(b"XYZZY plugh\r\n") == r.UNRECOGNIZED.encode()
    assert (r.UNRECOGNIZED.code, r.UNRECOGNIZED.enhanced) == (500, "5.5.2")
    assert driver.feed(b"\r\n") == r.UNRECOGNIZED.encode()


# -- sequence errors ----------------------------------------------------------------------------


def test_mail_before_helo() -> None:
    driver = Driver()
    assert driver.feed(MAIL) == r.NEED_HELO.encode()
    assert r.NEED_HELO.code == 503


def test_rcpt_before_mail() -> None:
    driver = started()
    assert driver.feed(RCPT) == r.NEED_MAIL.encode()
    assert r.NEED_MAIL.code == 503
    assert driver.sent == []


def test_nested_mail() -> None:
    driver = started()
    driver.feed(MAIL)
    assert driver.feed(MAIL) == r.NESTED_MAIL.encode()
    assert r.NESTED_MAIL.code == 503


def test_data_before_mail_names_mail_before_data() -> None:
    # Found in review: it used to answer with the RCPT sequence error's text.
    assert started().feed(b"DATA\r\n") == r.NEED_MAIL_BEFORE_DATA.encode()


def test_data_with_no_recipient_is_503_and_reads_no_body() -> None:
    driver = started()
    output = driver.feed(MAIL + b"DATA\r\nRSET\r\n")
    assert split_replies(output) == [r.SENDER_OK.encode(), r.NO_VALID_RECIPIENTS.encode(), r.RESET_OK.encode()]
    assert (r.NO_VALID_RECIPIENTS.code, r.NO_VALID_RECIPIENTS.enhanced) == (503, "5.5.1")
    assert driver.sent == []
    assert not driver.session.in_data


def test_data_after_only_refused_recipients_is_554_and_costs_the_backend_nothing() -> None:
    driver = started()
    output = driver.feed(MAIL + RELAY + b"RCPT TO:<x@elsewhere.test>\r\nDATA\r\nbody\r\n.\r\nQUIT\r\n")
    assert split_replies(output) == [
        r.SENDER_OK.encode(),
        RELAY_DENIED,
        RELAY_DENIED,
        r.NO_VALID_RECIPIENTS_AFTER_REJECTS.encode(),
        r.UNRECOGNIZED.encode(),  # "body": the bytes after a refused DATA are commands
        r.UNRECOGNIZED.encode(),  # "."
        r.CLOSING.encode(),
    ]
    assert (r.NO_VALID_RECIPIENTS_AFTER_REJECTS.code, r.NO_VALID_RECIPIENTS_AFTER_REJECTS.enhanced) == (554, "5.5.1")
    assert driver.events and not any(isinstance(event, ev.BackendSend) for event in driver.events)
    assert [event.rule for event in driver.refused] == ["relay_denied", "relay_denied"]


# -- MAIL parameters and size ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [b"MAIL FROM:<a@remote.test> FOO=bar\r\n", b"MAIL FROM:<a@remote.test> XVERP\r\n"],
    ids=["foo", "xverp"],
)
def test_unrecognized_mail_parameter_is_555(command: bytes) -> None:
    driver = started()
    assert driver.feed(command) == r.PARAMETER_UNRECOGNIZED.encode()
    assert r.PARAMETER_UNRECOGNIZED.code == 555
    assert driver.feed(RCPT) == r.NEED_MAIL.encode()


def test_dsn_parameters_are_refused_when_the_backend_lacks_dsn() -> None:
    driver = started(make_session(backend_ehlo=("PIPELINING", "8BITMIME")))
    assert driver.feed(b"MAIL FROM:<a@remote.test> RET=FULL\r\n") == r.PARAMETER_UNRECOGNIZED.encode()
    driver.feed(MAIL)
    assert driver.feed(b"RCPT TO:<u@example.test> NOTIFY=NEVER\r\n") == r.PARAMETER_UNRECOGNIZED.encode()
    assert driver.sent == []


def test_known_parameters_are_forwarded() -> None:
    driver = started()
    driver.feed(b"MAIL FROM:<a@remote.test> SIZE=100 BODY=8BITMIME RET=HDRS\r\n")
    driver.feed(b"RCPT TO:<u@example.test> NOTIFY=SUCCESS,FAILURE\r\n")
    assert driver.commands() == [
        b"MAIL FROM:<a@remote.test> SIZE=100 BODY=8BITMIME RET=HDRS\r\n",
        b"RCPT TO:<u@example.test> NOTIFY=SUCCESS,FAILURE\r\n",
    ]


def test_size_over_the_limit_is_refused_at_mail() -> None:
    config = settings(max_message_size="1000")
    driver = started(make_session(config))
    assert driver.feed(b"MAIL FROM:<a@remote.test> SIZE=1001\r\n") == config.replies["MESSAGE_TOO_BIG"].encode()
    assert [event.rule for event in driver.refused] == ["message_too_big"]
    assert driver.feed(b"MAIL FROM:<a@remote.test> SIZE=1000\r\n") == r.SENDER_OK.encode()
    assert driver.sent == []


def test_backend_size_limit_below_ours_applies_at_mail() -> None:
    driver = started(make_session(backend_ehlo=("PIPELINING", "SIZE 500")))
    assert driver.feed(b"MAIL FROM:<a@remote.test> SIZE=501\r\n") == DEFAULTS.replies["MESSAGE_TOO_BIG"].encode()


def test_body_over_the_size_limit_is_refused_after_its_end_and_the_backend_aborted() -> None:
    config = settings(max_message_size="1000")
    driver = started(make_session(config))
    body = b"x" * 80 + b"\r\n"
    output = driver.feed(transaction(body=body * 20) + b"NOOP\r\n")
    assert split_replies(output) == [
        r.SENDER_OK.encode(),
        RCPT_OK[1],
        DATA_GO[1],
        config.replies["MESSAGE_TOO_BIG"].encode(),
        r.OK.encode(),
    ]
    assert len(driver.aborts) == 1
    assert ev.Command.END not in driver.kinds()
    assert [event.rule for event in driver.refused] == ["message_too_big"]
    assert [event.delivered for event in driver.ended] == [False]


def test_body_exactly_at_the_size_limit_is_delivered() -> None:
    config = settings(max_message_size="1000")
    driver = started(make_session(config))
    body = b"y" * 998 + b"\r\n"
    assert driver.feed(transaction(body=body[:-2])).endswith(QUEUED[1])
    assert driver.aborts == []


# -- pipelining -------------------------------------------------------------------------------------


def test_pipelined_group_with_a_relay_rcpt_keeps_command_order() -> None:
    driver = started(auto=False)
    output = driver.feed(MAIL + RCPT + RELAY + RCPT2 + b"DATA\r\n")
    assert output == r.SENDER_OK.encode()  # the rest waits for the backend
    assert driver.commands() == [MAIL, RCPT, RCPT2, b"DATA\r\n"]  # never the relay RCPT
    assert driver.answer() == b""  # MAIL's reply is not the client's
    assert driver.answer() == RCPT_OK[1] + RELAY_DENIED  # the ready prefix only
    assert driver.answer(reply=(550, b"550 5.1.1 backend: no such user\r\n")) == (
        b"550 5.1.1 backend: no such user\r\n"
    )
    assert driver.answer() == DATA_GO[1]
    assert b"far.test" not in driver.backend_bytes


def test_replies_wait_for_the_backend_even_behind_local_ones() -> None:
    driver = started(auto=False)
    output = driver.feed(MAIL + RCPT + b"NOOP\r\nHELP\r\nVRFY x\r\n")
    assert output == r.SENDER_OK.encode()
    assert driver.session.take_output() == b""
    assert driver.answer(2) == RCPT_OK[1] + r.OK.encode() + r.HELP.encode() + r.VRFY_CANNOT.encode()


def test_backend_refusing_mail_gives_every_rcpt_its_mail_reply() -> None:
    refusal = (550, b"550 5.7.1 backend: sender refused\r\n")
    no_mail = (503, b"503 5.5.1 backend: need MAIL first\r\n")
    driver = started(
        auto=True,
        script={(ev.Command.MAIL, 0): refusal, (ev.Command.RCPT, 0): no_mail, (ev.Command.RCPT, 1): no_mail},
    )
    output = driver.feed(MAIL + RCPT + RELAY + RCPT2)
    assert split_replies(output) == [r.SENDER_OK.encode(), refusal[1], RELAY_DENIED, refusal[1]]
    # The next transaction is judged by its own MAIL reply.
    driver.feed(b"RSET\r\n")
    assert driver.feed(MAIL + RCPT) == r.SENDER_OK.encode() + RCPT_OK[1]


def test_the_clients_final_reply_is_the_backends() -> None:
    driver = started(auto=False)
    driver.feed(MAIL + RCPT + b"DATA\r\n")
    driver.answer(3)
    assert driver.feed(BODY + END) == b""  # no 250 of our own making
    assert not driver.session.output_complete
    assert driver.answer() == QUEUED[1]
    assert driver.ended[-1].delivered


@pytest.mark.parametrize(
    "reply",
    [(554, b"554 5.7.0 backend: content rejected\r\n"), (452, b"452 4.3.1 backend: disk full\r\n")],
    ids=["554", "452"],
)
def test_the_backends_final_refusal_reaches_the_client(reply: tuple[int, bytes]) -> None:
    driver = started(script={(ev.Command.END, 0): reply})
    assert driver.feed(transaction()).endswith(reply[1])
    assert [(event.delivered, event.reply_code) for event in driver.ended] == [(False, reply[0])]
    assert driver.session.stats.messages == 0


def test_next_transaction_may_be_pipelined_behind_the_final_reply() -> None:
    driver = started(auto=False)
    driver.feed(MAIL + RCPT + b"DATA\r\n")
    driver.answer(3)
    driver.read()
    assert driver.feed(BODY + END + MAIL + RCPT2) == b""
    assert driver.kinds()[-3:] == [ev.Command.END, ev.Command.MAIL, ev.Command.RCPT]
    assert driver.answer() == QUEUED[1] + r.SENDER_OK.encode()
    assert driver.answer(2) == RCPT_OK[1]


# -- DATA hold-back ---------------------------------------------------------------------------------


def test_bytes_after_data_wait_for_the_backends_354() -> None:
    driver = started(auto=False)
    held = b"RSET\r\nMAIL FROM:<evil@far.test>\r\nRCPT TO:<x@example.test>\r\n" + END
    assert driver.feed(MAIL + RCPT + b"DATA\r\n" + held) == r.SENDER_OK.encode()
    assert driver.kinds() == [ev.Command.MAIL, ev.Command.RCPT, ev.Command.DATA]  # no BODY before the 354
    assert driver.answer(2) == RCPT_OK[1]
    assert driver.kinds() == [ev.Command.MAIL, ev.Command.RCPT, ev.Command.DATA]
    assert driver.answer() == DATA_GO[1]  # and no replies to body lines
    assert driver.messages() == [held]
    assert driver.commands(ev.Command.MAIL) == [MAIL]
    assert driver.answer() == QUEUED[1]


def test_bytes_after_a_refused_data_are_commands() -> None:
    refusal = (554, b"554 5.5.1 backend: no valid recipients\r\n")
    driver = started(auto=False)
    driver.feed(MAIL + RCPT + b"DATA\r\nRSET\r\nNOOP\r\n")
    driver.answer(2)
    assert driver.answer(reply=refusal) == refusal[1] + r.RESET_OK.encode() + r.OK.encode()
    assert ev.Command.BODY not in driver.kinds() and not driver.session.in_data
    assert driver.kinds()[-1] == ev.Command.RSET


def test_a_client_far_ahead_of_data_is_paused() -> None:
    driver = started(auto=False)
    driver.feed(MAIL + RCPT + b"DATA\r\n")
    assert driver.session.wants_input
    driver.feed(b"x" * 70000)
    assert not driver.session.wants_input
    driver.answer(3)
    assert driver.session.wants_input


# -- the rebuilt command lines --------------------------------------------------------------------


def test_backend_receives_commands_built_from_the_parsed_values() -> None:
    config = settings(local_domains="compaq.test", rewrite="dec.test=compaq.test")
    driver = started(make_session(config))
    driver.feed(b"MAIL FROM: <Ken.Olsen@DEC.Test>  size=1234\r\n")
    driver.feed(b"RCPT TO:<Ken@DEC.TEST>\r\n")
    driver.feed(b"rcpt to:<Gordon@Compaq.Test>   \r\n")
    assert driver.commands() == [
        b"MAIL FROM:<Ken.Olsen@dec.test> SIZE=1234\r\n",
        b"RCPT TO:<Ken@compaq.test>\r\n",
        b"RCPT TO:<Gordon@compaq.test>\r\n",
    ]


def test_a_source_route_from_a_client_that_may_relay_is_not_forwarded() -> None:
    driver = started(make_session(grant=fc.GRANT_ALLOW_LIST))
    driver.feed(MAIL + b"RCPT TO:<@hop1.test,@hop2.test:user@example.test>\r\n")
    assert driver.commands(ev.Command.RCPT) == [b"RCPT TO:<user@example.test>\r\n"]


def test_idna_domains_are_forwarded_in_a_label_form() -> None:
    driver = started()
    driver.feed("MAIL FROM:<a@bücher.test>\r\n".encode() + RCPT)
    assert driver.commands(ev.Command.MAIL) == [b"MAIL FROM:<a@xn--bcher-kva.test>\r\n"]


def test_received_header_leads_the_body() -> None:
    driver = started(make_session(received_header=True))
    driver.feed(transaction())
    (message,) = driver.messages()
    header, _, rest = message.partition(b"\r\n\tby ")
    assert header == b"Received: from client.test ([192.0.2.7])"
    assert rest.endswith(BODY + END)
    assert b"for <user@example.test>" in rest


# -- attacks: SMTP smuggling (one test per form) ----------------------------------------------------

SMUGGLED = b"MAIL FROM:<evil@far.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nsmuggled\r\n"


def assert_smuggling_refused(fake_end: bytes, rule: str) -> None:
    """The body carries ``fake_end`` and a second message behind it; only CRLF.CRLF ends it."""
    body = b"Subject: first\r\n\r\nfirst" + fake_end + SMUGGLED
    dialogue = MAIL + RCPT + b"DATA\r\n" + body + END + b"QUIT\r\n"
    marker = dialogue.index(fake_end)
    splits = ([dialogue], [dialogue[:marker], dialogue[marker:]], [dialogue[: marker + 2], dialogue[marker + 2 :]])
    for chunks in splits:
        driver = started()
        output = driver.feed_chunks(chunks)
        assert split_replies(output) == [
            r.SENDER_OK.encode(),
            RCPT_OK[1],
            DATA_GO[1],
            r.BODY_BARE_LINE_END.encode(),
            r.CLOSING.encode(),
        ]
        assert len(driver.aborts) == 1
        assert ev.Command.END not in driver.kinds()
        assert driver.commands(ev.Command.MAIL) == [MAIL]  # no second MAIL ever reaches the backend
        assert b"evil" not in b"".join(driver.commands())
        assert [(e.stage, e.rule) for e in driver.refused] == [("data", rule)]
        assert [event.delivered for event in driver.ended] == [False]


def test_smuggling_lf_dot_crlf() -> None:
    assert_smuggling_refused(b"\n.\r\n", "body_bare_lf")


def test_smuggling_cr_dot_crlf() -> None:
    assert_smuggling_refused(b"\r.\r\n", "body_bare_cr")


def test_smuggling_lf_dot_lf() -> None:
    assert_smuggling_refused(b"\n.\n", "body_bare_lf")


def test_smuggling_crlf_dot_lf() -> None:
    assert_smuggling_refused(b"\r\n.\n", "body_bare_lf")


def test_smuggling_cr_dot_cr() -> None:
    assert_smuggling_refused(b"\r.\r", "body_bare_cr")


def test_smuggling_crlf_dot_cr() -> None:
    assert_smuggling_refused(b"\r\n.\r", "body_bare_cr")


def test_bare_cr_in_body() -> None:
    assert_smuggling_refused(b"\rmore text\r\n", "body_bare_cr")


def test_bare_lf_in_body() -> None:
    assert_smuggling_refused(b"\nmore text\r\n", "body_bare_lf")


def test_stuffed_dot_line_is_not_an_end() -> None:
    driver = started()
    body = b"..\r\n.. \r\n...\r\n. \r\n"
    assert driver.feed(transaction(body=body)).endswith(QUEUED[1])
    assert driver.messages() == [body + END]


# -- attacks on the command line --------------------------------------------------------------------


def test_bare_cr_in_command_line() -> None:
    driver = started()
    assert driver.feed(b"MAIL FROM:<a@remote.test>\rRCPT TO:<u@example.test>\r\n") == r.BARE_LINE_END.encode()
    assert r.BARE_LINE_END.code == 500
    assert driver.feed(RCPT) == r.NEED_MAIL.encode()  # neither half was a command


def test_bare_lf_ends_no_command() -> None:
    driver = started()
    output = driver.feed(b"MAIL FROM:<a@remote.test>\nRCPT TO:<u@example.test>\r\n")
    assert split_replies(output) == [r.BARE_LINE_END.encode(), r.NEED_MAIL.encode()]
    assert driver.sent == []


def test_nul_in_command_line() -> None:
    driver = started()
    assert driver.feed(b"MAIL FROM:<a@remote.test>\x00\r\n") == r.NUL_IN_COMMAND.encode()
    assert driver.feed(RCPT) == r.NEED_MAIL.encode()


def test_eight_bit_command_without_smtputf8() -> None:
    driver = started(make_session(backend_ehlo=("PIPELINING", "8BITMIME")))
    assert driver.feed("MAIL FROM:<jürgen@remote.test>\r\n".encode()) == r.EIGHT_BIT_COMMAND.encode()
    assert r.EIGHT_BIT_COMMAND.code == 500


def test_eight_bit_command_after_helo_even_when_smtputf8_is_on_offer() -> None:
    driver = started(hello=b"HELO client.test\r\n")
    assert driver.feed("NOOP ü\r\n".encode()) == r.EIGHT_BIT_COMMAND.encode()


def test_eight_bit_address_needs_the_smtputf8_parameter() -> None:
    driver = started()
    assert driver.feed("MAIL FROM:<jürgen@remote.test>\r\n".encode()) == r.SMTPUTF8_REQUIRED.encode()
    assert driver.feed("MAIL FROM:<jürgen@remote.test> SMTPUTF8\r\n".encode()) == r.SENDER_OK.encode()
    assert driver.feed(b"\xff\xfe\r\n") == r.BAD_UTF8.encode()


def test_eight_bit_recipient_needs_the_smtputf8_parameter() -> None:
    driver = started()
    driver.feed(MAIL)
    assert driver.feed("RCPT TO:<jürgen@example.test>\r\n".encode()) == r.SMTPUTF8_REQUIRED.encode()
    assert driver.sent == []


def test_over_long_command_line() -> None:
    driver = started()
    output = driver.feed(b"NOOP " + b"a" * 600 + b"\r\nNOOP\r\n")
    assert split_replies(output) == [r.LINE_TOO_LONG.encode(), r.OK.encode()]
    assert (r.LINE_TOO_LONG.code, r.LINE_TOO_LONG.enhanced) == (500, "5.5.6")


def test_over_long_command_line_without_lf_in_several_chunks() -> None:
    driver = started()
    outputs = [driver.feed(b"A" * 300) for _ in range(5)]
    assert outputs == [b"", r.LINE_TOO_LONG.encode(), b"", b"", b""]
    assert driver.feed(b"A" * 10 + b"\r\nNOOP\r\n") == r.OK.encode()
    assert driver.session.stats.errors == 1


def test_the_tail_of_an_over_long_line_is_never_a_command() -> None:
    driver = started()
    output = driver.feed(b"X" * 600 + MAIL + RCPT)
    assert split_replies(output) == [r.LINE_TOO_LONG.encode(), r.NEED_MAIL.encode()]
    assert driver.sent == []


def test_a_command_line_exactly_at_the_limit_is_accepted() -> None:
    limit = DEFAULTS.max_line_length
    line = b"NOOP " + b"a" * (limit - 7) + b"\r\n"
    assert len(line) == limit
    driver = started()
    assert driver.feed_chunks(bytes([byte]) for byte in line) == r.OK.encode()
    assert driver.feed(line[:-2] + b"a\r\n") == r.LINE_TOO_LONG.encode()


def test_over_long_body_line() -> None:
    config = settings(max_body_line_length="1000")
    driver = started(make_session(config))
    body = b"ok\r\n" + b"z" * 999 + b"\r\nmore\r\n"
    output = driver.feed(transaction(body=body))
    assert output.endswith(r.BODY_LINE_TOO_LONG.encode())
    assert len(driver.aborts) == 1 and ev.Command.END not in driver.kinds()
    assert [event.rule for event in driver.refused] == ["body_line_too_long"]


def test_body_line_exactly_at_the_limit_is_delivered() -> None:
    config = settings(max_body_line_length="1000")
    driver = started(make_session(config))
    body = b"z" * 998
    assert driver.feed(transaction(body=body)).endswith(QUEUED[1])
    assert driver.aborts == []


# -- floods -----------------------------------------------------------------------------------------


def test_recipient_flood() -> None:
    config = settings(max_recipients="3")
    driver = started(make_session(config))
    rcpts = b"".join(f"RCPT TO:<u{n}@example.test>\r\n".encode() for n in range(5))
    output = driver.feed(MAIL + rcpts)
    too_many = config.replies["TOO_MANY_RECIPIENTS"]
    assert (too_many.code, too_many.enhanced) == (452, "4.5.3")
    assert split_replies(output) == [r.SENDER_OK.encode()] + [RCPT_OK[1]] * 3 + [too_many.encode()] * 2
    assert len(driver.commands(ev.Command.RCPT)) == 3
    assert [event.rule for event in driver.refused] == ["too_many_recipients"] * 2


def test_refused_recipients_do_not_count_towards_the_limit() -> None:
    config = settings(max_recipients="2")
    driver = started(make_session(config))
    output = driver.feed(MAIL + RELAY + RELAY + RCPT + RCPT2)
    assert split_replies(output)[-2:] == [RCPT_OK[1], RCPT_OK[1]]


def test_a_large_mailing_is_split_by_452_not_disconnected() -> None:
    driver = started()
    limit = DEFAULTS.max_recipients
    rcpts = b"".join(f"RCPT TO:<u{n}@example.test>\r\n".encode() for n in range(limit + DEFAULTS.max_errors + 5))
    output = driver.feed(MAIL + rcpts + b"DATA\r\n" + BODY + END)
    replies = split_replies(output)
    assert r.TOO_MANY_ERRORS.encode() not in replies
    assert replies.count(DEFAULTS.replies["TOO_MANY_RECIPIENTS"].encode()) == DEFAULTS.max_errors + 5
    assert replies[-1] == QUEUED[1]


def test_error_flood_closes_the_session() -> None:
    config = settings(max_errors="3")
    driver = started(make_session(config))
    output = driver.feed(b"BOGUS\r\n" * 5 + b"NOOP\r\n")
    assert split_replies(output) == [r.UNRECOGNIZED.encode()] * 3 + [r.TOO_MANY_ERRORS.encode()]
    assert driver.session.closed and driver.session.output_complete
    assert driver.feed(b"NOOP\r\n") == b""


def test_relay_probing_counts_as_errors() -> None:
    config = settings(max_errors="2")
    driver = started(make_session(config))
    output = driver.feed(MAIL + RELAY * 3)
    assert split_replies(output) == [r.SENDER_OK.encode(), RELAY_DENIED, RELAY_DENIED, r.TOO_MANY_ERRORS.encode()]
    assert driver.sent == []


def test_early_talker() -> None:
    driver = Driver(greet=False)
    assert driver.feed(SMTP) == r.EARLY_TALKER.encode()
    assert driver.session.closed and driver.session.output_complete
    assert driver.feed(MAIL) == b""
    assert driver.sent == []


# -- encapsulated recipients from an unauthorized client ---------------------------------------------

ENCAPSULATED = {
    "percent": "user%far.test@example.test",
    "bang": "far.test!user@example.test",
    "source_route": "@far.test:user@example.test",
    "source_route_two_hops": "@a.test,@far.test:user@example.test",
    "quoted_at": '"user@far.test"@example.test',
    "quoted_percent": '"user%far.test"@example.test',
    "quoted_bang": '"far.test!user"@example.test',
    "multiple_at": "user@far.test@example.test",
    "trailing_dot": "user@example.test.",
    "trailing_at": "user@example.test@",
    "ip_literal": "user@[192.0.2.99]",
    "ipv6_literal": "user@[IPv6:2001:db8::99]",
    "imcea": "IMCEASMTP-user+40far+2Etest@example.test",
}


@pytest.mark.parametrize("address", ENCAPSULATED.values(), ids=ENCAPSULATED.keys())
def test_encapsulated_rcpt_is_a_relay_attempt(address: str) -> None:
    driver = started()
    output = driver.feed(MAIL + f"RCPT TO:<{address}>\r\n".encode() + b"DATA\r\n")
    assert split_replies(output) == [
        r.SENDER_OK.encode(),
        DEFAULTS.replies["ENCAPSULATED"].encode(),
        r.NO_VALID_RECIPIENTS_AFTER_REJECTS.encode(),
    ]
    assert DEFAULTS.replies["ENCAPSULATED"] == DEFAULTS.replies["RELAY_DENIED"]
    assert driver.sent == []
    assert [event.rule for event in driver.refused] == ["encapsulated"]


@pytest.mark.parametrize(
    "address",
    ['"IMCEASMTP-user+40far+2Etest"@example.test', '"IMCEAEX-_O=ORG_OU=SITE_CN=user"@example.test'],
    ids=["quoted_imcea_smtp", "quoted_imcea_ex"],
)
def test_quoted_imcea_rcpt_is_a_relay_attempt(address: str) -> None:
    driver = started()
    output = driver.feed(MAIL + f"RCPT TO:<{address}>\r\n".encode())
    assert split_replies(output) == [r.SENDER_OK.encode(), DEFAULTS.replies["ENCAPSULATED"].encode()]
    assert driver.sent == []


def test_relay_from_a_never_host_is_refused_but_local_mail_is_taken() -> None:
    driver = started(make_session(grant=fc.GRANT_NEVER))
    output = driver.feed(MAIL + RELAY + RCPT)
    assert split_replies(output) == [r.SENDER_OK.encode(), DEFAULTS.replies["RELAY_NEVER"].encode(), RCPT_OK[1]]
    assert driver.commands(ev.Command.RCPT) == [RCPT]


def test_soft_reject_turns_relay_refusals_into_4xx() -> None:
    config = settings(soft_reject="yes")
    driver = started(make_session(config))
    assert driver.feed(MAIL + RELAY).endswith(config.replies["RELAY_DENIED"].encode())
    assert config.replies["RELAY_DENIED"].code == 454


# -- vanishing peers ----------------------------------------------------------------------------------


def test_client_vanishing_mid_data_aborts_the_backend() -> None:
    driver = started()
    driver.feed(MAIL + RCPT + b"DATA\r\nSubject: half\r\n\r\nhalf a bo")
    assert driver.session.in_data
    driver.lose_client()
    assert len(driver.aborts) == 1
    assert ev.Command.END not in driver.kinds()
    assert driver.session.closed


def test_client_vanishing_outside_data_aborts_nothing() -> None:
    driver = started()
    driver.feed(MAIL + RCPT)
    driver.lose_client()
    assert driver.aborts == [] and driver.session.closed


def test_no_backend_traffic_after_the_client_vanished_while_data_was_pending() -> None:
    driver = started(make_session(received_header=True), auto=False)
    driver.feed(MAIL + RCPT + b"DATA\r\n")
    driver.answer(2)
    driver.lose_client()
    before = len(driver.sent)
    driver.answer()
    assert len(driver.sent) == before
    assert not driver.session.in_data


def test_backend_failing_mid_data() -> None:
    driver = started()
    driver.feed(MAIL + RCPT + b"DATA\r\nSubject: x\r\n\r\nfirst part\r\n")
    sent = len(driver.sent)
    assert driver.fail_backend() == b""  # the client is still sending: answer after its end
    assert driver.feed(b"second part\r\n") == b""
    assert driver.feed(b"last part" + END) == r.BACKEND_FAILED_DATA.encode()
    assert r.BACKEND_FAILED_DATA.code == 451
    assert len(driver.sent) == sent  # nothing further went anywhere
    assert [(e.delivered, e.reply_code) for e in driver.ended] == [(False, 451)]
    # The session goes on, with a new backend connection for the next transaction.
    assert driver.feed(MAIL + RCPT) == r.SENDER_OK.encode() + RCPT_OK[1]


def test_backend_failing_after_the_end_marker() -> None:
    driver = started(auto=False)
    driver.feed(MAIL + RCPT + b"DATA\r\n")
    driver.answer(3)
    driver.feed(BODY + END)
    assert driver.fail_backend() == r.BACKEND_FAILED_DATA.encode()
    assert [event.delivered for event in driver.ended] == [False]


def test_backend_failing_with_rcpt_replies_owed() -> None:
    driver = started(auto=False)
    assert driver.feed(MAIL + RCPT + RELAY + RCPT2) == r.SENDER_OK.encode()
    unavailable = r.BACKEND_UNAVAILABLE.encode()
    assert r.BACKEND_UNAVAILABLE.code == 451
    assert split_replies(driver.fail_backend()) == [unavailable, RELAY_DENIED, unavailable]
    sent = len(driver.sent)
    assert driver.feed(RCPT) == unavailable  # later RCPTs of that transaction too
    assert driver.feed(b"DATA\r\n") == unavailable
    assert len(driver.sent) == sent
    assert driver.feed(b"RSET\r\n") == r.RESET_OK.encode()  # nothing to reset at the backend
    assert len(driver.sent) == sent
    driver.auto = True
    assert driver.feed(MAIL + RCPT) == r.SENDER_OK.encode() + RCPT_OK[1]
    assert driver.connections[-1][0].data == MAIL  # a new connection, starting with MAIL


def test_backend_failing_while_data_awaits_its_354() -> None:
    driver = started(auto=False)
    driver.feed(MAIL + RCPT + b"DATA\r\n")
    driver.answer(2)
    assert driver.fail_backend() == r.BACKEND_UNAVAILABLE.encode()
    assert not driver.session.in_data
    assert driver.feed(b"RSET\r\n") == r.RESET_OK.encode()


def test_backend_421_is_never_relayed_as_421_for_one_command() -> None:
    driver = started(script={(ev.Command.RCPT, 0): (421, b"421 4.3.2 backend: shutting down\r\n")})
    output = driver.feed(MAIL + RCPT)
    assert split_replies(output) == [r.SENDER_OK.encode(), r.BACKEND_UNAVAILABLE.encode()]
    assert not driver.session.closed
