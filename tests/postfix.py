"""A private Postfix instance as the proxy's real backend (shared with the bench harness)."""

from __future__ import annotations

from bench.servers import PostfixBackend, PrivatePostfix

__all__ = ["PostfixBackend", "available"]


def available() -> bool:
    return PrivatePostfix.available()
