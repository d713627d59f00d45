"""The exception hierarchy: one root, so callers can catch everything edgeproxy raises."""

from __future__ import annotations


class EdgeproxyError(Exception):
    """Root of every exception edgeproxy raises on purpose."""


class ParseError(EdgeproxyError, ValueError):
    """A command line or path that cannot be parsed.

    ``reason`` is one of the ``REASON_*`` constants in :mod:`edgeproxy.fastpath_common`; the SMTP
    core maps it to a reply, so the fast path never has to know reply texts.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __eq__(self, other: object) -> bool:
        # Lets the differential test compare exceptions from both twins by value.
        return type(other) is type(self) and other.reason == self.reason  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.reason))


class ConfigError(EdgeproxyError):
    """Invalid settings; ``problems`` holds one line per bad variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
