"""Real SMTP servers on loopback for the proxy to talk to, each on its own thread and loop.

``AiosmtpdSink`` is aiosmtpd, a third-party SMTP server (it does not offer PIPELINING, so the
proxy's one-command-at-a-time path runs against it). ``PipeliningSink`` is a small strict server
of ours that offers PIPELINING and XCLIENT and can be told to misbehave, for the fault tests.

Every server counts the connections it accepted (``connections``), those open now
(``open_connections``) and the most it ever held open at once (``max_open_connections``).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Message:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    xclient: dict[str, str] = field(default_factory=dict)


class _LoopThread:
    """An event loop on a thread, serving a protocol factory on 127.0.0.1:<free port>."""

    def __init__(self, factory: Callable[[], asyncio.Protocol]) -> None:
        self._factory = factory
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0
        self.connections = 0
        self.open_connections = 0
        self.max_open_connections = 0  # high-water mark of connections open at once
        self.messages: list[Message] = []
        self._lock = threading.Lock()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._server = self._loop.run_until_complete(self._loop.create_server(self._counted, sock=sock))
        self._started.set()
        self._loop.run_forever()
        self._server.close()
        self._loop.run_until_complete(self._server.wait_closed())
        self._loop.close()

    def _counted(self) -> asyncio.Protocol:
        with self._lock:
            self.connections += 1
            self.open_connections += 1
            self.max_open_connections = max(self.max_open_connections, self.open_connections)
        protocol = self._factory()
        lost = protocol.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            with self._lock:
                self.open_connections -= 1
            lost(exc)

        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        return protocol

    def record(self, message: Message) -> None:
        with self._lock:
            self.messages.append(message)

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def __enter__(self) -> _LoopThread:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("backend did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class AiosmtpdSink(_LoopThread):
    def __init__(self, final_delay: float = 0.0) -> None:
        sink = self
        self.final_delay = final_delay

        class Handler:
            async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
                if sink.final_delay:
                    await asyncio.sleep(sink.final_delay)
                content = envelope.original_content or b""
                sink.record(Message(envelope.mail_from or "", list(envelope.rcpt_tos), content))
                return "250 2.0.0 Stored"

        super().__init__(lambda: SMTP(Handler(), enable_SMTPUTF8=True, hostname="aiosmtpd-sink"))


class PipeliningSink(_LoopThread):
    """A strict little SMTP server: CRLF only, PIPELINING, optional XCLIENT, fault knobs.

    ``die_after_body_bytes``: close the connection once that much body has arrived.
    ``final_delay``: seconds before answering the end of data.
    ``mail_reply``: a reply to give every MAIL instead of 250.
    ``close_after_mail_reply``: close the connection right after giving ``mail_reply``.
    ``rcpt_delay``: seconds before answering a RCPT; replies to later commands wait behind it.
    ``drop_on_reuse``: a MAIL on a connection that already completed a transaction closes the
    connection without a reply (a pooled connection that died while idle).
    ``close_on_connect``: close every new connection at once, without a greeting (a backend that
    is down); read per connection, so a test may change it to bring the backend back.
    ``smtputf8``: offer SMTPUTF8 (it takes UTF-8 command lines as they come).
    ``rcpt_replies``: the reply to a RCPT for each address listed (others get 250); may change.
    """

    def __init__(
        self,
        xclient: bool = False,
        die_after_body_bytes: int | None = None,
        final_delay: float = 0.0,
        mail_reply: bytes | None = None,
        size: int = 0,
        close_after_mail_reply: bool = False,
        rcpt_delay: float = 0.0,
        drop_on_reuse: bool = False,
        close_on_connect: bool = False,
        smtputf8: bool = False,
        rcpt_replies: dict[str, bytes] | None = None,
    ) -> None:
        self.xclient = xclient
        self.die_after_body_bytes = die_after_body_bytes
        self.final_delay = final_delay
        self.mail_reply = mail_reply
        self.size = size
        self.close_after_mail_reply = close_after_mail_reply
        self.rcpt_delay = rcpt_delay
        self.drop_on_reuse = drop_on_reuse
        self.close_on_connect = close_on_connect
        self.smtputf8 = smtputf8
        self.rcpt_replies = rcpt_replies or {}
        self.commands: list[bytes] = []
        super().__init__(lambda: _PipeliningProtocol(self))


class _PipeliningProtocol(asyncio.Protocol):
    def __init__(self, sink: PipeliningSink) -> None:
        self.sink = sink
        self.buffer = b""
        self.in_data = False
        self.body = b""
        self.mail_from = ""
        self.rcpts: list[str] = []
        self.xclient: dict[str, str] = {}
        self.completed = 0  # transactions this connection completed (250 to the end of data)
        self.held: list[bytes] | None = None  # replies waiting behind a delayed one

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.sink.close_on_connect:
            transport.close()
            return
        transport.write(b"220 pipelining-sink ESMTP\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.buffer:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if self.sink.die_after_body_bytes is not None and len(self.body) + len(self.buffer) >= (
                    self.sink.die_after_body_bytes
                ):
                    self.transport.close()
                    return
                if end < 0 and self.buffer.startswith(b".\r\n") and not self.body:
                    end = -2  # the empty message
                if end < 0 and not self.buffer.startswith(b".\r\n"):
                    self.body += self.buffer
                    self.buffer = b""
                    return
                cut = end + 2 if end >= 0 else 0
                self.body += self.buffer[:cut]
                self.buffer = self.buffer[cut + 3 :]
                self.in_data = False
                self._finish_message()
                continue
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                return
            line, self.buffer = self.buffer[:line_end], self.buffer[line_end + 2 :]
            self.sink.commands.append(line)
            self._command(line)

    def _reply(self, text: bytes) -> None:
        if self.held is not None:
            self.held.append(text)  # in command order, behind the delayed reply
            return
        self.transport.write(text)  # type: ignore[attr-defined]

    def _delayed_reply(self, text: bytes, seconds: float) -> None:
        if self.held is not None:
            self.held.append(text)
            return
        self.held = []

        def release() -> None:
            held, self.held = self.held or [], None
            if not self.transport.is_closing():
                self.transport.write(text + b"".join(held))  # type: ignore[attr-defined]

        asyncio.get_running_loop().call_later(seconds, release)

    def _drop(self) -> None:
        """Close without another word, ignoring whatever else the client pipelined."""
        self.transport.close()
        self.buffer = b""

    def _command(self, line: bytes) -> None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            keywords = [b"pipelining-sink", b"PIPELINING", b"8BITMIME", b"ENHANCEDSTATUSCODES"]
            if self.sink.size:
                keywords.append(b"SIZE %d" % self.sink.size)
            if self.sink.smtputf8:
                keywords.append(b"SMTPUTF8")
            if self.sink.xclient:
                keywords.append(b"XCLIENT ADDR NAME HELO PROTO")
            self._reply(b"".join(b"250-" + k + b"\r\n" for k in keywords[:-1]) + b"250 " + keywords[-1] + b"\r\n")
        elif verb == b"HELO":
            self._reply(b"250 pipelining-sink\r\n")
        elif verb == b"XCLI":
            for item in line.split()[1:]:
                key, _, value = item.decode().partition("=")
                self.xclient[key] = value
            self._reply(b"220 pipelining-sink ESMTP\r\n")
        elif verb == b"MAIL":
            if self.sink.drop_on_reuse and self.completed:
                self._drop()
                return
            if self.sink.mail_reply is not None:
                self._reply(self.sink.mail_reply)
                if self.sink.close_after_mail_reply:
                    self._drop()
                return
            self.mail_from = line.decode().split(":", 1)[1].split(">")[0].lstrip(" <")
            self.rcpts = []
            self._reply(b"250 2.1.0 Ok\r\n")
        elif verb == b"RCPT":
            if not self.mail_from and self.sink.mail_reply is not None:
                self._reply(b"503 5.5.1 Need MAIL\r\n")
                return
            address = line.decode().split(":", 1)[1].split(">")[0].lstrip(" <")
            refusal = self.sink.rcpt_replies.get(address)
            if refusal is not None:
                self._reply(refusal)
                return
            self.rcpts.append(address)
            if self.sink.rcpt_delay:
                self._delayed_reply(b"250 2.1.5 Ok\r\n", self.sink.rcpt_delay)
                return
            self._reply(b"250 2.1.5 Ok\r\n")
        elif verb == b"DATA":
            if not self.rcpts:
                self._reply(b"554 5.5.1 No valid recipients\r\n")
                return
            self.in_data = True
            self.body = b""
            self._reply(b"354 Go ahead\r\n")
        elif verb == b"RSET":
            self.mail_from, self.rcpts = "", []
            self._reply(b"250 2.0.0 Ok\r\n")
        elif verb == b"QUIT":
            self._reply(b"221 2.0.0 Bye\r\n")
            self.transport.close()
        else:
            self._reply(b"250 2.0.0 Ok\r\n")

    def _finish_message(self) -> None:
        # RFC 5321 §4.5.2: a leading dot on a line was added by the sender; remove it.
        lines = [line[1:] if line.startswith(b".") else line for line in self.body.split(b"\r\n")]
        message = Message(self.mail_from, list(self.rcpts), b"\r\n".join(lines), dict(self.xclient))
        self.mail_from, self.rcpts = "", []

        def store() -> None:
            if self.transport.is_closing():
                return
            self.sink.record(message)
            self.completed += 1
            self._reply(b"250 2.0.0 Ok: queued\r\n")

        if self.sink.final_delay:
            asyncio.get_running_loop().call_later(self.sink.final_delay, store)
        else:
            store()
