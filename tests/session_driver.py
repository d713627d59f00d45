"""Plays both peers of the sans-IO SMTP core for the session tests.

The test is the client (it feeds bytes) and :class:`Driver` is also the backend: a test double
that answers each command the core sends, in order (MAIL/RCPT/RSET 250, DATA 354, END 250 by
default, or what a script says), and records every byte it was sent. No sockets: the end-to-end
tests elsewhere use real servers; here the subject is the core's own bookkeeping.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from edgeproxy import fastpath_common as fc
from edgeproxy.config import Settings
from edgeproxy.policy import Policy
from edgeproxy.smtp import events as ev
from edgeproxy.smtp.capabilities import Capabilities
from edgeproxy.smtp.session import SessionLimits, SmtpSession

HOSTNAME = "proxy.test"
LOCAL = "example.test"  # EDGEPROXY_LOCAL_DOMAINS' default
# What a full-featured backend's EHLO lists (the greeting line excluded).
FULL_BACKEND = ("PIPELINING", "SIZE 52428800", "8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES")

# The backend's answers carry texts of their own, so a test can tell them from the proxy's.
MAIL_OK = (250, b"250 2.1.0 backend: sender ok\r\n")
RCPT_OK = (250, b"250 2.1.5 backend: recipient ok\r\n")
DATA_GO = (354, b"354 backend: end data with <CR><LF>.<CR><LF>\r\n")
QUEUED = (250, b"250 2.0.0 backend: queued as 4711\r\n")
RSET_OK = (250, b"250 2.0.0 backend: reset\r\n")
EXPN_OK = (250, b"250 2.1.5 backend: expanded\r\n")
DEFAULT_ANSWERS: dict[str, tuple[int, bytes]] = {
    ev.Command.MAIL: MAIL_OK,
    ev.Command.RCPT: RCPT_OK,
    ev.Command.DATA: DATA_GO,
    ev.Command.END: QUEUED,
    ev.Command.RSET: RSET_OK,
    ev.Command.EXPN: EXPN_OK,
    ev.Command.ETRN: EXPN_OK,
}

SMTP = b"EHLO client.test\r\n"
MAIL = b"MAIL FROM:<sender@remote.test>\r\n"
RCPT = b"RCPT TO:<user@example.test>\r\n"
RCPT2 = b"RCPT TO:<other@example.test>\r\n"
RELAY = b"RCPT TO:<victim@far.test>\r\n"
END = b"\r\n.\r\n"

REPLY_LINE = re.compile(rb"\d{3}[ -][^\r\n]*\r\n")


def settings(**env: str) -> Settings:
    """Settings from ``EDGEPROXY_<KEY>`` variables; the hostname is fixed so no DNS is asked."""
    environ = {"EDGEPROXY_HOSTNAME": HOSTNAME}
    environ.update({f"EDGEPROXY_{key.upper()}": value for key, value in env.items()})
    return Settings.from_env(environ)


def make_session(
    config: Settings | None = None,
    *,
    backend_ehlo: Iterable[str] | None = FULL_BACKEND,
    grant: int = fc.GRANT_NONE,
    received_header: bool = False,
    enable_expn: bool = False,
    enable_etrn: bool = False,
) -> SmtpSession:
    config = config if config is not None else settings()
    limits = SessionLimits(
        HOSTNAME,
        config.max_line_length,
        config.max_body_line_length,
        config.max_errors,
        received_header,
        enable_expn,
        enable_etrn,
        max_pending_input=config.max_pending_input,
        max_pipeline=config.max_pipeline,
        recipient_overshoot=config.recipient_overshoot_limit,
        junk_command_limit=config.junk_command_limit,
    )
    keywords = None if backend_ehlo is None else list(backend_ehlo)
    capabilities = Capabilities.negotiate(config.max_message_size, keywords)
    return SmtpSession(limits, Policy(config), capabilities, "192.0.2.7", grant, "sess1", clock=lambda: 0.0)


class Driver:
    """The client's and the backend's side of one session.

    ``auto`` answers every command as soon as the core sends it; without it, commands wait in
    :attr:`pending` until :meth:`answer`. ``script`` maps ``(kind, n)`` (the n-th command of that
    kind, from 0) to the answer to give instead of the default. A BackendAbort or a backend
    failure ends the current backend connection: its unanswered commands are never answered
    (counted in :attr:`lost`), and later commands go to a new one, as the I/O layer does.
    """

    def __init__(
        self,
        session: SmtpSession | None = None,
        *,
        auto: bool = True,
        script: Mapping[tuple[str, int], tuple[int, bytes]] | None = None,
        greet: bool = True,
    ) -> None:
        self.session = session if session is not None else make_session()
        self.auto = auto
        self.script = dict(script or {})
        self.counts: Counter[str] = Counter()
        self.pending: deque[ev.BackendSend] = deque()
        self.events: list[object] = []
        self.connections: list[list[ev.BackendSend]] = [[]]
        self.lost = 0
        self.lost_at_abort = 0  # replies the core still expected when it asked for an abort
        self.answers: list[tuple[str, int]] = []  # (kind, code) of every answer given
        self.output = bytearray()
        self._read = 0
        if greet:
            self.output += self.session.greeting()
            self._read = len(self.output)  # read() and feed() return replies to commands only

    # -- the client's side ---------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """Send ``data`` as one write; return the client output it (and the backend) produced."""
        self.session.receive_data(data)
        self.pump()
        return self.read()

    def feed_chunks(self, chunks: Iterable[bytes]) -> bytes:
        for chunk in chunks:
            self.session.receive_data(chunk)
            self.pump()
        return self.read()

    def lose_client(self) -> None:
        self.session.connection_lost()
        self.pump()

    def read(self) -> bytes:
        """Client output not read yet."""
        data = bytes(self.output[self._read :])
        self._read = len(self.output)
        return data

    # -- the backend's side --------------------------------------------------------------------

    def answer(self, count: int = 1, reply: tuple[int, bytes] | None = None) -> bytes:
        """Answer the next ``count`` pending commands; return the client output that follows."""
        for _ in range(count):
            self._answer_one(reply)
            self.pump()
        return self.read()

    def fail_backend(self) -> bytes:
        self._new_connection()
        self.session.backend_failed()
        self.pump()
        return self.read()

    def _answer_one(self, reply: tuple[int, bytes] | None = None) -> None:
        command = self.pending.popleft()
        number = self.counts[command.command]
        self.counts[command.command] += 1
        if reply is None:
            reply = self.script.get((command.command, number), DEFAULT_ANSWERS[command.command])
        self.answers.append((command.command, reply[0]))
        self.session.backend_reply(*reply)

    def _new_connection(self) -> None:
        self.lost += len(self.pending)
        self.pending.clear()
        self.connections.append([])

    def pump(self) -> None:
        while True:
            self.output += self.session.take_output()
            events = self.session.take_events()
            for event in events:
                self.events.append(event)
                if isinstance(event, ev.BackendSend):
                    self.connections[-1].append(event)
                    if event.command.expects_reply:
                        self.pending.append(event)
                elif isinstance(event, ev.BackendAbort):
                    self.lost_at_abort += len(self.pending)
                    self._new_connection()
            if self.auto and self.pending:
                self._answer_one()
                continue
            if self.session.can_resume:  # as the I/O layer does once the client took its replies
                self.session.resume()
                continue
            if not events:
                break
        self.output += self.session.take_output()

    # -- what happened -------------------------------------------------------------------------

    @property
    def sent(self) -> list[ev.BackendSend]:
        return [event for event in self.events if isinstance(event, ev.BackendSend)]

    def commands(self, kind: str | None = None) -> list[bytes]:
        """Data of every reply-expecting command sent (of ``kind``), END chunks excluded."""
        return [
            send.data
            for send in self.sent
            if send.command.expects_reply and send.command != ev.Command.END and (kind is None or send.command == kind)
        ]

    def kinds(self) -> list[str]:
        return [send.command for send in self.sent]

    @property
    def backend_bytes(self) -> bytes:
        return b"".join(send.data for send in self.sent)

    def messages(self) -> list[bytes]:
        """Each body ended with an END chunk: BODY chunks and the END chunk, joined."""
        done, current = [], bytearray()
        for event in self.events:
            if isinstance(event, ev.BackendSend) and event.command in (ev.Command.BODY, ev.Command.END):
                current += event.data
                if event.command == ev.Command.END:
                    done.append(bytes(current))
                    current.clear()
            elif isinstance(event, ev.BackendAbort):
                current.clear()
        return done

    @property
    def aborts(self) -> list[ev.BackendAbort]:
        return [event for event in self.events if isinstance(event, ev.BackendAbort)]

    @property
    def refused(self) -> list[ev.Refused]:
        return [event for event in self.events if isinstance(event, ev.Refused)]

    @property
    def ended(self) -> list[ev.TransactionEnded]:
        return [event for event in self.events if isinstance(event, ev.TransactionEnded)]


def started(session: SmtpSession | None = None, hello: bytes = SMTP, **options: object) -> Driver:
    """A driver whose client has been greeted and said EHLO; its output so far is read."""
    driver = Driver(session, **options)  # type: ignore[arg-type]
    driver.feed(hello)
    driver.read()
    return driver


def split_replies(output: bytes) -> list[bytes]:
    """The client output as whole replies (a multi-line reply is one item); asserts well-formed."""
    replies, current = [], b""
    for line in output.splitlines(keepends=True):
        assert REPLY_LINE.fullmatch(line), f"malformed reply line {line!r} in {output!r}"
        current += line
        if line[3:4] == b" ":
            replies.append(current)
            current = b""
    assert not current, f"unfinished multi-line reply {current!r}"
    return replies


def well_formed(output: bytes) -> bool:
    position = 0
    while position < len(output):
        match = REPLY_LINE.match(output, position)
        if match is None:
            return False
        position = match.end()
    return True


@dataclass
class Digest:
    """What must not depend on how the client's bytes were chunked.

    ``trace`` holds, in order, every command sent to the backend, each message as the backend
    received it (BODY and END chunks joined), each abort and each refusal. Body bytes streamed
    before an abort are left out: they never became a message, and how many of them went out
    depends on where the chunk that revealed the problem began.
    """

    output: bytes
    trace: list[tuple[object, ...]] = field(default_factory=list)
    ended: list[tuple[bool, int, int, int]] = field(default_factory=list)
    closed: bool = False


def digest(driver: Driver) -> Digest:
    result = Digest(bytes(driver.output), closed=driver.session.closed)
    body = bytearray()
    for event in driver.events:
        if isinstance(event, ev.BackendSend):
            if event.command == ev.Command.BODY:
                body += event.data
            elif event.command == ev.Command.END:
                result.trace.append(("message", bytes(body + event.data)))
                body.clear()
            else:
                result.trace.append((event.command, event.data))
        elif isinstance(event, ev.BackendAbort):
            result.trace.append(("abort",))
            body.clear()
        elif isinstance(event, ev.Refused):
            result.trace.append(("refused", event.stage, event.rule, str(event.reply)))
        elif isinstance(event, ev.TransactionEnded):
            result.ended.append((event.delivered, event.recipients, event.size, event.reply_code))
    return result
