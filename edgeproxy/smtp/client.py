"""The client side of SMTP towards the backend, sans-IO: replies in, command bytes out.

:class:`BackendClient` does the connection's own work (greeting, EHLO with a HELO fallback,
XCLIENT announcements, RSET) and writes the owner's commands pipelined in RFC 2920 groups when
the backend offers PIPELINING, one at a time when it does not. The I/O layer feeds it the
backend's bytes (:meth:`receive_data`), writes :meth:`data_to_send`, hands
:meth:`take_replies` to the session that owns the connection, arms a timer for
:attr:`awaiting`, and drops the connection once :attr:`failure` is set.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from edgeproxy.reply import Reply
from edgeproxy.smtp import replies as r
from edgeproxy.smtp.events import Command
from edgeproxy.smtp.replyparser import ReplyError, ReplyParser, reply_lines

XCLIENT_LINE_LIMIT = 512


class Own(enum.Enum):
    """The connection's own commands; their replies never reach a client."""
    # Members compare by identity; hashing them so too keeps set and dict lookups in C.
    __hash__ = object.__hash__


    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    XCLIENT = "XCLIENT"
    RSET = "RSET"
    STARTTLS = "STARTTLS"


# RFC 2920 §3.1: a command that changes the session, or whose reply the rest depends on, must end
# a pipeline group (EXPN by name; ETRN as an extension command that does not say otherwise).
_SYNC_POINTS = frozenset((Own.GREETING, Own.EHLO, Own.HELO, Own.XCLIENT, Own.STARTTLS, Command.DATA, Command.EXPN,
                          Command.ETRN))
TLS_MODES = ("no", "opportunistic", "required")
_TRANSACTION_COMMANDS = frozenset((Command.MAIL, Command.RCPT, Command.DATA))


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """Who the backend should believe it talks to (XCLIENT)."""

    addr: str
    helo: str | None
    proto: str
    login: str | None = None  # the AUTH user, when the client authenticated


class BackendClient:
    __slots__ = (
        "_announcement_taken",
        "_answered",
        "_awaiting",
        "_handshake",
        "_parser",
        "_previously_announced",
        "_queue",
        "_replies",
        "_transaction",
        "announced",
        "failure",
        "failure_code",
        "failure_reply",
        "hostname",
        "in_transaction",
        "keywords",
        "pipelining",
        "ready",
        "tls_active",
        "tls_mode",
        "tls_wanted",
        "use_xclient",
        "xclient_attributes",
        "xclient_refused",
    )

    def __init__(self, hostname: str, use_xclient: bool = True, tls_mode: str = "no") -> None:
        self.hostname = hostname
        self.use_xclient = use_xclient
        self.tls_mode = tls_mode  # STARTTLS to the backend: "no", "opportunistic" or "required"
        self.tls_wanted = False  # the backend said 220 to STARTTLS: the I/O layer does the handshake
        self.tls_active = False
        self.ready = False  # greeted and EHLO (or HELO) done: the owner's commands may go
        self.failure: str | None = None  # set once the connection is unusable
        self.failure_code: int | None = None  # the backend's reply code that made it so, if any
        self.failure_reply: Reply | None = None  # what the owner should hear, when not the default
        self.keywords: list[str] | None = None  # the backend's EHLO keywords, greeting line excluded
        self.pipelining = False
        self.xclient_attributes: frozenset[str] = frozenset()
        self.xclient_refused = False  # it lists XCLIENT but refused ours: do not try again here
        self.announced: ClientIdentity | None = None
        self._previously_announced: ClientIdentity | None = None  # before the announcement in progress
        self._announcement_taken = False  # a line of the announcement in progress was accepted
        self._parser = ReplyParser()
        self._queue: deque[tuple[Command | Own, bytes, ClientIdentity | None]] = deque()
        self._awaiting: deque[Command | Own] = deque([Own.GREETING])
        self._handshake: list[bytes] = []  # EHLO or HELO, written before anything queued
        self._replies: list[tuple[Command, int, bytes]] = []
        self.in_transaction = False  # the backend holds a MAIL of the owner's not yet ended or reset
        self._transaction: list[tuple[Command, bytes, ClientIdentity | None]] = []  # since MAIL
        self._answered = False  # the backend answered one of the current transaction's commands

    # -- input -----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.failure is not None:
            return
        try:
            replies = self._parser.feed(data)
        except ReplyError as error:
            self._fail(str(error))
            return
        for code, raw in replies:
            if not self._awaiting or self._handshake:
                # A reply to a command not written yet is no reply to it: the backend talks
                # out of turn, and taking it would shift every later reply by one.
                self._fail("reply to no command")
                return
            self._on_reply(self._awaiting.popleft(), code, raw)
            if self.failure is not None:
                return

    def send(self, command: Command, data: bytes, identity: ClientIdentity | None = None) -> None:
        """Queue one of the owner's commands; ``identity`` comes with MAIL, for XCLIENT."""
        if command is Command.MAIL:
            self._transaction = []
            self._answered = False
            self.in_transaction = True
        elif command is Command.END or command is Command.RSET:
            self.in_transaction = False
        if command in _TRANSACTION_COMMANDS:
            self._transaction.append((command, data, identity))
        self._queue.append((command, data, identity))

    def reset(self) -> None:
        """The owner left between transactions: make sure the backend holds none of its own."""
        if self.in_transaction:
            self._queue.append((Own.RSET, b"RSET\r\n", None))
            self.in_transaction = False
        self._transaction = []

    # -- output ----------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """What may be written now, in as few writes as the backend's pipelining allows."""
        if self.failure is not None:
            return b""
        chunks, self._handshake = self._handshake, []
        if not self.ready:
            return b"".join(chunks)
        queue, awaiting = self._queue, self._awaiting
        while queue:
            if awaiting and (not self.pipelining or any(kind in _SYNC_POINTS for kind in awaiting)):
                break
            kind, data, identity = queue[0]
            if kind is Command.MAIL and identity is not None and self._must_announce(identity):
                # Announced here, not when MAIL was queued: only now are the keywords known,
                # so even the first transaction on a new connection carries the client's name.
                self._queue_announcement(identity)
                continue
            queue.popleft()
            chunks.append(data)
            if kind is not Command.BODY:
                awaiting.append(kind)
        return b"".join(chunks)

    def take_replies(self) -> list[tuple[Command, int, bytes]]:
        """Replies to the owner's commands, in order: (command, code, raw reply)."""
        replies, self._replies = self._replies, []
        return replies

    @property
    def awaiting(self) -> Command | Own | None:
        """The command whose reply is due next (the I/O layer times it), or None."""
        return self._awaiting[0] if self._awaiting else None

    @property
    def owes_owner(self) -> bool:
        """Some owner command has not been answered (queued or sent)."""
        return any(isinstance(kind, Command) for kind in self._awaiting) or any(
            isinstance(kind, Command) for kind, _, _ in self._queue)

    @property
    def mid_transaction(self) -> bool:
        """MAIL, RCPT or DATA is unanswered: the backend may hold a transaction of the owner."""
        return any(kind in _TRANSACTION_COMMANDS for kind in self._awaiting) or bool(self._queue)

    @property
    def idle(self) -> bool:
        return self.ready and self.failure is None and not self._awaiting and not self._queue

    def replayable(self) -> list[tuple[Command, bytes, ClientIdentity | None]] | None:
        """The current transaction's commands if the backend answered none of them, else None:
        they may be sent again on another connection without anything being done twice."""
        if self._answered or not self._transaction or not self.in_transaction:
            return None
        owed = sum(isinstance(kind, Command) for kind in self._awaiting)
        owed += sum(isinstance(kind, Command) for kind, _, _ in self._queue)
        if owed != len(self._transaction):
            return None  # something outside the transaction is owed too: its reply would be lost
        return list(self._transaction)

    # -- internals -------------------------------------------------------------------------

    def _on_reply(self, kind: Command | Own, code: int, raw: bytes) -> None:
        if isinstance(kind, Command):
            if kind in _TRANSACTION_COMMANDS:
                self._answered = True
            self._replies.append((kind, code, raw))
            if code == 421:
                self._fail("the backend is closing: " + reply_lines(raw)[0][:80], code)
            return
        if kind is Own.GREETING:
            if code != 220:
                self._fail(f"greeting {code}: " + reply_lines(raw)[0][:80], code)
                return
            self._write_now(Own.EHLO, f"EHLO {self.hostname}\r\n".encode())
        elif kind is Own.EHLO and 500 <= code < 600 and not self.ready:
            # RFC 5321 §3.2: a server that does not know EHLO says 5xx; a 4xx (421) is no such
            # answer, and HELO to a server that is closing would only wait for nothing.
            self._write_now(Own.HELO, f"HELO {self.hostname}\r\n".encode())
        elif kind in (Own.EHLO, Own.HELO):
            if code != 250:
                self._fail(f"{kind.value} refused with {code}", code)
                return
            if kind is Own.EHLO and not self.ready:
                # Only the handshake's EHLO: the one after an XCLIENT describes the same server,
                # and a backend that stopped listing XCLIENT there must not stop announcements.
                self._learn(reply_lines(raw)[1:])
                if self._start_tls():
                    return
            self.ready = True
        elif kind is Own.STARTTLS:
            if code == 220:
                self.tls_wanted = True
            elif self.tls_mode == "required":
                self._fail(f"STARTTLS refused with {code}", code, r.BACKEND_TLS_FAILED)
            else:
                self.ready = True  # opportunistic: on in plaintext
        elif kind is Own.XCLIENT:
            # Postfix answers with a new greeting (220), other servers with 250: both took it.
            if 200 <= code < 300:
                self._announcement_taken = True
            else:
                self._xclient_refused(code)
        elif kind is Own.RSET and code != 250:
            self._fail(f"RSET refused with {code}", code)

    def _write_now(self, kind: Own, data: bytes) -> None:
        """A handshake step, ahead of anything queued."""
        self._awaiting.append(kind)
        self._handshake.append(data)

    def _learn(self, keyword_lines: list[str]) -> None:
        keywords = {line.split(" ", 1)[0].upper(): line for line in keyword_lines}
        self.keywords = keyword_lines
        self.pipelining = "PIPELINING" in keywords
        xclient = keywords.get("XCLIENT")
        self.xclient_attributes = frozenset(xclient.upper().split()[1:]) if xclient else frozenset()

    def _must_announce(self, identity: ClientIdentity) -> bool:
        if identity == self.announced:
            return False
        if self.use_xclient and self.xclient_attributes and not self.xclient_refused:
            return True
        if self.announced is not None:
            # Someone else was announced here and this client cannot be: its mail would go as
            # theirs. The connection is unusable (its transaction can be replayed on another).
            self._fail("cannot announce the next client with XCLIENT")
        return False

    def _xclient_refused(self, code: int) -> None:
        if code == 421 or self._announcement_taken or self._previously_announced is not None:
            # Part of the new identity, or an earlier client's, is what the backend now holds.
            self._fail(f"XCLIENT refused with {code} after an announcement", code)
            return
        # It lists XCLIENT but will not take it from us: carry on as ourselves, unannounced, and
        # drop what is left of the announcement (further XCLIENT lines, the EHLO as the client).
        self.xclient_refused = True
        self.announced = None
        while self._queue and self._queue[0][0] in (Own.XCLIENT, Own.EHLO):
            self._queue.popleft()

    def _queue_announcement(self, identity: ClientIdentity) -> None:
        # XCLIENT restarts the backend's session: it greets again and wants a new EHLO, whose
        # name would replace the announced HELO, so it must be the client's own.
        steps: list[tuple[Command | Own, bytes, ClientIdentity | None]] = [
            (Own.XCLIENT, line, None) for line in xclient_commands(identity, self.xclient_attributes)]
        steps.append((Own.EHLO, f"EHLO {identity.helo or self.hostname}\r\n".encode(), None))
        self._queue.extendleft(reversed(steps))
        self._previously_announced = self.announced
        self._announcement_taken = False
        self.announced = identity

    def _start_tls(self) -> bool:
        """After the first EHLO: ask for TLS when the mode wants it; True when the handshake
        goes on (STARTTLS sent, or the connection failed for want of it)."""
        if self.tls_mode == "no" or self.tls_active:
            return False
        if self.keywords is not None and any(line.upper().split(" ", 1)[0] == "STARTTLS" for line in self.keywords):
            self._write_now(Own.STARTTLS, b"STARTTLS\r\n")
            return True
        if self.tls_mode == "required":
            self._fail("STARTTLS required, and the backend does not offer it", None, r.BACKEND_TLS_FAILED)
            return True
        return False

    def tls_started(self) -> None:
        """The I/O layer finished the handshake: RFC 3207 §4.2, start over with EHLO."""
        self.tls_wanted = False
        self.tls_active = True
        self.keywords = None
        self._write_now(Own.EHLO, f"EHLO {self.hostname}\r\n".encode())

    def tls_failed(self, reason: str) -> None:
        self.tls_wanted = False
        self._fail(f"TLS handshake failed: {reason}", None, r.BACKEND_TLS_FAILED)

    def _fail(self, reason: str, code: int | None = None, reply: Reply | None = None) -> None:
        if self.failure is None:
            self.failure = reason
            self.failure_code = code
            self.failure_reply = reply


def xtext(value: str) -> str:
    """RFC 3461 §4 xtext: '+', '=' and anything outside printable ASCII as +HH."""
    out = []
    for byte in value.encode("utf-8"):
        out.append(chr(byte) if 33 <= byte <= 126 and byte not in (43, 61) else f"+{byte:02X}")
    return "".join(out)


def xclient_commands(identity: ClientIdentity, offered: frozenset[str]) -> list[bytes]:
    """XCLIENT lines announcing ``identity``, each within the command length limit."""
    addr = identity.addr
    if ":" in addr:
        addr = addr[7:] if addr.lower().startswith("::ffff:") and "." in addr else "IPV6:" + addr
    # NAME: we do no reverse lookup; Postfix's word for "we do not know" keeps its checks sane.
    values = {"ADDR": addr, "NAME": "[UNAVAILABLE]", "PROTO": identity.proto}
    if identity.helo:
        values["HELO"] = identity.helo
    # Attributes persist on a reused connection (XCLIENT_README): an unauthenticated client after
    # an authenticated one must say so, or it would pass for the earlier user.
    values["LOGIN"] = identity.login or "[UNAVAILABLE]"
    attributes = [f"{key}={xtext(value)}" for key, value in values.items() if key in offered]
    lines: list[bytes] = []
    current = "XCLIENT"
    for attribute in attributes:
        if len(current) + 1 + len(attribute) + 2 > XCLIENT_LINE_LIMIT and current != "XCLIENT":
            lines.append((current + "\r\n").encode())
            current = "XCLIENT"
        current += " " + _cut_xtext(attribute, XCLIENT_LINE_LIMIT - 12)
    if current != "XCLIENT":
        lines.append((current + "\r\n").encode())
    return lines


def _cut_xtext(attribute: str, length: int) -> str:
    """At most ``length`` characters of ``attribute``, never ending inside a +HH escape."""
    if len(attribute) <= length:
        return attribute
    cut = attribute[:length]
    plus = cut.rfind("+", len(cut) - 2)
    return cut[:plus] if plus >= 0 else cut
