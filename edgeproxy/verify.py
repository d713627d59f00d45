"""Recipient verification: the backend's verdict on each recipient, remembered (Postfix's
``reject_unverified_recipient`` verify cache, Exchange's recipient filtering).

Every RCPT for a local or relay domain without a directory list goes to the backend anyway; its
answer is the probe. A refusal of the recipient as unknown (``5.1.1`` and its kin) is remembered
for ``negative_ttl``, so the next RCPT for it is refused by the proxy and costs the backend
nothing (a harvest or a dictionary attack stops there); an acceptance is remembered for
``positive_ttl``, and replaces a remembered refusal at once (a mailbox created since). A 4xx, a
reply the backend gave the MAIL and not the recipient, or any other 5xx (a policy refusal
that may not hold for the next sender) is never remembered.

Memory is bounded: ``size`` entries per worker, least recently used forgotten first. With Redis
(``EDGEPROXY_REDIS_URL``), each verdict a worker learns is published to every worker of every
node (Redis pub/sub), which remembers it for its time to live: one backend refusal teaches the
whole cluster, and no RCPT ever waits for Redis. A worker started later learns the verdicts given
from then on. Redis unwell: each worker remembers what it learns itself, as without Redis.
``forget`` (SIGHUP) clears this worker's memory and, with Redis, every worker's, so a mailbox
created a minute ago is never refused on an old word.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from edgeproxy.fastpath_common import local_key
from edgeproxy.smtp.recipients import is_unknown_recipient

CHANNEL = "edgeproxy:recipient-verdicts"
_MAX_PUBLISHING = 64  # publications a worker keeps in flight; past that a verdict is not shared


def recipient_key(address: str) -> str:
    """One key per mailbox: quoting and case of the local part, case of the domain, never two."""
    local, _, domain = address.rpartition("@")
    return f"{local_key(local)}@{domain.lower()}"


class RecipientCache:
    """The verdicts of one worker; ``known`` answers from memory only, never waits."""

    __slots__ = ("_clock", "_entries", "_listener", "_pending", "_publisher", "_redis_url", "_sender",
                 "_timeout", "negative_ttl", "positive_ttl", "size")

    def __init__(self, size: int, negative_ttl: float, positive_ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.negative_ttl = negative_ttl
        self.positive_ttl = positive_ttl
        self._clock = clock
        self._entries: OrderedDict[str, tuple[bool, float]] = OrderedDict()  # key: (accepted, expiry)
        self._publisher: Redis | None = None
        self._listener: asyncio.Task[None] | None = None
        self._redis_url = ""
        self._timeout = 0.0
        self._sender = f"{socket.gethostname()}:{os.getpid()}:{id(self)}".encode()
        self._pending: set[asyncio.Task[None]] = set()

    def share(self, url: str, timeout: float) -> None:
        """Publish verdicts to, and hear them from, every worker using the Redis at ``url``
        (from a running loop). ``timeout`` bounds each publication."""
        self._redis_url = url
        self._timeout = timeout
        self._publisher = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    def __len__(self) -> int:
        return len(self._entries)

    def known(self, address: str) -> bool | None:
        """True: the backend accepted it lately; False: it refused it as unknown; None: no word."""
        key = recipient_key(address)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def learn(self, address: str, code: int, reply: bytes) -> None:
        """Remember the backend's reply to a RCPT for ``address``, if it is a verdict on it."""
        if 200 <= code < 300:
            accepted = True
        elif is_unknown_recipient(code, reply):
            accepted = False
        else:
            return
        key = recipient_key(address)
        ttl = self.positive_ttl if accepted else self.negative_ttl
        self._remember(key, accepted, ttl)
        if self._publisher is not None:
            self._publish(b"%s %d %d %s" % (self._sender, accepted, round(ttl * 1000), key.encode()))

    def forget(self) -> None:
        self._entries.clear()
        if self._publisher is not None:
            self._publish(self._sender + b" forget")

    async def close(self) -> None:
        """At shutdown: the publications in flight go out (each within the timeout)."""
        if self._listener is not None:
            self._listener.cancel()
        while self._pending:
            await asyncio.wait(set(self._pending))
        if self._publisher is not None:
            await self._publisher.aclose()

    def _remember(self, key: str, accepted: bool, ttl: float) -> None:
        self._entries[key] = (accepted, self._clock() + ttl)
        self._entries.move_to_end(key)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def _publish(self, message: bytes) -> None:
        if len(self._pending) >= _MAX_PUBLISHING:
            return  # Redis is slow: this worker's own memory holds the verdict all the same
        task = asyncio.get_running_loop().create_task(self._send(message))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, message: bytes) -> None:
        assert self._publisher is not None
        with contextlib.suppress(TimeoutError, RedisError, OSError):
            await self._publisher.publish(CHANNEL, message)

    def _heard(self, message: bytes) -> None:
        sender, _, rest = message.partition(b" ")
        if sender == self._sender:
            return
        if rest == b"forget":
            self._entries.clear()
            return
        accepted, ttl_ms, key = rest.split(b" ", 2)
        self._remember(key.decode(), accepted == b"1", int(ttl_ms) / 1000)

    async def _listen(self) -> None:
        """Hear the other workers' verdicts; on any Redis trouble, try again a second later."""
        while True:
            subscriber = Redis.from_url(self._redis_url, socket_connect_timeout=self._timeout,
                                        health_check_interval=30)
            try:
                async with subscriber.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    while True:
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None and message["type"] == "message":
                            with contextlib.suppress(ValueError):
                                self._heard(message["data"])
            except (TimeoutError, RedisError, OSError):
                await asyncio.sleep(1.0)
            finally:
                await subscriber.aclose()
