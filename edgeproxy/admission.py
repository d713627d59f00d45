"""How a connection becomes a session (part of :class:`~edgeproxy.server.ClientProtocol`).

Before a word of SMTP: a load balancer's PROXY header when the peer is one (the address in it is
the client from then on), the connect lists, draining, and the connection limits (this worker's,
or the ones shared through Redis, decided in one round trip while the client waits unread). A
refusal here is the connection's only reply.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

from edgeproxy.proxyproto import ProxyHeaderError, ProxyHeaderReader
from edgeproxy.reply import Reply
from edgeproxy.smtp import replies as r
from edgeproxy.smtp.session import SmtpSession
from edgeproxy.tlsauth import tls_info

if TYPE_CHECKING:
    from edgeproxy.server import ClientProtocol

log = structlog.get_logger("edgeproxy")


class Admission:
    """Mixed into ClientProtocol, whose slots hold the state."""

    __slots__ = ()

    def connection_made(self: ClientProtocol, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        try:
            peer = transport.get_extra_info("peername")
            self.client = peer[0] if peer else "?"
            state = self.state
            balancers = state.policy.balancers
            if balancers is not None and self.client in balancers:
                # A load balancer: the client is whoever its PROXY header names, so nothing is
                # decided (and nothing said) before that header is read, within its time limit.
                self._proxy_reader = ProxyHeaderReader()
                self._timer = self.state.loop.call_later(
                    state.settings.proxy_protocol_timeout, self._proxy_header_missing)
                return
            self._admit()
        except Exception:
            self._crash()

    def _proxy_header(self: ClientProtocol, data: bytes) -> None:
        reader = self._proxy_reader
        assert reader is not None
        try:
            header = reader.feed(data)
        except ProxyHeaderError as error:
            self._refuse_proxy_header("invalid", str(error))
            return
        if header is None:
            return
        self._proxy_reader = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not header.local and header.source is not None:  # LOCAL: the balancer's own health check
            self._balancer, self.client = self.client, header.source[0]
        self._early_input = reader.rest
        self._admit()

    def _proxy_header_missing(self: ClientProtocol) -> None:
        self._timer = None
        self._refuse_proxy_header("timeout", "no PROXY header in time")

    def _refuse_proxy_header(self: ClientProtocol, rule: str, reason: str) -> None:
        """PROXY protocol §2: a receiver must drop a connection whose header is not valid. No SMTP
        reply: the peer is a balancer (or something posing as one), not a mail client."""
        log.info("refused", stage="proxy", rule=f"proxy_header_{rule}", reason=reason, peer=self.client)
        self.state.metrics.count(self.state.metrics.connections_refused, f"proxy_header_{rule}")
        self._finish()

    def _admit(self: ClientProtocol) -> None:
        transport = self.transport
        assert transport is not None
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
        if state.shared_limits is not None:
            # One Redis round trip decides (within REDIS_TIMEOUT); the client waits unread.
            transport.pause_reading()
            self._reading = False
            self._admit_task = self.state.loop.create_task(self._admit_shared())
            return
        self._limit_decided(state.limiter.admit(self.client, time.monotonic()))

    def _limit_decided(self: ClientProtocol, limit: str | None) -> None:
        if limit is not None:
            self._refuse_connection(limit.lower(), self.state.policy.replies[limit])
            return
        self._open_session()

    async def _admit_shared(self: ClientProtocol) -> None:
        shared = self.state.shared_limits
        assert shared is not None and self.transport is not None
        try:
            limit = await shared.admit(self.client, self.session_id, time.monotonic())
        except Exception:
            self._admit_task = None
            self._crash()
            return
        self._admit_task = None
        if self._lost or self._closing:
            if limit is None:
                shared.release(self.client, self.session_id)  # admitted for a client gone meanwhile
            return
        if limit is None:
            self._reading = True
            self.transport.resume_reading()
        try:
            self._limit_decided(limit)
        except Exception:
            self._crash()

    def _open_session(self: ClientProtocol) -> None:
        transport = self.transport
        assert transport is not None
        state = self.state
        policy = state.policy
        self._admitted = True
        state.sessions.add(self)
        state.metrics.connections_accepted += 1
        grant = policy.relay_grant(self.client, self.listener)
        self.session = SmtpSession(state.limits, policy, state.capabilities(), self.client, grant, self.session_id,
                                   listener=self.listener, verdicts=state.recipient_verdicts)
        loop = self.state.loop
        self._started = self._last_progress = loop.time()
        self._timer = loop.call_later(state.settings.timeout, self._check_timeouts)
        if self.listener.implicit_tls:
            # RFC 8314: the listener's own TLS layer did the handshake before this connection was
            # handed to us (ServerState.implicit_tls_context); without one, no plaintext at all.
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is None:
                self._finish()
                return
            self.session.tls_started(tls_info(ssl_object))
            state.metrics.count(state.metrics.tls, "ok")
        self._schedule_greeting()
        if self._early_input:
            early, self._early_input = self._early_input, b""
            self._first_read = False  # (after a balancer's header: "PROXY" is its client's word)
            self.data_received(early)

    def _schedule_greeting(self: ClientProtocol) -> None:
        delay = self.state.settings.greeting_delay
        if delay > 0:
            self.state.loop.call_later(delay, self._greet)
        else:
            self._greet()

    def _refuse_connection(self: ClientProtocol, rule: str, reply: Reply) -> None:
        self.log.info("refused", stage="connect", rule=rule, reply=str(reply))
        self.state.metrics.count(self.state.metrics.connections_refused, rule)
        self._finish(reply)

    def _greet(self: ClientProtocol) -> None:
        if self.session is None or self._closing or self.session.closed:
            return
        assert self.transport is not None
        self.transport.write(self.session.greeting())
