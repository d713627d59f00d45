"""The client-side SMTP state machine, sans-IO: bytes in, replies and backend requests out.

The I/O layer feeds client bytes to :meth:`SmtpSession.receive_data` and backend replies to
:meth:`SmtpSession.backend_reply`, then writes :meth:`take_output` to the client and carries out
:meth:`take_events`. Replies leave in command order (RFC 2920) whatever mix of local and backend
replies they are: each command gets a slot, and output is the filled prefix of the slots.

After ``DATA`` no further client byte is read until the backend has answered it: the same bytes
are commands after a ``503`` and body after a ``354``, and guessing is how pipelines desync.
"""

from __future__ import annotations

import email.utils
import functools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar

from edgeproxy import fastpath_common as fc
from edgeproxy.fastpath import DataScanner, ParsedPath, ParseError, parse_command, parse_mail_from
from edgeproxy.policy import Policy, Refusal
from edgeproxy.smtp import events as ev
from edgeproxy.smtp import replies as r
from edgeproxy.smtp.capabilities import Capabilities

_COMMAND_ERRORS = {
    fc.REASON_LINE_TOO_LONG: r.LINE_TOO_LONG,
    fc.REASON_BARE_CR: r.BARE_LINE_END,
    fc.REASON_BARE_LF: r.BARE_LINE_END,
    fc.REASON_NUL: r.NUL_IN_COMMAND,
    fc.REASON_EIGHT_BIT: r.EIGHT_BIT_COMMAND,
    fc.REASON_BAD_UTF8: r.BAD_UTF8,
}
_BODY_ERRORS = {
    fc.VIOLATION_BARE_CR: r.BODY_BARE_LINE_END,
    fc.VIOLATION_BARE_LF: r.BODY_BARE_LINE_END,
    fc.VIOLATION_LINE_TOO_LONG: r.BODY_LINE_TOO_LONG,
}
# Bytes a client may send past an unanswered DATA before we stop reading from it.
HELD_INPUT_LIMIT = 65536


@dataclass(frozen=True, slots=True)
class SessionLimits:
    hostname: str
    max_line_length: int
    max_body_line_length: int
    max_errors: int
    received_header: bool
    enable_expn: bool
    enable_etrn: bool


class _Slot:
    """A reply owed to the client, in command order; ``close`` ends the session after it."""

    __slots__ = ("close", "data")

    def __init__(self, data: bytes | None = None, close: bool = False) -> None:
        self.data = data
        self.close = close


class SmtpSession:
    def __init__(
        self,
        limits: SessionLimits,
        policy: Policy,
        capabilities: Capabilities,
        client_address: str,
        grant: int,
        session_id: str = "",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.limits = limits
        self.policy = policy
        self.capabilities = capabilities
        self.client_address = client_address
        self.grant = grant
        self.session_id = session_id
        self._clock = clock
        self.helo: str | None = None
        self.esmtp = False
        self.stats = ev.SessionStats()
        self.closed = False  # no more input is processed; close once output is written
        self._greeted = False
        self._input = bytearray()
        self._discarding = False  # inside an over-long command line, until its LF
        self._held = False  # DATA awaits the backend: do not interpret input yet
        self._slots: deque[_Slot] = deque()
        self._events: list[object] = []
        self._expected: deque[tuple[str, _Slot | None]] = deque()
        self._scanner: DataScanner | None = None
        self._ending: deque[tuple[int, int]] = deque()  # (recipients, size) awaiting END replies
        # The backend's refusal of the MAIL now being answered, which its RCPTs inherit.
        self._backend_mail_refusal: bytes | None = None
        self._reset_transaction()

    # -- the I/O layer's interface ---------------------------------------------------------

    def greeting(self) -> bytes:
        self._greeted = True
        return f"220 {self.limits.hostname} ESMTP edgeproxy\r\n".encode()

    def receive_data(self, data: bytes) -> None:
        if self.closed:
            return
        if not self._greeted:
            self._finish(r.EARLY_TALKER)
            return
        self._input += data
        self._process()

    def backend_reply(self, code: int, raw: bytes) -> None:
        """One complete (possibly multi-line) reply from the backend, in command order."""
        kind, slot = self._expected.popleft()
        if code == 421:
            # The backend is closing, not us: the client's session goes on, so it must not read
            # a 421 (RFC 5321 §3.8) for one command; the connection loss follows and is handled.
            raw = r.BACKEND_UNAVAILABLE.encode()
        if kind == ev.MAIL:
            self._backend_mail_refusal = raw if code >= 300 else None
        elif kind == ev.RCPT:
            assert slot is not None
            slot.data = raw if self._backend_mail_refusal is None else self._backend_mail_refusal
        elif kind == ev.DATA:
            assert slot is not None
            slot.data = raw
            self._held = False
            if code == 354 and not self.closed:
                self._start_body()
            self._process()
        elif kind == ev.END:
            assert slot is not None
            slot.data = raw
            self._transaction_ended(200 <= code < 300, code, *self._ending.popleft())
        elif slot is not None:  # EXPN, ETRN: the backend's answer is the client's
            slot.data = raw

    def backend_failed(self) -> None:
        """The backend connection is gone or unusable: every reply still owed becomes 4xx."""
        while self._expected:
            kind, slot = self._expected.popleft()
            if slot is None:
                continue
            if kind == ev.END:
                slot.data = r.BACKEND_FAILED_DATA.encode()
                self._transaction_ended(False, r.BACKEND_FAILED_DATA.code, *self._ending.popleft())
            else:
                slot.data = r.BACKEND_UNAVAILABLE.encode()
            if kind == ev.DATA:
                self._held = False
        if self._scanner is not None and self._body_failure is None:
            self._body_failure = r.BACKEND_FAILED_DATA
        if self._mail is not None:
            self._backend_broken = True
        self._mail_forwarded = False
        self._process()

    def connection_lost(self) -> None:
        """The client is gone. A half-sent body must never become a message."""
        if self._scanner is not None and self._body_failure is None:
            self._events.append(ev.BackendAbort("client vanished during DATA"))
        self.closed = True

    def take_output(self) -> bytes:
        out = []
        while self._slots and self._slots[0].data is not None:
            slot = self._slots.popleft()
            out.append(slot.data)
            if slot.close:
                self._slots.clear()
                break
        return b"".join(out)  # type: ignore[arg-type]

    @property
    def output_complete(self) -> bool:
        """True once every owed reply has been taken (so a closing session may close)."""
        return not self._slots

    def take_events(self) -> list[object]:
        events, self._events = self._events, []
        return events

    @property
    def wants_input(self) -> bool:
        """False when the I/O layer should stop reading: the client is ahead of us."""
        return not (self._held and len(self._input) > HELD_INPUT_LIMIT)

    @property
    def in_data(self) -> bool:
        return self._scanner is not None

    @property
    def in_transaction(self) -> bool:
        return self._mail is not None or self._scanner is not None

    # -- input ---------------------------------------------------------------------------------

    def _process(self) -> None:
        while self._input and not self._held and not self.closed:
            if self._scanner is not None:
                self._body(bytes(self._input))
                continue
            newline = self._input.find(b"\n")
            if self._discarding:
                if newline < 0:
                    self._input.clear()
                    return
                del self._input[: newline + 1]
                self._discarding = False
                continue
            if newline < 0:
                if len(self._input) > self.limits.max_line_length:
                    self._input.clear()
                    self._discarding = True
                    self._error(r.LINE_TOO_LONG)
                return
            line = bytes(self._input[: newline + 1])
            del self._input[: newline + 1]
            self._command(line)

    def _command(self, line: bytes) -> None:
        try:
            verb, arg = parse_command(line, self.esmtp and self.capabilities.smtputf8, self.limits.max_line_length)
        except ParseError as error:
            self._error(_COMMAND_ERRORS.get(error.reason, r.UNRECOGNIZED))
            return
        handler = self._HANDLERS.get(verb)
        if handler is None:
            self._error(r.UNRECOGNIZED)
            return
        handler(self, arg)

    # -- replies -------------------------------------------------------------------------------

    def _reply(self, data: bytes | r.Reply | None = None, close: bool = False) -> _Slot:
        if isinstance(data, r.Reply):
            data = data.encode()
        slot = _Slot(data, close)
        self._slots.append(slot)
        return slot

    def _error(self, reply: r.Reply) -> None:
        self._reply(reply)
        self.stats.errors += 1
        if self.stats.errors >= self.limits.max_errors:
            self._finish(r.TOO_MANY_ERRORS)

    def _refuse(self, stage: str, refusal: Refusal, recipient: str | None = None, error: bool = True) -> None:
        sender = self._mail.address if self._mail is not None else None
        self._events.append(ev.Refused(stage, refusal.rule, refusal.reply, sender, recipient))
        self.stats.refusals += 1
        self.stats.rules[refusal.rule] = self.stats.rules.get(refusal.rule, 0) + 1
        if error:
            self._error(refusal.reply)
        else:
            self._reply(refusal.reply)

    def _finish(self, reply: r.Reply) -> None:
        self._reply(reply, close=True)
        self.closed = True

    # -- commands ------------------------------------------------------------------------------

    def _helo(self, arg: str, esmtp: bool) -> None:
        if not arg.strip():
            self._error(r.HELO_NEEDS_DOMAIN)
            return
        self._abandon_transaction()
        self.helo = arg.split()[0]
        self.esmtp = esmtp
        if not esmtp:
            self._reply(f"250 {self.limits.hostname}\r\n".encode())
            return
        self._reply(_ehlo_reply(self.limits.hostname, self.capabilities))

    def _ehlo_command(self, arg: str) -> None:
        self._helo(arg, True)

    def _helo_command(self, arg: str) -> None:
        self._helo(arg, False)

    def _mail_command(self, arg: str) -> None:
        if self.helo is None:
            self._error(r.NEED_HELO)
            return
        if self._mail is not None:
            self._error(r.NESTED_MAIL)
            return
        try:
            path = parse_mail_from(arg)
        except ParseError as error:
            self._error(r.PARAMETER_BAD if error.reason == fc.REASON_BAD_PARAMETER else r.BAD_SENDER_SYNTAX)
            return
        problem = self.capabilities.check_mail_params(path.params, self.esmtp)
        if problem is not None:
            self._error(problem)
            return
        if not path.address.isascii() and "SMTPUTF8" not in path.params:
            self._error(r.SMTPUTF8_REQUIRED)
            return
        refusal = self.policy.check_sender(path, self.capabilities.max_message_size)
        if refusal is not None:
            self._mail = path  # so the log line names the refused sender
            self._refuse("mail", refusal)
            self._mail = None
            return
        self._mail = path
        self._reply(r.SENDER_OK)

    def _rcpt_command(self, arg: str) -> None:
        if self._mail is None:
            self._error(r.NEED_MAIL)
            return
        if self._backend_broken:
            self._reply(r.BACKEND_UNAVAILABLE)
            return
        if self._recipients >= self.policy.max_recipients:
            # Not an error: RFC 5321 §4.5.3.1.10 has the client send the rest in a later
            # transaction, and counting these would cut every large mailing off with a 421.
            self._refuse("rcpt", self.policy.too_many_recipients(), error=False)
            return
        try:
            verdict = self.policy.decide_rcpt(arg, self.grant)
        except ParseError as error:
            self._error(r.PARAMETER_BAD if error.reason == fc.REASON_BAD_PARAMETER else r.BAD_RECIPIENT_SYNTAX)
            return
        if not verdict.address.isascii() and "SMTPUTF8" not in self._mail.params:
            self._error(r.SMTPUTF8_REQUIRED)
            return
        refusal = self.policy.refusal_for(verdict)
        if refusal is not None:
            self._rejected_recipients += 1
            self._refuse("rcpt", refusal, verdict.address)
            return
        problem = self.capabilities.check_rcpt_params(verdict.params)
        if problem is not None:
            self._error(problem)
            return
        if not self._mail_forwarded:
            self._send(ev.MAIL, _path_command("MAIL FROM:", self._mail))
            self._mail_forwarded = True
        self._recipients += 1
        self._rcpt_addresses.append(verdict.address)
        self._send(ev.RCPT, _command_line("RCPT TO:", verdict.address, verdict.params), self._reply())

    def _data_command(self, arg: str) -> None:
        if arg:
            self._error(r.SYNTAX_ERROR)
        elif self._mail is None:
            self._error(r.NEED_MAIL)
        elif self._backend_broken:
            self._reply(r.BACKEND_UNAVAILABLE)
        elif not self._recipients:
            self._error(r.NO_VALID_RECIPIENTS_AFTER_REJECTS if self._rejected_recipients else r.NO_VALID_RECIPIENTS)
        else:
            self._send(ev.DATA, b"DATA\r\n", self._reply())
            self._held = True

    def _rset_command(self, arg: str) -> None:
        if arg:
            self._error(r.SYNTAX_ERROR)
            return
        self._abandon_transaction()
        self._reply(r.RESET_OK)

    def _noop_command(self, arg: str) -> None:
        self._reply(r.OK)

    def _quit_command(self, arg: str) -> None:
        self._finish(r.CLOSING)

    def _help_command(self, arg: str) -> None:
        self._reply(r.HELP)

    def _vrfy_command(self, arg: str) -> None:
        # RFC 2505 §2.11: never confirm addresses to a stranger; 252 keeps clients happy.
        self._error(r.SYNTAX_ERROR) if not arg else self._reply(r.VRFY_CANNOT)

    def _expn_command(self, arg: str) -> None:
        self._pass_through(ev.EXPN if self.limits.enable_expn else None, "EXPN", arg)

    def _etrn_command(self, arg: str) -> None:
        self._pass_through(ev.ETRN if self.limits.enable_etrn else None, "ETRN", arg)

    def _not_implemented(self, arg: str) -> None:
        self._error(r.NOT_IMPLEMENTED)

    def _pass_through(self, kind: str | None, verb: str, arg: str) -> None:
        if kind is None:
            self._error(r.NOT_IMPLEMENTED)
        elif not arg:
            self._error(r.SYNTAX_ERROR)
        elif self.in_transaction:
            self._error(r.BAD_SEQUENCE)
        else:
            self._send(kind, f"{verb} {arg}\r\n".encode(), self._reply())

    _HANDLERS: ClassVar[dict[str, Callable[[SmtpSession, str], None]]] = {
        "EHLO": _ehlo_command,
        "HELO": _helo_command,
        "MAIL": _mail_command,
        "RCPT": _rcpt_command,
        "DATA": _data_command,
        "RSET": _rset_command,
        "NOOP": _noop_command,
        "QUIT": _quit_command,
        "HELP": _help_command,
        "VRFY": _vrfy_command,
        "EXPN": _expn_command,
        "ETRN": _etrn_command,
        # Not offered: TURN never (RFC 2505 §2.11), STARTTLS and AUTH until TLS is built, BDAT
        # because CHUNKING is not advertised.
        "TURN": _not_implemented,
        "STARTTLS": _not_implemented,
        "AUTH": _not_implemented,
        "BDAT": _not_implemented,
    }

    # -- the body ------------------------------------------------------------------------------

    def _start_body(self) -> None:
        self._scanner = DataScanner(self.limits.max_body_line_length, self.capabilities.max_message_size)
        if self.limits.received_header:
            self._events.append(ev.BackendSend(ev.BODY, self._received_header()))

    def _body(self, data: bytes) -> None:
        scanner = self._scanner
        assert scanner is not None
        end = scanner.feed(data)
        chunk = data if end < 0 else data[:end]
        del self._input[: len(chunk)]
        if scanner.violation and self._body_failure is None:
            # Refuse the whole message: this chunk is withheld and the backend connection is
            # dropped without an end marker, so the backend discards what it got.
            self._body_failure = self._violation_reply(scanner.violation)
            self._events.append(ev.BackendAbort(f"body refused: {self._body_failure.text}"))
            self._mail_forwarded = False
        if self._body_failure is None:
            self._events.append(ev.BackendSend(ev.END if end >= 0 else ev.BODY, chunk))
        if end < 0:
            return
        self._scanner = None
        failure = self._body_failure
        if failure is None:
            # The transaction is over for the client: its next MAIL may come, and be forwarded,
            # before the backend's final reply to this one.
            self._expected.append((ev.END, self._reply()))
            self._ending.append((self._recipients, scanner.size))
        elif failure is r.BACKEND_FAILED_DATA:
            self._reply(failure)
            self._transaction_ended(False, failure.code, self._recipients, scanner.size)
        else:
            # Decided now, not at the abort: the scanner's final word is chunking-independent.
            failure = self._violation_reply(scanner.violation)
            self._refuse("data", Refusal(_violation_rule(scanner.violation), failure))
            self._transaction_ended(False, failure.code, self._recipients, scanner.size)
        self._reset_transaction()

    def _violation_reply(self, violation: int) -> r.Reply:
        if violation == fc.VIOLATION_TOO_BIG:
            return self.policy.message_too_big().reply
        return _BODY_ERRORS[violation]

    def _received_header(self) -> bytes:
        now = self._clock() if self._clock is not None else time.time()
        date = _rfc5322_date(int(now))
        protocol = "ESMTP" if self.esmtp else "SMTP"
        if self._mail is not None and "SMTPUTF8" in self._mail.params:
            protocol = "UTF8SMTP"
        recipient = f"\r\n\tfor <{self._rcpt_addresses[0]}>" if len(self._rcpt_addresses) == 1 else ""
        header = (
            f"Received: from {self.helo} ([{self.client_address}])\r\n"
            f"\tby {self.limits.hostname} (edgeproxy) with {protocol} id {self.session_id}{recipient};\r\n"
            f"\t{date}\r\n"
        )
        return header.encode("utf-8")

    # -- transactions --------------------------------------------------------------------------

    def _send(self, kind: str, data: bytes, slot: _Slot | None = None) -> None:
        self._events.append(ev.BackendSend(kind, data))
        self._expected.append((kind, slot))

    def _reset_transaction(self) -> None:
        self._mail: ParsedPath | None = None
        self._mail_forwarded = False
        self._backend_broken = False
        self._recipients = 0
        self._rejected_recipients = 0
        self._rcpt_addresses: list[str] = []
        self._body_failure: r.Reply | None = None

    def _abandon_transaction(self) -> None:
        """RSET, HELO or EHLO: the backend forgets the transaction too."""
        if self._mail_forwarded:
            self._send(ev.RSET, b"RSET\r\n")
        self._reset_transaction()

    def _transaction_ended(self, delivered: bool, code: int, recipients: int, size: int) -> None:
        if delivered:
            self.stats.messages += 1
        self._events.append(ev.TransactionEnded(delivered, recipients, size, code))


@functools.lru_cache(maxsize=16)
def _ehlo_reply(hostname: str, capabilities: Capabilities) -> bytes:
    return r.multiline(250, [hostname, *capabilities.ehlo_keywords()])


@functools.lru_cache(maxsize=4)
def _rfc5322_date(second: int) -> str:
    """The Received: date; a second's worth of messages share one formatting."""
    return email.utils.format_datetime(datetime.fromtimestamp(second, UTC))


def _violation_rule(violation: int) -> str:
    return {
        fc.VIOLATION_BARE_CR: "body_bare_cr",
        fc.VIOLATION_BARE_LF: "body_bare_lf",
        fc.VIOLATION_LINE_TOO_LONG: "body_line_too_long",
        fc.VIOLATION_TOO_BIG: "message_too_big",
    }[violation]


def _path_command(prefix: str, path: ParsedPath) -> bytes:
    return _command_line(prefix, path.address, path.params)


def _command_line(prefix: str, address: str, params: dict[str, str | None]) -> bytes:
    """Rebuild the command from what we parsed, never the client's bytes: the backend then
    sees exactly what our policy decided on, so no parser difference can be exploited."""
    parts = [f"{prefix}<{address}>"]
    parts.extend(key if value is None else f"{key}={value}" for key, value in params.items())
    return (" ".join(parts) + "\r\n").encode("utf-8")
