"""Connections to the real mail server: asyncio glue around the sans-IO client, and the pool.

- :class:`BackendConnection` moves bytes between a socket and a
  :class:`~edgeproxy.smtp.client.BackendClient`, times the reply due, and reports loss.
- :class:`BackendLease` is one session's claim on a connection: it holds the session's commands
  while the pool finds one, gives the connection back when the session's transaction is over,
  and replays a transaction on a fresh connection when a pooled one turns out dead before the
  backend answered any of it.
- :class:`edgeproxy.pool.BackendPool` keeps them within a budget.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

import structlog

from edgeproxy.reply import Reply
from edgeproxy.smtp import replies as r
from edgeproxy.smtp.client import BackendClient, ClientIdentity
from edgeproxy.smtp.events import Command

if TYPE_CHECKING:
    from edgeproxy.pool import BackendPool

log = structlog.get_logger("edgeproxy.backend")

_WRITE_HIGH_WATER = 256 * 1024
PendingCommand = tuple[Command, bytes, ClientIdentity | None]


class BackendOwner(Protocol):
    def backend_reply(self, code: int, raw: bytes) -> None: ...
    def backend_failed(self, reply: Reply) -> None: ...
    def backend_writable(self, writable: bool) -> None: ...


class BackendConnection(asyncio.Protocol):
    __slots__ = ("_pool", "_timer", "_timer_stale", "_tls_task", "_transport", "client", "closed", "idle_since",
                 "lease", "reused")

    def __init__(self, pool: BackendPool) -> None:
        self._pool = pool
        self.client = BackendClient(pool.hostname, pool.use_xclient, pool.tls_mode)
        self._transport: asyncio.Transport | None = None
        self._tls_task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Set by anything that moves the deadline (bytes written, a reply read); a flush that
        # writes nothing leaves a running timer alone rather than re-arming it each round.
        self._timer_stale = False
        self.lease: BackendLease | None = None
        self.closed = False
        self.reused = False  # taken from the idle pool: it may have died there unnoticed
        self.idle_since = 0.0

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        # (TCP_NODELAY, design.md §3: both loops set it on every TCP transport themselves.)
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        client = self.client
        was_ready = client.ready
        client.receive_data(data)
        self._timer_stale = True
        for _, code, raw in client.take_replies():
            if self.lease is not None:
                self.lease.owner.backend_reply(code, raw)
        if not was_ready and client.ready:
            self._pool.connection_ready(self)
        if self.closed:
            return  # the owner aborted it while handling a reply
        if client.failure is not None:
            self._fail(client.failure, client.failure_code)
            return
        if client.tls_wanted and self._tls_task is None:
            self._tls_task = asyncio.get_running_loop().create_task(self._start_tls())
            return
        self.flush()
        if self.lease is None and client.idle and not self.closed:
            self._pool.put_back(self)

    async def _start_tls(self) -> None:
        """STARTTLS accepted: our own handshake with the backend (design.md §7: TLS on both legs
        is the proxy's own, never passed through)."""
        loop = asyncio.get_running_loop()
        pool = self._pool
        assert self._transport is not None and pool.tls_context is not None
        self._cancel_timer()
        try:
            transport = await loop.start_tls(
                self._transport, self, pool.tls_context,
                server_hostname=pool.host if pool.tls_context.check_hostname else None,
                ssl_handshake_timeout=pool.connect_timeout,
            )
        except (OSError, TimeoutError, ValueError) as error:  # ssl.SSLError is an OSError
            if not self.closed:
                self.client.tls_failed(str(error) or type(error).__name__)
                log.warning("backend_tls_failed", reason=self.client.failure, backend=pool.address)
                self._fail(self.client.failure or "TLS handshake failed")
            return
        if self.closed or transport is None:
            return
        self._transport = transport  # type: ignore[assignment]
        self.client.tls_started()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self._lost("connection lost" + (f": {exc}" if exc else ""), backend_fault=True)

    def pause_writing(self) -> None:
        if self.lease is not None:
            self.lease.owner.backend_writable(False)

    def resume_writing(self) -> None:
        if self.lease is not None:
            self.lease.owner.backend_writable(True)

    # -- the lease's interface ----------------------------------------------------------------

    def flush(self) -> None:
        """Write what the client may send now; one write for a whole pipeline group."""
        if self._transport is None or self.closed:
            return
        data = self.client.data_to_send()
        if data:
            self._transport.write(data)
            self._timer_stale = True
        if self._timer_stale:
            self._timer_stale = False
            self._arm_timer()

    def abort(self) -> None:
        """Drop the connection at once, without ending any message it carries."""
        self.lease = None
        if self._tls_task is not None:
            self._tls_task.cancel()
        if self._transport is not None:
            self._transport.abort()
        self._lost("aborted", backend_fault=False)

    def close_idle(self) -> None:
        """Say goodbye politely to a backend connection nobody uses."""
        if self.closed:
            return
        self.closed = True
        self._cancel_timer()
        self._pool.forget(self)
        if self._transport is not None:
            self._transport.write(b"QUIT\r\n")
            self._transport.close()

    # -- internals ---------------------------------------------------------------------------

    def connect_failed(self, reason: str) -> None:
        self._lost(reason, backend_fault=True)

    def _arm_timer(self) -> None:
        self._cancel_timer()
        due = self.client.awaiting
        if due is None:
            return
        pool = self._pool
        if not self.client.ready:
            seconds = pool.connect_timeout
        else:
            # RFC 5321 §4.5.3.2.6: the reply to the end of data may take 10 minutes.
            seconds = pool.reply_timeout * (2 if due is Command.END else 1)
        self._timer = self._pool.loop.call_later(seconds, self._fail, "backend timeout")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, reason: str, code: int | None = None) -> None:
        if self.closed:
            return
        if code == 421:
            log.warning("backend_closed", code=code, reason=reason, backend=self._pool.address)
        elif self.client.ready:
            log.warning("backend_failed", reason=reason, backend=self._pool.address)
        if self._transport is not None:
            self._transport.abort()
        self._lost(reason, backend_fault=True)

    def _lost(self, reason: str, backend_fault: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancel_timer()
        self._pool.forget(self, reason if backend_fault else "")
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.connection_lost(self)


class BackendLease:
    """One session's claim on a backend connection, one transaction at a time."""

    __slots__ = ("_failing", "_pending", "_replayed", "_sending", "_wait_timer", "connection", "owner", "pool")

    def __init__(self, pool: BackendPool, owner: BackendOwner) -> None:
        self.pool = pool
        self.owner = owner
        self.connection: BackendConnection | None = None
        self._pending: list[PendingCommand] = []  # held while the pool finds a connection
        self._wait_timer: asyncio.TimerHandle | None = None
        self._failing = False  # the owner is being told; what it sends meanwhile gets 4xx too
        self._replayed = False
        self._sending = False

    @property
    def waiting(self) -> bool:
        return self._wait_timer is not None

    def send(self, command: Command, data: bytes, identity: ClientIdentity | None = None) -> None:
        if self._failing:
            return
        if self.connection is not None:
            self.connection.client.send(command, data, identity)
            return
        self._pending.append((command, data, identity))
        if not self.waiting:
            self._sending = True
            try:
                self.pool.request(self)
            finally:
                self._sending = False

    def flush(self) -> None:
        if self.connection is not None:
            self.connection.flush()

    def release(self) -> None:
        """The session's transaction is over: the connection may serve another session."""
        connection = self.connection
        if connection is None:
            return
        self.connection = None
        connection.lease = None
        self._replayed = False
        if connection.client.idle:
            self.pool.put_back(connection)

    def close(self) -> None:
        """The session is over. Keep the connection for reuse if that is safe."""
        self._stop_waiting()
        self._pending.clear()
        connection, self.connection = self.connection, None
        if connection is None or connection.closed:
            return
        connection.lease = None
        if connection.client.mid_transaction:
            # The owner left mid-command; whatever the backend holds must not become a message.
            connection.abort()
            return
        connection.client.reset()
        connection.flush()
        if connection.client.idle:
            self.pool.put_back(connection)

    def abort(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.abort()

    # -- the pool's and the connection's interface ----------------------------------------------

    def wait(self, seconds: float) -> None:
        self._wait_timer = self.pool.loop.call_later(seconds, self.pool.give_up, self)

    def attach(self, connection: BackendConnection, reused: bool) -> None:
        self._stop_waiting()
        self.connection = connection
        connection.lease = self
        connection.reused = reused
        for command, data, identity in self._pending:
            connection.client.send(command, data, identity)
        self._pending.clear()
        if not self._sending:  # else the session's own flush writes the whole round at once
            connection.flush()

    def fail(self, reply: Reply) -> None:
        """No connection for this transaction: every reply owed becomes ``reply``."""
        self._stop_waiting()
        self._pending.clear()
        if self._failing:
            return
        self._failing = True
        # Told on the next turn of the loop, never from inside the session's own event handling.
        self.pool.loop.call_soon(self._tell_failed, reply)

    def connection_lost(self, connection: BackendConnection) -> None:
        self.connection = None
        replay = connection.client.replayable() if connection.reused and not self._replayed else None
        if replay:
            self._replayed = True
            log.info("backend_replay", commands=len(replay), backend=self.pool.address)
            self._pending = replay
            self.pool.request(self)
        elif connection.client.owes_owner or connection.client.in_transaction:
            self.fail(connection.client.failure_reply or r.BACKEND_UNAVAILABLE)

    def _tell_failed(self, reply: Reply) -> None:
        self._failing = False
        self.owner.backend_failed(reply)

    def _stop_waiting(self) -> None:
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None
            self.pool.forget_waiter(self)
