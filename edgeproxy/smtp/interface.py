"""What the SMTP core needs from outside it: its limits, and the relay policy's decisions.

The core depends on these shapes, never on :mod:`edgeproxy.config` or :mod:`edgeproxy.policy`, so it
can be built, tested and fuzzed with nothing but values (h11's core imports nothing above it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from edgeproxy.fastpath import ParsedPath, RcptVerdict
from edgeproxy.listener import ListenerKind
from edgeproxy.reply import Reply


@dataclass(frozen=True, slots=True)
class SessionLimits:
    hostname: str
    max_line_length: int
    max_body_line_length: int
    max_errors: int
    received_header: bool
    enable_expn: bool
    enable_etrn: bool
    max_pending_input: int = 65536  # octets of client input held unanswered before reading stops
    max_pipeline: int = 256  # replies owed before no further command is interpreted
    recipient_overshoot: int = 1000  # 452s per transaction before each further RCPT is an error
    junk_command_limit: int = 100  # NOOP, RSET, VRFY... before each further one is an error
    starttls: bool = False  # a certificate is loaded: STARTTLS may be offered
    auth: bool = False  # a verifier is configured: AUTH may be offered inside TLS
    harvest_limit: int = 0  # unknown-recipient refusals before each RCPT reply is delayed; 0: never
    harvest_delay: float = 0.0  # seconds each of those replies is delayed


class PolicyRefusal(Protocol):
    @property
    def rule(self) -> str: ...
    @property
    def reply(self) -> Reply: ...


class SessionPolicy(Protocol):
    """What the core asks of the relay policy (design.md §2); :class:`edgeproxy.policy.Policy`
    is one. Decisions are values: a refusal, or None to go on."""

    @property
    def max_recipients(self) -> int: ...
    def relay_grant(self, client: str, listener: ListenerKind, authenticated: bool = False) -> int: ...
    def check_sender(self, path: ParsedPath, size_limit: int | None = None) -> PolicyRefusal | None: ...
    def decide_rcpt(self, arg: str, grant: int) -> RcptVerdict: ...
    def refusal_for(self, verdict: RcptVerdict) -> PolicyRefusal | None: ...
    def too_many_recipients(self) -> PolicyRefusal: ...
    def message_too_big(self) -> PolicyRefusal: ...
    def unknown_recipient(self) -> PolicyRefusal: ...


class RecipientVerdicts(Protocol):
    """The backend's remembered verdicts on recipients (:class:`edgeproxy.verify.RecipientCache`)."""

    def known(self, address: str) -> bool | None: ...
    def learn(self, address: str, code: int, reply: bytes) -> None: ...
