"""Listeners, worker processes and signals: the part of edgeproxy that runs as a daemon.

SIGTERM/SIGINT drain (stop accepting, 421 to idle sessions, let transactions finish until the
deadline, then close); a second one exits at once. SIGHUP reloads every list and directory; a bad
file keeps the old policy and logs why.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping

import structlog

from edgeproxy import log as logsetup
from edgeproxy import metrics, tls
from edgeproxy.config import ConfigError, Settings
from edgeproxy.listener import ListenerKind
from edgeproxy.worker import ServerState

log = structlog.get_logger("edgeproxy")
Listener = tuple[str, int, ListenerKind]
# The kernel caps it at net.core.somaxconn; asyncio's default of 100 drops SYNs in a burst.
LISTEN_BACKLOG = 4096


class ListenError(OSError):
    """An address from the configuration cannot be listened on (in use, not ours)."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"{address}: {reason}")
        self.address = address
        self.reason = reason


def listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    try:
        return _bound_socket(host, port, reuse_port)
    except OSError as error:
        raise ListenError(f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                          error.strerror or str(error)) from None


def _bound_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        # So that [::]:25 and 0.0.0.0:25 can both be listed.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(address)
    sock.setblocking(False)
    return sock


def _listeners(settings: Settings) -> list[Listener]:
    kinds = ((settings.listen, ListenerKind.SMTP), (settings.relay_listen, ListenerKind.RELAY),
             (settings.submission_listen, ListenerKind.SUBMISSION),
             (settings.submissions_listen, ListenerKind.SUBMISSIONS))
    return [(host, port, kind) for addresses, kind in kinds for host, port in addresses]


async def serve(settings: Settings, backend: tuple[str, int], listeners: list[Listener],
                reuse_port: bool, environ: Mapping[str, str], metrics_dir: str | None = None,
                supervisor: int | None = None) -> None:
    loop = asyncio.get_running_loop()
    logsetup.batch_writes(loop)
    state = ServerState(settings, backend)
    await state.pool.probe()
    report_metrics = _report_metrics(state, metrics_dir) if metrics_dir is not None else None
    servers = []
    bound = []
    for host, port, kind in listeners:
        sock = listen_socket(host, port, reuse_port)
        servers.append(await loop.create_server(state.protocol_factory(kind), sock=sock, backlog=LISTEN_BACKLOG,
                                                **state.listener_options(kind)))  # type: ignore[arg-type]
        name = sock.getsockname()
        bound.append(f"[{name[0]}]:{name[1]}" if sock.family == socket.AF_INET6 else f"{name[0]}:{name[1]}")
    from edgeproxy import fastpath

    log.info("listening", addresses=bound, backend=state.pool.address, pid=os.getpid(),
             fastpath=fastpath.IMPLEMENTATION, loop=type(loop).__module__.split(".")[0],
             backend_ready=state.pool.keywords is not None)
    stopping = asyncio.Event()
    stop_now = asyncio.Event()

    def on_stop_signal() -> None:
        if stopping.is_set():
            stop_now.set()
        stopping.set()

    def on_reload() -> None:
        try:
            new = Settings.from_env(environ)
            if not new.tls_cert and settings.tls_cert:
                new = dataclasses.replace(new, tls_cert=settings.tls_cert, tls_key=settings.tls_key)
            state.reload(new)
        except (ConfigError, ValueError) as error:
            problems = error.problems if isinstance(error, ConfigError) else [str(error)]
            log.error("reload_failed", problems=problems, kept="previous policy and certificate")
            return
        log.info("reloaded")

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop_signal)
    if supervisor is not None:
        # A supervisor killed outright (SIGKILL, the OOM killer) forwards no signal: a worker
        # that outlived it would serve on, unsupervised and unseen. It drains instead.
        def watch_supervisor() -> None:
            if os.getppid() != supervisor:
                log.warning("supervisor_gone", action="draining")
                stopping.set()
            elif not stopping.is_set():
                loop.call_later(1.0, watch_supervisor)

        watch_supervisor()
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    await stopping.wait()
    log.info("draining", sessions=len(state.sessions), deadline=settings.drain_timeout)
    for server in servers:
        server.close()
    state.drain()
    done = asyncio.ensure_future(state.drained.wait())
    now = asyncio.ensure_future(stop_now.wait())
    await asyncio.wait({done, now}, timeout=settings.drain_timeout, return_when=asyncio.FIRST_COMPLETED)
    done.cancel()
    now.cancel()
    if state.sessions:
        log.warning("drain_deadline", aborted=len(state.sessions))
        state.abort_all()
    state.pool.close_all()
    if state.shared_limits is not None:
        await state.shared_limits.close()  # (the releases of the last sessions reach Redis first)
    if state.recipient_verdicts is not None:
        await state.recipient_verdicts.close()
    await asyncio.sleep(0)
    if report_metrics is not None:
        report_metrics()
    log.info("stopped")


def _report_metrics(state: ServerState, directory: str) -> Callable[[], None]:
    """This worker's counts to the metrics process, once a second; the returned function writes
    one at once (the last one, at the end)."""
    loop = asyncio.get_running_loop()

    def write() -> None:
        try:
            metrics.write_snapshot(directory, state.metrics_snapshot())
        except OSError as error:
            log.warning("metrics_snapshot_failed", reason=str(error))

    def every_second() -> None:
        write()
        loop.call_later(metrics.SNAPSHOT_INTERVAL, every_second)

    every_second()
    return write


def run_worker(settings: Settings, backend: tuple[str, int], listeners: list[Listener],
               reuse_port: bool, environ: Mapping[str, str], metrics_dir: str | None = None,
               supervisor: int | None = None) -> None:
    coroutine = serve(settings, backend, listeners, reuse_port, environ, metrics_dir, supervisor)
    try:
        if settings.loop == "uvloop":
            import uvloop

            uvloop.run(coroutine)
        else:
            asyncio.run(coroutine)
    finally:
        logsetup.batch_writes(None)  # what the last turn held, before the worker exits


def start_embedded_sink(settings: Settings) -> tuple[tuple[str, int], int, str]:
    """Fork the embedded sink before any event loop exists; return its address, pid and dir."""
    from edgeproxy.sink import run_sink_process

    directory = settings.sink_dir or tempfile.mkdtemp(prefix="edgeproxy-sink-")
    sock = listen_socket("127.0.0.1", 0, reuse_port=False)
    sock.listen(LISTEN_BACKLOG)
    address = sock.getsockname()[:2]
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            run_sink_process(sock, directory, parent)
        finally:
            os._exit(0)
    sock.close()
    return address, pid, directory


def run(settings: Settings, environ: Mapping[str, str]) -> int:
    logsetup.configure(settings.log_level, settings.log_format)
    children: list[int] = []
    backend = settings.backend
    try:
        if backend is None:
            backend, sink_pid, directory = start_embedded_sink(settings)
            children.append(sink_pid)
            log.info("embedded_sink", address=f"{backend[0]}:{backend[1]}", directory=directory,
                     note="no EDGEPROXY_BACKEND set: messages are written to files, not delivered")
            if not settings.tls_cert:
                cert, key = tls.make_self_signed(settings.hostname, tempfile.mkdtemp(prefix="edgeproxy-tls-"))
                settings = dataclasses.replace(settings, tls_cert=cert, tls_key=key)
                log.info("tls_self_signed", certificate=cert, note="a throwaway certificate, for trying it out")
        _check_certificate(settings)
        listeners = _listeners(settings)
        if settings.workers == 1 and settings.metrics_listen is None:
            run_worker(settings, backend, listeners, False, environ)
            return 0
        return _supervise(settings, backend, listeners, environ, children)
    except ListenError as error:
        log.error("listen_failed", address=error.address, reason=error.reason)
        return 1
    finally:
        for pid in children:
            _stop_child(pid)


def _check_certificate(settings: Settings) -> None:
    """One warning line each for what still starts but an operator should know."""
    if not settings.tls_cert:
        log.warning("starttls_not_offered", note="set EDGEPROXY_TLS_CERT and EDGEPROXY_TLS_KEY to offer STARTTLS")
        return
    expires = tls.certificate_expiry(settings.tls_cert)
    if expires <= datetime.datetime.now(datetime.UTC):
        log.warning("tls_certificate_expired", variable="EDGEPROXY_TLS_CERT", path=settings.tls_cert,
                    expired=expires.isoformat())


def _supervise(settings: Settings, backend: tuple[str, int], listeners: list[Listener],
               environ: Mapping[str, str], children: list[int]) -> int:
    """Fork one worker per requested process, all on the same ports with SO_REUSEPORT."""
    # Bound but never listening, these sockets hold port-0 choices without taking connections.
    reserved = [listen_socket(host, port, reuse_port=True) for host, port, _ in listeners]
    listeners = [
        (host, sock.getsockname()[1], kind) for (host, _, kind), sock in zip(listeners, reserved, strict=True)
    ]
    metrics_sock = None
    metrics_dir = None
    if settings.metrics_listen is not None:
        host, port = settings.metrics_listen
        metrics_sock = listen_socket(host, port, reuse_port=False)
        metrics_sock.listen(64)
        metrics_dir = tempfile.mkdtemp(prefix="edgeproxy-metrics-")
    workers: set[int] = set()
    supervisor = os.getpid()
    metrics_pid = 0
    stopping = False

    def spawn_metrics() -> None:
        nonlocal metrics_pid
        assert metrics_sock is not None and metrics_dir is not None
        pid = os.fork()
        if pid == 0:
            try:
                metrics.serve_metrics(metrics_sock, metrics_dir, backend, supervisor)
            finally:
                os._exit(0)
        metrics_pid = pid

    def spawn() -> None:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run_worker(settings, backend, listeners, True, environ, metrics_dir, supervisor)
            except BaseException:
                log.exception("worker_crashed")
                code = 1
            finally:
                os._exit(code)
        workers.add(pid)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in (*workers, metrics_pid):
            if pid:
                _signal(pid, signum)

    if metrics_sock is not None:
        spawn_metrics()
        name = metrics_sock.getsockname()
        log.info("metrics_listening", address=f"{name[0]}:{name[1]}", paths=["/metrics", "/healthz", "/readyz"])
    for _ in range(settings.workers):
        spawn()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == metrics_pid:
            metrics_pid = 0
            if not stopping:
                log.error("metrics_died", pid=pid, status=status, action="restarting")
                spawn_metrics()
            continue
        if pid not in workers:
            continue
        workers.discard(pid)
        if not stopping:
            log.error("worker_died", pid=pid, status=status, action="restarting")
            spawn()
    for sock in reserved:
        sock.close()
    if metrics_pid:
        # SIGKILL, not a second SIGTERM: two signals close together can arrive as one, and it
        # has nothing to save.
        _signal(metrics_pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(metrics_pid, 0)
    if metrics_sock is not None:
        metrics_sock.close()
    if metrics_dir is not None:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _stop_child(pid: int) -> None:
    _signal(pid, signal.SIGTERM)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: edgeproxy serve")
