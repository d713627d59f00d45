"""What the client is offered: what both the proxy and the backend support (design.md §3)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from edgeproxy.smtp import replies as r
from edgeproxy.smtp.sasl import MECHANISMS

_BODY_TYPES = ("7BIT", "8BITMIME")


@dataclass(frozen=True, slots=True)
class Capabilities:
    max_message_size: int
    eightbitmime: bool = True
    smtputf8: bool = False
    dsn: bool = False

    @classmethod
    def negotiate(cls, proxy_max_size: int, backend_ehlo: list[str] | None) -> Capabilities:
        """Combine our limit with the keywords of the backend's EHLO reply (one per line, the
        greeting line excluded). ``None`` (backend not probed yet) offers the safe minimum."""
        if backend_ehlo is None:
            return cls(proxy_max_size, eightbitmime=False)
        keywords: dict[str, str] = {}
        for line in backend_ehlo:
            keyword, _, value = line.strip().partition(" ")
            keywords[keyword.upper()] = value.strip()
        size = proxy_max_size
        backend_size = keywords.get("SIZE", "")
        if backend_size.isdigit() and int(backend_size) > 0:
            size = min(size, int(backend_size))
        return cls(
            size,
            eightbitmime="8BITMIME" in keywords,
            smtputf8="SMTPUTF8" in keywords,
            dsn="DSN" in keywords,
        )

    def ehlo_keywords(self, starttls: bool = False, auth: bool = False) -> list[str]:
        """Our keywords; STARTTLS is the proxy's own (offered before TLS only, RFC 3207 §4.2),
        never passed through from the backend."""
        keywords = ["PIPELINING", f"SIZE {self.max_message_size}"]
        if self.eightbitmime:
            keywords.append("8BITMIME")
        if self.smtputf8:
            keywords.append("SMTPUTF8")
        if self.dsn:
            keywords.append("DSN")
        keywords.append("ENHANCEDSTATUSCODES")
        if starttls:
            keywords.append("STARTTLS")
        if auth:
            keywords.append("AUTH " + " ".join(MECHANISMS))
        return keywords

    def ehlo_reply(self, hostname: str, starttls: bool = False, auth: bool = False) -> bytes:
        return _ehlo_reply(hostname, self, starttls, auth)

    def check_mail_params(self, params: dict[str, str | None], esmtp: bool) -> r.Reply | None:
        """Refuse any MAIL parameter we did not offer (RFC 5321 §4.1.1.11: 555)."""
        if params and not esmtp:
            return r.PARAMETER_UNRECOGNIZED
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    return r.PARAMETER_BAD
            elif key == "BODY" and self.eightbitmime:
                if value is None or value.upper() not in _BODY_TYPES:
                    return r.PARAMETER_BAD
            elif key == "SMTPUTF8" and self.smtputf8:
                if value is not None:
                    return r.PARAMETER_BAD
            elif key == "RET" and self.dsn:
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    return r.PARAMETER_BAD
            elif key == "ENVID" and self.dsn:
                if value is None:
                    return r.PARAMETER_BAD
            else:
                return r.PARAMETER_UNRECOGNIZED
        return None

    def check_rcpt_params(self, params: dict[str, str | None]) -> r.Reply | None:
        for key, value in params.items():
            if key in ("NOTIFY", "ORCPT") and self.dsn:
                if value is None:
                    return r.PARAMETER_BAD
            else:
                return r.PARAMETER_UNRECOGNIZED
        return None


@functools.lru_cache(maxsize=16)
def _ehlo_reply(hostname: str, capabilities: Capabilities, starttls: bool, auth: bool) -> bytes:
    """The EHLO reply; every session of one configuration sends the same bytes."""
    return r.multiline(250, [hostname, *capabilities.ehlo_keywords(starttls, auth)])
