"""Shared fixtures: the real proxy on a thread (stdlib asyncio or uvloop) in front of a real
SMTP backend on loopback."""

from __future__ import annotations

import asyncio
import os
import shutil
import smtplib
import threading
from collections.abc import Callable, Iterator

import pytest

from edgeproxy import log as logsetup
from edgeproxy.config import Settings
from edgeproxy.listener import ListenerKind
from edgeproxy.worker import ServerState
from tests.backends import AiosmtpdSink, PipeliningSink

LOOPS = ("asyncio", "uvloop")
IN_CI = os.environ.get("CI", "").lower() == "true"

logsetup.configure("warning", "json")


def require_tool(name: str) -> str:
    """A system tool the test needs: skipped where absent, but never in CI (which installs it)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/lib/postfix/sbin")
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is not installed, but .ci/run installs it")
        pytest.skip(f"{name} is not installed")
    return path


class ProxyThread:
    """edgeproxy's ServerState served on 127.0.0.1:0 from an event loop on its own thread."""

    def __init__(self, env: dict[str, str], backend: tuple[str, int], loop_kind: str) -> None:
        base = {"EDGEPROXY_MAX_CONNECTIONS_PER_IP": "0", "EDGEPROXY_HOSTNAME": "proxy.test"}
        self.settings = Settings.from_env({**base, **env})
        self.backend = backend
        self.loop_kind = loop_kind
        self.port = 0
        self.relay_port = 0
        self.state: ServerState | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        if self.loop_kind == "uvloop":
            import uvloop

            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as error:  # surfaced to the test by start()
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()

    async def _start(self) -> None:
        self.state = ServerState(self.settings, self.backend)
        await self.state.pool.probe()
        self._servers = [
            await self.loop.create_server(self.state.protocol_factory(kind), "127.0.0.1", 0,
                                          **self.state.listener_options(kind))  # type: ignore[arg-type]
            for kind in ListenerKind
        ]
        self.ports = {kind: server.sockets[0].getsockname()[1]
                      for kind, server in zip(ListenerKind, self._servers, strict=True)}
        self.port = self.ports[ListenerKind.SMTP]
        self.relay_port = self.ports[ListenerKind.RELAY]

    def start(self) -> ProxyThread:
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("proxy did not start")
        if self._error is not None:
            raise self._error
        return self

    def call(self, function: Callable[[], object]) -> None:
        self.loop.call_soon_threadsafe(function)

    def stop(self) -> None:
        async def shutdown() -> None:
            for server in self._servers:
                server.close()
            assert self.state is not None
            self.state.abort_all()
            self.state.pool.close_all()
            await asyncio.sleep(0.01)
            self.loop.stop()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
            self._thread.join(10)

    def quiet(self) -> bool:
        """No session is open and no backend connection is in use: whatever was forwarded has
        been answered, so nothing more can reach the backend. The event negative checks wait for."""
        state = self.state
        assert state is not None
        return not state.sessions and state.pool.open_count == state.pool.idle_count

    def wait_quiet(self, timeout: float = 10) -> None:
        assert wait_for(self.quiet, timeout), "the proxy did not go quiet"

    def client(self, relay_listener: bool = False, timeout: float = 10) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.relay_port if relay_listener else self.port, timeout=timeout)


@pytest.fixture(params=LOOPS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def sink() -> Iterator[AiosmtpdSink]:
    with AiosmtpdSink() as backend:
        yield backend


@pytest.fixture
def pipelining_sink() -> Iterator[PipeliningSink]:
    with PipeliningSink() as backend:
        yield backend


@pytest.fixture
def make_proxy(loop_kind: str) -> Iterator[Callable[..., ProxyThread]]:
    started: list[ProxyThread] = []

    def make(backend: tuple[str, int], **env: str) -> ProxyThread:
        proxy = ProxyThread({f"EDGEPROXY_{k.upper()}": v for k, v in env.items()}, backend, loop_kind).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture
def logged_proxy() -> Iterator:
    """``edgeproxy serve`` in its own process, logging JSON at info level, for the log tests.

    In-process, the suite's logging is configured at ``warning`` (conftest) and structlog caches
    each logger's level filter on first use, so ``capture_logs`` cannot see the info-level
    ``refused`` and ``session`` lines; a real process reading its real stderr can."""
    from tests.test_lifecycle import ServeProcess

    started: list[ServeProcess] = []

    def start(backend: tuple[str, int], **env: str) -> ServeProcess:
        variables = {f"EDGEPROXY_{k.upper()}": v for k, v in env.items()}
        process = ServeProcess({"EDGEPROXY_BACKEND": f"{backend[0]}:{backend[1]}", "EDGEPROXY_LOG_LEVEL": "info",
                                "EDGEPROXY_HOSTNAME": "proxy.test", **variables})
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll a condition that another thread makes true; bounded."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
