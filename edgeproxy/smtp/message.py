"""One mail transaction's state, the message body's scan, and the ``Received:`` trace header.

Kept apart from the command state machine in :mod:`edgeproxy.smtp.session`: the session decides
what a command means; this module holds what a transaction has gathered and judges its body.
"""

from __future__ import annotations

import email.utils
import functools
from datetime import UTC, datetime

from edgeproxy import fastpath_common as fc
from edgeproxy.fastpath import DataScanner, ParsedPath
from edgeproxy.reply import Reply
from edgeproxy.smtp import replies as r
from edgeproxy.smtp.events import TlsInfo

# Body faults, in the scanner's own order of precedence; too-big is the policy's reply.
_BODY_FAULTS: dict[int, tuple[str, Reply]] = {
    fc.VIOLATION_BARE_CR: ("body_bare_cr", r.BODY_BARE_LINE_END),
    fc.VIOLATION_BARE_LF: ("body_bare_lf", r.BODY_BARE_LINE_END),
    fc.VIOLATION_LINE_TOO_LONG: ("body_line_too_long", r.BODY_LINE_TOO_LONG),
    fc.VIOLATION_NUL: ("body_nul", r.BODY_NUL),
}


class Transaction:
    """What one MAIL ... end-of-data exchange has gathered so far."""

    __slots__ = ("body_failure", "broken", "excess_recipients", "forwarded", "mail", "received", "recipient_addresses",
                 "recipients", "rejected", "scanner")

    def __init__(self, mail: ParsedPath | None = None) -> None:
        self.mail = mail
        self.forwarded = False  # MAIL went to the backend, so RSET must follow it there
        self.broken = False  # the backend failed under it: every further RCPT or DATA gets 4xx
        self.recipients = 0
        self.rejected = 0
        self.excess_recipients = 0  # RCPTs past the recipient limit (452s)
        self.recipient_addresses: list[str] = []
        self.scanner: DataScanner | None = None
        self.body_failure: Reply | None = None
        self.received = b""  # our Received: header, sent with the body's first chunk

    @property
    def smtputf8(self) -> bool:
        return self.mail is not None and "SMTPUTF8" in self.mail.params


def body_fault(violation: int, too_big: Reply) -> tuple[str, Reply]:
    """The rule name and reply for a scanner violation."""
    if violation == fc.VIOLATION_TOO_BIG:
        return "message_too_big", too_big
    return _BODY_FAULTS[violation]


def received_header(*, helo: str | None, client_address: str, hostname: str, esmtp: bool,
                    transaction: Transaction, session_id: str, now: float, tls: TlsInfo | None = None,
                    authenticated: bool = False) -> bytes:
    """The RFC 5321 §4.4 trace header naming the real client.

    Only the HELO argument comes from the client; the session has refused control characters in
    it, and outside an SMTPUTF8 transaction anything not ASCII is escaped, so no client byte
    reaches the header raw.
    """
    protocol = "ESMTP" if esmtp else "SMTP"
    shown_helo = helo or ""
    if transaction.smtputf8:
        protocol = "UTF8SMTP"
    elif not shown_helo.isascii():
        shown_helo = shown_helo.encode("ascii", "backslashreplace").decode("ascii")
    using = ""
    if tls is not None:
        protocol += "S"  # RFC 3848: with TLS; "A" below: authenticated
        using = f"\r\n\t(using {tls.version} with cipher {tls.cipher} ({tls.bits}/{tls.bits} bits))"
    if authenticated:
        protocol += "A"
    addresses = transaction.recipient_addresses
    recipient = f"\r\n\tfor <{addresses[0]}>" if len(addresses) == 1 else ""
    header = (
        f"Received: from {shown_helo} ([{client_address}]){using}\r\n"
        f"\tby {hostname} (edgeproxy) with {protocol} id {session_id}{recipient};\r\n"
        f"\t{_rfc5322_date(int(now))}\r\n"
    )
    return header.encode("utf-8")


@functools.lru_cache(maxsize=4)
def _rfc5322_date(second: int) -> str:
    """The Received: date; a second's worth of messages share one formatting."""
    return email.utils.format_datetime(datetime.fromtimestamp(second, UTC))


def command_line(prefix: str, address: str, params: dict[str, str | None]) -> bytes:
    """Rebuild the command from what we parsed, never the client's bytes: the backend then
    sees exactly what our policy decided on, so no parser difference can be exploited."""
    parts = [f"{prefix}<{address}>"]
    parts.extend(key if value is None else f"{key}={value}" for key, value in params.items())
    return (" ".join(parts) + "\r\n").encode("utf-8")
