"""What the SMTP core asks of the I/O layer, as typed values.

Every event derives from :class:`Event`; the I/O layer dispatches on the class. The commands the
core forwards to the backend are the :class:`Command` enum; the backend client's own commands
(greeting, EHLO, XCLIENT...) are a separate enum in :mod:`edgeproxy.smtp.client`, so the two can
never be mistaken for each other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgeproxy.reply import Reply
from edgeproxy.smtp.sasl import Secret

if TYPE_CHECKING:
    from edgeproxy.smtp.replyqueue import Slot


class Command(enum.Enum):
    """A client command forwarded to the backend. Each but BODY expects exactly one reply."""
    # Members compare by identity; hashing them so too keeps set and dict lookups in C.
    __hash__ = object.__hash__


    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    BODY = "BODY"  # a chunk of the message, end marker not included
    END = "END"  # the last chunk, end marker included
    RSET = "RSET"
    EXPN = "EXPN"  # passed through only when enabled
    ETRN = "ETRN"

    @property
    def expects_reply(self) -> bool:
        return self is not Command.BODY


class Event:
    __slots__ = ()


@dataclass(slots=True)
class BackendSend(Event):
    """Bytes for the backend. The I/O layer opens (or takes from the pool) a connection first
    when it holds none; it may pipeline them when the backend offers PIPELINING."""

    command: Command
    data: bytes


@dataclass(slots=True)
class BackendAbort(Event):
    """Drop the backend connection without ending the message, so nothing is delivered.

    Used when the body turns out bad after part of it was forwarded, and when the client
    vanishes mid-transaction. The connection must not go back to the pool."""

    reason: str


@dataclass(slots=True)
class BackendRelease(Event):
    """The core owes the backend nothing and holds no transaction there: the connection may go
    back to the pool for other sessions (a session keeps none while it idles)."""


@dataclass(slots=True)
class StartTls(Event):
    """The client was told 220 to STARTTLS: once that reply is written, the I/O layer performs
    the server-side handshake and calls :meth:`SmtpSession.tls_started`. Until then the session
    reads nothing (RFC 3207 §4.2: what came after the command is discarded, never interpreted)."""


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What the handshake agreed, for the trace header and the log."""

    version: str  # "TLSv1.3"
    cipher: str
    bits: int


@dataclass(slots=True)
class Authenticate(Event):
    """Verify these credentials, then call :meth:`SmtpSession.auth_succeeded` or
    :meth:`SmtpSession.auth_failed`; the session reads nothing meanwhile. The password is a
    :class:`~edgeproxy.smtp.sasl.Secret`: this event's repr never shows it."""

    mechanism: str
    username: str
    password: Secret


@dataclass(slots=True)
class Refused(Event):
    """One policy or protocol refusal, for the RFC 2505 §2.4 log line."""

    stage: str  # connect, mail, rcpt, data
    rule: str
    reply: Reply
    sender: str | None = None
    recipient: str | None = None


@dataclass(slots=True)
class DelayReply(Event):
    """``slot`` is held: ``seconds`` after the session's previous delayed reply left (or from
    now), call :meth:`SmtpSession.release` with it and take the output again (the
    directory-harvest tarpit). Replies after it wait behind it
    (command order); the session's other work, and every other client, go on meanwhile."""

    slot: Slot
    seconds: float


@dataclass(slots=True)
class TransactionEnded(Event):
    """A message's fate, for the log and metrics."""

    delivered: bool
    recipients: int
    size: int
    reply_code: int


@dataclass(slots=True)
class SessionStats:
    messages: int = 0
    refusals: int = 0
    errors: int = 0
    rules: dict[str, int] = field(default_factory=dict)
