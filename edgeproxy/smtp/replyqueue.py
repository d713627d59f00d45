"""Replies owed to the client, released in command order (RFC 2920 §3.1).

Each command takes a slot when it is read; a local reply fills its slot at once, a backend reply
when it arrives. Output is the filled prefix of the slots, so a relay refusal answered locally
can never overtake the backend's reply to an earlier RCPT.
"""

from __future__ import annotations

from collections import deque

from edgeproxy.reply import Reply


class Slot:
    """A reply owed to the client; ``close`` ends the session after it; ``held``: not yet, even
    when filled (the harvest tarpit)."""

    __slots__ = ("close", "data", "held")

    def __init__(self, data: bytes | None = None, close: bool = False) -> None:
        self.data = data
        self.close = close
        self.held = False


class ReplyQueue(deque[Slot]):
    """A deque of slots (its length and truth are the deque's own, in C)."""

    __slots__ = ()

    def add(self, data: bytes | Reply | None = None, close: bool = False) -> Slot:
        """A slot for the next reply: filled now with ``data``, or later through the slot."""
        if isinstance(data, Reply):
            data = data.encode()
        slot = Slot(data, close)
        self.append(slot)
        return slot

    def take(self) -> bytes:
        """Every reply that may leave now; nothing after a closing one."""
        out = []
        slots = self
        while slots and slots[0].data is not None and not slots[0].held:
            slot = slots.popleft()
            out.append(slot.data)
            if slot.close:
                slots.clear()
                break
        return b"".join(out)  # type: ignore[arg-type]
