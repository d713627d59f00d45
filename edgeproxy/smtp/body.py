"""The message body: from the backend's 354 to the end-of-data marker, scanned on its way to the
backend chunk by chunk and never held whole. A mixin of :class:`~edgeproxy.smtp.session.SmtpSession`.

A body the scanner refuses (a bare CR or LF that could smuggle a second message, an over-long
line, past the size limit) is refused whole: the rest is withheld and the backend connection is
dropped without an end marker, so the backend discards what it got.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from edgeproxy.fastpath import DataScanner
from edgeproxy.smtp import events as ev
from edgeproxy.smtp import replies as r
from edgeproxy.smtp.events import Command
from edgeproxy.smtp.message import Transaction, body_fault, received_header
from edgeproxy.smtp.state import State

if TYPE_CHECKING:
    from collections.abc import Callable

    from edgeproxy.smtp.capabilities import Capabilities
    from edgeproxy.smtp.interface import SessionLimits, SessionPolicy
    from edgeproxy.smtp.replyqueue import Slot


class MessageBody:
    __slots__ = ()

    if TYPE_CHECKING:  # provided by SmtpSession
        limits: SessionLimits
        policy: SessionPolicy
        capabilities: Capabilities
        state: State
        helo: str | None
        esmtp: bool
        client_address: str
        session_id: str
        authenticated_as: str | None
        tls: ev.TlsInfo | None
        progress: int
        _clock: Callable[[], float]
        _txn: Transaction
        _input: bytearray
        _events: list[ev.Event]
        _expected: deque[tuple[Command, Slot | None]]
        _ending: deque[tuple[int, int]]
        _reply: Callable[..., Slot]
        _refuse: Callable[..., None]
        _transaction_ended: Callable[[bool, int, int, int], None]
        _release_backend_if_done: Callable[[], None]

    def _start_body(self) -> None:
        self.state = State.BODY
        txn = self._txn
        txn.scanner = DataScanner(self.limits.max_body_line_length, self.capabilities.max_message_size)
        if self.limits.received_header:
            # Held for the first chunk: one backend write for both, not two per message.
            txn.received = received_header(
                helo=self.helo, client_address=self.client_address, hostname=self.limits.hostname,
                esmtp=self.esmtp, transaction=txn, session_id=self.session_id, now=self._clock(), tls=self.tls,
                authenticated=self.authenticated_as is not None,
            )

    def _body(self, data: bytes) -> None:
        txn = self._txn
        scanner = txn.scanner
        assert scanner is not None
        end = scanner.feed(data)
        chunk = data if end < 0 else data[:end]
        del self._input[: len(chunk)]
        self.progress += 1
        if scanner.violation and txn.body_failure is None:
            # Refuse the whole message: this chunk is withheld and the backend connection is
            # dropped without an end marker, so the backend discards what it got.
            txn.body_failure = body_fault(scanner.violation, self.policy.message_too_big().reply)[1]
            self._events.append(ev.BackendAbort(f"body refused: {txn.body_failure.text}"))
            txn.forwarded = False
        if txn.body_failure is None:
            if txn.received:
                chunk, txn.received = txn.received + chunk, b""
            self._events.append(ev.BackendSend(Command.END if end >= 0 else Command.BODY, chunk))
        if end < 0:
            return
        failure = txn.body_failure
        if failure is None:
            # The transaction is over for the client: its next MAIL may come, and be forwarded,
            # before the backend's final reply to this one.
            self._expected.append((Command.END, self._reply()))
            self._ending.append((txn.recipients, scanner.size))
        elif failure is r.BACKEND_FAILED_DATA:
            self._reply(failure)
            self._transaction_ended(False, failure.code, txn.recipients, scanner.size)
        else:
            # Decided now, not at the abort: the scanner's final word is chunking-independent.
            rule, reply = body_fault(scanner.violation, self.policy.message_too_big().reply)
            self._refuse("data", rule, reply)
            self._transaction_ended(False, reply.code, txn.recipients, scanner.size)
        if self.state is State.BODY:
            self.state = State.READY
        self._txn = Transaction()
        self._release_backend_if_done()
