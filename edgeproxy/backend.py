"""Connections to the real mail server: handshake, pipelined writer, reply reader, idle pool.

A :class:`BackendConnection` takes commands from the session that owns it as soon as it exists,
queues them while it connects and greets, and writes them pipelined when the backend offers
PIPELINING (else one at a time). Replies to the owner's commands go back to the owner in order;
replies to its own (greeting, EHLO, XCLIENT, the pool's RSET) it consumes itself.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import structlog

from edgeproxy.smtp import events as ev
from edgeproxy.smtp.replyparser import ReplyError, ReplyParser, reply_lines

log = structlog.get_logger("edgeproxy.backend")

# The connection's own commands; their replies never reach a client.
_GREETING = "_GREETING"
_EHLO = "_EHLO"
_HELO = "_HELO"
_XCLIENT = "_XCLIENT"
_RSET = "_RSET"
# RFC 2920 §3.1: a command that changes the session must end a pipeline group.
_SYNC_POINTS = frozenset((_GREETING, _EHLO, _HELO, _XCLIENT, ev.DATA))
_WRITE_HIGH_WATER = 256 * 1024
_XCLIENT_LINE_LIMIT = 512


class BackendOwner(Protocol):
    def backend_reply(self, code: int, raw: bytes) -> None: ...
    def backend_failed(self) -> None: ...
    def backend_writable(self, writable: bool) -> None: ...


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """Who the backend should believe it talks to (XCLIENT)."""

    addr: str
    helo: str | None
    proto: str


class BackendConnection(asyncio.Protocol):
    def __init__(self, pool: BackendPool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = ReplyParser()
        self._queue: deque[tuple[str, bytes]] = deque()
        self._awaiting: deque[str] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._ready = False
        self.owner: BackendOwner | None = None
        self.closed = False
        self.in_transaction = False
        self.pipelining = False
        self.xclient_attributes: frozenset[str] = frozenset()
        self.announced: ClientIdentity | None = None
        self.idle_since = 0.0

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Without it, a pipelined group meets Nagle and delayed ACKs (design.md §3).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self._awaiting.append(_GREETING)
        self._arm_timer(self._pool.connect_timeout)

    def data_received(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except ReplyError as error:
            self._fail(str(error))
            return
        for code, raw in replies:
            if not self._awaiting:
                self._fail("reply to no command")
                return
            self._on_reply(self._awaiting.popleft(), code, raw)
            if self.closed:
                return
        self._after_replies()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self._lost()

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.backend_writable(False)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.backend_writable(True)

    # -- the owner's interface ---------------------------------------------------------------

    def send(self, kind: str, data: bytes, identity: ClientIdentity | None = None) -> None:
        if kind == ev.MAIL:
            if identity is not None and identity != self.announced:
                self._announce(identity)
            self.in_transaction = True
        elif kind in (ev.END, ev.RSET):
            self.in_transaction = False
        self._queue.append((kind, data))

    def flush(self) -> None:
        """Write what ``send`` queued, in as few writes as the backend's pipelining allows."""
        self._flush()

    def abort(self) -> None:
        """Drop the connection at once, without ending any message it carries."""
        self.owner = None
        if self._transport is not None:
            self._transport.abort()
        self._lost()

    def release(self) -> None:
        """The owner is done. Keep the connection for reuse if that is safe."""
        self.owner = None
        if self.closed:
            return
        if self._queue or any(kind in (ev.MAIL, ev.RCPT, ev.DATA) for kind in self._awaiting):
            # The owner left mid-command; whatever the backend holds must not become a message.
            self.abort()
            return
        if self.in_transaction:
            self._queue.append((_RSET, b"RSET\r\n"))
            self.in_transaction = False
            self._flush()
        self._maybe_idle()

    # -- internals ---------------------------------------------------------------------------

    def connect_failed(self, reason: str) -> None:
        log.warning("backend_connect_failed", reason=reason, backend=self._pool.address)
        self._lost()

    def _on_reply(self, kind: str, code: int, raw: bytes) -> None:
        if kind == _GREETING:
            if code != 220:
                self._fail(f"greeting {code}")
                return
            self._write_now(_EHLO, f"EHLO {self._pool.hostname}\r\n".encode())
        elif kind in (_EHLO, _HELO):
            if kind == _EHLO and code != 250 and not self._ready:
                self._write_now(_HELO, f"HELO {self._pool.hostname}\r\n".encode())
            elif code != 250:
                self._fail(f"{kind[1:]} refused with {code}")
            else:
                if kind == _EHLO:
                    self._learn(reply_lines(raw)[1:])
                if not self._ready:
                    self._ready = True
                    self._arm_timer(None)
        elif kind == _XCLIENT:
            # Postfix answers with a new greeting (220), other servers with 250: both took it.
            if not 200 <= code < 300:
                # The backend lists XCLIENT but will not take it from us: carry on without it.
                log.warning("backend_xclient_refused", code=code, backend=self._pool.address)
                self._pool.xclient_refused = True
        elif kind == _RSET:
            if code != 250:
                self._fail(f"RSET refused with {code}")
        elif self.owner is not None:
            self.owner.backend_reply(code, raw)

    def _after_replies(self) -> None:
        if self._awaiting:
            self._arm_timer(self._timeout_for(self._awaiting[0]))
        else:
            self._arm_timer(None)
        self._flush()
        if self.owner is None:
            self._maybe_idle()

    def _learn(self, keyword_lines: list[str]) -> None:
        keywords = {line.split(" ", 1)[0].upper(): line for line in keyword_lines}
        self.pipelining = "PIPELINING" in keywords
        xclient = keywords.get("XCLIENT")
        self.xclient_attributes = frozenset(xclient.upper().split()[1:]) if xclient else frozenset()
        self._pool.learn(keyword_lines)

    def _announce(self, identity: ClientIdentity) -> None:
        if not (self.xclient_attributes and self._pool.use_xclient) or self._pool.xclient_refused:
            return
        for line in xclient_commands(identity, self.xclient_attributes):
            self._queue.append((_XCLIENT, line))
        # XCLIENT restarts the backend's session: it greets again and wants a new EHLO, whose
        # name would replace the announced HELO, so it must be the client's own.
        helo = identity.helo or self._pool.hostname
        self._queue.append((_EHLO, f"EHLO {helo}\r\n".encode()))
        self.announced = identity

    def _flush(self) -> None:
        if not self._ready or self.closed or self._transport is None:
            return
        chunks = []
        while self._queue:
            if self._awaiting and (not self.pipelining or any(k in _SYNC_POINTS for k in self._awaiting)):
                break
            kind, data = self._queue.popleft()
            chunks.append(data)
            if kind != ev.BODY:
                if not self._awaiting:
                    self._arm_timer(self._timeout_for(kind))
                self._awaiting.append(kind)
        if chunks:
            self._transport.write(b"".join(chunks))

    def _write_now(self, kind: str, data: bytes) -> None:
        assert self._transport is not None
        self._awaiting.append(kind)
        self._transport.write(data)

    def _timeout_for(self, kind: str) -> float:
        if not self._ready:
            return self._pool.connect_timeout
        # RFC 5321 §4.5.3.2.6: the reply to the end of data may take 10 minutes.
        return self._pool.reply_timeout * (2 if kind == ev.END else 1)

    def _arm_timer(self, seconds: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if seconds is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(seconds, self._fail, "backend timeout")

    def _maybe_idle(self) -> None:
        if self.owner is None and not self.closed and self._ready and not self._awaiting and not self._queue:
            self._pool.put_back(self)

    def _fail(self, reason: str) -> None:
        if self.closed:
            return
        log.warning("backend_failed", reason=reason, backend=self._pool.address)
        if self._transport is not None:
            self._transport.abort()
        self._lost()

    def _lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._arm_timer(None)
        self._pool.forget(self)
        owner, self.owner = self.owner, None
        owed = any(not kind.startswith("_") for kind in self._awaiting) or self._queue
        if owner is not None and (owed or self.in_transaction):
            owner.backend_failed()

    def close_idle(self) -> None:
        """Say goodbye politely to a backend connection nobody uses."""
        if self._transport is not None and not self.closed:
            self.closed = True
            self._arm_timer(None)
            self._transport.write(b"QUIT\r\n")
            self._transport.close()


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
    attributes = [f"{key}={xtext(value)}" for key, value in values.items() if key in offered]
    lines: list[bytes] = []
    current = "XCLIENT"
    for attribute in attributes:
        if len(current) + 1 + len(attribute) + 2 > _XCLIENT_LINE_LIMIT and current != "XCLIENT":
            lines.append((current + "\r\n").encode())
            current = "XCLIENT"
        current += " " + attribute[: _XCLIENT_LINE_LIMIT - 12]
    if current != "XCLIENT":
        lines.append((current + "\r\n").encode())
    return lines


class BackendPool:
    """Connections to one backend address, with the idle ones kept for reuse."""

    def __init__(
        self,
        host: str,
        port: int,
        hostname: str,
        pool_size: int,
        idle_timeout: float,
        connect_timeout: float,
        reply_timeout: float,
        use_xclient: bool,
    ) -> None:
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.hostname = hostname
        self.pool_size = pool_size
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.use_xclient = use_xclient
        self.xclient_refused = False
        self.keywords: list[str] | None = None  # the backend's last EHLO keywords
        self._idle: list[BackendConnection] = []
        self._open: set[BackendConnection] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def acquire(self, owner: BackendOwner) -> BackendConnection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                connection.owner = owner
                return connection
        connection = BackendConnection(self)
        connection.owner = owner
        self._open.add(connection)
        asyncio.get_running_loop().create_task(self._connect(connection))
        return connection

    async def _connect(self, connection: BackendConnection) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: connection, self.host, self.port),
                                   self.connect_timeout)
        except (OSError, TimeoutError) as error:
            connection.connect_failed(str(error) or type(error).__name__)

    def put_back(self, connection: BackendConnection) -> None:
        if connection in self._idle:
            return
        if len(self._idle) >= self.pool_size:
            connection.close_idle()
            self.forget(connection)
            return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle_timeout / 2, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = time.monotonic() - self.idle_timeout
        for connection in [c for c in self._idle if c.idle_since < deadline]:
            self._idle.remove(connection)
            connection.close_idle()
            self.forget(connection)
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle_timeout / 2, self._sweep)

    def forget(self, connection: BackendConnection) -> None:
        self._open.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)

    def learn(self, keyword_lines: list[str]) -> None:
        self.keywords = keyword_lines

    async def probe(self) -> bool:
        """Open one connection to learn the backend's EHLO; True when it answered."""
        class _Waiter:
            def backend_reply(self, code: int, raw: bytes) -> None:  # pragma: no cover - none sent
                pass

            def backend_failed(self) -> None:
                pass

            def backend_writable(self, writable: bool) -> None:
                pass

        connection = self.acquire(_Waiter())
        deadline = time.monotonic() + self.connect_timeout + 1
        while time.monotonic() < deadline and not connection.closed and self.keywords is None:
            await asyncio.sleep(0.01)
        connection.release()
        return self.keywords is not None

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def close_all(self) -> None:
        for connection in list(self._idle):
            connection.close_idle()
        self._idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
