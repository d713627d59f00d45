"""Connections to the real mail server: asyncio glue around the sans-IO client, and the pool.

- :class:`BackendConnection` moves bytes between a socket and a
  :class:`~edgeproxy.smtp.client.BackendClient`, times the reply due, and reports loss.
- :class:`BackendLease` is one session's claim on a connection: it holds the session's commands
  while the pool finds one, gives the connection back when the session's transaction is over,
  and replays a transaction on a fresh connection when a pooled one turns out dead before the
  backend answered any of it.
- :class:`BackendPool` keeps every connection within a budget (a worker's share of
  ``EDGEPROXY_BACKEND_MAX_CONNECTIONS``), reuses idle ones last-in first-out so the pool shrinks
  to recent demand, queues transactions that find none free for a bounded time, and stops
  dialling a backend that is down for a short window (answering 4xx at once) instead of trying
  again for every RCPT.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import Protocol

import structlog

from edgeproxy.netutil import set_nodelay
from edgeproxy.reply import Reply
from edgeproxy.smtp import replies as r
from edgeproxy.smtp.client import BackendClient, ClientIdentity
from edgeproxy.smtp.events import Command

log = structlog.get_logger("edgeproxy.backend")

_WRITE_HIGH_WATER = 256 * 1024
PendingCommand = tuple[Command, bytes, ClientIdentity | None]


class BackendOwner(Protocol):
    def backend_reply(self, code: int, raw: bytes) -> None: ...
    def backend_failed(self, reply: Reply) -> None: ...
    def backend_writable(self, writable: bool) -> None: ...


class BackendConnection(asyncio.Protocol):
    __slots__ = ("_pool", "_timer", "_tls_task", "_transport", "client", "closed", "idle_since", "lease", "reused")

    def __init__(self, pool: BackendPool) -> None:
        self._pool = pool
        self.client = BackendClient(pool.hostname, pool.use_xclient, pool.tls_mode)
        self._transport: asyncio.Transport | None = None
        self._tls_task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.lease: BackendLease | None = None
        self.closed = False
        self.reused = False  # taken from the idle pool: it may have died there unnoticed
        self.idle_since = 0.0

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        set_nodelay(transport)
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        client = self.client
        was_ready = client.ready
        client.receive_data(data)
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
        self._timer = asyncio.get_running_loop().call_later(seconds, self._fail, "backend timeout")

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
        self._wait_timer = asyncio.get_running_loop().call_later(seconds, self.pool.give_up, self)

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
        asyncio.get_running_loop().call_soon(self._tell_failed, reply)

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


class BackendPool:
    """Connections to one backend address, within a budget, the idle ones kept for reuse."""

    def __init__(
        self,
        host: str,
        port: int,
        hostname: str,
        *,
        budget: int,
        queue_timeout: float,
        idle_timeout: float,
        connect_timeout: float,
        reply_timeout: float,
        retry_interval: float,
        use_xclient: bool,
        tls_mode: str = "no",
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.hostname = hostname
        self.budget = budget
        self.queue_timeout = queue_timeout
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.retry_interval = retry_interval
        self.use_xclient = use_xclient
        self.tls_mode = tls_mode if tls_context is not None else "no"
        self.tls_context = tls_context
        self.keywords: list[str] | None = None  # the backend's last EHLO keywords
        self._idle: list[BackendConnection] = []  # last in, first out: the oldest age out
        self._open: set[BackendConnection] = set()  # every connection counted in the budget
        self._waiters: deque[BackendLease] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready_waiters: list[asyncio.Future[bool]] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._down_since: float | None = None  # the backend is down: new connections wait
        self._retry_at = 0.0
        self._refused_while_down = 0
        self._down_reply = r.BACKEND_UNAVAILABLE  # what the clients hear while it is down
        self._trial: BackendConnection | None = None  # the one connection trying a down backend

    # -- leases ------------------------------------------------------------------------------

    def request(self, lease: BackendLease) -> None:
        """Attach a connection to ``lease`` now, queue it for one, or fail it."""
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                lease.attach(connection, reused=True)
                return
        if self._down_since is not None and not self._may_try_again():
            self._refused_while_down += 1
            lease.fail(self._down_reply)
            return
        if len(self._open) < self.budget:
            lease.attach(self._open_connection(), reused=False)
            return
        self._waiters.append(lease)
        lease.wait(self.queue_timeout)

    def give_up(self, lease: BackendLease) -> None:
        """A queued transaction waited its whole ``queue_timeout``."""
        lease.fail(r.BACKEND_BUSY)

    def forget_waiter(self, lease: BackendLease) -> None:
        if lease in self._waiters:
            self._waiters.remove(lease)

    def put_back(self, connection: BackendConnection) -> None:
        if connection.closed or connection in self._idle or connection.lease is not None:
            return
        if self._waiters:
            self._waiters.popleft().attach(connection, reused=True)
            return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle_timeout / 2, self._sweep)

    def forget(self, connection: BackendConnection, reason: str = "") -> None:
        """``connection`` is closed: its place in the budget is free."""
        self._open.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)
        if self._trial is connection:
            self._trial = None
        if not connection.client.ready and reason:
            self._connect_failed(reason, connection.client.failure_reply or r.BACKEND_UNAVAILABLE)
        self._serve_waiters()

    def connection_ready(self, connection: BackendConnection) -> None:
        self.keywords = connection.client.keywords
        if self._trial is connection:
            self._trial = None
        if self._down_since is not None:
            log.warning("backend_up", backend=self.address, refused=self._refused_while_down,
                        seconds=round(time.monotonic() - self._down_since, 1))
            self._down_since = None
            self._refused_while_down = 0
        self._resolve_ready(True)

    # -- state -------------------------------------------------------------------------------

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def open_count(self) -> int:
        return len(self._open)

    @property
    def waiting_count(self) -> int:
        return len(self._waiters)

    async def probe(self) -> bool:
        """Open one connection to learn the backend's EHLO; True when it answered."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._ready_waiters.append(future)
        self._open_connection()
        try:
            return await asyncio.wait_for(future, self.connect_timeout + 1)
        except TimeoutError:
            return False

    def close_all(self) -> None:
        for connection in list(self._idle):
            connection.close_idle()
        self._idle.clear()
        for lease in list(self._waiters):
            lease.fail(r.BACKEND_UNAVAILABLE)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    # -- internals ---------------------------------------------------------------------------

    def _open_connection(self) -> BackendConnection:
        connection = BackendConnection(self)
        self._open.add(connection)
        if self._down_since is not None:
            self._trial = connection
        task = asyncio.get_running_loop().create_task(self._connect(connection))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return connection

    async def _connect(self, connection: BackendConnection) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: connection, self.host, self.port),
                                   self.connect_timeout)
        except (OSError, TimeoutError) as error:
            connection.connect_failed(str(error) or type(error).__name__)

    def _may_try_again(self) -> bool:
        return self._trial is None and time.monotonic() >= self._retry_at

    def _connect_failed(self, reason: str, reply: Reply) -> None:
        self._down_reply = reply
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            log.warning("backend_down", reason=reason, backend=self.address, retry_in=self.retry_interval)
        self._retry_at = now + self.retry_interval
        self._resolve_ready(False)
        # Those queued for a connection would only wait for one that cannot come soon.
        while self._waiters:
            self._refused_while_down += 1
            self._waiters.popleft().fail(reply)

    def _serve_waiters(self) -> None:
        while self._waiters and len(self._open) < self.budget:
            if self._down_since is not None and not self._may_try_again():
                return
            self._waiters.popleft().attach(self._open_connection(), reused=False)

    def _resolve_ready(self, ready: bool) -> None:
        waiters, self._ready_waiters = self._ready_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(ready)

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = time.monotonic() - self.idle_timeout
        for connection in [c for c in self._idle if c.idle_since < deadline]:
            connection.close_idle()
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle_timeout / 2, self._sweep)
