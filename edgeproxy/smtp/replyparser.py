"""Splits a server's byte stream into complete SMTP replies (RFC 5321 §4.2), sans-IO."""

from __future__ import annotations

from edgeproxy.errors import EdgeproxyError

MAX_REPLY_LINE = 4096  # generous: RFC 5321 says 512, real servers send longer text
MAX_REPLY_LINES = 200


class ReplyError(EdgeproxyError):
    """The backend sent something that is not an SMTP reply; its connection is unusable."""


class ReplyParser:
    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._code = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Return every reply completed by ``data``: (code, the reply's raw bytes)."""
        self._buffer += data
        replies = []
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    raise ReplyError("reply line too long")
                return replies
            line = bytes(self._buffer[: newline + 1])
            del self._buffer[: newline + 1]
            reply = self._line(line)
            if reply is not None:
                replies.append(reply)

    def _line(self, line: bytes) -> tuple[int, bytes] | None:
        if len(line) > MAX_REPLY_LINE or len(line) < 4 or not line[:3].isdigit():
            raise ReplyError(f"not an SMTP reply line: {line[:40]!r}")
        code = int(line[:3])
        if code < 200 or code > 599:
            raise ReplyError(f"reply code out of range: {code}")
        if self._lines and code != self._code:
            raise ReplyError("reply code changed inside a multi-line reply")
        separator = line[3:4]
        if not line.endswith(b"\r\n"):
            line = line[:-1] + b"\r\n"  # relay a sloppy backend's reply with a proper CRLF
        if b"\r" in line[:-2]:
            # Relayed, it would be a bare CR on the client's connection: refuse the backend.
            raise ReplyError("bare CR inside a reply line")
        self._code = code
        self._lines.append(line)
        if separator == b"-":
            if len(self._lines) > MAX_REPLY_LINES:
                raise ReplyError("multi-line reply too long")
            return None
        if separator not in (b" ", b"\r", b"\n"):
            raise ReplyError(f"bad reply separator: {line[:40]!r}")
        raw = b"".join(self._lines)
        self._lines = []
        return code, raw


def reply_lines(raw: bytes) -> list[str]:
    """The text of each line of a reply, code and separator removed."""
    return [line[4:].decode("utf-8", "replace").rstrip("\r\n") for line in raw.splitlines(keepends=True)]
