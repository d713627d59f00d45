"""SASL for SMTP AUTH (RFC 4954), sans-IO: the PLAIN (RFC 4616) and LOGIN exchanges.

The session feeds it the AUTH argument and then each response line; it answers with a challenge
to send, the credentials to verify, or the reply that ends the exchange. Passwords travel as
:class:`Secret`, whose repr and str never show the value, so no log line, exception or event
dump can carry one.
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from dataclasses import dataclass

from edgeproxy.reply import Reply
from edgeproxy.smtp import replies as r

MECHANISMS = ("PLAIN", "LOGIN")
# RFC 4954 §4: an AUTH command line, and each response line, may be up to 12,288 octets.
MAX_AUTH_LINE = 12288
_LOGIN_USERNAME = "VXNlcm5hbWU6"  # base64("Username:")
_LOGIN_PASSWORD = "UGFzc3dvcmQ6"  # base64("Password:")


class Secret:
    """A password: only :meth:`reveal` gives it back."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Challenge:
    text: str  # sent as "334 <text>"


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: Secret


@dataclass(frozen=True, slots=True)
class Failed:
    reply: Reply


Step = Challenge | Credentials | Failed


class SaslExchange:
    __slots__ = ("_username", "mechanism")

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self._username: str | None = None

    def begin(self, initial: str | None) -> Step:
        """The AUTH command's own argument after the mechanism, if any (``=`` is empty)."""
        if initial is None:
            return Challenge("" if self.mechanism == "PLAIN" else _LOGIN_USERNAME)
        return self.respond(initial)

    def respond(self, line: str) -> Step:
        if line == "*":
            return Failed(r.AUTH_CANCELLED)  # RFC 4954 §4: the client gave up
        decoded = _decode(line)
        if decoded is None:
            return Failed(r.AUTH_BAD_BASE64)
        if self.mechanism == "PLAIN":
            return _plain(decoded)
        if self._username is None:
            self._username = decoded
            return Challenge(_LOGIN_PASSWORD)
        return _credentials(self._username, decoded)


def _decode(line: str) -> str | None:
    if line == "=":
        return ""
    try:
        return b64decode(line.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None


def _plain(message: str) -> Step:
    """RFC 4616: [authzid] NUL authcid NUL passwd. An authzid other than the user is refused:
    we let nobody act for someone else."""
    parts = message.split("\0")
    if len(parts) != 3:
        return Failed(r.AUTH_BAD_BASE64)
    authzid, username, password = parts
    if authzid and authzid != username:
        return Failed(r.AUTH_FAILED)
    return _credentials(username, password)


def _credentials(username: str, password: str) -> Step:
    if not username or not password or any(ord(char) < 32 for char in username):
        return Failed(r.AUTH_FAILED)
    return Credentials(username, Secret(password))
