"""The load generator: several processes, each an uvloop event loop driving raw SMTP clients.

Each client runs sessions back to back until the deadline or its share of the session budget.
A session's latency runs from connect to the reply to QUIT. Delivered messages carry a unique
token in their Subject, so the harness can check the sink got exactly what was acknowledged.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import time
from dataclasses import dataclass, field

RELAY, DELIVER, PIPELINED = "relay", "deliver", "pipelined"
SCENARIO_KINDS = {"relay-storm": RELAY, "deliver": DELIVER, "pipelined": PIPELINED, "mixed": "mixed"}


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


@dataclass
class Result:
    sessions: int = 0
    refused: int = 0  # relay attempts answered with a 5xx/4xx at RCPT
    relayed: int = 0  # relay attempts accepted: a failure for a system with a relay policy
    delivered: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0
    cpu: float = 0.0

    def merge(self, other: Result) -> None:
        for name in ("sessions", "refused", "relayed", "delivered", "failed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latencies.extend(other.latencies)
        for name, count in other.errors.items():
            self.errors[name] = self.errors.get(name, 0) + count
        self.tokens.extend(other.tokens)
        self.elapsed = max(self.elapsed, other.elapsed)
        self.cpu += other.cpu


class SmtpClient(asyncio.Protocol):
    """Just enough SMTP client: write commands, await complete replies, nothing else."""

    def __init__(self) -> None:
        self.buffer = b""
        self.replies: asyncio.Queue[int] = asyncio.Queue()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            if line[3:4] != b"-":
                self.replies.put_nowait(int(line[:3]))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.replies.put_nowait(0)

    def send(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    async def reply(self) -> int:
        return await self.replies.get()


def message(token: str, size: int) -> bytes:
    header = f"From: bench@sender.test\r\nTo: user@example.test\r\nSubject: bench {token}\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    lines = max(1, (size - len(header)) // len(line))
    return header + line * lines + b".\r\n"


async def session(job: Job, kind: str, token: str, result: Result) -> None:
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    _, client = await loop.create_connection(SmtpClient, job.host, job.port)
    try:
        if await client.reply() != 220:
            result.failed += 1
            return
        if kind == RELAY:
            client.send(b"EHLO bench.test\r\nMAIL FROM:<bench@sender.test>\r\nRCPT TO:<victim@elsewhere.test>\r\n")
            codes = [await client.reply() for _ in range(3)]
            if codes[2] >= 400:
                result.refused += 1
            else:
                result.relayed += 1
        else:
            body = message(token, job.message_size)
            if kind == PIPELINED:
                client.send(b"EHLO bench.test\r\nMAIL FROM:<bench@sender.test>\r\n"
                            b"RCPT TO:<user@example.test>\r\nDATA\r\n")
                codes = [await client.reply() for _ in range(4)]
            else:
                codes = []
                for command in (b"EHLO bench.test\r\n", b"MAIL FROM:<bench@sender.test>\r\n",
                                b"RCPT TO:<user@example.test>\r\n", b"DATA\r\n"):
                    client.send(command)
                    codes.append(await client.reply())
            if codes[-1] != 354:
                result.failed += 1
            else:
                client.send(body)
                if await client.reply() == 250:
                    result.delivered += 1
                    result.tokens.append(token)
                else:
                    result.failed += 1
        client.send(b"QUIT\r\n")
        await client.reply()
        result.sessions += 1
        result.latencies.append(time.perf_counter() - started)
    finally:
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
            try:
                await asyncio.wait_for(session(job, kind, token, result), timeout=60)
            except Exception as error:  # a failed session is counted, never fatal to the run
                result.failed += 1
                result.errors[type(error).__name__] = result.errors.get(type(error).__name__, 0) + 1
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
        part = Job(job.host, job.port, job.scenario, share, job.duration, sessions, job.message_size, index)
        child = multiprocessing.Process(target=_child, args=(part, queue), daemon=True)
        child.start()
        children.append(child)
    total = Result()
    for _ in children:
        total.merge(queue.get(timeout=job.duration + 120))
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
        await client.reply()
        await client.reply()
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
