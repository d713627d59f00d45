"""The STARTTLS handshake and AUTH verification of a session (part of
:class:`~edgeproxy.server.ClientProtocol`): each runs off the session's path, so a slow handshake,
hash or backend holds up that session only.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING

from edgeproxy.auth import FAILURE_WINDOW, Outcome
from edgeproxy.smtp import events as ev
from edgeproxy.smtp import replies as r

if TYPE_CHECKING:
    from edgeproxy.server import ClientProtocol


class Securing:
    """Mixed into ClientProtocol, whose slots hold the state."""

    __slots__ = ()

    def _start_tls(self: ClientProtocol) -> None:
        context = self.state.tls_context
        assert context is not None and self.transport is not None
        # Not one more byte for the session: the next ones are the ClientHello, which must wait
        # in the socket for the TLS layer (start_tls resumes reading once it owns the transport).
        self.transport.pause_reading()
        self._reading = False
        self._handshaking = True
        self._tls_task = self.state.loop.create_task(self._handshake(self.transport, context))

    async def _handshake(self: ClientProtocol, transport: asyncio.Transport, context: ssl.SSLContext) -> None:
        """The server side of TLS, off the session's path: other sessions run meanwhile, and a
        failed or stalled handshake costs one log line and this connection only."""
        loop = self.state.loop
        try:
            secured = await loop.start_tls(transport, self, context, server_side=True,
                                           ssl_handshake_timeout=self.state.settings.tls_handshake_timeout)
        except (OSError, TimeoutError, ValueError, RuntimeError) as error:  # ssl.SSLError is an OSError
            self.state.metrics.count(self.state.metrics.tls, "failed")
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
        self.state.metrics.count(self.state.metrics.tls, "ok")
        self._reading = True
        self._last_progress = loop.time()
        session.tls_started(tls_info(secured.get_extra_info("ssl_object")))
        early, self._early_tls_data = self._early_tls_data, b""
        if early:
            session.receive_data(early)  # said inside TLS before this coroutine resumed
        self._pump()

    async def _authenticate(self: ClientProtocol, event: ev.Authenticate) -> None:
        """Verify off the session's path: a slow hash or backend holds up this session only."""
        state = self.state
        shared = state.shared_limits
        # Counted on every node through Redis when it can say, else by this worker alone.
        failures = await shared.auth_failures(self.client, FAILURE_WINDOW) if shared is not None else None
        if state.auth_failures.blocked(self.client) or (failures is not None
                                                         and failures >= state.auth_failures.limit):
            self.log.warning("auth_blocked", user=event.username, limit=state.auth_failures.limit)
            outcome = Outcome(False, r.AUTH_BLOCKED)
        else:
            assert state.verifier is not None
            outcome = await state.verifier.verify(event.username, event.password)
            if not outcome.ok and outcome.reply.is_permanent:
                state.auth_failures.add(self.client)
                if shared is not None:
                    shared.auth_failed(self.client, FAILURE_WINDOW)
                # Each failure waits before its answer: guessing gets slow, nobody else waits.
                await asyncio.sleep(state.settings.auth_failure_delay)
        self._auth_task = None
        session = self.session
        if session is None or self._closing:
            return
        state.metrics.count(state.metrics.auth, "ok" if outcome.ok else
                            "blocked" if outcome.reply is r.AUTH_BLOCKED else "failed")
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


def tls_info(ssl_object: ssl.SSLObject | None) -> ev.TlsInfo:
    cipher = ssl_object.cipher() if ssl_object is not None else None
    return ev.TlsInfo(ssl_object.version() or "TLS" if ssl_object is not None else "TLS",
                      cipher[0] if cipher else "unknown", cipher[2] if cipher else 0)
