"""Verifying SMTP AUTH credentials (design.md §7): a local file of password hashes, or the backend.

Both sit behind one small interface, :class:`Verifier`. Hashing runs in a thread pool, so a slow
hash (argon2id is slow on purpose) never stalls other sessions. Passwords arrive as
:class:`~edgeproxy.smtp.sasl.Secret` and are revealed only at the call that checks them.
Libraries: argon2-cffi and bcrypt for the hashes, aiosmtplib for the backend's own AUTH.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import aiosmtplib
import bcrypt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from edgeproxy.reply import Reply
from edgeproxy.smtp import replies as r
from edgeproxy.smtp.sasl import Secret

FAILURE_WINDOW = 600.0  # seconds: failures from one address are counted over ten minutes
_HASHER = PasswordHasher()  # argon2id with argon2-cffi's RFC 9106 low-memory defaults


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    reply: Reply  # what the client hears when not ok (5xx refused, 4xx could not tell)


ACCEPTED = Outcome(True, r.AUTH_OK)
REFUSED = Outcome(False, r.AUTH_FAILED)
UNAVAILABLE = Outcome(False, r.AUTH_TEMPORARY)


class Verifier(Protocol):
    async def verify(self, username: str, password: Secret) -> Outcome: ...


def hash_password(password: str) -> str:
    """The line format's hash for a new user (``edgeproxy passwd``)."""
    return _HASHER.hash(password)


def read_users(text: str) -> dict[str, str]:
    """``user:hash`` lines (``#`` comments, blank lines ignored); raises ValueError naming a bad
    line, never the hash itself."""
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        if not colon or not user or not hashed.startswith(("$argon2id$", "$argon2i$", "$2b$", "$2a$", "$2y$")):
            raise ValueError(f"line {number}: expected user:<argon2id or bcrypt hash>")
        users[user] = hashed
    return users


def _check(hashed: str, password: str) -> bool:
    if hashed.startswith("$argon2"):
        try:
            return _HASHER.verify(hashed, password)
        except (VerificationError, InvalidHashError):
            return False
    try:
        return bcrypt.checkpw(password.encode("utf-8"), hashed.encode("ascii"))
    except ValueError:
        return False


_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _hashing_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                                      thread_name_prefix="edgeproxy-hash")
    return _POOL


class FileVerifier:
    """``EDGEPROXY_AUTH=file``: the users file, read at start-up and on SIGHUP."""

    def __init__(self, users: dict[str, str], executor: concurrent.futures.Executor | None = None) -> None:
        self._users = users
        # One hash per core at a time: argon2id takes 64 MiB each, so the pool is the memory bound
        # (a queue of attempts waits its turn instead of each taking its own 64 MiB).
        self._executor = executor or _hashing_pool()
        # An unknown user costs the same hash as a known one: timing does not tell them apart.
        self._decoy = hash_password("decoy password that matches nothing")

    async def verify(self, username: str, password: Secret) -> Outcome:
        hashed = self._users.get(username)
        loop = asyncio.get_running_loop()
        matched = await loop.run_in_executor(self._executor, _check, hashed or self._decoy, password.reveal())
        return ACCEPTED if matched and hashed is not None else REFUSED


class BackendVerifier:
    """``EDGEPROXY_AUTH=backend``: the backend's own AUTH, on a connection of its own (after its
    STARTTLS where it offers it). Only its 235 authenticates; its 5xx refusal is relayed."""

    def __init__(self, host: str, port: int, hostname: str, timeout: float,
                 tls_context: ssl.SSLContext | None) -> None:
        self._host, self._port, self._hostname = host, port, hostname
        self._timeout = timeout
        self._tls_context = tls_context

    async def verify(self, username: str, password: Secret) -> Outcome:
        # With a context its STARTTLS is used when offered (as for mail), without one never.
        client = aiosmtplib.SMTP(hostname=self._host, port=self._port, local_hostname=self._hostname,
                                 timeout=self._timeout, start_tls=None if self._tls_context else False,
                                 tls_context=self._tls_context)
        try:
            await client.connect()
            # One mechanism, one attempt: login() would try each offered one in turn, and a wrong
            # password would count twice against the backend's own lockout.
            methods = client.server_auth_methods
            if "plain" in methods:
                await client.auth_plain(username, password.reveal())
            elif "login" in methods:
                await client.auth_login(username, password.reveal())
            else:
                return UNAVAILABLE
        except aiosmtplib.SMTPAuthenticationError as error:
            if 400 <= error.code < 500:
                return UNAVAILABLE
            return Outcome(False, _relayed(error.code, error.message))
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            return UNAVAILABLE
        finally:
            if client.is_connected:
                client.close()
        return ACCEPTED


def _relayed(code: int, message: str) -> Reply:
    """The backend's refusal as the client's: its code and text, made safe for one reply line."""
    text = "".join(char for char in message.splitlines()[0] if 32 <= ord(char) < 127) if message else ""
    enhanced, _, rest = text.partition(" ")
    if len(enhanced) >= 5 and enhanced[0] == str(code)[0] and enhanced[1] == ".":
        return Reply(code, enhanced, rest)
    return Reply(code, r.AUTH_FAILED.enhanced if code >= 500 else r.AUTH_TEMPORARY.enhanced, text)


class FailureCounter:
    """AUTH failures per client address over :data:`FAILURE_WINDOW`, bounded in memory."""

    def __init__(self, limit: int, max_addresses: int = 100_000) -> None:
        self.limit = limit
        self._max_addresses = max_addresses
        self._failures: dict[str, deque[float]] = {}

    def blocked(self, address: str, now: float | None = None) -> bool:
        recent = self._recent(address, time.monotonic() if now is None else now)
        return recent is not None and len(recent) >= self.limit

    def add(self, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        recent = self._recent(address, now)
        if recent is None:
            if len(self._failures) >= self._max_addresses:
                self._failures.pop(next(iter(self._failures)))  # the oldest address: a bound, not a cache
            recent = self._failures[address] = deque()
        recent.append(now)

    def _recent(self, address: str, now: float) -> deque[float] | None:
        recent = self._failures.get(address)
        if recent is None:
            return None
        while recent and recent[0] <= now - FAILURE_WINDOW:
            recent.popleft()
        if not recent:
            del self._failures[address]
            return None
        return recent
