"""What a session learns about recipients: the backend's remembered verdicts (refuse a known
unknown without asking it) and the directory-harvest tarpit (Exchange 2003's: past
``harvest_limit`` unknown recipients in a session, each RCPT reply is delayed by
``harvest_delay``). A mixin of :class:`~edgeproxy.smtp.session.SmtpSession`.

A harvester learns which mailboxes exist from which RCPTs are refused; the delay makes each of its
guesses cost seconds instead of microseconds, and since replies leave in command order a
pipelined flood of guesses waits behind the first delayed one. The delay is a timer in the I/O
layer, never a sleep: other clients, and this session's own reading up to its bounds, go on.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from edgeproxy import fastpath_common as fc
from edgeproxy.smtp import events as ev

if TYPE_CHECKING:
    from collections.abc import Callable

    from edgeproxy.fastpath import RcptVerdict
    from edgeproxy.smtp.interface import RecipientVerdicts, SessionLimits, SessionPolicy
    from edgeproxy.smtp.message import Transaction
    from edgeproxy.smtp.replyqueue import ReplyQueue, Slot

# Verdicts the backend gives for domains we have no directory for: the ones worth remembering.
VERIFIED_RULES = frozenset((fc.RULE_LOCAL, fc.RULE_RELAY_DOMAIN))
# Enhanced status codes (RFC 3463) that say "no such mailbox": bad destination mailbox (5.1.1),
# mailbox moved (5.1.6), and 5.1.0 as some servers (Exchange) answer for an unknown recipient.
# 5.1.2 (bad system) and 5.1.3 (bad syntax) say nothing about the mailbox.
_UNKNOWN_MAILBOX = (b"5.1.1", b"5.1.0", b"5.1.6")


def is_unknown_recipient(code: int, reply: bytes) -> bool:
    """A permanent refusal of the mailbox itself, judged by the reply's enhanced status code."""
    if not 500 <= code < 600:
        return False
    status = reply[4:10].split(maxsplit=1)
    return bool(status) and status[0] in _UNKNOWN_MAILBOX


class RecipientChecks:
    __slots__ = ()

    if TYPE_CHECKING:  # provided by SmtpSession
        limits: SessionLimits
        policy: SessionPolicy
        verdicts: RecipientVerdicts | None
        unknown_recipients: int
        _verifying: deque[str | None]
        _slots: ReplyQueue
        _events: list[ev.Event]
        _txn: Transaction
        _rcpt: Callable[[str], None]
        _refuse: Callable[..., None]

    def _rcpt_command(self, arg: str) -> None:
        limits = self.limits
        tarpit = limits.harvest_limit and limits.harvest_delay and self.unknown_recipients >= limits.harvest_limit
        if not tarpit:
            self._rcpt(arg)
            return
        before = len(self._slots)
        self._rcpt(arg)
        if len(self._slots) > before:
            slot = self._slots[before]
            slot.held = True
            self._events.append(ev.DelayReply(slot, limits.harvest_delay))

    def _remembered_unknown(self, verdict: RcptVerdict) -> bool:
        """Refuse a recipient the backend lately refused as unknown; True if so."""
        verdicts = self.verdicts
        if verdicts is None or verdict.rule not in VERIFIED_RULES or verdicts.known(verdict.address) is not False:
            return False
        self._txn.rejected += 1
        self.unknown_recipients += 1
        refusal = self.policy.unknown_recipient()
        self._refuse("rcpt", refusal.rule, refusal.reply, verdict.address)
        return True

    def _forwarding_recipient(self, verdict: RcptVerdict) -> None:
        """A RCPT goes to the backend: when verifying, its reply is a verdict to remember (for
        verified domains), and ``_verifying`` keeps one entry per forwarded RCPT."""
        if self.verdicts is not None:
            self._verifying.append(verdict.address if verdict.rule in VERIFIED_RULES else None)

    def _recipient_reply(self, code: int, raw: bytes, judged: bool) -> None:
        """The backend's reply to a forwarded RCPT; ``judged``: to the RCPT itself, not the
        inherited refusal of its MAIL."""
        verdicts = self.verdicts
        address = self._verifying.popleft() if verdicts is not None else None
        if not judged:
            return
        if is_unknown_recipient(code, raw):
            self.unknown_recipients += 1
        if verdicts is not None and address is not None:
            verdicts.learn(address, code, raw)

    def release(self, slot: Slot) -> None:
        """A delayed reply's time has come (the I/O layer's timer): it may leave."""
        slot.held = False
