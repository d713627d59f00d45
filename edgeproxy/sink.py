"""A local SMTP sink: accepts every message and writes it to a file.

It is edgeproxy's embedded backend when ``EDGEPROXY_BACKEND`` is unset, so that
``edgeproxy serve`` shows the product working on a machine with no mail server, and it is
``edgeproxy sink`` for tests and benchmarks. It is not a mail server: it delivers nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from typing import Any

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session

log = structlog.get_logger("edgeproxy.sink")


class SinkHandler:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._numbers = itertools.count(1)
        os.makedirs(directory, exist_ok=True)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        number = next(self._numbers)
        name = f"{os.getpid()}-{number:08d}.eml"
        envelope_lines = f"X-Sink-Mail-From: <{envelope.mail_from}>\r\n" + "".join(
            f"X-Sink-Rcpt-To: <{recipient}>\r\n" for recipient in envelope.rcpt_tos
        )
        content = envelope_lines.encode("utf-8") + _as_bytes(envelope.original_content or envelope.content)
        # Written aside and renamed, so a reader never sees half a message.
        temporary = os.path.join(self.directory, "." + name + ".tmp")
        with open(temporary, "wb") as handle:
            handle.write(content)
        os.replace(temporary, os.path.join(self.directory, name))
        return f"250 2.0.0 Ok: stored as {name}"


def _as_bytes(content: Any) -> bytes:
    return content if isinstance(content, bytes) else str(content).encode("utf-8")


async def serve_sink(sock: socket.socket, directory: str, stop: asyncio.Event | None = None) -> None:
    """Serve on an already bound socket until ``stop`` is set (or forever)."""
    loop = asyncio.get_running_loop()
    handler = SinkHandler(directory)
    server = await loop.create_server(
        lambda: SMTP(handler, enable_SMTPUTF8=True, hostname="edgeproxy-sink", data_size_limit=0),
        sock=sock,
        backlog=4096,
    )
    async with server:
        if stop is None:
            await server.serve_forever()
        else:
            await stop.wait()


def run_sink_process(sock: socket.socket, directory: str, parent: int | None = None) -> None:
    """The body of the embedded sink's child process; it exits with its parent."""
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, lambda: None)  # the parent decides when we stop
        if parent is not None:
            async def watch_parent() -> None:
                while os.getppid() == parent:
                    await asyncio.sleep(1)
                stop.set()

            watcher = loop.create_task(watch_parent())
        await serve_sink(sock, directory, stop)
        if parent is not None:
            watcher.cancel()

    asyncio.run(main())
