"""A throwaway ``redis-server`` for tests: loopback only, no persistence, its own temporary directory.

    with RedisServer() as server:          # started, answering PING
        client = redis.Redis.from_url(server.url)
        server.pause()                      # SIGSTOP: connections open, nothing answered (a slow Redis)
        server.resume()                     # SIGCONT
        server.stop()                       # SIGKILL: gone, as in a crash (nothing is saved)
        server.start()                      # again on the same port, empty

Where ``redis-server`` is not installed the test is skipped, except under ``CI=true``, where it
fails (CI installs it). As a fixture::

    @pytest.fixture
    def redis_server() -> Iterator[RedisServer]:
        with RedisServer() as server:
            yield server
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import pytest

_IN_CI = os.environ.get("CI", "").lower() == "true"
_START_TIMEOUT = 10.0


def redis_server_binary() -> str:
    """The ``redis-server`` to run: skips the calling test where it is absent, but fails in CI."""
    path = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/local/bin")
    if path is None:
        if _IN_CI:
            pytest.fail("redis-server is not installed, but CI installs it")
        pytest.skip("redis-server is not installed")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:<port>``; a context manager that starts it and,
    on exit, kills it and removes its directory. ``port`` 0 picks a free one, kept for restarts."""

    def __init__(self, port: int = 0) -> None:
        self.binary = redis_server_binary()
        self.port = port
        self._fixed_port = port != 0
        self._dir = Path(tempfile.mkdtemp(prefix="edgeproxy-redis-"))
        self._process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> RedisServer:
        """Start (or restart, on the same port, with no data) and wait until it answers PING."""
        if self.running:
            return self
        # A port picked free can be taken before redis-server binds it: pick another, first start only.
        attempts = 1 if self._fixed_port else 5
        for attempt in range(attempts):
            if not self.port:
                self.port = _free_port()
            if self._launch():
                self._fixed_port = True  # restarts come back where clients expect it
                return self
            if attempt + 1 < attempts:
                self.port = 0
        raise RuntimeError(f"redis-server did not start on port {self.port}: {self._log_tail()}")

    def _launch(self) -> bool:
        log_file = self._dir / "redis.log"
        self._process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self._dir), "--logfile", str(log_file), "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.paused = False
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            if _answers_ping(self.port):
                return True
            time.sleep(0.005)
        self.stop()
        return False

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server, by default as a crash would (SIGKILL); its data is gone either way."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        if self.paused and sig != signal.SIGKILL:
            process.send_signal(signal.SIGCONT)  # a stopped process acts on no other signal
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections and buffers commands, nothing is answered."""
        assert self._process is not None, "not running"
        self._process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self._process is not None, "not running"
        self._process.send_signal(signal.SIGCONT)
        self.paused = False

    def _log_tail(self) -> str:
        try:
            return (self._dir / "redis.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> RedisServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
