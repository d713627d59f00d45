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
from edgeproxy.smtp.state import State

if TYPE_CHECKING:
    from collections.abc import Callable

    from edgeproxy.listener import ListenerKind
    from edgeproxy.reply import Reply
    from edgeproxy.smtp.capabilities import Capabilities
    from edgeproxy.smtp.interface import SessionLimits
    from edgeproxy.smtp.replyqueue import Slot

# C0, DEL and C1: a HELO carrying them would reach terminals, the backend and the trace header.
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")
_ARGUMENT_SEPARATOR = re.compile("[ \t]+")


class SessionCommands:
    __slots__ = ()

    if TYPE_CHECKING:  # provided by SmtpSession
        limits: SessionLimits
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
        self._reply(self.capabilities.ehlo_reply(self.limits.hostname, self._starttls_offered))

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
        """Submission listeners take no mail before TLS (RFC 6409 §4.1, RFC 3207 §4)."""
        if self.listener.requires_tls and self.tls is None:
            self._error(r.MUST_STARTTLS)
            return True
        return False

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
