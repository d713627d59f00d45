"""Prometheus metrics summed over the workers, and the health endpoints (design.md §8).

The hot path never touches prometheus_client: a worker counts in plain integers (an attribute or
dict increment, well under a microsecond; a prometheus_client multiprocess ``inc`` is a locked
mmap write of about one) and writes a snapshot of its counts to a file once a second. The
metrics process (forked by the supervisor, never a worker) reads every worker's latest
snapshot and sums them through a prometheus_client collector, which renders the official text
format. Counters of a worker that died stay in its last snapshot, so totals never go back;
gauges come from snapshots written in the last few seconds only, so a dead worker's open
connections vanish with it.

``/healthz``: the metrics process serves (and so does the supervisor that forked it).
``/readyz``: not draining, at least one worker has written a snapshot lately, and the backend
answers with a 220 greeting (checked at most once per ``_BACKEND_CHECK_INTERVAL``).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

SNAPSHOT_INTERVAL = 1.0
# Gauges older than this belong to a worker that is gone (or hung): left out of the sum.
_FRESH = 5.0
_BACKEND_CHECK_INTERVAL = 2.0
_BACKEND_CHECK_TIMEOUT = 1.0

SESSION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
BACKEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Histogram:
    """Observations counted into fixed buckets (upper bounds, +Inf implied), and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


class WorkerMetrics:
    """One worker's counts since it started. Increment the attributes directly."""

    __slots__ = ("auth", "backend_seconds", "connections_accepted", "connections_refused", "harvest_delays",
                 "message_bytes", "messages", "recipients", "redis_fallbacks", "refusals", "session_seconds",
                 "sessions", "tls")

    def __init__(self) -> None:
        self.connections_accepted = 0
        self.connections_refused: dict[str, int] = {}  # by reason
        self.sessions = 0
        self.refusals: dict[str, int] = {}  # by rule
        self.recipients = 0
        self.messages: dict[tuple[str, str], int] = {}  # (outcome, reply class)
        self.message_bytes = 0
        self.tls: dict[str, int] = {}  # handshakes by result
        self.auth: dict[str, int] = {}  # AUTH attempts by result
        self.redis_fallbacks = 0
        self.harvest_delays = 0
        self.session_seconds = Histogram(SESSION_BUCKETS)
        self.backend_seconds = Histogram(BACKEND_BUCKETS)

    def count(self, table: dict[Any, int], key: Any) -> None:
        table[key] = table.get(key, 0) + 1

    def transaction_ended(self, delivered: bool, recipients: int, size: int, reply_code: int) -> None:
        self.count(self.messages, ("delivered" if delivered else "failed", f"{reply_code // 100}xx"))
        self.recipients += recipients
        if delivered:
            self.message_bytes += size

    def snapshot(self, gauges: dict[str, float]) -> dict[str, Any]:
        return {
            "time": time.time(),
            "counters": {
                "connections_accepted": self.connections_accepted,
                "sessions": self.sessions,
                "recipients": self.recipients,
                "message_bytes": self.message_bytes,
                "redis_fallbacks": self.redis_fallbacks,
                "harvest_delays": self.harvest_delays,
            },
            "labelled": {
                "connections_refused": sorted(self.connections_refused.items()),
                "refusals": sorted(self.refusals.items()),
                "messages": sorted((list(key), value) for key, value in self.messages.items()),
                "tls": sorted(self.tls.items()),
                "auth": sorted(self.auth.items()),
            },
            "histograms": {
                "session_seconds": [self.session_seconds.counts, self.session_seconds.total],
                "backend_seconds": [self.backend_seconds.counts, self.backend_seconds.total],
            },
            "gauges": gauges,
        }


def write_snapshot(directory: str, snapshot: dict[str, Any]) -> None:
    """Atomically: the reader never sees half a file."""
    path = Path(directory) / f"worker-{os.getpid()}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(snapshot), encoding="utf-8")
    os.replace(temporary, path)


def read_snapshots(directory: str) -> list[dict[str, Any]]:
    snapshots = []
    for path in Path(directory).glob("worker-*.json"):
        with contextlib.suppress(OSError, ValueError):
            snapshots.append(json.loads(path.read_text(encoding="utf-8")))
    return snapshots


# -- the metrics process ------------------------------------------------------------------------

_COUNTERS = {
    "connections_accepted": ("edgeproxy_connections_accepted", "Client connections admitted to a session"),
    "sessions": ("edgeproxy_sessions", "Sessions ended"),
    "recipients": ("edgeproxy_recipients_accepted", "Recipients accepted in transactions that ended"),
    "message_bytes": ("edgeproxy_message_bytes", "Body octets of messages the backend accepted"),
    "redis_fallbacks": ("edgeproxy_redis_fallbacks", "Limit decisions taken per worker while Redis was unwell"),
    "harvest_delays": ("edgeproxy_harvest_delays", "RCPT replies delayed by the directory-harvest tarpit"),
}
_LABELLED = {
    "connections_refused": ("edgeproxy_connections_refused", "Connections refused before a session", ("reason",)),
    "refusals": ("edgeproxy_refusals", "Commands refused by a policy rule", ("rule",)),
    "messages": ("edgeproxy_messages", "Messages that ended, by outcome and backend reply class",
                 ("outcome", "reply_class")),
    "tls": ("edgeproxy_tls_handshakes", "Client TLS handshakes", ("result",)),
    "auth": ("edgeproxy_auth_attempts", "SMTP AUTH attempts", ("result",)),
}
_HISTOGRAMS = {
    "session_seconds": ("edgeproxy_session_duration_seconds", "Client session duration", SESSION_BUCKETS),
    "backend_seconds": ("edgeproxy_backend_transaction_seconds",
                        "From MAIL sent to the backend to its reply to the end of data", BACKEND_BUCKETS),
}
_GAUGES = {
    "connections_open": ("edgeproxy_connections_open", "Client sessions open"),
    "backend_open": ("edgeproxy_backend_connections_open", "Backend connections open"),
    "backend_idle": ("edgeproxy_backend_connections_idle", "Backend connections idle in the pools"),
    "redis_up": ("edgeproxy_redis_up", "Workers whose shared limits are in Redis (not falling back)"),
    "workers": ("edgeproxy_workers", "Workers that reported in the last seconds"),
}


class SnapshotCollector:
    """A prometheus_client collector summing the workers' snapshots at each scrape."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snapshots = read_snapshots(self.directory)
        now = time.time()
        for key, (name, help_text) in _COUNTERS.items():
            yield CounterMetricFamily(name, help_text, value=sum(s["counters"].get(key, 0) for s in snapshots))
        for key, (name, help_text, labels) in _LABELLED.items():
            family = CounterMetricFamily(name, help_text, labels=labels)
            totals: dict[tuple[str, ...], int] = {}
            for snapshot in snapshots:
                for label, value in snapshot["labelled"].get(key, []):
                    values = tuple(label) if isinstance(label, list) else (label,)
                    totals[values] = totals.get(values, 0) + value
            for values, value in sorted(totals.items()):
                family.add_metric(list(values), value)
            yield family
        for key, (name, help_text, bounds) in _HISTOGRAMS.items():
            counts = [0] * (len(bounds) + 1)
            total = 0.0
            for snapshot in snapshots:
                these, their_sum = snapshot["histograms"][key]
                counts = [a + b for a, b in zip(counts, these, strict=True)]
                total += their_sum
            cumulative, running = [], 0
            for bound, count in zip((*map(str, bounds), "+Inf"), counts, strict=True):
                running += count
                cumulative.append((bound, running))
            yield HistogramMetricFamily(name, help_text, buckets=cumulative, sum_value=total)
        fresh = [s for s in snapshots if now - s["time"] < _FRESH]
        for key, (name, help_text) in _GAUGES.items():
            yield GaugeMetricFamily(name, help_text, value=sum(s["gauges"].get(key, 0) for s in fresh))


class Health:
    """What /readyz answers from: draining is set by SIGTERM; the backend is asked now and then."""

    def __init__(self, directory: str, backend: tuple[str, int]) -> None:
        self.directory = directory
        self.backend = backend
        self.draining = False
        self._checked = 0.0
        self._backend_ok = False

    def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        now = time.time()
        if not any(now - s["time"] < _FRESH for s in read_snapshots(self.directory)):
            return False, "no worker has reported"
        if time.monotonic() - self._checked >= _BACKEND_CHECK_INTERVAL:
            self._backend_ok = backend_answers(self.backend)
            self._checked = time.monotonic()
        return (True, "ready") if self._backend_ok else (False, "backend does not answer")


def backend_answers(backend: tuple[str, int]) -> bool:
    """A 220 greeting within the timeout (and a polite QUIT): the backend can take mail."""
    try:
        with socket.create_connection(backend, timeout=_BACKEND_CHECK_TIMEOUT) as connection:
            greeting = b""
            while b"\n" not in greeting and len(greeting) < 4096:
                chunk = connection.recv(4096)
                if not chunk:
                    break
                greeting += chunk
            with contextlib.suppress(OSError):
                connection.sendall(b"QUIT\r\n")
            return greeting.startswith(b"220")
    except OSError:
        return False


def wsgi_app(directory: str, health: Health) -> Callable[..., Iterable[bytes]]:
    from prometheus_client import CollectorRegistry, make_wsgi_app

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(directory))  # type: ignore[arg-type]
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            ok, text = True, "ok"
        elif path == "/readyz":
            ok, text = health.ready()
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [text.encode() + b"\n"]

    return app


class _QuietHandler(WSGIRequestHandler):
    timeout = 5  # one request at a time: a client that dawdles cannot hold the endpoint

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not news


def serve_metrics(sock: socket.socket, directory: str, backend: tuple[str, int], parent: int) -> None:
    """The metrics process: serve until a second SIGTERM/SIGINT (the first one marks draining,
    so balancers see /readyz fail while the workers finish their sessions), or until the
    supervisor is gone (killed: nobody would stop this process otherwise)."""
    health = Health(directory, backend)
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        if health.draining:
            stopping = True
        health.draining = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    server = _BoundServer(("", 0), _QuietHandler, bind_and_activate=False)
    server.socket.close()
    # Blocking, or handle_request's select() would take the socket's 0 s timeout over its own
    # and spin: the listening socket comes non-blocking from the supervisor.
    sock.setblocking(True)
    server.socket = sock
    server.server_name, server.server_port = "edgeproxy", sock.getsockname()[1]
    server.setup_environ()
    server.set_app(wsgi_app(directory, health))
    server.timeout = 0.5  # (handle_request returns then, so a signal is seen within it)
    while not stopping and os.getppid() == parent:
        server.handle_request()
    server.server_close()


class _BoundServer(WSGIServer):
    """Serves a socket the supervisor made (and checked) before it forked this process."""
