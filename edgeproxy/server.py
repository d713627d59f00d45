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
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from edgeproxy import log as logsetup
from edgeproxy.admission import Admission
from edgeproxy.backend import BackendLease
from edgeproxy.listener import ListenerKind
from edgeproxy.log import RefusalLog
from edgeproxy.proxyproto import V2_SIGNATURE, ProxyHeaderReader
from edgeproxy.reply import Reply
from edgeproxy.smtp import events as ev
from edgeproxy.smtp import replies as r
from edgeproxy.smtp.client import ClientIdentity
from edgeproxy.smtp.session import SmtpSession
from edgeproxy.tlsauth import Securing

if TYPE_CHECKING:
    from edgeproxy.worker import ServerState

log = structlog.get_logger("edgeproxy")


class ClientProtocol(Admission, Securing, asyncio.Protocol):
    __slots__ = (
        "_admit_task",
        "_admitted",
        "_auth_task",
        "_backend_writable",
        "_balancer",
        "_client_writable",
        "_closing",
        "_early_input",
        "_early_tls_data",
        "_first_read",
        "_handshaking",
        "_last_progress",
        "_log",
        "_lost",
        "_proxy_reader",
        "_reading",
        "_refusals",
        "_resume_scheduled",
        "_started",
        "_tarpit_at",
        "_timer",
        "_tls_task",
        "_tls_wanted",
        "_transaction_started",
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
        self._admit_task: asyncio.Task[None] | None = None
        self._proxy_reader: ProxyHeaderReader | None = None  # a load balancer's connection, before its header
        self._balancer: str | None = None  # the balancer the client came through (PROXY protocol)
        self._early_input = b""  # what followed the PROXY header, for the session once it opens
        self._first_read = True
        self._transaction_started = 0.0  # when MAIL went to the backend (for the latency metric)
        self._lost = False
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
        self._tarpit_at = 0.0  # when the last reply held by the harvest tarpit leaves

    # -- client side -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None or self._closing:
            if self._proxy_reader is not None and not self._closing:
                self._proxy_header(data)
            return
        if self._first_read:
            self._first_read = False
            if data.startswith(_PROXY_HEADER_STARTS):
                # Not from a configured balancer: a PROXY header here is someone claiming to be
                # another client. Never trusted, never answered as SMTP.
                self.log.info("refused", stage="proxy", rule="proxy_header_untrusted")
                self.state.metrics.count(self.state.metrics.refusals, "proxy_header_untrusted")
                self._finish()
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
                self._last_progress = self.state.loop.time()
            self._pump()
        except Exception:
            self._crash()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
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
        shared = self.state.shared_limits
        if shared is not None:  # (then every admission went through it)
            shared.release(self.client, self.session_id)
        else:
            self.state.limiter.release(self.client)
        self.state.sessions.discard(self)
        seconds = self.state.loop.time() - self._started
        metrics = self.state.metrics
        metrics.sessions += 1
        metrics.session_seconds.observe(seconds)
        if logsetup.info_enabled:
            self._log_session(session, seconds)
        if self.state.draining and not self.state.sessions:
            self.state.drained.set()

    def _log_session(self, session: SmtpSession, seconds: float) -> None:
        stats = session.stats
        runs = self._refusals.take() if stats.refusals else None
        if runs and self._refusals.spilled:
            self._log_refused(runs)
            runs = None
        tls = session.tls
        fields = {
            "session": self.session_id, "client": self.client, "helo": session.helo, "seconds": round(seconds, 3),
            "tls": f"{tls.version}/{tls.cipher}" if tls else None, "user": session.authenticated_as,
            "messages": stats.messages, "refusals": stats.refusals, "errors": stats.errors,
            "rules": stats.rules or None, "refused": runs or None,
        }
        if self._balancer is not None:
            fields["via"] = self._balancer
        logsetup.info_line("session", fields)

    def _log_refused(self, runs: list[dict[str, object]]) -> None:
        helo = self.session.helo if self.session is not None else None
        for run in runs:
            logsetup.info_line("refused", {**self._line_context(), "helo": helo, **run})

    def _line_context(self) -> dict[str, object]:
        """What ``log`` binds, for the lines written without a bound logger."""
        if self._balancer is None:
            return {"session": self.session_id, "client": self.client}
        return {"session": self.session_id, "client": self.client, "via": self._balancer}

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
            if self._balancer is not None:
                self._log = self._log.bind(via=self._balancer)
        return self._log

    # -- backend side (BackendOwner) -----------------------------------------------------------

    def backend_reply(self, code: int, raw: bytes) -> None:
        self._drive(SmtpSession.backend_reply, code, raw)

    def backend_failed(self, reply: Reply) -> None:
        self._drive(SmtpSession.backend_failed, reply)

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

    def _schedule_resume(self) -> None:
        """More input is waiting behind the pipeline bound: take it on the loop's next turn, so
        one client's backlog never holds up the others."""
        session = self.session
        if (session is not None and not self._resume_scheduled and not self._closing and self._client_writable
                and session.can_resume):
            self._resume_scheduled = True
            self.state.loop.call_soon(self._resume)

    def _resume(self) -> None:
        self._resume_scheduled = False
        self._drive(SmtpSession.resume)

    def _drive(self, step: Callable[..., None], *args: object) -> None:
        """Give the core one thing outside client input (``step(session, *args)``: a backend
        reply, a resumption, a timer) and carry out what it then owes."""
        session = self.session
        if session is None or self._closing:
            return
        try:
            step(session, *args)
            self._pump()
        except Exception:
            self._crash()

    def _handle_events(self, events: list[ev.Event]) -> None:
        sent = False
        for event in events:
            if isinstance(event, ev.BackendSend):
                self._send_backend(event)
                sent = True
            elif isinstance(event, ev.Refused):
                metrics = self.state.metrics
                metrics.count(metrics.refusals, event.rule)
                if logsetup.info_enabled:
                    ended = self._refusals.add(event)
                    if ended:
                        self._log_refused(ended)
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
                self._auth_task = self.state.loop.create_task(self._authenticate(event))
            elif isinstance(event, ev.DelayReply):
                # Each delayed reply a delay after the one before: a pipelined flood of guesses
                # pays for every guess, not once for the lot.
                self.state.metrics.harvest_delays += 1
                loop = self.state.loop
                self._tarpit_at = max(loop.time(), self._tarpit_at) + event.seconds
                loop.call_at(self._tarpit_at, self._drive, SmtpSession.release, event.slot)
            elif isinstance(event, ev.TransactionEnded):
                self._transaction_ended(event)
                if logsetup.debug_enabled:  # (else not even the bound logger is made)
                    self.log.debug("transaction", delivered=event.delivered, recipients=event.recipients,
                                   size=event.size, reply_code=event.reply_code)
        if sent and self.lease is not None:
            # One write for all the commands of this round. (Commands held back until a backend
            # reply, at an RFC 2920 sync point, are written by the backend connection then.)
            self.lease.flush()

    def _transaction_ended(self, event: ev.TransactionEnded) -> None:
        metrics = self.state.metrics
        metrics.transaction_ended(event.delivered, event.recipients, event.size, event.reply_code)
        if self._transaction_started:
            metrics.backend_seconds.observe(self.state.loop.time() - self._transaction_started)
            self._transaction_started = 0.0

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
            self._transaction_started = self.state.loop.time()
        lease.send(event.command, event.data, identity)

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
            self._timer = self.state.loop.call_later(1.0, self._check_timeouts)
            return
        settings = self.state.settings
        now = self.state.loop.time()
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
        self._timer = self.state.loop.call_later(wait, self._check_timeouts)

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
            loop = self.state.loop
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


_PROXY_HEADER_STARTS = (b"PROXY ", V2_SIGNATURE)

