"""structlog set-up: JSON lines in production, readable console output on a terminal.

Client-supplied text (a HELO, an address, a reason) can reach a log line; in no format may it
carry control characters to the reader: JSON escapes them itself, and a processor escapes them
for the console, where an ESC sequence would repaint the operator's terminal or set its title.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

import orjson
import structlog

if TYPE_CHECKING:
    from edgeproxy.smtp.events import Refused

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# C0, DEL and C1 controls, shown as \xNN; everything printable is left as it is.
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
# Whether info lines are written: below that level the per-session log work (binding a logger,
# building the session and refusal lines) is skipped, not merely filtered.
info_enabled = True


def _escape_control_characters(_logger: object, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        # The traceback is ours, its line breaks wanted; client bytes appear in it only as reprs.
        if type(value) is str and not value.isprintable() and key != "exception":
            event[key] = value.translate(_CONTROLS)
    return event


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    global info_enabled
    info_enabled = _LEVELS[level] <= logging.INFO
    stream = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    processors: list[Any] = [
        structlog.processors.add_log_level,
        _timestamp,
        structlog.processors.format_exc_info,
    ]
    # One write per line either way: workers share stderr, and a line written in two parts can
    # be cut in half by another worker's line.
    factory: Any
    if use_console:
        # Colours only for a terminal: escape sequences in a file or pipe are noise to its reader.
        processors += [_escape_control_characters, structlog.dev.ConsoleRenderer(colors=stream.isatty())]
        factory = structlog.WriteLoggerFactory(stream)
    elif hasattr(stream, "buffer"):
        # orjson straight to the byte stream: the JSON encoding was a third of a line's cost.
        processors.append(structlog.processors.JSONRenderer(serializer=_orjson_bytes))
        factory = structlog.BytesLoggerFactory(stream.buffer)
    else:
        processors.append(structlog.processors.JSONRenderer(serializer=_orjson_text))
        factory = structlog.WriteLoggerFactory(stream)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def _orjson_bytes(event: dict[str, Any], **_: Any) -> bytes:
    return orjson.dumps(event, default=str)


def _orjson_text(event: dict[str, Any], **_: Any) -> str:
    return orjson.dumps(event, default=str).decode()


@functools.lru_cache(maxsize=1)
def _date_and_time(second: int) -> str:
    """Formatted once a second, not once per line."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _timestamp(_logger: object, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """ISO 8601 UTC with microseconds, as structlog's TimeStamper(fmt="iso", utc=True) writes it."""
    now = time.time()
    second = int(now)
    event["timestamp"] = f"{_date_and_time(second)}.{int((now - second) * 1_000_000):06d}Z"
    return event


class RefusalLog:
    """RFC 2505 §2.4 refusal records, carried by the session's one summary line.

    A refused relay attempt is the commonest session at the edge, and two lines for it (the
    refusal, then the session) were a third of its cost; so a session's refusals wait in runs:
    identical refusals in a row are one run with a count, and up to ``HELD_RUNS`` runs ride in
    the ``session`` line. Past that a client is probing many things at once: each further run is
    written as its own ``refused`` line (with ``count``) as soon as it ends, so what it tried is
    on record before the session does, and repeating itself never makes the log its amplifier.
    """

    HELD_RUNS = 8

    __slots__ = ("_key", "_runs", "_spilled")

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._runs: list[dict[str, Any]] = []
        self._spilled = False

    def add(self, event: Refused, logger: structlog.typing.FilteringBoundLogger, helo: str | None) -> None:
        recipient_domain = _domain(event.recipient)
        key = (event.stage, event.rule, event.sender, recipient_domain, event.reply)
        if key == self._key:
            self._runs[-1]["count"] += 1
            return
        if len(self._runs) >= self.HELD_RUNS:
            self._spilled = True
        if self._spilled and self._runs:
            self._write(logger, helo)
        self._key = key
        # RFC 2505 §2.4: time, rule, client address and name, HELO, sender, recipient domain
        # (the time, client and HELO are the line's).
        self._runs.append({"stage": event.stage, "rule": event.rule, "sender": event.sender,
                           "recipient_domain": recipient_domain, "reply": str(event.reply), "count": 1})

    def take(self, logger: structlog.typing.FilteringBoundLogger, helo: str | None) -> list[dict[str, Any]] | None:
        """The runs for the session line; after a spill, the last run goes out as its own line."""
        if self._spilled and self._runs:
            self._write(logger, helo)
        runs, self._runs, self._key = self._runs, [], None
        return runs or None

    def _write(self, logger: structlog.typing.FilteringBoundLogger, helo: str | None) -> None:
        for run in self._runs:
            logger.info("refused", helo=helo, **run)
        self._runs.clear()


def _domain(recipient: str | None) -> str | None:
    return recipient.rpartition("@")[2] if recipient else None
