"""The relay policy of design.md §2, built from Settings into immutable matchers.

Every decision is a returned value (a rule name and a reply, or nothing); nothing here raises for
a policy outcome, logs, or keeps per-connection state. A reload builds a new :class:`Policy`
and the server swaps the reference; a live policy is never mutated.
"""

from __future__ import annotations

from collections import defaultdict

from edgeproxy import fastpath_common as fc
from edgeproxy.config import Settings
from edgeproxy.fastpath import CidrSet, DomainSet, ParsedPath, RcptMatcher, RcptVerdict
from edgeproxy.fastpath_common import local_key
from edgeproxy.listener import ListenerKind
from edgeproxy.refusals import Refusal

# RCPT rules that refuse, and the reply-table entry each answers with.
_RULE_REPLY = {
    fc.RULE_ENCAPSULATED: "ENCAPSULATED",
    fc.RULE_UNKNOWN_USER: "UNKNOWN_USER",
    fc.RULE_RELAY_NEVER: "RELAY_NEVER",
    fc.RULE_RELAY_DENIED: "RELAY_DENIED",
}


class Policy:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.replies = settings.replies
        self.local_domains = DomainSet(settings.local_domains)
        self.relay_domains = DomainSet(settings.relay_domains)
        self.relay_allow = CidrSet(settings.relay_allow)
        self.relay_never = CidrSet(settings.relay_never)
        self.connect_allow = CidrSet(settings.connect_allow) if settings.connect_allow else None
        self.connect_deny = CidrSet(settings.connect_deny)
        # Load balancers whose connections open with a PROXY header (design.md §8).
        self.balancers = CidrSet(settings.proxy_protocol_from) if settings.proxy_protocol_from else None
        self.max_recipients = settings.max_recipients
        self.max_message_size = settings.max_message_size
        self._sender_addresses = frozenset(entry for entry in settings.sender_deny if "@" in entry)
        self._sender_domains = DomainSet(entry for entry in settings.sender_deny if "@" not in entry)
        self.rcpt_matcher = RcptMatcher(
            self.local_domains, self.relay_domains, dict(settings.rewrite), recipient_directories(settings)
        )

    # -- connect -----------------------------------------------------------------------------

    def check_connect(self, client: str) -> Refusal | None:
        """Connect allow/deny lists (design.md §2 "At connect", rule 1)."""
        if client in self.connect_deny:
            return Refusal("connect_deny", self.replies["CONNECT_DENIED"])
        if self.connect_allow is not None and client not in self.connect_allow:
            return Refusal("connect_not_allowed", self.replies["CONNECT_DENIED"])
        return None

    def relay_grant(self, client: str, listener: ListenerKind, authenticated: bool = False) -> int:
        """What this client may do with foreign domains; the NEVER list overrides all else."""
        if client in self.relay_never:
            return fc.GRANT_NEVER
        if authenticated:
            return fc.GRANT_AUTHENTICATED
        if client in self.relay_allow:
            return fc.GRANT_ALLOW_LIST
        if listener is ListenerKind.RELAY:
            return fc.GRANT_LISTENER
        return fc.GRANT_NONE

    # -- MAIL --------------------------------------------------------------------------------

    def check_sender(self, path: ParsedPath, size_limit: int | None = None) -> Refusal | None:
        """Sender deny list and SIZE. The null sender is never refused (RFC 2505 §2.6), and
        neither is a sender for being in one of our own domains: only an explicitly listed
        address of ours is. ``size_limit`` is the limit in force when the backend's is lower."""
        limit = self.max_message_size if size_limit is None else size_limit
        size = path.params.get("SIZE")
        if size is not None and size.isdigit() and int(size) > limit:
            return Refusal("message_too_big", self.replies["MESSAGE_TOO_BIG"])
        if not path.address:
            return None
        if local_key(path.local) + "@" + path.domain in self._sender_addresses:
            return Refusal("sender_deny", self.replies["SENDER_DENIED"])
        if path.domain in self.local_domains:
            return None
        if path.domain in self._sender_domains:
            return Refusal("sender_deny", self.replies["SENDER_DENIED"])
        return None

    # -- RCPT --------------------------------------------------------------------------------

    def decide_rcpt(self, arg: str, grant: int) -> RcptVerdict:
        """Rules 1 to 6; raises ParseError on a syntax error, which the core answers 501."""
        return self.rcpt_matcher.decide(arg, grant)

    def refusal_for(self, verdict: RcptVerdict) -> Refusal | None:
        """The reply for a refusing verdict; None when the RCPT goes to the backend."""
        if verdict.action == fc.ACTION_FORWARD:
            return None
        return Refusal(fc.RULE_NAMES[verdict.rule], self.replies[_RULE_REPLY[verdict.rule]])

    def too_many_recipients(self) -> Refusal:
        return Refusal("too_many_recipients", self.replies["TOO_MANY_RECIPIENTS"])

    def message_too_big(self) -> Refusal:
        return Refusal("message_too_big", self.replies["MESSAGE_TOO_BIG"])

    def unknown_recipient(self) -> Refusal:
        """A recipient the backend refused as unknown lately (EDGEPROXY_VERIFY_RECIPIENTS)."""
        return Refusal("unknown_user_remembered", self.replies["UNKNOWN_USER"])


def recipient_directories(settings: Settings) -> dict[str, frozenset[str]]:
    """Group the recipient directory by domain: a domain listed at all has a closed directory."""
    by_domain: dict[str, set[str]] = defaultdict(set)
    for address in settings.recipients:
        local, _, domain = address.rpartition("@")
        by_domain[domain].add(local)
    return {domain: frozenset(locals_) for domain, locals_ in by_domain.items()}
