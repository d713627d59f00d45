"""Policy refusals: the value a policy decision returns, and the table of configurable replies.

Every rule's reply can be changed by the operator (design.md §2 "Reply codes", RFC 2505 §2.13);
the defaults are here, on the policy's side, and :mod:`edgeproxy.config` validates overrides.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeproxy.reply import Reply


@dataclass(frozen=True, slots=True)
class Refusal:
    """A policy refusal: the rule that decided (for the log) and the reply to send."""

    rule: str
    reply: Reply


POLICY_DEFAULTS: dict[str, Reply] = {
    "CONNECT_DENIED": Reply(554, "5.7.1", "Connection refused by policy"),
    "TOO_MANY_CONNECTIONS": Reply(421, "4.7.0", "Too many connections, try again later"),
    "RATE_LIMITED": Reply(421, "4.7.0", "Connection rate limit exceeded, try again later"),
    "SENDER_DENIED": Reply(550, "5.7.1", "Sender address rejected"),
    "RELAY_DENIED": Reply(554, "5.7.1", "Relay access denied"),
    "UNKNOWN_USER": Reply(550, "5.1.1", "Recipient address rejected: user unknown"),
    "TOO_MANY_RECIPIENTS": Reply(452, "4.5.3", "Too many recipients"),
    "MESSAGE_TOO_BIG": Reply(552, "5.3.4", "Message size exceeds fixed limit"),
}
# Rules that refuse relaying answer like RELAY_DENIED unless configured apart: a relay prober
# should not learn which of our rules caught it.
POLICY_INHERITS = {"ENCAPSULATED": "RELAY_DENIED", "RELAY_NEVER": "RELAY_DENIED"}
POLICY_RULES = (*POLICY_DEFAULTS, *POLICY_INHERITS)
