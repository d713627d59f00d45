"""A small SMTP sink whose RCPT reply is delayed for some recipients: the ``held-input`` backend.

    python bench/slowsink.py --listen 127.0.0.1:PORT --dir DUMP --delay 40 [--prefix held] [--max-sessions N]

Recipients whose local part starts with ``--prefix`` get their ``250`` to RCPT only after
``--delay`` seconds (the session waits meanwhile, as smtp-sink's ``-W rcpt:delay`` would, but
smtp-sink delays every recipient); all other commands are answered at once, so normal clients
beside the held ones keep delivering. Every message goes to a file of its own in ``--dir``, like
smtp-sink's ``-d``. With ``--max-sessions`` at most that many connections are accepted at once;
the rest wait in the listen backlog, as with smtp-sink's ``-m``.

It runs in a process of its own, with uvloop when installed; it is not the system under test.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import socket
from pathlib import Path

EHLO_REPLY = b"250-slowsink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n250 ENHANCEDSTATUSCODES\r\n"
LINE_LIMIT = 64 * 1024


class SlowSink:
    def __init__(self, directory: Path, delay: float, prefix: str) -> None:
        self.directory = directory
        self.delay = delay
        self.prefix = prefix.lower().encode()
        self.numbers = itertools.count()

    def held(self, argument: bytes) -> bool:
        start = argument.find(b"<")
        return argument[start + 1 :].lower().startswith(self.prefix) if start >= 0 else False

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 slowsink.test ESMTP\r\n")
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb in (b"EHLO", b"LHLO"):
                    writer.write(EHLO_REPLY)
                elif verb == b"HELO":
                    writer.write(b"250 slowsink.test\r\n")
                elif verb == b"MAIL":
                    writer.write(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT":
                    if self.held(line[4:]):
                        await writer.drain()
                        await asyncio.sleep(self.delay)
                    writer.write(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    body = await reader.readuntil(b"\r\n.\r\n")
                    self.store(body)
                    writer.write(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    return
                elif verb in (b"RSET", b"NOOP"):
                    writer.write(b"250 2.0.0 Ok\r\n")
                else:
                    writer.write(b"502 5.5.2 Error: command not recognized\r\n")
                await writer.drain()  # waits only when the client is not reading
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            writer.close()

    def store(self, body: bytes) -> None:
        path = self.directory / f"{os.getpid()}.{next(self.numbers)}"
        temporary = path.with_name("." + path.name)  # the harness skips dot files: never half a message
        temporary.write_bytes(body)
        temporary.rename(path)


async def main(listen: str, directory: Path, delay: float, prefix: str, max_sessions: int | None) -> None:
    host, port = listen.rsplit(":", 1)
    sink = SlowSink(directory, delay, prefix)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(4096)
    listener.setblocking(False)
    slots = asyncio.Semaphore(max_sessions) if max_sessions else None
    tasks: set[asyncio.Task[None]] = set()

    async def one(connection: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=connection, limit=LINE_LIMIT)
            await sink.serve(reader, writer)
        finally:
            if slots is not None:
                slots.release()

    async def accept() -> None:
        while True:
            if slots is not None:
                await slots.acquire()  # at the limit: further connections wait in the backlog
            connection, _ = await loop.sock_accept(listener)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.ensure_future(one(connection))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    acceptor = asyncio.ensure_future(accept())
    await stop.wait()
    acceptor.cancel()
    for task in list(tasks):
        task.cancel()
    listener.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--delay", type=float, default=40.0)
    parser.add_argument("--prefix", default="held")
    parser.add_argument("--max-sessions", type=int, default=None)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(main(args.listen, args.dir, args.delay, args.prefix, args.max_sessions))
    except ImportError:
        asyncio.run(main(args.listen, args.dir, args.delay, args.prefix, args.max_sessions))
