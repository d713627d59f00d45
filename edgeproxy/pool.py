"""The backend connection pool: every connection within a budget (a worker's share of
``EDGEPROXY_BACKEND_MAX_CONNECTIONS``), idle ones reused last-in first-out so the pool shrinks to
recent demand, transactions that find none free queued for a bounded time, and a backend that is
down not dialled again for a short window (4xx at once meanwhile) instead of for every RCPT.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque

import structlog

from edgeproxy.backend import BackendConnection, BackendLease
from edgeproxy.reply import Reply
from edgeproxy.smtp import replies as r

log = structlog.get_logger("edgeproxy.backend")


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
        self.loop = asyncio.get_running_loop()  # (kept: each asking is a getpid() call)
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.host_port = (host, port)
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
            self._sweeper = self.loop.call_later(self.idle_timeout / 2, self._sweep)

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
        future: asyncio.Future[bool] = self.loop.create_future()
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
        task = self.loop.create_task(self._connect(connection))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return connection

    async def _connect(self, connection: BackendConnection) -> None:
        loop = self.loop
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
            self._sweeper = self.loop.call_later(self.idle_timeout / 2, self._sweep)
