"""Value parsers for ``EDGEPROXY_*`` variables: each takes the raw text and returns the value or
raises ValueError with a message fit to follow the variable's name and value."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from typing import Any

from edgeproxy.fastpath import CidrSet, DomainSet, ParseError, canonical_domain, parse_rcpt_to
from edgeproxy.fastpath_common import REASON_SYNTAX, local_key

_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected one of 1/true/yes/0/false/no")


def parse_list(text: str) -> tuple[str, ...]:
    """Comma-separated entries, or ``@/path``: one entry a line, ``#`` starts a comment."""
    text = text.strip()
    if text.startswith("@"):
        path = text[1:]
        try:
            with open(path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except OSError as error:
            raise ValueError(f"cannot read {path}: {error.strerror}") from None
        entries = (line.split("#", 1)[0].strip() for line in lines)
    else:
        entries = (entry.strip() for entry in text.split(","))
    return tuple(entry for entry in entries if entry)


def int_parser(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError("expected a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise ValueError(f"expected a whole number {bound}")
        return value

    return parse


def seconds_parser(minimum: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError("expected a number of seconds") from None
        if not value >= minimum or value == float("inf"):
            raise ValueError(f"expected a number of seconds, at least {minimum:g}")
        return value

    return parse


def choice_parser(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError("expected one of " + "/".join(choices))
        return value

    return parse


def parse_host_port(text: str) -> tuple[str, int]:
    """``127.0.0.1:25``, ``[::1]:25`` or ``mail.example.com:25``."""
    text = text.strip()
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError("expected [ipv6]:port")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, _, port_text = text.rpartition(":")
        if not host or ":" in host:
            raise ValueError("expected host:port (IPv6 as [addr]:port)")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            try:
                canonical_domain(host)
            except ParseError:
                raise ValueError(f"{host!r} is neither an address nor a host name") from None
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError("expected a port from 0 to 65535")
    return host, int(port_text)


def parse_optional_host_port(text: str) -> tuple[str, int] | None:
    return parse_host_port(text) if text.strip() else None


def parse_redis_url(text: str) -> str:
    """redis:// or rediss:// (TLS) with host and optional port and database, or unix:///path."""
    from urllib.parse import urlsplit

    text = text.strip()
    if not text:
        return ""
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected redis://host:port/db, rediss://... or unix:///path")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError("expected unix:///path/to/redis.sock")
    if parts.scheme != "unix":
        try:
            port = parts.port
        except ValueError:
            raise ValueError("expected a port from 0 to 65535") from None
        if not parts.hostname or port == 0:
            raise ValueError("expected redis://host:port/db")
    return text


def parse_listeners(text: str) -> tuple[tuple[str, int], ...]:
    return tuple(parse_host_port(entry) for entry in parse_list(text))


def parse_required_listeners(text: str) -> tuple[tuple[str, int], ...]:
    listeners = parse_listeners(text)
    if not listeners:
        raise ValueError("at least one address to listen on is needed")
    return listeners


def parse_file(text: str) -> str:
    """Empty, or a readable file (``@/path`` is taken as ``/path`` too)."""
    path = text.strip().removeprefix("@")
    if path and not os.access(path, os.R_OK):
        raise ValueError(f"cannot read {path}")
    return path


def parse_users(text: str) -> str:
    """A readable file of ``user:hash`` lines (``@/path`` or ``/path``), checked line by line."""
    from edgeproxy.auth import read_users

    path = parse_file(text)
    if path:
        with open(path, encoding="utf-8") as handle:
            read_users(handle.read())
    return path


def parse_backend(text: str) -> tuple[str, int] | None:
    return parse_host_port(text) if text.strip() else None


def parse_domains(text: str) -> tuple[str, ...]:
    entries = parse_list(text)
    DomainSet(entries)  # validates; the policy builds the live matcher
    return entries


def parse_cidrs(text: str) -> tuple[str, ...]:
    entries = parse_list(text)
    CidrSet(entries)
    return entries


def _converted(text: str, convert: Callable[[str], Any], expected: str) -> tuple[Any, ...]:
    """Each list entry through ``convert``, which raises ParseError for a bad one."""
    converted = []
    for entry in parse_list(text):
        try:
            converted.append(convert(entry))
        except ParseError:
            raise ValueError(f"expected {expected}, got {entry!r}") from None
    return tuple(converted)


def _address(entry: str) -> str:
    """A full address, checked by the same parser as RCPT TO, lower-cased for lookups."""
    path = parse_rcpt_to(f"TO:<{entry}>")
    if not path.domain:
        raise ParseError(REASON_SYNTAX)
    return local_key(path.local) + "@" + path.domain


def _rewrite_pair(entry: str) -> tuple[str, str]:
    source, equals, target = entry.partition("=")
    if not equals:
        raise ParseError(REASON_SYNTAX)
    return canonical_domain(source.strip()), canonical_domain(target.strip())


def _sender_entry(entry: str) -> str:
    if "@" in entry:
        return _address(entry)
    if entry.startswith("."):
        return "." + canonical_domain(entry[1:])
    return canonical_domain(entry)


def parse_rewrite(text: str) -> tuple[tuple[str, str], ...]:
    return _converted(text, _rewrite_pair, "from.domain=to.domain")


def parse_addresses(text: str) -> tuple[str, ...]:
    """Full addresses (``user@domain``), as in a recipient directory."""
    return _converted(text, _address, "user@domain")


def parse_sender_deny(text: str) -> tuple[str, ...]:
    """Addresses (``user@domain``), domains (``domain``) and wildcards (``.domain``)."""
    return _converted(text, _sender_entry, "user@domain, domain or .domain")


def parse_hostname(text: str) -> str:
    """Empty (the host's FQDN is used), or a name fit for the greeting and Received: lines."""
    text = text.strip()
    if not text:
        return ""
    try:
        return canonical_domain(text)
    except ParseError:
        raise ValueError("expected a domain name") from None


def parse_directory(text: str) -> str:
    text = text.strip()
    if text and os.path.exists(text) and not os.path.isdir(text):
        raise ValueError("exists and is not a directory")
    return text


def parse_workers(text: str) -> int:
    if text.strip().lower() == "auto":
        return os.cpu_count() or 1
    return int_parser(1, 256)(text)
