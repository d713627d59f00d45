"""The kinds of listener a client can arrive on; part of every session's input, like its address.

The policy reads the kind (design.md §2 "listener L"), the core reads whether it owes TLS; nothing
branches on a port number.
"""

from __future__ import annotations

import enum


class ListenerKind(enum.Enum):
    # Members compare by identity; hashing them so too keeps set and dict lookups in C.
    __hash__ = object.__hash__

    SMTP = "smtp"  # port 25: the relay policy as it stands
    RELAY = "relay"  # an internal listener whose clients may relay (Exchange's "these addresses")
    SUBMISSION = "submission"  # port 587 (RFC 6409): STARTTLS before MAIL
    SUBMISSIONS = "submissions"  # port 465 (RFC 8314): TLS from the first byte

    @property
    def implicit_tls(self) -> bool:
        return self is ListenerKind.SUBMISSIONS

    @property
    def requires_tls(self) -> bool:
        return self is ListenerKind.SUBMISSION or self is ListenerKind.SUBMISSIONS
