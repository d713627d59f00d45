"""The client-side SMTP state machine, sans-IO: bytes in, replies and backend requests out.

The I/O layer feeds client bytes to :meth:`SmtpSession.receive_data` and backend replies to
:meth:`SmtpSession.backend_reply`, then writes :meth:`take_output` to the client and carries out
:meth:`take_events`. Replies leave in command order (RFC 2920) whatever mix of local and backend
replies they are (:mod:`edgeproxy.smtp.replyqueue`).

After ``DATA`` no further client byte is read until the backend has answered it: the same bytes
are commands after a ``503`` and body after a ``354``, and guessing is how pipelines desync.

Every resource a client can make the session hold is bounded: input held unanswered
(``max_pending_input``), replies owed (``max_pipeline``: interpreting stops there until the
client reads), excess recipients (``recipient_overshoot``), errors (``max_errors``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import ClassVar

from edgeproxy import fastpath_common as fc
from edgeproxy.fastpath import ParsedPath, ParseError, parse_command, parse_mail_from
from edgeproxy.listener import ListenerKind
from edgeproxy.reply import Reply
from edgeproxy.smtp import events as ev
from edgeproxy.smtp import replies as r
from edgeproxy.smtp.body import MessageBody
from edgeproxy.smtp.capabilities import Capabilities
from edgeproxy.smtp.commands import SessionCommands
from edgeproxy.smtp.events import Command
from edgeproxy.smtp.interface import RecipientVerdicts, SessionLimits, SessionPolicy
from edgeproxy.smtp.message import Transaction, command_line
from edgeproxy.smtp.recipients import RecipientChecks
from edgeproxy.smtp.replyqueue import ReplyQueue, Slot
from edgeproxy.smtp.sasl import SaslExchange
from edgeproxy.smtp.state import HOLDING_STATES, JUNK_VERBS, OUT_OF_SEQUENCE, TRANSACTION_STATES, State

__all__ = ["SessionLimits", "SessionPolicy", "SmtpSession", "State"]



class SmtpSession(SessionCommands, MessageBody, RecipientChecks):
    __slots__ = (
        "_backend_failure",
        "_backend_mail_refusal",
        "_clock",
        "_ending",
        "_events",
        "_expected",
        "_input",
        "_junk_commands",
        "_pending_auth",
        "_pipeline_full",
        "_sasl",
        "_skipping_line",
        "_slots",
        "_txn",
        "_verifying",
        "authenticated_as",
        "capabilities",
        "client_address",
        "esmtp",
        "grant",
        "helo",
        "limits",
        "listener",
        "policy",
        "progress",
        "session_id",
        "state",
        "stats",
        "tls",
        "unknown_recipients",
        "verdicts",
    )

    def __init__(
        self,
        limits: SessionLimits,
        policy: SessionPolicy,
        capabilities: Capabilities,
        client_address: str,
        grant: int,
        session_id: str = "",
        clock: Callable[[], float] | None = None,
        listener: ListenerKind = ListenerKind.SMTP,
        verdicts: RecipientVerdicts | None = None,
    ) -> None:
        self.limits = limits
        self.policy = policy
        self.capabilities = capabilities
        self.client_address = client_address
        self.grant = grant
        self.session_id = session_id
        self.listener = listener
        self.verdicts = verdicts  # the backend's remembered verdicts on recipients, when verifying
        self._verifying: deque[str | None] = deque()  # per forwarded RCPT: the address to learn about
        self.unknown_recipients = 0  # refused as unknown mailboxes: the harvest tarpit's count
        self.tls: ev.TlsInfo | None = None  # set by tls_started: what the handshake agreed
        self.authenticated_as: str | None = None  # set only by a verified AUTH (a real 235)
        self._sasl: SaslExchange | None = None
        self._pending_auth: Slot | None = None  # the reply owed to the credentials being checked
        self._junk_commands = 0
        self._clock = clock or time.time
        self.state = State.GREETING
        self.helo: str | None = None
        self.esmtp = False
        self.stats = ev.SessionStats()
        self.progress = 0  # complete command lines and body chunks taken: the client is alive
        self._input = bytearray()
        self._skipping_line = False  # inside an over-long command line, until its LF
        self._pipeline_full = False  # interpreting stopped at max_pipeline owed replies
        self._slots = ReplyQueue()
        self._events: list[ev.Event] = []
        self._expected: deque[tuple[Command, Slot | None]] = deque()
        self._ending: deque[tuple[int, int]] = deque()  # (recipients, size) awaiting END replies
        self._txn = Transaction()
        self._backend_mail_refusal: bytes | None = None  # the backend's MAIL refusal its RCPTs inherit
        self._backend_failure = r.BACKEND_UNAVAILABLE  # what a broken transaction answers

    # -- the I/O layer's interface ---------------------------------------------------------

    def greeting(self) -> bytes:
        if self.state is State.GREETING:
            self.state = State.CONNECTED
        return f"220 {self.limits.hostname} ESMTP edgeproxy\r\n".encode()

    def receive_data(self, data: bytes) -> None:
        if self.state is State.CLOSED or self.state is State.TLS:
            return  # after 220 to STARTTLS nothing is interpreted (RFC 3207 §4.2, CVE-2011-0411)
        if self.state is State.GREETING:
            self._finish(r.EARLY_TALKER)
            return
        self._input += data
        self._process()

    def tls_started(self, info: ev.TlsInfo) -> None:
        """The handshake is done (after STARTTLS, or first thing on an implicit-TLS listener).
        RFC 3207 §4.2: everything learnt from the client before is forgotten; it greets again."""
        self.tls = info
        self.helo = None
        self.esmtp = False
        self._txn = Transaction()
        self._input.clear()
        if self.state is State.TLS:
            self.state = State.CONNECTED

    def resume(self) -> None:
        """Interpret input held back by the pipeline bound, once the client took its replies."""
        self._process()

    def backend_reply(self, code: int, raw: bytes) -> None:
        """One complete (possibly multi-line) reply from the backend, in command order."""
        command, slot = self._expected.popleft()
        if code == 421:
            # The backend is closing, not us: the client's session goes on, so it must not read
            # a 421 (RFC 5321 §3.8) for one command; the connection loss follows and is handled.
            raw = r.BACKEND_UNAVAILABLE.encode()
        if command is Command.MAIL:
            self._backend_mail_refusal = raw if code >= 300 else None
        elif command is Command.RCPT:
            assert slot is not None
            slot.data = raw if self._backend_mail_refusal is None else self._backend_mail_refusal
            self._recipient_reply(code, raw, self._backend_mail_refusal is None)
        elif command is Command.DATA:
            assert slot is not None
            slot.data = raw
            if self.state is State.DATA:
                if code == 354:
                    self._start_body()
                else:
                    self.state = State.RCPT
                self._process()
        elif command is Command.END:
            assert slot is not None
            slot.data = raw
            self._transaction_ended(200 <= code < 300, code, *self._ending.popleft())
        elif slot is not None:  # EXPN, ETRN: the backend's answer is the client's
            slot.data = raw
        self._release_backend_if_done()

    def backend_failed(self, reply: Reply = r.BACKEND_UNAVAILABLE) -> None:
        """The backend connection is gone or unusable: every reply still owed becomes 4xx."""
        while self._expected:
            command, slot = self._expected.popleft()
            if slot is None:
                continue
            if command is Command.END:
                slot.data = r.BACKEND_FAILED_DATA.encode()
                self._transaction_ended(False, r.BACKEND_FAILED_DATA.code, *self._ending.popleft())
            else:
                slot.data = reply.encode()
            if command is Command.DATA and self.state is State.DATA:
                self.state = State.RCPT
        self._verifying.clear()
        txn = self._txn
        if txn.scanner is not None and txn.body_failure is None:
            txn.body_failure = r.BACKEND_FAILED_DATA
        if txn.mail is not None:
            txn.broken = True
        txn.forwarded = False
        self._backend_failure = reply
        self._process()

    def connection_lost(self) -> None:
        """The client is gone. A half-sent body must never become a message."""
        if self._txn.scanner is not None and self._txn.body_failure is None:
            self._events.append(ev.BackendAbort("client vanished during DATA"))
        self.state = State.CLOSED

    def take_output(self) -> bytes:
        return self._slots.take()

    @property
    def output_complete(self) -> bool:
        """True once every owed reply has been taken (so a closing session may close)."""
        return not self._slots

    def take_events(self) -> list[ev.Event]:
        events, self._events = self._events, []
        return events

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def wants_input(self) -> bool:
        """False when the I/O layer should stop reading: the client is ahead by more than we hold
        for it, or the session is closed (last reply held behind a backend's): nothing to read for."""
        return self.state is not State.CLOSED and len(self._input) < self.limits.max_pending_input

    @property
    def can_resume(self) -> bool:
        """Input is waiting only because of the pipeline bound, which taking output has lifted."""
        return self._pipeline_full and self._interpreting and len(self._slots) < self.limits.max_pipeline

    @property
    def in_data(self) -> bool:
        return self.state is State.BODY

    @property
    def in_transaction(self) -> bool:
        return self.state in TRANSACTION_STATES

    # -- input ---------------------------------------------------------------------------------

    @property
    def _interpreting(self) -> bool:
        return self.state not in HOLDING_STATES

    def _process(self) -> None:
        self._pipeline_full = False
        buffer = self._input
        limit = self.limits.max_pipeline
        limits = self.limits
        while buffer and self.state not in HOLDING_STATES:
            if self.state is State.BODY:
                self._body(bytes(buffer))
                continue
            if len(self._slots) >= limit:
                self._pipeline_full = True  # the client has not read what it is owed yet
                return
            newline = buffer.find(b"\n")
            if self._skipping_line:
                if newline < 0:
                    buffer.clear()
                    return
                del buffer[: newline + 1]
                self._skipping_line = False
                continue
            line_limit = self._line_limit() if limits.auth else limits.max_line_length
            if newline < 0:
                if len(buffer) > line_limit:
                    buffer.clear()
                    self._skipping_line = True
                    self._end_auth()  # an over-long SASL response ends the exchange too
                    self._error(r.LINE_TOO_LONG)
                return
            line = bytes(buffer[: newline + 1])
            del buffer[: newline + 1]
            self.progress += 1
            if self.state is State.AUTH:
                self._auth_response(line)
            else:
                self._command(line, line_limit)

    def _command(self, line: bytes, line_limit: int) -> None:
        try:
            verb, arg = parse_command(line, self.esmtp and self.capabilities.smtputf8, line_limit)
        except ParseError as error:
            self._error(r.FOR_COMMAND_FAULT.get(error.reason, r.UNRECOGNIZED))
            return
        handler = self._HANDLERS.get(verb)
        if handler is None:
            self._error(r.UNRECOGNIZED)
            return
        refused = OUT_OF_SEQUENCE.get(verb)
        if refused is not None and self.state in refused:
            self._error(refused[self.state])
            return
        handler(self, arg)
        if verb in JUNK_VERBS:
            # Postfix's smtpd_junk_command_limit: answered all the same, but past the limit each
            # counts toward MAX_ERRORS, so a NOOP loop cannot hold the worker or its slot.
            self._junk_commands += 1
            if self._junk_commands > self.limits.junk_command_limit and self.state is not State.CLOSED:
                self._count_error()

    # -- replies -------------------------------------------------------------------------------

    def _reply(self, data: bytes | Reply | None = None, close: bool = False) -> Slot:
        return self._slots.add(data, close)

    def _error(self, reply: Reply) -> None:
        self._reply(reply)
        self._count_error()

    def _count_error(self) -> None:
        self.stats.errors += 1
        if self.stats.errors >= self.limits.max_errors:
            self._finish(r.TOO_MANY_ERRORS)

    def _refuse(self, stage: str, rule: str, reply: Reply, recipient: str | None = None, error: bool = True,
                sender: ParsedPath | None = None) -> None:
        sender = sender or self._txn.mail
        self._events.append(ev.Refused(stage, rule, reply, sender.address if sender else None, recipient))
        self.stats.refusals += 1
        self.stats.rules[rule] = self.stats.rules.get(rule, 0) + 1
        if error:
            self._error(reply)
        else:
            self._reply(reply)

    def _finish(self, reply: Reply) -> None:
        self._reply(reply, close=True)
        self.state = State.CLOSED

    # -- commands ------------------------------------------------------------------------------

    def _mail_command(self, arg: str) -> None:
        if self._tls_missing():
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
            self._refuse("mail", refusal.rule, refusal.reply, sender=path)
            return
        self._txn = Transaction(path)
        self.state = State.MAIL
        self._reply(r.SENDER_OK)

    def _rcpt(self, arg: str) -> None:
        txn = self._txn
        assert txn.mail is not None
        if txn.broken:
            self._reply(self._backend_failure)
            return
        if txn.recipients >= self.policy.max_recipients:
            # RFC 5321 §4.5.3.1.10 has the client send the rest in a later transaction, so a 452
            # is no error; only a client that keeps on far past the limit is counting toward
            # MAX_ERRORS (Postfix's smtpd_recipient_overshoot_limit).
            txn.excess_recipients += 1
            refusal = self.policy.too_many_recipients()
            overshoot = txn.excess_recipients > self.limits.recipient_overshoot
            self._refuse("rcpt", refusal.rule, refusal.reply, error=overshoot)
            return
        try:
            verdict = self.policy.decide_rcpt(arg, self.grant)
        except ParseError as error:
            self._error(r.PARAMETER_BAD if error.reason == fc.REASON_BAD_PARAMETER else r.BAD_RECIPIENT_SYNTAX)
            return
        if not verdict.address.isascii() and not txn.smtputf8:
            self._error(r.SMTPUTF8_REQUIRED)
            return
        refusal = self.policy.refusal_for(verdict)
        if refusal is not None:
            txn.rejected += 1
            self.unknown_recipients += verdict.rule == fc.RULE_UNKNOWN_USER
            self._refuse("rcpt", refusal.rule, refusal.reply, verdict.address)
            return
        problem = self.capabilities.check_rcpt_params(verdict.params)
        if problem is not None:
            self._error(problem)
            return
        if self._remembered_unknown(verdict):
            return
        if not txn.forwarded:
            self._send(Command.MAIL, command_line("MAIL FROM:", txn.mail.address, txn.mail.params))
            txn.forwarded = True
        txn.recipients += 1
        txn.recipient_addresses.append(verdict.address)
        self.state = State.RCPT
        self._forwarding_recipient(verdict)
        self._send(Command.RCPT, command_line("RCPT TO:", verdict.address, verdict.params), self._reply())

    def _data_command(self, arg: str) -> None:
        txn = self._txn
        if arg:
            self._error(r.SYNTAX_ERROR)
        elif txn.broken:
            self._reply(self._backend_failure)
        elif not txn.recipients:
            self._error(r.NO_VALID_RECIPIENTS_AFTER_REJECTS if txn.rejected else r.NO_VALID_RECIPIENTS)
        else:
            self._send(Command.DATA, b"DATA\r\n", self._reply())
            self.state = State.DATA

    def _rset_command(self, arg: str) -> None:
        if arg:
            self._error(r.SYNTAX_ERROR)
            return
        self._abandon_transaction()
        if self.state is not State.CONNECTED:
            self.state = State.READY
        self._reply(r.RESET_OK)

    _HANDLERS: ClassVar[dict[str, Callable[[SmtpSession, str], None]]] = {
        "EHLO": SessionCommands._ehlo_command, "HELO": SessionCommands._helo_command, "MAIL": _mail_command,
        "RCPT": RecipientChecks._rcpt_command, "DATA": _data_command, "RSET": _rset_command,
        "NOOP": SessionCommands._noop_command,
        "QUIT": SessionCommands._quit_command, "HELP": SessionCommands._help_command,
        "VRFY": SessionCommands._vrfy_command, "EXPN": SessionCommands._expn_command,
        "ETRN": SessionCommands._etrn_command, "STARTTLS": SessionCommands._starttls_command,
        # Not offered: TURN never (RFC 2505 §2.11), BDAT because CHUNKING is not advertised.
        "AUTH": SessionCommands._auth_command,
        "TURN": SessionCommands._not_implemented,
        "BDAT": SessionCommands._not_implemented,
    }

    # -- transactions --------------------------------------------------------------------------

    def _send(self, command: Command, data: bytes, slot: Slot | None = None) -> None:
        self._events.append(ev.BackendSend(command, data))
        self._expected.append((command, slot))

    def _abandon_transaction(self) -> None:
        """RSET, HELO or EHLO: the backend forgets the transaction too."""
        if self._txn.forwarded:
            self._send(Command.RSET, b"RSET\r\n")
        if self._txn.mail is not None:  # (an untouched one serves on: nothing is set before MAIL)
            self._txn = Transaction()

    def _release_backend_if_done(self) -> None:
        if not self._expected and not self._txn.forwarded and self.state is not State.CLOSED:
            self._events.append(ev.BackendRelease())

    def _transaction_ended(self, delivered: bool, code: int, recipients: int, size: int) -> None:
        if delivered:
            self.stats.messages += 1
            self._junk_commands = 0  # a client that delivers is no idler
        self._events.append(ev.TransactionEnded(delivered, recipients, size, code))
