"""What every connection of one worker shares: settings, policy, limits, TLS contexts, the
backend pool, and the set of live sessions (for draining). Swapped parts are swapped whole."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import ssl

from edgeproxy import tls
from edgeproxy.auth import BackendVerifier, FailureCounter, FileVerifier, Verifier, read_users
from edgeproxy.config import Settings
from edgeproxy.limits import ConnectionLimiter
from edgeproxy.listener import ListenerKind
from edgeproxy.metrics import WorkerMetrics
from edgeproxy.policy import Policy
from edgeproxy.pool import BackendPool
from edgeproxy.server import ClientProtocol
from edgeproxy.sharedlimits import SharedLimiter
from edgeproxy.smtp.capabilities import Capabilities
from edgeproxy.smtp.session import SessionLimits
from edgeproxy.verify import RecipientCache

_session_ids = itertools.count(1)


class ServerState:
    """What every connection of one worker shares. ``policy`` is swapped whole on reload."""

    def __init__(self, settings: Settings, backend: tuple[str, int]) -> None:
        # Kept, not asked for: in CPython 3.11 each asyncio.get_running_loop() is a getpid()
        # system call (its fork check), and the hot path wanted it a dozen times per message.
        self.loop = asyncio.get_running_loop()
        self.settings = settings
        self.policy = Policy(settings)
        self.tls_context = _server_tls(settings)
        self._implicit_context: ssl.SSLContext | None = None
        self.verifier = _verifier(settings, backend)
        self.auth_failures = FailureCounter(settings.auth_failure_limit)
        self.limits = SessionLimits(
            hostname=settings.hostname,
            max_line_length=settings.max_line_length,
            max_body_line_length=settings.max_body_line_length,
            max_errors=settings.max_errors,
            received_header=settings.received_header,
            enable_expn=settings.enable_expn,
            enable_etrn=settings.enable_etrn,
            max_pending_input=settings.max_pending_input,
            max_pipeline=settings.max_pipeline,
            recipient_overshoot=settings.recipient_overshoot_limit,
            junk_command_limit=settings.junk_command_limit,
            starttls=self.tls_context is not None,
            auth=self.verifier is not None and self.tls_context is not None,
            harvest_limit=settings.harvest_limit,
            harvest_delay=settings.harvest_delay,
        )
        self.recipient_verdicts = _recipient_verdicts(settings)
        self.limiter = ConnectionLimiter(
            settings.max_connections, settings.max_connections_per_ip, settings.connection_rate
        )
        self.shared_limits = _shared_limits(settings, self.limiter)
        self.pool = BackendPool(
            backend[0],
            backend[1],
            hostname=settings.hostname,
            # The budget is the backend's protection, so the workers split it.
            budget=max(1, settings.backend_max_connections // settings.workers),
            queue_timeout=settings.backend_queue_timeout,
            idle_timeout=settings.backend_idle_timeout,
            connect_timeout=settings.backend_connect_timeout,
            reply_timeout=settings.backend_timeout,
            retry_interval=settings.backend_retry_interval,
            use_xclient=settings.xclient,
            tls_mode=settings.backend_tls,
            tls_context=None if settings.backend_tls == "no" else tls.backend_context(
                settings.backend_verify, settings.backend_tls_ca),
        )
        self.metrics = WorkerMetrics()
        self.sessions: set[ClientProtocol] = set()
        self.draining = False
        self.drained = asyncio.Event()
        self._capabilities_for: list[str] | None = None
        self._capabilities = Capabilities.negotiate(settings.max_message_size, None)
        self._id_prefix = f"{os.getpid():x}"

    def metrics_snapshot(self) -> dict[str, object]:
        shared = self.shared_limits
        if shared is not None:
            self.metrics.redis_fallbacks = shared.fallbacks
        return self.metrics.snapshot({
            "connections_open": len(self.sessions),
            "backend_open": self.pool.open_count,
            "backend_idle": self.pool.idle_count,
            "redis_up": int(shared is not None and shared.healthy),
            "workers": 1,
        })

    def implicit_tls_context(self) -> ssl.SSLContext | None:
        """The context an implicit-TLS listener is created with. Its SNI callback (OpenSSL calls it
        for every ClientHello, SNI or not) hands each handshake the context current at that
        moment, so a SIGHUP reload reaches new connections on that listener too."""
        if self.tls_context is None:
            return None
        if self._implicit_context is None:
            context = self._implicit_context = _server_tls(self.settings)
            assert context is not None

            def current(ssl_object: ssl.SSLObject, _name: str | None, _context: ssl.SSLContext) -> None:
                ssl_object.context = self.tls_context  # type: ignore[assignment]

            context.sni_callback = current
        return self._implicit_context

    def listener_options(self, kind: ListenerKind) -> dict[str, object]:
        """create_server keywords for a listener of ``kind``: TLS from the first byte for
        submissions, within the handshake limit."""
        context = self.implicit_tls_context() if kind.implicit_tls else None
        if context is None:
            return {}
        return {"ssl": context, "ssl_handshake_timeout": self.settings.tls_handshake_timeout}

    def capabilities(self) -> Capabilities:
        keywords = self.pool.keywords
        if keywords is not self._capabilities_for:
            self._capabilities = Capabilities.negotiate(self.settings.max_message_size, keywords)
            self._capabilities_for = keywords
        return self._capabilities

    def new_session_id(self) -> str:
        return f"{self._id_prefix}{next(_session_ids):06x}"

    def reload(self, settings: Settings) -> None:
        """New lists, directories and certificate for new sessions; sessions in progress keep
        theirs. Raises ValueError (the old state stays) when the new certificate will not load."""
        context = _server_tls(settings)
        verifier = _verifier(settings, self.pool.host_port)
        self.policy = Policy(settings)
        if self.recipient_verdicts is not None:
            # A mailbox created since must not be refused on the old word (nor, with Redis, on
            # another node's): the verdicts are forgotten, here and in Redis.
            self.recipient_verdicts.forget()
        if context is not None:
            self.tls_context = context
        if isinstance(verifier, FileVerifier):
            self.verifier = verifier  # the users file re-read (SIGHUP)

    def drain(self) -> None:
        self.draining = True
        for session in list(self.sessions):
            session.drain()
        if not self.sessions:
            self.drained.set()

    def abort_all(self) -> None:
        for session in list(self.sessions):
            session.abort()

    def protocol_factory(self, listener: ListenerKind):
        return lambda: ClientProtocol(self, listener)


def _recipient_verdicts(settings: Settings) -> RecipientCache | None:
    if not settings.verify_recipients:
        return None
    cache = RecipientCache(settings.verify_cache_size, settings.verify_negative_ttl, settings.verify_positive_ttl)
    if settings.redis_url:
        cache.share(settings.redis_url, settings.redis_timeout)
    return cache


def _shared_limits(settings: Settings, limiter: ConnectionLimiter) -> SharedLimiter | None:
    if not settings.redis_url or not (settings.max_connections_per_ip or settings.connection_rate
                                      or settings.auth != "off"):
        return None  # (nothing per client to share)
    # A session cannot outlive its time limit (and a drain): a crashed node's connections leave
    # the shared count by then.
    return SharedLimiter(limiter, settings.redis_url, settings.redis_timeout,
                         holder=f"{socket.gethostname()}:{os.getpid()}",
                         hold_seconds=settings.session_timeout + settings.drain_timeout)


def _verifier(settings: Settings, backend: tuple[str, int]) -> Verifier | None:
    if settings.auth == "file":
        with open(settings.auth_users, encoding="utf-8") as handle:
            return FileVerifier(read_users(handle.read()))
    if settings.auth == "backend":
        context = None if settings.backend_tls == "no" else tls.backend_context(
            settings.backend_verify, settings.backend_tls_ca)
        return BackendVerifier(backend[0], backend[1], settings.hostname, settings.backend_connect_timeout, context)
    return None


def _server_tls(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_cert:
        return None
    return tls.server_context(settings.tls_cert, settings.tls_key, settings.tls_min_version)
