"""asyncio glue: one :class:`ClientProtocol` per client connection, around the sans-IO core.

Nothing here parses SMTP or decides policy: it moves bytes between the socket, the core and the
backend connection, runs the timers, and logs what the core reports.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time

import structlog

from edgeproxy.backend import BackendConnection, BackendPool, ClientIdentity
from edgeproxy.config import Settings
from edgeproxy.policy import Policy
from edgeproxy.smtp import events as ev
from edgeproxy.smtp import replies as r
from edgeproxy.smtp.capabilities import Capabilities
from edgeproxy.smtp.session import SessionLimits, SmtpSession

log = structlog.get_logger("edgeproxy")
_session_ids = itertools.count(1)


class ServerState:
    """What every connection of one worker shares. ``policy`` is swapped whole on reload."""

    def __init__(self, settings: Settings, backend: tuple[str, int]) -> None:
        from edgeproxy.limits import ConnectionLimiter

        self.settings = settings
        self.policy = Policy(settings)
        self.limits = SessionLimits(
            hostname=settings.hostname,
            max_line_length=settings.max_line_length,
            max_body_line_length=settings.max_body_line_length,
            max_errors=settings.max_errors,
            received_header=settings.received_header,
            enable_expn=settings.enable_expn,
            enable_etrn=settings.enable_etrn,
        )
        self.limiter = ConnectionLimiter(
            settings.max_connections, settings.max_connections_per_ip, settings.connection_rate
        )
        self.pool = BackendPool(
            backend[0],
            backend[1],
            hostname=settings.hostname,
            pool_size=settings.backend_pool_size,
            idle_timeout=settings.backend_idle_timeout,
            connect_timeout=settings.backend_connect_timeout,
            reply_timeout=settings.backend_timeout,
            use_xclient=settings.xclient,
        )
        self.sessions: set[ClientProtocol] = set()
        self.draining = False
        self.drained = asyncio.Event()
        self._capabilities_for: list[str] | None = None
        self._capabilities = Capabilities.negotiate(settings.max_message_size, None)
        self._id_prefix = f"{os.getpid():x}"

    def capabilities(self) -> Capabilities:
        keywords = self.pool.keywords
        if keywords is not self._capabilities_for:
            self._capabilities = Capabilities.negotiate(self.settings.max_message_size, keywords)
            self._capabilities_for = keywords
        return self._capabilities

    def new_session_id(self) -> str:
        return f"{self._id_prefix}{next(_session_ids):06x}"

    def reload(self, settings: Settings) -> None:
        """New lists and directories for new sessions; sessions in progress keep theirs."""
        self.policy = Policy(settings)

    def drain(self) -> None:
        self.draining = True
        for session in list(self.sessions):
            session.drain()
        if not self.sessions:
            self.drained.set()

    def abort_all(self) -> None:
        for session in list(self.sessions):
            session.abort()

    def protocol_factory(self, listener_may_relay: bool):
        return lambda: ClientProtocol(self, listener_may_relay)


class ClientProtocol(asyncio.Protocol):
    def __init__(self, state: ServerState, listener_may_relay: bool) -> None:
        self.state = state
        self.listener_may_relay = listener_may_relay
        self.transport: asyncio.Transport | None = None
        self.session: SmtpSession | None = None
        self.backend: BackendConnection | None = None
        self.client = "?"
        self.session_id = ""
        self._log: structlog.typing.FilteringBoundLogger | None = None
        self._admitted = False
        self._closing = False
        self._reading = True
        self._backend_writable = True
        self._client_writable = True
        self._last_activity = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._started = 0.0

    # -- client side -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if peer else "?"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        state = self.state
        policy = state.policy
        session_id = self.session_id = state.new_session_id()
        refusal = policy.check_connect(self.client)
        if refusal is None and state.draining:
            self._refuse_connection("shutting_down", r.SHUTTING_DOWN)
            return
        if refusal is not None:
            self._refuse_connection(refusal.rule, refusal.reply)
            return
        limit = state.limiter.admit(self.client, time.monotonic())
        if limit is not None:
            self._refuse_connection(limit.lower(), policy.replies[limit])
            return
        self._admitted = True
        state.sessions.add(self)
        grant = policy.relay_grant(self.client, self.listener_may_relay)
        self.session = SmtpSession(
            state.limits, policy, state.capabilities(), self.client, grant, session_id
        )
        self._started = self._last_activity = time.monotonic()
        delay = state.settings.greeting_delay
        loop = asyncio.get_running_loop()
        if delay > 0:
            loop.call_later(delay, self._greet)
        else:
            self._greet()
        self._timer = loop.call_later(state.settings.timeout, self._check_idle)

    def _refuse_connection(self, rule: str, reply: r.Reply) -> None:
        self.log.info("refused", stage="connect", rule=rule, reply=str(reply))
        assert self.transport is not None
        self.transport.write(reply.encode())
        self.transport.close()
        self._closing = True

    def _greet(self) -> None:
        if self.session is None or self._closing or self.session.closed:
            return
        assert self.transport is not None
        self.transport.write(self.session.greeting())

    def data_received(self, data: bytes) -> None:
        if self.session is None or self._closing:
            return
        self._last_activity = time.monotonic()
        try:
            self.session.receive_data(data)
            self._pump()
        except Exception:
            self._crash()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        session = self.session
        if session is None or not self._admitted:
            return
        self._admitted = False
        self._closing = True
        try:
            session.connection_lost()
            self._handle_events(session.take_events())
        except Exception:
            self.log.exception("connection_lost_failed")
        if self.backend is not None:
            self.backend.release()
            self.backend = None
        self.state.limiter.release(self.client)
        self.state.sessions.discard(self)
        stats = session.stats
        self.log.info(
            "session",
            helo=session.helo,
            seconds=round(time.monotonic() - self._started, 3),
            messages=stats.messages,
            refusals=stats.refusals,
            errors=stats.errors,
            rules=stats.rules or None,
        )
        if self.state.draining and not self.state.sessions:
            self.state.drained.set()

    def pause_writing(self) -> None:
        self._set_reading(False)

    def resume_writing(self) -> None:
        self._set_reading(True)

    @property
    def log(self) -> structlog.typing.FilteringBoundLogger:
        """The connection's logger, bound on first use: most sessions log one line or none."""
        if self._log is None:
            self._log = log.bind(session=self.session_id, client=self.client)
        return self._log

    # -- backend side (BackendOwner) -----------------------------------------------------------

    def backend_reply(self, code: int, raw: bytes) -> None:
        if self.session is None or self._closing:
            return
        try:
            self.session.backend_reply(code, raw)
            self._pump()
        except Exception:
            self._crash()

    def backend_failed(self) -> None:
        self.backend = None
        if self.session is None or self._closing:
            return
        try:
            self.session.backend_failed()
            self._pump()
        except Exception:
            self._crash()

    def backend_writable(self, writable: bool) -> None:
        self._backend_writable = writable
        self._update_reading()

    # -- plumbing ------------------------------------------------------------------------------

    def _pump(self) -> None:
        session = self.session
        assert session is not None and self.transport is not None
        self._handle_events(session.take_events())
        output = session.take_output()
        if output:
            self.transport.write(output)
        if session.closed and session.output_complete:
            self._close()
            return
        if self.state.draining and not session.in_transaction and session.output_complete:
            self.transport.write(r.SHUTTING_DOWN.encode())
            self._close()
            return
        self._update_reading()

    def _handle_events(self, events: list[object]) -> None:
        for event in events:
            if isinstance(event, ev.BackendSend):
                self._send_backend(event)
            elif isinstance(event, ev.Refused):
                self._log_refusal(event)
            elif isinstance(event, ev.BackendAbort) and self.backend is not None:
                self.log.info("backend_aborted", reason=event.reason)
                backend, self.backend = self.backend, None
                backend.abort()
        if self.backend is not None:
            self.backend.flush()  # one write for all the commands of this round

    def _send_backend(self, event: ev.BackendSend) -> None:
        backend = self.backend
        if backend is None or backend.closed:
            backend = self.backend = self.state.pool.acquire(self)
        identity = None
        if event.kind == ev.MAIL:
            session = self.session
            assert session is not None
            identity = ClientIdentity(self.client, session.helo, "ESMTP" if session.esmtp else "SMTP")
        backend.send(event.kind, event.data, identity)

    def _log_refusal(self, event: ev.Refused) -> None:
        # RFC 2505 §2.4: time, rule, client address and name, HELO, sender, recipient domain.
        recipient_domain = event.recipient.rpartition("@")[2] if event.recipient else None
        self.log.info(
            "refused",
            stage=event.stage,
            rule=event.rule,
            helo=self.session.helo if self.session else None,
            sender=event.sender,
            recipient_domain=recipient_domain,
            reply=str(event.reply),
        )

    def _set_reading(self, reading: bool) -> None:
        self._client_writable = reading
        self._update_reading()

    def _update_reading(self) -> None:
        if self.transport is None or self._closing:
            return
        want = (
            self._backend_writable
            and self._client_writable
            and (self.session is None or self.session.wants_input)
        )
        if want != self._reading:
            self._reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def _check_idle(self) -> None:
        self._timer = None
        if self._closing or self.session is None:
            return
        session = self.session
        timeout = self.state.settings.data_timeout if session.in_data else self.state.settings.timeout
        idle = time.monotonic() - self._last_activity
        if idle >= timeout and session.output_complete:
            self.log.info("timeout", seconds=round(idle, 1))
            assert self.transport is not None
            self.transport.write(r.TIMEOUT.encode())
            session.connection_lost()
            self._handle_events(session.take_events())
            self._close()
            return
        # Silence while we owe the client replies is the backend's to answer for, not the client's.
        wait = max(timeout - idle, 1.0) if session.output_complete else timeout
        self._timer = asyncio.get_running_loop().call_later(wait, self._check_idle)

    def _close(self) -> None:
        if not self._closing and self.transport is not None:
            self._closing = True
            self.transport.close()

    def _crash(self) -> None:
        """Any bug in handling one client costs that client a 421, never the process."""
        self.log.exception("session_crashed")
        if self.backend is not None:
            backend, self.backend = self.backend, None
            backend.abort()
        if self.transport is not None and not self._closing:
            self.transport.write(r.LOCAL_ERROR.encode())
            self._close()

    def drain(self) -> None:
        session = self.session
        if session is None or self._closing or self.transport is None:
            return
        if not session.in_transaction and session.output_complete:
            self.transport.write(r.SHUTTING_DOWN.encode())
            self._close()

    def abort(self) -> None:
        if self.session is not None and not self._closing:
            self.session.connection_lost()
            self._handle_events(self.session.take_events())
        if self.transport is not None:
            self.transport.abort()
