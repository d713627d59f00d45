"""The commands a session answers without a mail transaction: HELO/EHLO, STARTTLS, NOOP, QUIT,
HELP, VRFY, and the EXPN/ETRN pass-through. A mixin of :class:`~edgeproxy.smtp.session.SmtpSession`,
kept apart so the transaction's own code reads in one place.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from edgeproxy.smtp import events as ev
from edgeproxy.smtp import replies as r
from edgeproxy.smtp.events import Command
from edgeproxy.smtp.sasl import MAX_AUTH_LINE, MECHANISMS, Challenge, Credentials, Failed, SaslExchange, Step
from edgeproxy.smtp.state import State

if TYPE_CHECKING:
    from collections.abc import Callable

    from edgeproxy.listener import ListenerKind
    from edgeproxy.reply import Reply
    from edgeproxy.smtp.capabilities import Capabilities
    from edgeproxy.smtp.interface import SessionLimits, SessionPolicy
    from edgeproxy.smtp.replyqueue import Slot

# C0, DEL and C1: a HELO carrying them would reach terminals, the backend and the trace header.
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")
_ARGUMENT_SEPARATOR = re.compile("[ \t]+")


class SessionCommands:
    __slots__ = ()

    if TYPE_CHECKING:  # provided by SmtpSession
        limits: SessionLimits
        policy: SessionPolicy
        client_address: str
        grant: int
        authenticated_as: str | None
        stats: ev.SessionStats
        _sasl: SaslExchange | None
        _pending_auth: Slot | None
        _process: Callable[[], None]
        capabilities: Capabilities
        listener: ListenerKind
        tls: ev.TlsInfo | None
        helo: str | None
        esmtp: bool
        state: State
        _input: bytearray
        _events: list[ev.Event]
        _reply: Callable[..., Slot]
        _error: Callable[[Reply], None]
        _count_error: Callable[[], None]
        _finish: Callable[[Reply], None]
        _send: Callable[..., None]
        _abandon_transaction: Callable[[], None]

        @property
        def in_transaction(self) -> bool: ...

    def _helo(self, arg: str, esmtp: bool) -> None:
        words = _ARGUMENT_SEPARATOR.split(arg.strip(" \t"), 1)
        if not words[0]:
            self._error(r.HELO_NEEDS_DOMAIN)
            return
        if _CONTROL_CHARACTERS.search(words[0]):
            self._error(r.HELO_BAD_CHARACTERS)
            return
        self._abandon_transaction()
        self.helo = words[0]
        self.esmtp = esmtp
        self.state = State.READY
        if not esmtp:
            self._reply(f"250 {self.limits.hostname}\r\n".encode())
            return
        # RFC 4954 §4 with RFC 3207: AUTH only inside TLS, so no password ever crosses in clear.
        auth = self.limits.auth and self.tls is not None
        self._reply(self.capabilities.ehlo_reply(self.limits.hostname, self._starttls_offered, auth))

    def _ehlo_command(self, arg: str) -> None:
        self._helo(arg, True)

    def _helo_command(self, arg: str) -> None:
        self._helo(arg, False)

    def _noop_command(self, arg: str) -> None:
        self._reply(r.OK)

    def _quit_command(self, arg: str) -> None:
        self._finish(r.CLOSING)

    def _help_command(self, arg: str) -> None:
        self._reply(r.HELP)

    def _vrfy_command(self, arg: str) -> None:
        # RFC 2505 §2.11: never confirm addresses to a stranger; 252 keeps clients happy.
        if not self._tls_missing():
            self._error(r.SYNTAX_ERROR) if not arg else self._reply(r.VRFY_CANNOT)

    def _starttls_command(self, arg: str) -> None:
        if not self.limits.starttls or (self.listener.implicit_tls and self.tls is None):
            self._error(r.NOT_IMPLEMENTED)
        elif arg:
            self._error(r.SYNTAX_ERROR)
        elif self.tls is not None:
            self._error(r.ALREADY_TLS)
        else:
            self._reply(r.STARTTLS_READY)
            # Whatever the client sent after the command line is dropped here, and nothing more
            # is read until the handshake is done: none of it may count as said inside TLS.
            self._input.clear()
            self.state = State.TLS
            self._events.append(ev.StartTls())

    @property
    def _starttls_offered(self) -> bool:
        return self.limits.starttls and self.tls is None and not self.listener.implicit_tls

    def _tls_missing(self) -> bool:
        """Submission listeners take no mail before TLS (RFC 6409 §4.1, RFC 3207 §4), nor, when
        AUTH is on, before authentication (RFC 6409 §4.3)."""
        if self.listener.requires_tls and self.tls is None:
            self._error(r.MUST_STARTTLS)
            return True
        if self.listener.requires_tls and self.limits.auth and self.authenticated_as is None:
            self._error(r.AUTH_REQUIRED)
            return True
        return False

    # -- AUTH (RFC 4954) -------------------------------------------------------------------------

    def _line_limit(self) -> int:
        """RFC 4954 §4: AUTH lines, and the SASL responses after them, may be 12,288 octets."""
        if self.limits.auth and (self.state is State.AUTH or self._input[:5].upper() == b"AUTH "):
            return max(self.limits.max_line_length, MAX_AUTH_LINE + 2)
        return self.limits.max_line_length

    def _auth_command(self, arg: str) -> None:
        mechanism, _, initial = arg.strip(" ").partition(" ")
        if not self.limits.auth:
            self._error(r.NOT_IMPLEMENTED)
        elif self.tls is None:
            self._error(r.AUTH_NEEDS_TLS)  # never verified: the password must not cross in clear
        elif self.authenticated_as is not None:
            self._error(r.BAD_SEQUENCE)
        elif mechanism.upper() not in MECHANISMS:
            self._error(r.AUTH_UNKNOWN_MECHANISM)
        else:
            self._sasl = SaslExchange(mechanism.upper())
            self._auth_step(self._sasl.begin(initial.strip(" ") or None))

    def _auth_response(self, line: bytes) -> None:
        """One line of the client's side of the SASL exchange."""
        if len(line) > MAX_AUTH_LINE + 2:
            self._auth_step(Failed(r.LINE_TOO_LONG))  # whole in one read, or cut: the same answer
            return
        if not line.endswith(b"\r\n") or any(octet < 32 or octet > 126 for octet in line[:-2]):
            self._auth_step(Failed(r.AUTH_BAD_BASE64))
            return
        assert self._sasl is not None
        self._auth_step(self._sasl.respond(line[:-2].decode("ascii")))

    def _auth_step(self, step: Step) -> None:
        if isinstance(step, Challenge):
            self.state = State.AUTH
            self._reply(f"334 {step.text}\r\n".encode("ascii"))
        elif isinstance(step, Credentials):
            self.state = State.AUTH_CHECK
            self._events.append(ev.Authenticate(self._sasl_mechanism, step.username, step.password))
            self._pending_auth = self._reply()
        else:
            self._end_auth()
            self._error(step.reply)

    @property
    def _sasl_mechanism(self) -> str:
        assert self._sasl is not None
        return self._sasl.mechanism

    def auth_succeeded(self, username: str) -> None:
        """The verifier accepted the credentials (a real 235): the session may now relay as the
        policy allows authenticated clients (design.md §2 rule 6; the NEVER list still wins)."""
        slot = self._end_auth()
        if slot is None:
            return  # the session ended while the verifier worked
        self.authenticated_as = username
        self.grant = self.policy.relay_grant(self.client_address, self.listener, authenticated=True)
        slot.data = r.AUTH_OK.encode()
        self._process()

    def auth_failed(self, reply: Reply) -> None:
        """The verifier refused (5xx, an error toward MAX_ERRORS) or could not tell (4xx)."""
        slot = self._end_auth()
        if slot is None:
            return
        slot.data = reply.encode()
        if reply.is_permanent:
            self._count_error()
        self._process()

    def _end_auth(self) -> Slot | None:
        self._sasl = None
        slot, self._pending_auth = self._pending_auth, None
        if self.state in (State.AUTH, State.AUTH_CHECK):
            self.state = State.READY
        return slot

    def _expn_command(self, arg: str) -> None:
        self._pass_through(Command.EXPN if self.limits.enable_expn else None, arg)

    def _etrn_command(self, arg: str) -> None:
        self._pass_through(Command.ETRN if self.limits.enable_etrn else None, arg)

    def _not_implemented(self, arg: str) -> None:
        self._error(r.NOT_IMPLEMENTED)

    def _pass_through(self, command: Command | None, arg: str) -> None:
        if self._tls_missing():
            return
        if command is None:
            self._error(r.NOT_IMPLEMENTED)
        elif not arg:
            self._error(r.SYNTAX_ERROR)
        elif self.in_transaction:
            self._error(r.BAD_SEQUENCE)
        else:
            self._send(command, f"{command.value} {arg}\r\n".encode(), self._reply())
