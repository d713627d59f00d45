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
import contextlib
import dataclasses
import errno
import multiprocessing
import os
import re
import resource
import socket
import ssl
import time
from dataclasses import dataclass, field

RELAY, DELIVER, PIPELINED = "relay", "deliver", "pipelined"
DELIVER_TLS, HANDSHAKE_ONLY, EHLO_ONLY = "deliver-tls", "tls-handshake-only", "ehlo-only"
SCENARIO_KINDS = {"relay-storm": RELAY, "deliver": DELIVER, "pipelined": PIPELINED, "mixed": "mixed",
                  "hostile": DELIVER, "held-input": DELIVER, DELIVER_TLS: DELIVER_TLS, HANDSHAKE_ONLY: HANDSHAKE_ONLY,
                  EHLO_ONLY: EHLO_ONLY}
TLS_KINDS = (DELIVER_TLS, HANDSHAKE_ONLY)
ENHANCED = re.compile(rb"[245]\.\d{1,3}\.\d{1,3}")
DEFAULT_SOURCES = 64  # client source addresses, 127.1.0.1 and up (1: the kernel's choice, 127.0.0.1)
MAX_SOURCES = 254 * 256
# Linux: bind() records the address only; connect() picks the port for the whole 4-tuple, so a
# bound client takes no port from anyone else's connects (a plain bind() to port 0 would).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def source_addresses(count: int) -> list[str]:
    """The clients' source addresses: ``count`` of 127.1.0.1, 127.1.0.2, ... (Linux's loopback
    answers all of 127.0.0.0/8), so the load is spread over ``count`` times the ephemeral ports
    of one address pair, and the TIME-WAIT sockets each cell leaves with them. 1 (or less): none
    chosen, the kernel's 127.0.0.1."""
    if count <= 1:
        return []
    if count > MAX_SOURCES:
        raise ValueError(f"at most {MAX_SOURCES} source addresses")
    return [f"127.1.{index // 254}.{index % 254 + 1}" for index in range(count)]


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
    tls_resumption: bool = False  # TLS kinds: offer each process's last session (ticket) to the next handshake
    sources: int = 1  # client source addresses, taken in turn (see source_addresses); 1: 127.0.0.1


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
    tls_handshakes: int = 0  # completed TLS handshakes
    tls_resumed: int = 0  # ... of which the server resumed the session offered (SSLObject.session_reused)
    tls_offered: int = 0  # handshakes that offered a session to resume
    tls_versions: dict[str, int] = field(default_factory=dict)  # "TLSv1.3 TLS_AES_256_GCM_SHA384": count

    def fail(self, reason: str) -> None:
        self.failed += 1
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def merge(self, other: Result) -> None:
        for name in ("sessions", "refused", "relayed", "delivered", "failed", "tls_handshakes", "tls_resumed",
                     "tls_offered"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latencies.extend(other.latencies)
        for name, count in other.errors.items():
            self.errors[name] = self.errors.get(name, 0) + count
        for name, count in other.tls_versions.items():
            self.tls_versions[name] = self.tls_versions.get(name, 0) + count
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
    """Just enough SMTP client: write commands, await complete replies, nothing else; and, after
    ``STARTTLS``, TLS over memory BIOs (:meth:`start_tls`), which, unlike the loop's ``start_tls``,
    can offer an ``SSLSession`` to resume."""

    def __init__(self) -> None:
        self.buffer = b""
        self.first_line = b""
        self.replies: asyncio.Queue[Reply | None] = asyncio.Queue()
        self.closed = asyncio.get_running_loop().create_future()
        self.lost: BaseException | None = None
        self.tls: ssl.SSLObject | None = None
        self._incoming: ssl.MemoryBIO | None = None  # made by start_tls: plaintext sessions pay nothing
        self._outgoing: ssl.MemoryBIO | None = None
        self._handshake: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    async def start_tls(self, context: ssl.SSLContext, session: ssl.SSLSession | None) -> ssl.SSLObject:
        """The client side of a TLS handshake on this connection (after ``220`` to STARTTLS)."""
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._incoming, self._outgoing, session=session)
        self._handshake = asyncio.get_running_loop().create_future()
        self._handshake_step()
        await self._handshake
        return self.tls

    def _handshake_step(self) -> None:
        assert self.tls is not None and self._handshake is not None
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as error:
            self._flush()
            self._handshake.set_exception(error)
            self.transport.close()
            return
        self._flush()
        self._handshake.set_result(None)

    def _flush(self) -> None:
        assert self._outgoing is not None
        pending = self._outgoing.read()
        if pending and not self.transport.is_closing():  # type: ignore[attr-defined]
            self.transport.write(pending)  # type: ignore[attr-defined]

    def _decrypt(self) -> bytes:
        assert self.tls is not None
        chunks = []
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError:  # the server's close_notify, or a broken record: done with it
                self.transport.close()
                break
            if not chunk:
                break
            chunks.append(chunk)
        self._flush()
        return b"".join(chunks)

    def data_received(self, data: bytes) -> None:
        if self.tls is not None:
            assert self._incoming is not None
            self._incoming.write(data)
            if self._handshake is not None and not self._handshake.done():
                self._handshake_step()
                if not self._handshake.done() or self._handshake.exception() is not None:
                    return
            data = self._decrypt()
            if not data:
                return
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
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(Closed(exc))
        self.replies.put_nowait(None)

    def send(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.write(data)
            self._flush()
        else:
            self.transport.write(data)  # type: ignore[attr-defined]

    def close(self) -> None:
        """Close the connection; inside TLS, after a close_notify, as a well-behaved client does."""
        if self.tls is not None and not self.transport.is_closing():  # type: ignore[attr-defined]
            with contextlib.suppress(ssl.SSLError):  # SSLWantReadError: ours is out; not waiting for theirs
                self.tls.unwrap()
            self._flush()
        self.transport.close()

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


class TlsClient:
    """A load-generating process's TLS side: one client context (no verification, the default
    versions: TLS 1.3 where the server has it) and, with resumption, the last session per target."""

    def __init__(self, resumption: bool) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE
        self.resumption = resumption
        self.sessions: dict[tuple[str, int], ssl.SSLSession] = {}

    def offer(self, target: tuple[str, int]) -> ssl.SSLSession | None:
        return self.sessions.get(target) if self.resumption else None

    def keep(self, target: tuple[str, int], tls: ssl.SSLObject) -> None:
        """After the first reply inside TLS, so a TLS 1.3 ticket (sent after the handshake) is in."""
        if not self.resumption:
            return
        session = tls.session
        if session is not None and (session.has_ticket or (tls.version() != "TLSv1.3" and session.id)):
            self.sessions[target] = session


async def starttls(client: SmtpClient, progress: Progress, tls: TlsClient, target: tuple[str, int],
                   result: Result) -> ssl.SSLObject:
    """EHLO's reply is in: STARTTLS, 220, the handshake (offering the last session, if any)."""
    client.send(b"STARTTLS\r\n")
    await expect(client, progress, "STARTTLS", 220)
    progress.stage = "TLS handshake"
    offered = tls.offer(target)
    try:
        secured = await client.start_tls(tls.context, offered)
    except ssl.SSLError as error:
        raise SessionFailed(f"TLS handshake failed: {error.reason or type(error).__name__}") from None
    result.tls_handshakes += 1
    result.tls_offered += offered is not None
    result.tls_resumed += secured.session_reused
    cipher = secured.cipher()
    name = f"{secured.version()} {cipher[0] if cipher else '?'}"
    result.tls_versions[name] = result.tls_versions.get(name, 0) + 1
    return secured


async def connect(job: Job, source: str | None) -> SmtpClient:
    """A connection to the job's target, from ``source`` (its port chosen at connect) if given."""
    loop = asyncio.get_running_loop()
    if source is None:
        _, client = await loop.create_connection(SmtpClient, job.host, job.port)
        return client
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        # On loopback the handshake is done by the time connect() returns (EINPROGRESS all the
        # same): skipping the loop's wait for writability halves what a bound connect costs here.
        error = sock.connect_ex((job.host, job.port))
        if error == errno.EINPROGRESS:
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if not error:
                try:
                    sock.getpeername()
                except OSError:  # still under way
                    await loop.sock_connect(sock, (job.host, job.port))
        if error:
            raise OSError(error, os.strerror(error))  # ConnectionRefusedError and the like
        _, client = await loop.create_connection(SmtpClient, sock=sock)
    except BaseException:
        sock.close()
        raise
    return client


async def session(job: Job, kind: str, token: str, result: Result, progress: Progress | None = None,
                  tls: TlsClient | None = None, source: str | None = None) -> None:
    """One session, from ``source`` if given; raises on failure (its reason from :func:`failure_reason`)."""
    progress = progress or Progress()
    started = time.perf_counter()
    progress.stage = "connect"
    client = await connect(job, source)
    target = (job.host, job.port)
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
        elif kind in (EHLO_ONLY, HANDSHAKE_ONLY):
            client.send(b"EHLO bench.test\r\n")
            await expect(client, progress, "EHLO", 250)
            if kind == HANDSHAKE_ONLY:
                assert tls is not None
                await starttls(client, progress, tls, target, result)
        else:
            body = message(token, job.message_size)
            steps = (("EHLO", b"EHLO bench.test\r\n", 250), ("MAIL", b"MAIL FROM:<bench@sender.test>\r\n", 250),
                     ("RCPT", b"RCPT TO:<user@example.test>\r\n", 250), ("DATA", b"DATA\r\n", 354))
            if kind == DELIVER_TLS:
                assert tls is not None
                client.send(b"EHLO bench.test\r\n")
                await expect(client, progress, "EHLO", 250)
                secured = await starttls(client, progress, tls, target, result)
                client.send(b"EHLO bench.test\r\n")
                await expect(client, progress, "EHLO inside TLS", 250)
                tls.keep(target, secured)
                steps = steps[1:]
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
        if kind == HANDSHAKE_ONLY and client.tls is not None:
            tls.keep(target, client.tls)  # type: ignore[union-attr]  # the 221 came after the ticket
        result.sessions += 1
        result.latencies.append(time.perf_counter() - started)
    finally:
        if not client.transport.is_closing():
            if progress.stage not in ("QUIT", "TLS handshake"):
                with contextlib.suppress(ssl.SSLError):  # a broken TLS layer: just close
                    client.send(b"QUIT\r\n")  # polite after a refusal; the close follows at once
            client.close()


async def drive(job: Job) -> Result:
    result = Result()
    deadline = time.monotonic() + job.duration
    budget = [job.sessions]
    counter = [0]
    tls = TlsClient(job.tls_resumption) if SCENARIO_KINDS[job.scenario] in TLS_KINDS else None
    # Loopback targets only: a 127.x source reaches nothing else.
    sources = source_addresses(job.sources) if job.host.startswith("127.") else []

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
            source = sources[number % len(sources)] if sources else None
            progress = Progress()
            try:
                await asyncio.wait_for(session(job, kind, token, result, progress, tls, source),
                                       timeout=job.session_timeout)
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
        part = dataclasses.replace(job, concurrency=share, sessions=sessions, process_index=index)
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
