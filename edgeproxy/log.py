"""structlog set-up: JSON lines in production, readable console output on a terminal.

Client-supplied text (a HELO, an address, a reason) can reach a log line; in no format may it
carry control characters to the reader: JSON escapes them itself, and a processor escapes them
for the console, where an ESC sequence would repaint the operator's terminal or set its title.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

import orjson
import structlog

if TYPE_CHECKING:
    from edgeproxy.smtp.events import Refused

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# C0, DEL and C1 controls, shown as \xNN; everything printable is left as it is.
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_LEVEL_NAMES = {"warn": "warning", "exception": "error"}  # as structlog's add_log_level names them
# Whether info (debug) lines are written: below that level the per-session log work (binding a logger,
# building the session and refusal lines) is skipped, not merely filtered.
info_enabled = True
debug_enabled = False


def _escape_control_characters(_logger: object, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        # The traceback is ours, its line breaks wanted; client bytes appear in it only as reprs.
        if type(value) is str and not value.isprintable() and key != "exception":
            event[key] = value.translate(_CONTROLS)
    return event


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    global info_enabled, debug_enabled, _json_lines
    info_enabled = _LEVELS[level] <= logging.INFO
    debug_enabled = _LEVELS[level] <= logging.DEBUG
    stream = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    processors: list[Any] = [_level_and_time, structlog.processors.format_exc_info]
    factory: Any
    _json_lines = None
    if use_console:
        # Colours only for a terminal: escape sequences in a file or pipe are noise to its reader.
        processors += [_escape_control_characters, structlog.dev.ConsoleRenderer(colors=stream.isatty())]
        factory = structlog.WriteLoggerFactory(stream)
    elif hasattr(stream, "buffer"):
        # orjson straight to the byte stream: the JSON encoding was a third of a line's cost.
        _json_lines = JsonLines(stream.buffer)
        processors.append(_orjson_line)
        factory = _json_lines.factory
    else:
        processors.append(structlog.processors.JSONRenderer(serializer=_orjson_text))
        factory = structlog.WriteLoggerFactory(stream)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def info_line(event: str, fields: dict[str, Any]) -> None:
    """An info line off the hot path's own road: with JSON output, straight to the encoder, none
    of structlog's per-call machinery (the session line is written once per connection, and was
    a fifth of a refused relay attempt's cost). Same fields and format as ``log.info``."""
    lines = _json_lines
    if lines is None:
        structlog.get_logger("edgeproxy").info(event, **fields)
        return
    fields["event"] = event
    lines.write(_orjson_line(None, "info", _level_and_time(None, "info", fields)))


def batch_writes(loop: asyncio.AbstractEventLoop | None) -> None:
    """Gather a worker's JSON lines and write them together (:class:`JsonLines`) on ``loop``; None
    writes what is held and goes back to a write per line (before the loop is gone: nothing
    would flush)."""
    if _json_lines is not None:
        _json_lines.flush()
        _json_lines.loop = loop


class JsonLines:
    """The JSON lines of one process to one byte stream. With a loop attached, lines are held for
    up to ``HOLD_SECONDS`` and go out together, in writes of whole lines never more than
    ``PIPE_BUF`` bytes, so lines of workers sharing a pipe never interleave within a line. (Once
    per loop turn was still a write for every one or two sessions under load.)"""

    MAX_WRITE = 4096  # PIPE_BUF on Linux: a pipe write up to this size is atomic
    HOLD_SECONDS = 0.05

    __slots__ = ("_held", "_scheduled", "_stream", "loop")

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._held = bytearray()
        self._scheduled = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def factory(self, *_args: object) -> JsonLines:
        return self  # structlog's logger factory: every logger writes here

    def write(self, line: bytes) -> None:
        if self.loop is None:
            self._stream.write(line)
            self._stream.flush()
            return
        if len(self._held) + len(line) > self.MAX_WRITE:
            self.flush()
        self._held += line
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_later(self.HOLD_SECONDS, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._held:
            self._stream.write(self._held)
            self._stream.flush()
            self._held.clear()

    # structlog's logger interface: whatever the level, the rendered line is written.
    msg = log = debug = info = warn = warning = err = error = exception = failure = critical = fatal = write


_json_lines: JsonLines | None = None


def _orjson_line(_logger: object, _method: str, event: dict[str, Any]) -> bytes:
    return orjson.dumps(event, default=str, option=orjson.OPT_APPEND_NEWLINE)


def _orjson_text(event: dict[str, Any], **_: Any) -> str:
    return orjson.dumps(event, default=str).decode()


_clock_second = -1
_clock_prefix = ""  # "2026-12-01T03:30:01." for _clock_second


def _level_and_time(_logger: object, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """The level, and the time in ISO 8601 UTC with microseconds as structlog's
    TimeStamper(fmt="iso", utc=True) writes it, the date and time formatted once a second: one
    processor, not two, for every line."""
    global _clock_second, _clock_prefix
    event["level"] = _LEVEL_NAMES.get(method, method)
    now = time.time()
    second = int(now)
    if second != _clock_second:
        _clock_second, _clock_prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
    event["timestamp"] = f"{_clock_prefix}{int((now - second) * 1_000_000):06d}Z"
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

    __slots__ = ("_runs", "spilled")

    def __init__(self) -> None:
        self._runs: list[list[Any]] = []  # [first refusal of the run, count]; records built when written
        self.spilled = False  # past HELD_RUNS: every run is written as its own line once it ends

    def add(self, event: Refused) -> list[dict[str, Any]] | None:
        """Count the refusal in; returns the runs to write as their own lines now, if any."""
        runs = self._runs
        if runs:
            last = runs[-1][0]
            if (last.rule == event.rule and last.reply == event.reply and last.stage == event.stage
                    and last.sender == event.sender and _domain(last.recipient) == _domain(event.recipient)):
                runs[-1][1] += 1
                return None
        ended = None
        if len(runs) >= self.HELD_RUNS:
            self.spilled = True
        if self.spilled and runs:
            ended = self.take()
        self._runs.append([event, 1])
        return ended

    def take(self) -> list[dict[str, Any]]:
        """The runs not yet written: for the session line, or after a spill for lines of their own."""
        runs, self._runs = self._runs, []
        # RFC 2505 §2.4: time, rule, client address and name, HELO, sender, recipient domain
        # (the time, client and HELO are the line's).
        return [{"stage": event.stage, "rule": event.rule, "sender": event.sender,
                 "recipient_domain": _domain(event.recipient), "reply": str(event.reply), "count": count}
                for event, count in runs]


def _domain(recipient: str | None) -> str | None:
    return recipient.rpartition("@")[2] if recipient else None
