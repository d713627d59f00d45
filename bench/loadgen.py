"""The load generator: several processes, each an uvloop event loop driving raw SMTP clients.

Each client runs sessions back to back until the deadline or its share of the session budget.
A session's latency runs from connect to the reply to QUIT. Delivered messages carry a unique
token in their Subject, so the harness can check the sink got exactly what was acknowledged.

A failed session is counted under its reason: the unexpected reply (its first line's code and
enhanced code, and the command it answered: ``451 4.3.2 at DATA``), or what went wrong instead
(``timeout waiting for greeting``, ``connection closed waiting for RCPT reply``,
``ConnectionRefusedError at connect``).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import resource
import time
from dataclasses import dataclass, field

RELAY, DELIVER, PIPELINED = "relay", "deliver", "pipelined"
SCENARIO_KINDS = {"relay-storm": RELAY, "deliver": DELIVER, "pipelined": PIPELINED, "mixed": "mixed",
                  "hostile": DELIVER}
ENHANCED = re.compile(rb"[245]\.\d{1,3}\.\d{1,3}")


@dataclass
class Job:
    host: str
    port: int
    scenario: str
    concurrency: int
    duration: float
    sessions: int  # 0: as many as fit in the duration
    message_size: int
    process_index: int = 0
    session_timeout: float = 60.0  # a session still unfinished then fails as "timeout waiting for ..."


@dataclass
class Result:
    sessions: int = 0
    refused: int = 0  # relay attempts answered with a 5xx/4xx at RCPT
    relayed: int = 0  # relay attempts accepted: a failure for a system with a relay policy
    delivered: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # failed sessions by reason
    elapsed: float = 0.0
    cpu: float = 0.0

    def fail(self, reason: str) -> None:
        self.failed += 1
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def merge(self, other: Result) -> None:
        for name in ("sessions", "refused", "relayed", "delivered", "failed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latencies.extend(other.latencies)
        for name, count in other.errors.items():
            self.errors[name] = self.errors.get(name, 0) + count
        self.tokens.extend(other.tokens)
        self.elapsed = max(self.elapsed, other.elapsed)
        self.cpu += other.cpu


class Reply:
    """A complete reply: its code and its first line (where the enhanced code is)."""

    __slots__ = ("code", "line")

    def __init__(self, code: int, line: bytes) -> None:
        self.code = code
        self.line = line

    def reason(self, stage: str) -> str:
        """``451 4.4.1 at RCPT``: the code, the enhanced code when there is one, what it answered."""
        enhanced = ENHANCED.match(self.line, 4)
        code = f"{self.code} {enhanced.group().decode()}" if enhanced else str(self.code)
        return f"{code} at {stage}"


class Closed(Exception):
    """The server closed the connection (``cause``: the reset or error, if any) before replying."""

    def __init__(self, cause: BaseException | None) -> None:
        super().__init__(cause)
        self.cause = cause


class SessionFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SmtpClient(asyncio.Protocol):
    """Just enough SMTP client: write commands, await complete replies, nothing else."""

    def __init__(self) -> None:
        self.buffer = b""
        self.first_line = b""
        self.replies: asyncio.Queue[Reply | None] = asyncio.Queue()
        self.closed = asyncio.get_running_loop().create_future()
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            if not self.first_line:
                self.first_line = line
            if line[3:4] != b"-":
                try:
                    code = int(line[:3])
                except ValueError:
                    code = 0  # not SMTP: its reason says so
                self.replies.put_nowait(Reply(code, self.first_line))
                self.first_line = b""

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc
        if not self.closed.done():
            self.closed.set_result(None)
        self.replies.put_nowait(None)

    def send(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    async def reply(self) -> Reply:
        """The next reply; raises :class:`Closed` (every time) once the connection is gone."""
        reply = await self.replies.get()
        if reply is None:
            self.replies.put_nowait(None)  # every later call sees the loss too
            raise Closed(self.lost)
        return reply


def message(token: str, size: int) -> bytes:
    header = f"From: bench@sender.test\r\nTo: user@example.test\r\nSubject: bench {token}\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    lines = max(1, (size - len(header)) // len(line))
    return header + line * lines + b".\r\n"


def waiting_for(stage: str) -> str:
    return "greeting" if stage == "greeting" else f"{stage} reply"


def failure_reason(error: BaseException, stage: str) -> str:
    """A failed session's reason, from what interrupted it and the step it was at."""
    if isinstance(error, SessionFailed):
        return error.reason
    if isinstance(error, TimeoutError):
        return f"timeout waiting for {waiting_for(stage)}" if stage != "connect" else "timeout at connect"
    if isinstance(error, Closed):
        cause = type(error.cause).__name__ if error.cause is not None else "connection closed"
        return f"{cause} waiting for {waiting_for(stage)}"
    if isinstance(error, OSError):  # its message names addresses and ports: the class says enough
        return f"{type(error).__name__} at {stage}" if stage == "connect" else \
            f"{type(error).__name__} waiting for {waiting_for(stage)}"
    text = str(error)
    return f"{type(error).__name__}: {text[:80]}" if text else type(error).__name__


class Progress:
    """Where a session is, so a timeout can say what it was waiting for."""

    __slots__ = ("stage",)

    def __init__(self) -> None:
        self.stage = "connect"


async def expect(client: SmtpClient, progress: Progress, stage: str, *codes: int) -> Reply:
    progress.stage = stage
    reply = await client.reply()
    if reply.code not in codes:
        raise SessionFailed(reply.reason(stage))
    return reply


async def session(job: Job, kind: str, token: str, result: Result, progress: Progress | None = None) -> None:
    """One session; raises on failure (its reason from :func:`failure_reason`)."""
    progress = progress or Progress()
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    progress.stage = "connect"
    _, client = await loop.create_connection(SmtpClient, job.host, job.port)
    try:
        await expect(client, progress, "greeting", 220)
        if kind == RELAY:
            client.send(b"EHLO bench.test\r\nMAIL FROM:<bench@sender.test>\r\nRCPT TO:<victim@elsewhere.test>\r\n")
            await expect(client, progress, "EHLO", 250)
            await expect(client, progress, "MAIL", 250)
            progress.stage = "RCPT"
            reply = await client.reply()
            if reply.code == 421:  # the session is being closed: not a policy decision
                raise SessionFailed(reply.reason("RCPT"))
            if reply.code >= 400:
                result.refused += 1
            else:
                result.relayed += 1
        else:
            body = message(token, job.message_size)
            steps = (("EHLO", b"EHLO bench.test\r\n", 250), ("MAIL", b"MAIL FROM:<bench@sender.test>\r\n", 250),
                     ("RCPT", b"RCPT TO:<user@example.test>\r\n", 250), ("DATA", b"DATA\r\n", 354))
            if kind == PIPELINED:
                client.send(b"".join(command for _, command, _ in steps))
                for stage, _, code in steps:
                    await expect(client, progress, stage, code)
            else:
                for stage, command, code in steps:
                    client.send(command)
                    await expect(client, progress, stage, code)
            client.send(body)
            await expect(client, progress, "end of data", 250)
            result.delivered += 1
            result.tokens.append(token)
        progress.stage = "QUIT"
        client.send(b"QUIT\r\n")
        await client.reply()
        result.sessions += 1
        result.latencies.append(time.perf_counter() - started)
    finally:
        if not client.transport.is_closing():
            if progress.stage != "QUIT":
                client.send(b"QUIT\r\n")  # polite after a refusal; the close follows at once
            client.transport.close()


async def drive(job: Job) -> Result:
    result = Result()
    deadline = time.monotonic() + job.duration
    budget = [job.sessions]
    counter = [0]

    async def client_loop(client_index: int) -> None:
        while time.monotonic() < deadline:
            if job.sessions:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            counter[0] += 1
            number = counter[0]
            kind = SCENARIO_KINDS[job.scenario]
            if kind == "mixed":
                kind = DELIVER if number % 10 == 0 else RELAY
            token = f"p{job.process_index}c{client_index}n{number}"
            progress = Progress()
            try:
                await asyncio.wait_for(session(job, kind, token, result, progress), timeout=job.session_timeout)
            except Exception as error:  # a failed session is counted under its reason, never fatal to the run
                result.fail(failure_reason(error, progress.stage))
                await asyncio.sleep(0.01)

    started = time.monotonic()
    await asyncio.gather(*(client_loop(index) for index in range(job.concurrency)))
    result.elapsed = time.monotonic() - started
    return result


def _child(job: Job, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    import uvloop

    result = uvloop.run(drive(job))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.cpu = usage.ru_utime + usage.ru_stime
    queue.put(result)


def run_load(job: Job, processes: int) -> Result:
    """Split ``job`` over ``processes`` load-generating processes and merge what they measured."""
    processes = max(1, min(processes, job.concurrency))
    queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    children = []
    for index in range(processes):
        share = job.concurrency // processes + (1 if index < job.concurrency % processes else 0)
        sessions = job.sessions // processes + (1 if index < job.sessions % processes else 0) if job.sessions else 0
        part = Job(job.host, job.port, job.scenario, share, job.duration, sessions, job.message_size, index,
                   job.session_timeout)
        child = multiprocessing.Process(target=_child, args=(part, queue), daemon=True)
        child.start()
        children.append(child)
    total = Result()
    for _ in children:
        total.merge(queue.get(timeout=job.duration + job.session_timeout + 60))
    for child in children:
        child.join(10)
    return total


async def _hold_idle(host: str, port: int, count: int, seconds: float, ready: multiprocessing.Event) -> None:  # type: ignore[valid-type]
    loop = asyncio.get_running_loop()
    clients = []
    for start in range(0, count, 500):
        batch = await asyncio.gather(*(loop.create_connection(SmtpClient, host, port)
                                       for _ in range(min(500, count - start))), return_exceptions=True)
        for item in batch:
            if isinstance(item, tuple):
                client = item[1]
                clients.append(client)
                client.send(b"EHLO idle.test\r\n")
    for client in clients:
        try:
            await client.reply()
            await client.reply()
        except Closed:
            continue  # the proxy refused or dropped it: one idle connection fewer
    ready.set()  # type: ignore[attr-defined]
    await asyncio.sleep(seconds)
    for client in clients:
        client.transport.close()


async def _trickle(host: str, port: int, count: int, seconds: float) -> None:
    """Clients that send one byte every 100 ms: slow, but never idle long enough to time out."""
    loop = asyncio.get_running_loop()
    dialogue = b"EHLO slow.test\r\nNOOP\r\n" * 50
    deadline = time.monotonic() + seconds

    async def one() -> None:
        try:
            _, client = await loop.create_connection(SmtpClient, host, port)
        except OSError:
            return
        index = 0
        while time.monotonic() < deadline:
            client.send(dialogue[index : index + 1])
            index = (index + 1) % len(dialogue)
            await asyncio.sleep(0.1)
        client.transport.close()

    await asyncio.gather(*(one() for _ in range(count)))


def background(kind: str, host: str, port: int, count: int, seconds: float) -> tuple[multiprocessing.Process, object]:
    """Start idle holders or tricklers in their own process; returns it and a readiness event."""
    import uvloop

    ready = multiprocessing.Event()

    def target() -> None:
        if kind == "idle":
            uvloop.run(_hold_idle(host, port, count, seconds, ready))
        else:
            ready.set()
            uvloop.run(_trickle(host, port, count, seconds))

    process = multiprocessing.Process(target=target, daemon=True)
    process.start()
    return process, ready
