"""The session's states, and the commands each state refuses (h11's table-of-states idea).

The state says what the next input means; everything else a session holds (the transaction, the
owed replies) lives beside it in :mod:`edgeproxy.smtp.session` and :mod:`edgeproxy.smtp.message`.
"""

from __future__ import annotations

import enum

from edgeproxy.reply import Reply
from edgeproxy.smtp import replies as r


class State(enum.Enum):
    # Members compare by identity; hashing them so too keeps set and dict lookups in C.
    __hash__ = object.__hash__

    GREETING = "greeting"  # our 220 is not out yet: a client talking now is an early talker
    CONNECTED = "connected"  # greeted, no HELO or EHLO yet
    READY = "ready"  # HELO or EHLO done, no transaction
    MAIL = "mail"  # MAIL accepted, no recipient forwarded yet
    RCPT = "rcpt"  # at least one recipient forwarded
    DATA = "data"  # DATA forwarded: input is held, not interpreted, until the backend answers
    BODY = "body"  # the message body is streaming
    TLS = "tls"  # 220 to STARTTLS given: input is discarded until the handshake is done
    AUTH = "auth"  # inside a SASL exchange: each line is a response, not a command
    AUTH_CHECK = "auth_check"  # credentials being verified: input is held, not interpreted
    CLOSED = "closed"  # no more input is processed; close once the output is written


# The verbs each state refuses, and with what: anything not listed is admitted wherever commands
# are read (GREETING, DATA, BODY, TLS, AUTH, AUTH_CHECK and CLOSED read none).
OUT_OF_SEQUENCE: dict[str, dict[State, Reply]] = {
    "MAIL": {State.CONNECTED: r.NEED_HELO, State.MAIL: r.NESTED_MAIL, State.RCPT: r.NESTED_MAIL},
    "RCPT": {State.CONNECTED: r.NEED_MAIL, State.READY: r.NEED_MAIL},
    "DATA": {State.CONNECTED: r.NEED_MAIL_BEFORE_DATA, State.READY: r.NEED_MAIL_BEFORE_DATA},
    "STARTTLS": {State.MAIL: r.BAD_SEQUENCE, State.RCPT: r.BAD_SEQUENCE},
    "AUTH": {State.CONNECTED: r.NEED_HELO, State.MAIL: r.BAD_SEQUENCE, State.RCPT: r.BAD_SEQUENCE},
}
TRANSACTION_STATES = frozenset((State.MAIL, State.RCPT, State.DATA, State.BODY))
# States in which input is not interpreted as commands (it is held, or discarded).
HOLDING_STATES = frozenset((State.DATA, State.CLOSED, State.TLS, State.AUTH_CHECK))
# Postfix's junk commands: cheap to send, answered locally, and no step toward delivering mail.
JUNK_VERBS = frozenset(("NOOP", "RSET", "VRFY", "HELP", "EXPN", "ETRN"))
