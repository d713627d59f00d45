"""Hostile clients for the ``hostile`` scenario, in a process of their own beside the normal load.

Three kinds, one connection each (a client the server closes is not replaced):

- ``never-read``: reads the greeting, then writes ``EHLO`` and ``NOOP`` lines as fast as the
  socket takes them and never reads a reply.
- ``rcpt-flood``: reads the greeting, then writes ``EHLO``, ``MAIL`` and ``RCPT TO:<uN@example.test>``
  lines (N counting up) as fast as the socket takes them, never reading a reply.
- ``idle``: delivers one message (its token is checked in the sink like the normal clients'),
  then stays connected and silent.

And one more kind, for the ``held-input`` scenario rather than ``hostile``:

- ``held-input``: reads the replies to ``EHLO`` and ``MAIL``, writes ``RCPT TO:<held-N@example.test>``
  (a recipient whose reply the ``held-input`` backend delays), then never reads again and writes
  ``NOOP`` lines padded to ~500 octets with an argument, as fast as the socket takes them.

Every client stops at the run's end (the parent sets ``stop``) or at ``max_bytes`` written, and
closes its socket; the process sends back, per kind, what its clients did and how the server
treated them.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import socket
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bench import loadgen

KINDS = ("never-read", "rcpt-flood", "idle")  # the hostile scenario's
HELD = "held-input"
HELD_PADDING = 490  # NOOP's argument: a 497-octet line, within the 512 of RFC 5321 §4.5.3.1.4
HELD_CHUNK_LINES = 128
WRITE_HIGH_WATER = 64 * 1024  # what a writer keeps queued in its own process; the socket holds the rest
CHUNK_LINES = 1024
CLOSED = -1  # the "greeting" of a connection lost before one came


@dataclass
class KindStats:
    clients: int = 0
    connected: int = 0
    bytes_written: int = 0  # accepted by the socket
    lines_written: int = 0  # NOOP or RCPT lines (never-read, rcpt-flood)
    capped: int = 0  # writers that stopped at the byte cap
    closed_by_server: int = 0
    close_after_s: list[float] = field(default_factory=list)  # from connect to the server's close
    close_causes: dict[str, int] = field(default_factory=dict)
    open_at_end: int = 0
    delivered: int = 0  # idle: messages acknowledged before going silent
    bytes_per_client: list[int] = field(default_factory=list)  # held-input: what each got the socket to take
    tokens: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # connect or delivery failures, by reason

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


def split(total: int) -> dict[str, int]:
    """``total`` hostile clients spread over the kinds, the first kinds taking the remainder."""
    return {kind: total // len(KINDS) + (1 if index < total % len(KINDS) else 0) for index, kind in enumerate(KINDS)}


class Writer(asyncio.Protocol):
    """Reads the greeting, then never reads again; writes only while the socket takes data."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.buffer = b""
        self.greeting: asyncio.Future[int] = loop.create_future()
        self.lost: asyncio.Future[BaseException | None] = loop.create_future()
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self.greeting.done():
            return  # read in the same chunk before reading paused: never looked at
        self.buffer += data
        end = self.buffer.find(b"\r\n")
        while end >= 0:
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            if line[3:4] != b"-":
                self.greeting.set_result(int(line[:3]) if line[:3].isdigit() else 0)
                self.transport.pause_reading()  # from now on, never read
                return
            end = self.buffer.find(b"\r\n")

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        if not self.greeting.done():
            self.greeting.set_result(CLOSED)
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class Hostiles:
    def __init__(self, host: str, port: int, counts: dict[str, int], max_bytes: int, message_size: int,
                 session_timeout: float) -> None:
        self.host, self.port, self.counts, self.max_bytes = host, port, counts, max_bytes
        self.message_size, self.session_timeout = message_size, session_timeout
        self.stats = {kind: KindStats(clients=count) for kind, count in counts.items()}
        self.stopping = False
        self.writers: list[Writer | HeldClient] = []  # woken at the end
        self.stop_waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def stop(self) -> None:
        self.stopping = True
        for writer in self.writers:
            writer.wake()
        if not self.stop_waiter.done():
            self.stop_waiter.set_result(None)

    def _closed(self, stats: KindStats, started: float, cause: BaseException | None) -> None:
        stats.closed_by_server += 1
        stats.close_after_s.append(time.monotonic() - started)
        stats.count(stats.close_causes, type(cause).__name__ if cause is not None else "EOF")

    async def writer(self, kind: str, lines: Any, ready: asyncio.Future[None]) -> None:
        """A never-read or rcpt-flood client: one connection, written to until the end."""
        stats = self.stats[kind]
        loop = asyncio.get_running_loop()
        try:
            _, writer = await asyncio.wait_for(loop.create_connection(Writer, self.host, self.port), 10)
        except Exception as error:
            stats.count(stats.errors, loadgen.failure_reason(error, "connect"))
            ready.set_result(None)
            return
        stats.connected += 1
        started = time.monotonic()
        self.writers.append(writer)
        greeted = False
        try:
            code = await asyncio.wait_for(asyncio.shield(writer.greeting), 10)
            if code == CLOSED:
                raise loadgen.Closed(writer.lost.result())
            greeted = code == 220
            if not greeted:
                stats.count(stats.errors, f"{code} at greeting")
        except Exception as error:  # no greeting: the connection is held all the same, silent
            stats.count(stats.errors, loadgen.failure_reason(error, "greeting"))
        ready.set_result(None)
        written = 0
        try:
            for chunk, count in lines if greeted else ():
                while writer.paused and not writer.lost.done() and not self.stopping:
                    writer.waiter = loop.create_future()
                    await writer.waiter
                if writer.lost.done() or self.stopping:
                    break
                if written + len(chunk) > self.max_bytes:
                    stats.capped += 1
                    break
                writer.transport.write(chunk)
                written += len(chunk)
                stats.lines_written += count
                await asyncio.sleep(0)  # let the other clients write too
            if not writer.lost.done() and not self.stopping:  # capped or never greeted: silent until the end
                await asyncio.wait([writer.lost, self.stop_waiter], return_when=asyncio.FIRST_COMPLETED)
        finally:
            unsent = writer.transport.get_write_buffer_size() if not writer.lost.done() else 0
            stats.bytes_written += max(0, written - unsent)
            if writer.lost.done():
                self._closed(stats, started, writer.lost.result())
            else:
                stats.open_at_end += 1
                writer.transport.abort()

    async def idle(self, number: int, ready: asyncio.Future[None]) -> None:
        """Deliver one message, then stay connected and silent until the end."""
        stats = self.stats["idle"]
        loop = asyncio.get_running_loop()
        progress = loadgen.Progress()
        token = f"idle{number}"
        try:
            _, client = await asyncio.wait_for(loop.create_connection(loadgen.SmtpClient, self.host, self.port), 10)
        except Exception as error:
            stats.count(stats.errors, loadgen.failure_reason(error, "connect"))
            ready.set_result(None)
            return
        stats.connected += 1
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._deliver(client, progress, token), self.session_timeout)
            stats.delivered += 1
            stats.tokens.append(token)
        except Exception as error:
            stats.count(stats.errors, loadgen.failure_reason(error, progress.stage))
        ready.set_result(None)
        if not client.closed.done() and not self.stopping:
            await asyncio.wait([client.closed, self.stop_waiter], return_when=asyncio.FIRST_COMPLETED)
        if client.closed.done():
            self._closed(stats, started, client.lost)
        else:
            stats.open_at_end += 1
            client.transport.close()

    async def held(self, number: int, ready: asyncio.Future[None]) -> None:
        """A held-input client: EHLO and MAIL answered, a RCPT the backend sits on, then NOOPs
        written without ever reading, until the end or the byte cap."""
        stats = self.stats[HELD]
        loop = asyncio.get_running_loop()
        progress = loadgen.Progress()
        try:
            _, client = await asyncio.wait_for(loop.create_connection(HeldClient, self.host, self.port), 10)
        except Exception as error:
            stats.count(stats.errors, loadgen.failure_reason(error, "connect"))
            ready.set_result(None)
            return
        stats.connected += 1
        started = time.monotonic()
        self.writers.append(client)
        written = 0
        try:
            try:
                await asyncio.wait_for(self._envelope(client, progress), self.session_timeout)
            except Exception as error:  # not in a transaction: held all the same, silent
                stats.count(stats.errors, loadgen.failure_reason(error, progress.stage))
                ready.set_result(None)
                if not client.closed.done() and not self.stopping:
                    await asyncio.wait([client.closed, self.stop_waiter], return_when=asyncio.FIRST_COMPLETED)
                return
            client.transport.pause_reading()  # from now on, never read
            rcpt = b"RCPT TO:<held-%d@example.test>\r\n" % number
            client.send(rcpt)
            written += len(rcpt)
            ready.set_result(None)
            chunk = (b"NOOP " + b"x" * HELD_PADDING + b"\r\n") * HELD_CHUNK_LINES
            while not client.closed.done() and not self.stopping:
                if client.paused:
                    client.waiter = loop.create_future()
                    await client.waiter
                    continue
                if written + len(chunk) > self.max_bytes:
                    stats.capped += 1
                    await asyncio.wait([client.closed, self.stop_waiter], return_when=asyncio.FIRST_COMPLETED)
                    break
                client.send(chunk)
                written += len(chunk)
                stats.lines_written += HELD_CHUNK_LINES
                await asyncio.sleep(0)  # let the other clients write too
        finally:
            if not ready.done():
                ready.set_result(None)
            unsent = client.transport.get_write_buffer_size() if not client.closed.done() else 0
            sent = max(0, written - unsent)
            stats.bytes_written += sent
            stats.bytes_per_client.append(sent)
            if client.closed.done():
                self._closed(stats, started, client.lost)
            else:
                stats.open_at_end += 1
                sock = client.transport.get_extra_info("socket")
                if sock is not None:  # a reset, not a FIN behind MBs the server may never read
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.transport.abort()

    async def _envelope(self, client: loadgen.SmtpClient, progress: loadgen.Progress) -> None:
        await loadgen.expect(client, progress, "greeting", 220)
        for stage, command in (("EHLO", b"EHLO held.test\r\n"), ("MAIL", b"MAIL FROM:<held@sender.test>\r\n")):
            client.send(command)
            await loadgen.expect(client, progress, stage, 250)

    async def _deliver(self, client: loadgen.SmtpClient, progress: loadgen.Progress, token: str) -> None:
        await loadgen.expect(client, progress, "greeting", 220)
        for stage, command, code in (("EHLO", b"EHLO idle.test\r\n", 250),
                                     ("MAIL", b"MAIL FROM:<idle@sender.test>\r\n", 250),
                                     ("RCPT", b"RCPT TO:<user@example.test>\r\n", 250), ("DATA", b"DATA\r\n", 354)):
            client.send(command)
            await loadgen.expect(client, progress, stage, code)
        client.send(loadgen.message(token, self.message_size))
        await loadgen.expect(client, progress, "end of data", 250)

    async def run(self, ready_event: Any, stop_event: Any, limit: float) -> dict[str, Any]:
        """The idle clients deliver first (a backend that the writers wedge could not take their
        messages); then the writers connect. ``ready_event`` once all are going; until ``stop_event``."""
        loop = asyncio.get_running_loop()
        tasks = []
        for kinds in (("idle",), ("never-read", "rcpt-flood", HELD)):
            readies: list[asyncio.Future[None]] = []
            for kind in kinds:
                for number in range(self.counts.get(kind, 0)):
                    ready = loop.create_future()
                    readies.append(ready)
                    if kind == "idle":
                        tasks.append(asyncio.ensure_future(self.idle(number, ready)))
                    elif kind == HELD:
                        tasks.append(asyncio.ensure_future(self.held(number, ready)))
                    else:
                        lines = noop_lines() if kind == "never-read" else rcpt_lines()
                        tasks.append(asyncio.ensure_future(self.writer(kind, lines, ready)))
            if readies:
                await asyncio.wait(readies, timeout=self.session_timeout + 30)
        ready_event.set()
        deadline = time.monotonic() + limit
        while not stop_event.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.stop()
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        return {kind: asdict(stats) for kind, stats in self.stats.items()}


class HeldClient(loadgen.SmtpClient):
    """An SMTP client that, once it stops reading, writes only while the socket takes data."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def noop_lines() -> Any:
    chunk = b"EHLO hostile.test\r\n" + b"NOOP\r\n" * (CHUNK_LINES - 1)
    yield chunk, CHUNK_LINES
    chunk = b"NOOP\r\n" * CHUNK_LINES
    while True:
        yield chunk, CHUNK_LINES


def rcpt_lines() -> Any:
    yield b"EHLO flood.test\r\nMAIL FROM:<flood@sender.test>\r\n", 0
    number = 0
    while True:
        yield b"".join(b"RCPT TO:<u%d@example.test>\r\n" % n for n in range(number, number + CHUNK_LINES)), CHUNK_LINES
        number += CHUNK_LINES


def _child(host: str, port: int, counts: dict[str, int], max_bytes: int, message_size: int,
           session_timeout: float, limit: float, ready: Any, stop: Any, queue: Any) -> None:
    import uvloop

    async def main() -> dict[str, Any]:
        return await Hostiles(host, port, counts, max_bytes, message_size, session_timeout).run(ready, stop, limit)

    queue.put(uvloop.run(main()))


class HostileProcess:
    """The hostile clients' process: ``start()``, wait for ``ready``, run the load, ``finish()``."""

    def __init__(self, host: str, port: int, counts: dict[str, int], max_bytes: int, message_size: int,
                 session_timeout: float, limit: float) -> None:
        self.session_timeout = session_timeout
        self.ready = multiprocessing.Event()
        self.stop = multiprocessing.Event()
        self.queue: multiprocessing.Queue[dict[str, Any]] = multiprocessing.Queue()
        self.process = multiprocessing.Process(
            target=_child, args=(host, port, counts, max_bytes, message_size, session_timeout, limit, self.ready,
                                 self.stop, self.queue), daemon=True)

    def start(self) -> HostileProcess:
        self.process.start()
        if not self.ready.wait(2 * self.session_timeout + 90):
            raise RuntimeError("the hostile clients did not get going")
        return self

    def finish(self) -> dict[str, Any]:
        """Stop every hostile client; what they did, per kind ({} if the process died)."""
        self.stop.set()
        found: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                found = self.queue.get(timeout=0.5)
                break
            except queue.Empty:
                if not self.process.is_alive():
                    with contextlib.suppress(queue.Empty):
                        found = self.queue.get(timeout=0.5)
                    break
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        return found
