"""Connection limits per worker (design.md §2 "At connect", rule 2), sans-IO: time is passed in."""

from __future__ import annotations

from collections import deque

_RATE_WINDOW = 60.0


class ConnectionLimiter:
    def __init__(self, max_total: int, max_per_ip: int, rate_per_minute: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.rate_per_minute = rate_per_minute
        self.total = 0
        self._per_ip: dict[str, int] = {}
        self._recent: dict[str, deque[float]] = {}
        self._next_prune = 0.0

    def admit(self, client: str, now: float) -> str | None:
        """Count the connection in and return None, or the name of the limit it hits."""
        if self.total >= self.max_total:
            return "TOO_MANY_CONNECTIONS"
        if self.max_per_ip and self._per_ip.get(client, 0) >= self.max_per_ip:
            return "TOO_MANY_CONNECTIONS"
        if self.rate_per_minute:
            recent = self._recent.setdefault(client, deque())
            while recent and recent[0] <= now - _RATE_WINDOW:
                recent.popleft()
            if len(recent) >= self.rate_per_minute:
                return "RATE_LIMITED"
            recent.append(now)
            if now >= self._next_prune:
                self._prune(now)
        self.total += 1
        self._per_ip[client] = self._per_ip.get(client, 0) + 1
        return None

    def release(self, client: str) -> None:
        self.total -= 1
        count = self._per_ip.get(client, 0) - 1
        if count > 0:
            self._per_ip[client] = count
        else:
            self._per_ip.pop(client, None)

    def _prune(self, now: float) -> None:
        """Forget clients not seen for a whole window, so the table cannot grow without bound."""
        stale = [client for client, recent in self._recent.items() if not recent or recent[-1] <= now - _RATE_WINDOW]
        for client in stale:
            del self._recent[client]
        self._next_prune = now + _RATE_WINDOW
