"""asyncio glue: one :class:`ClientProtocol` per client connection, around the sans-IO core.

Nothing here parses SMTP or decides policy: it moves bytes between the socket, the core and the
backend lease, runs the timers, and logs what the core reports. What a client can cost is
bounded here too: reading stops while the core holds enough of its input or the client does not
read its replies; a command line must complete within ``TIMEOUT`` and a session within
``SESSION_TIMEOUT``; a client that does not take a final reply in time is cut off, so a slot is
never held by a socket that does not drain.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import TYPE_CHECKING

import structlog

from edgeproxy import log as logsetup
from edgeproxy.auth import Outcome
from edgeproxy.backend import BackendLease
from edgeproxy.listener import ListenerKind
from edgeproxy.log import RefusalLog
from edgeproxy.reply import Reply
from edgeproxy.smtp import events as ev
from edgeproxy.smtp import replies as r
from edgeproxy.smtp.client import ClientIdentity
from edgeproxy.smtp.session import SmtpSession

if TYPE_CHECKING:
    from edgeproxy.worker import ServerState

log = structlog.get_logger("edgeproxy")


class ClientProtocol(asyncio.Protocol):
    __slots__ = (
        "_admitted",
        "_auth_task",
        "_backend_writable",
        "_client_writable",
        "_closing",
        "_early_tls_data",
        "_handshaking",
        "_last_progress",
        "_log",
        "_reading",
        "_refusals",
        "_resume_scheduled",
        "_started",
        "_timer",
        "_tls_task",
        "_tls_wanted",
        "client",
        "lease",
        "listener",
        "session",
        "session_id",
        "state",
        "transport",
    )

    def __init__(self, state: ServerState, listener: ListenerKind) -> None:
        self.state = state
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.session: SmtpSession | None = None
        self.lease: BackendLease | None = None
        self.client = "?"
        self.session_id = ""
        self._log: structlog.typing.FilteringBoundLogger | None = None
        self._refusals = RefusalLog()
        self._admitted = False
        self._closing = False
        self._reading = True
        self._backend_writable = True
        self._client_writable = True
        self._resume_scheduled = False
        self._tls_wanted = False  # STARTTLS answered 220: hand-shake once that reply is out
        self._handshaking = False
        self._early_tls_data = b""
        self._tls_task: asyncio.Task[None] | None = None
        self._auth_task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._started = 0.0
        self._last_progress = 0.0

    # -- client side -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        try:
            self._admit(transport)
        except Exception:
            self._crash()

    def _admit(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if peer else "?"
        # (TCP_NODELAY, design.md §3: both loops set it on every TCP transport themselves.)
        state = self.state
        policy = state.policy
        self.session_id = state.new_session_id()
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
        grant = policy.relay_grant(self.client, self.listener)
        self.session = SmtpSession(state.limits, policy, state.capabilities(), self.client, grant, self.session_id,
                                   listener=self.listener)
        loop = asyncio.get_running_loop()
        self._started = self._last_progress = loop.time()
        self._timer = loop.call_later(state.settings.timeout, self._check_timeouts)
        if self.listener.implicit_tls:
            # RFC 8314: the listener's own TLS layer did the handshake before this connection was
            # handed to us (ServerState.implicit_tls_context); without one, no plaintext at all.
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is None:
                self._finish()
                return
            self.session.tls_started(_tls_info(ssl_object))
        self._schedule_greeting()

    def _schedule_greeting(self) -> None:
        delay = self.state.settings.greeting_delay
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._greet)
        else:
            self._greet()

    def _refuse_connection(self, rule: str, reply: Reply) -> None:
        self.log.info("refused", stage="connect", rule=rule, reply=str(reply))
        self._finish(reply)

    def _greet(self) -> None:
        if self.session is None or self._closing or self.session.closed:
            return
        assert self.transport is not None
        self.transport.write(self.session.greeting())

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None or self._closing:
            return
        if self._handshaking:
            # Only the TLS layer reads now (the raw transport was paused first), so this is the
            # client's first words inside TLS, come before the handshake's coroutine resumed.
            self._early_tls_data += data
            return
        progress = session.progress
        try:
            session.receive_data(data)
            if session.progress != progress:
                # Only a complete command or body chunk counts as life: a client trickling a
                # byte at a time must still finish a line within the timeout.
                self._last_progress = asyncio.get_running_loop().time()
            self._pump()
        except Exception:
            self._crash()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in (self._tls_task, self._auth_task):
            if task is not None:
                task.cancel()
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
        if self.lease is not None:
            self.lease.close()
            self.lease = None
        self.state.limiter.release(self.client)
        self.state.sessions.discard(self)
        if logsetup.info_enabled:
            self._log_session(session)
        if self.state.draining and not self.state.sessions:
            self.state.drained.set()

    def _log_session(self, session: SmtpSession) -> None:
        self._refusals.flush(self.log, session.helo)
        stats = session.stats
        self.log.info(
            "session",
            helo=session.helo,
            seconds=round(asyncio.get_running_loop().time() - self._started, 3),
            tls=f"{session.tls.version}/{session.tls.cipher}" if session.tls else None,
            user=session.authenticated_as,
            messages=stats.messages,
            refusals=stats.refusals,
            errors=stats.errors,
            rules=stats.rules or None,
        )

    def pause_writing(self) -> None:
        self._client_writable = False
        self._update_reading()

    def resume_writing(self) -> None:
        self._client_writable = True
        self._update_reading()
        self._schedule_resume()

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

    def backend_failed(self, reply: Reply) -> None:
        if self.session is None or self._closing:
            return
        try:
            self.session.backend_failed(reply)
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
            self._finish()
            return
        if self.state.draining and not session.in_transaction and session.output_complete:
            self._finish(r.SHUTTING_DOWN)
            return
        if self._tls_wanted and session.output_complete:
            self._tls_wanted = False
            self._start_tls()
            return
        self._update_reading()
        self._schedule_resume()

    def _start_tls(self) -> None:
        context = self.state.tls_context
        assert context is not None and self.transport is not None
        # Not one more byte for the session: the next ones are the ClientHello, which must wait
        # in the socket for the TLS layer (start_tls resumes reading once it owns the transport).
        self.transport.pause_reading()
        self._reading = False
        self._handshaking = True
        self._tls_task = asyncio.get_running_loop().create_task(self._handshake(self.transport, context))

    async def _handshake(self, transport: asyncio.Transport, context: ssl.SSLContext) -> None:
        """The server side of TLS, off the session's path: other sessions run meanwhile, and a
        failed or stalled handshake costs one log line and this connection only."""
        loop = asyncio.get_running_loop()
        try:
            secured = await loop.start_tls(transport, self, context, server_side=True,
                                           ssl_handshake_timeout=self.state.settings.tls_handshake_timeout)
        except (OSError, TimeoutError, ValueError, RuntimeError) as error:  # ssl.SSLError is an OSError
            if not self._closing:
                self.log.info("tls_failed", reason=str(error) or type(error).__name__)
                self._closing = True
                transport.abort()
            # asyncio's SSL layer does not pass a loss during the handshake on to us: release the
            # session's slot here (a second call, where the loop does pass it on, does nothing).
            self.connection_lost(error if isinstance(error, Exception) else None)
            return
        finally:
            self._handshaking = False
            self._tls_task = None
        session = self.session
        if secured is None or session is None or self._closing:
            self.connection_lost(None)  # (released once: a second call does nothing)
            return
        self.transport = secured  # type: ignore[assignment]
        self._reading = True
        self._last_progress = loop.time()
        session.tls_started(_tls_info(secured.get_extra_info("ssl_object")))
        early, self._early_tls_data = self._early_tls_data, b""
        if early:
            session.receive_data(early)  # said inside TLS before this coroutine resumed
        self._pump()

    def _schedule_resume(self) -> None:
        """More input is waiting behind the pipeline bound: take it on the loop's next turn, so
        one client's backlog never holds up the others."""
        session = self.session
        if (session is not None and not self._resume_scheduled and not self._closing and self._client_writable
                and session.can_resume):
            self._resume_scheduled = True
            asyncio.get_running_loop().call_soon(self._resume)

    def _resume(self) -> None:
        self._resume_scheduled = False
        session = self.session
        if session is None or self._closing:
            return
        try:
            session.resume()
            self._pump()
        except Exception:
            self._crash()

    def _handle_events(self, events: list[ev.Event]) -> None:
        for event in events:
            if isinstance(event, ev.BackendSend):
                self._send_backend(event)
            elif isinstance(event, ev.Refused):
                if logsetup.info_enabled:
                    self._refusals.add(event, self.log, self.session.helo if self.session else None)
            elif isinstance(event, ev.BackendRelease):
                if self.lease is not None:
                    self.lease.release()
            elif isinstance(event, ev.BackendAbort):
                if self.lease is not None and self.lease.connection is not None:
                    self.log.info("backend_aborted", reason=event.reason)
                    self.lease.abort()
            elif isinstance(event, ev.StartTls):
                self._tls_wanted = True
            elif isinstance(event, ev.Authenticate):
                self._auth_task = asyncio.get_running_loop().create_task(self._authenticate(event))
            elif isinstance(event, ev.TransactionEnded):
                self.log.debug("transaction", delivered=event.delivered, recipients=event.recipients,
                               size=event.size, reply_code=event.reply_code)
        if self.lease is not None:
            self.lease.flush()  # one write for all the commands of this round

    def _send_backend(self, event: ev.BackendSend) -> None:
        lease = self.lease
        if lease is None:
            lease = self.lease = BackendLease(self.state.pool, self)
        identity = None
        if event.command is ev.Command.MAIL:
            session = self.session
            assert session is not None
            identity = ClientIdentity(self.client, session.helo, "ESMTP" if session.esmtp else "SMTP",
                                      session.authenticated_as)
        lease.send(event.command, event.data, identity)

    async def _authenticate(self, event: ev.Authenticate) -> None:
        """Verify off the session's path: a slow hash or backend holds up this session only."""
        state = self.state
        if state.auth_failures.blocked(self.client):
            self.log.warning("auth_blocked", user=event.username, limit=state.auth_failures.limit)
            outcome = Outcome(False, r.AUTH_BLOCKED)
        else:
            assert state.verifier is not None
            outcome = await state.verifier.verify(event.username, event.password)
            if not outcome.ok and outcome.reply.is_permanent:
                state.auth_failures.add(self.client)
                # Each failure waits before its answer: guessing gets slow, nobody else waits.
                await asyncio.sleep(state.settings.auth_failure_delay)
        self._auth_task = None
        session = self.session
        if session is None or self._closing:
            return
        self.log.info("auth", user=event.username, mechanism=event.mechanism, ok=outcome.ok,
                      reply=None if outcome.ok else str(outcome.reply))
        try:
            if outcome.ok:
                session.auth_succeeded(event.username)
            else:
                session.auth_failed(outcome.reply)
            self._pump()
        except Exception:
            self._crash()

    def _update_reading(self) -> None:
        """Read only while the backend takes what we forward, the client takes its replies, and
        the core holds less of the client's input than it may."""
        if self.transport is None or self._closing or self._handshaking:
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

    def _check_timeouts(self) -> None:
        self._timer = None
        session = self.session
        if self._closing or session is None:
            return
        if self._handshaking:
            # The handshake has its own limit, and a reply now would go out in plaintext.
            self._timer = asyncio.get_running_loop().call_later(1.0, self._check_timeouts)
            return
        settings = self.state.settings
        now = asyncio.get_running_loop().time()
        if now - self._started >= settings.session_timeout:
            self._time_out(r.SESSION_TIMEOUT, now - self._started)
            return
        timeout = settings.data_timeout if session.in_data else settings.timeout
        idle = now - self._last_progress
        # Silence while the backend owes the client replies is the backend's to answer for.
        if idle >= timeout and session.output_complete:
            self._time_out(r.TIMEOUT, idle)
            return
        wait = max(timeout - idle, 1.0) if session.output_complete else timeout
        wait = min(wait, max(settings.session_timeout - (now - self._started), 0.1))
        self._timer = asyncio.get_running_loop().call_later(wait, self._check_timeouts)

    def _time_out(self, reply: Reply, seconds: float) -> None:
        session = self.session
        assert session is not None
        self.log.info("timeout", seconds=round(seconds, 1), reply=str(reply))
        session.connection_lost()
        self._handle_events(session.take_events())
        self._finish(reply)

    def _finish(self, reply: Reply | None = None) -> None:
        """The one way this side ends a connection: a last reply, then close once it is written.
        A client that has not taken what it was sent loses the connection at once: waiting for
        it to drain would let it keep its slot for as long as it likes."""
        transport = self.transport
        if self._closing or transport is None:
            return
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if reply is not None:
            transport.write(reply.encode())
        if not self._client_writable:
            transport.abort()
            return
        transport.close()
        if transport.get_write_buffer_size():
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.state.settings.timeout, transport.abort)

    def _crash(self) -> None:
        """Any bug in handling one client costs that client a 421, never the process."""
        self.log.exception("session_crashed")
        if self.lease is not None:
            self.lease.abort()
        self._finish(r.LOCAL_ERROR)

    def drain(self) -> None:
        session = self.session
        if session is None or self._closing or self.transport is None or self._handshaking:
            return  # (mid-handshake: the session is told once inside TLS, never in plaintext)
        if not session.in_transaction and session.output_complete:
            self._finish(r.SHUTTING_DOWN)

    def abort(self) -> None:
        if self.session is not None and not self._closing:
            self.session.connection_lost()
            self._handle_events(self.session.take_events())
        if self.transport is not None:
            self.transport.abort()


def _tls_info(ssl_object: ssl.SSLObject | None) -> ev.TlsInfo:
    cipher = ssl_object.cipher() if ssl_object is not None else None
    return ev.TlsInfo(ssl_object.version() or "TLS" if ssl_object is not None else "TLS",
                      cipher[0] if cipher else "unknown", cipher[2] if cipher else 0)
