"""What the SMTP core asks of the I/O layer, as plain values."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeproxy.smtp.replies import Reply

# Kinds of BackendSend. Each but BODY expects exactly one reply from the backend.
MAIL = "MAIL"
RCPT = "RCPT"
DATA = "DATA"
BODY = "BODY"  # a chunk of the message, end marker not included
END = "END"  # the last chunk, end marker included
RSET = "RSET"
EXPN = "EXPN"  # passed through only when enabled
ETRN = "ETRN"


@dataclass(slots=True)
class BackendSend:
    """Bytes for the backend. The I/O layer opens (or takes from the pool) a connection first
    when it holds none; it may pipeline them when the backend offers PIPELINING."""

    kind: str
    data: bytes

    @property
    def expects_reply(self) -> bool:
        return self.kind != BODY


@dataclass(slots=True)
class BackendAbort:
    """Drop the backend connection without ending the message, so nothing is delivered.

    Used when the body turns out bad after part of it was forwarded, and when the client
    vanishes mid-transaction. The connection must not go back to the pool."""

    reason: str


@dataclass(slots=True)
class Refused:
    """One policy or protocol refusal, for the RFC 2505 §2.4 log line."""

    stage: str  # connect, mail, rcpt, data
    rule: str
    reply: Reply
    sender: str | None = None
    recipient: str | None = None


@dataclass(slots=True)
class TransactionEnded:
    """A message's fate, for the session summary and metrics."""

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
