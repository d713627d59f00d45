"""One test per rule of the relay policy (design.md §2), through Policy built from settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeproxy import fastpath_common as fc
from edgeproxy.config import Settings
from edgeproxy.errors import ParseError
from edgeproxy.fastpath import parse_mail_from
from edgeproxy.policy import Policy
from edgeproxy.smtp.replies import POLICY_DEFAULTS, Reply


def policy(**env: str) -> Policy:
    return Policy(Settings.from_env({f"EDGEPROXY_{key.upper()}": value for key, value in env.items()}))


def rcpt(p: Policy, address: str, grant: int = fc.GRANT_NONE) -> tuple[int, int, str]:
    verdict = p.decide_rcpt(f"TO:<{address}>", grant)
    return verdict.action, verdict.rule, verdict.address


class TestConnect:
    def test_connect_deny_list(self) -> None:
        refusal = policy(connect_deny="192.0.2.0/24").check_connect("192.0.2.9")
        assert refusal is not None and refusal.reply == POLICY_DEFAULTS["CONNECT_DENIED"]
        assert policy(connect_deny="192.0.2.0/24").check_connect("198.51.100.1") is None

    def test_connect_allow_list_refuses_everyone_else(self) -> None:
        p = policy(connect_allow="10.0.0.0/8,2001:db8::/32")
        assert p.check_connect("10.2.3.4") is None and p.check_connect("2001:db8::7") is None
        refusal = p.check_connect("192.0.2.1")
        assert refusal is not None and refusal.reply == POLICY_DEFAULTS["CONNECT_DENIED"]


class TestSender:
    def test_deny_by_address_domain_and_wildcard(self) -> None:
        p = policy(sender_deny="Spam@Bad.example,worse.example,.worst.example")
        for sender in ("spam@bad.example", "x@worse.example", "x@mail.worst.example"):
            refusal = p.check_sender(parse_mail_from(f"FROM:<{sender}>"))
            assert refusal is not None and refusal.reply == POLICY_DEFAULTS["SENDER_DENIED"], sender
        assert p.check_sender(parse_mail_from("FROM:<ham@bad.example>")) is None

    def test_null_sender_is_never_refused(self) -> None:
        assert policy(sender_deny="example.test").check_sender(parse_mail_from("FROM:<>")) is None

    def test_our_own_domain_is_not_refused_for_being_ours(self) -> None:
        p = policy(local_domains="example.test", sender_deny="example.test,boss@example.test")
        assert p.check_sender(parse_mail_from("FROM:<anyone@example.test>")) is None
        assert p.check_sender(parse_mail_from("FROM:<boss@example.test>")) is not None  # listed by address

    def test_size_over_the_limit(self) -> None:
        p = policy(max_message_size="1000")
        refusal = p.check_sender(parse_mail_from("FROM:<a@b.test> SIZE=1001"))
        assert refusal is not None and refusal.reply == POLICY_DEFAULTS["MESSAGE_TOO_BIG"]
        assert p.check_sender(parse_mail_from("FROM:<a@b.test> SIZE=1000")) is None
        assert p.check_sender(parse_mail_from("FROM:<a@b.test> SIZE=900"), size_limit=800) is not None


class TestRecipient:
    def test_syntax_error_raises(self) -> None:
        with pytest.raises(ParseError):
            policy().decide_rcpt("TO:<no spaces@example.test>", fc.GRANT_NONE)

    @pytest.mark.parametrize(
        "address",
        [
            "user%elsewhere.test@example.test",
            "elsewhere.test!user@example.test",
            "@relay.test:user@example.test",
            '"user@elsewhere.test"@example.test',
            '"user%elsewhere.test"@example.test',
            '"elsewhere.test!user"@example.test',
            "user@elsewhere.test@example.test",
            "user@example.test.",
            "user@example.test@",
            "user@[192.0.2.99]",
            "IMCEASMTP-user+40elsewhere+2Etest@example.test",
        ],
        ids=["percent", "bang", "source-route", "quoted-at", "quoted-percent", "quoted-bang", "multiple-at",
             "trailing-dot", "trailing-at", "foreign-ip-literal", "imcea"],
    )
    def test_encapsulated_forms_are_relay_attempts(self, address: str) -> None:
        p = policy()
        verdict = p.decide_rcpt(f"TO:<{address}>", fc.GRANT_NONE)
        assert (verdict.action, verdict.rule) == (fc.ACTION_REJECT, fc.RULE_ENCAPSULATED)
        refusal = p.refusal_for(verdict)
        assert refusal is not None and refusal.reply == p.replies["ENCAPSULATED"] == p.replies["RELAY_DENIED"]
        for grant in (fc.GRANT_AUTHENTICATED, fc.GRANT_ALLOW_LIST, fc.GRANT_LISTENER):
            assert p.decide_rcpt(f"TO:<{address}>", grant).action == fc.ACTION_FORWARD

    def test_our_own_ip_literal_is_local(self) -> None:
        assert rcpt(policy(local_domains="example.test,[192.0.2.1]"), "user@[192.0.2.1]")[:2] == (
            fc.ACTION_FORWARD, fc.RULE_LOCAL)

    def test_rewrite_map_applies_before_the_decision(self) -> None:
        p = policy(local_domains="compaq.test", rewrite="dec.test=compaq.test")
        assert rcpt(p, "ken@DEC.test") == (fc.ACTION_FORWARD, fc.RULE_LOCAL, "ken@compaq.test")

    def test_recipient_directory_from_a_file(self, tmp_path: Path) -> None:
        directory = tmp_path / "recipients"
        directory.write_text("# staff\n" + "".join(f"user{n}@example.test\n" for n in range(25000)))
        p = policy(local_domains="example.test,open.test", recipients=f"@{directory}")
        assert rcpt(p, "User24999@example.test")[:2] == (fc.ACTION_FORWARD, fc.RULE_LOCAL_DIRECTORY)
        verdict = p.decide_rcpt("TO:<nobody@example.test>", fc.GRANT_NONE)
        assert verdict.rule == fc.RULE_UNKNOWN_USER
        refusal = p.refusal_for(verdict)
        assert refusal is not None and refusal.reply == POLICY_DEFAULTS["UNKNOWN_USER"]
        assert rcpt(p, "anyone@open.test")[:2] == (fc.ACTION_FORWARD, fc.RULE_LOCAL)  # no directory there

    def test_relay_domain_for_anyone(self) -> None:
        assert rcpt(policy(relay_domains="backup.test"), "x@backup.test")[:2] == (fc.ACTION_FORWARD,
                                                                                 fc.RULE_RELAY_DOMAIN)

    def test_foreign_domain(self) -> None:
        p = policy(relay_allow="10.0.0.0/8,2001:db8::/32")
        verdict = p.decide_rcpt("TO:<x@elsewhere.test>", fc.GRANT_NONE)
        assert verdict.rule == fc.RULE_RELAY_DENIED
        assert p.refusal_for(verdict).reply == Reply(554, "5.7.1", "Relay access denied")  # type: ignore[union-attr]
        assert rcpt(p, "x@elsewhere.test", fc.GRANT_AUTHENTICATED)[1] == fc.RULE_RELAY_AUTHENTICATED
        for client in ("10.1.1.1", "2001:db8::1", "::ffff:10.1.2.3"):
            grant = p.relay_grant(client, listener_may_relay=False)
            assert rcpt(p, "x@elsewhere.test", grant)[1] == fc.RULE_RELAY_ALLOW_LIST, client
        grant = p.relay_grant("192.0.2.1", listener_may_relay=True)
        assert rcpt(p, "x@elsewhere.test", grant)[1] == fc.RULE_RELAY_LISTENER

    def test_never_list_overrides_every_permission_but_only_for_relaying(self) -> None:
        p = policy(relay_allow="10.0.0.0/8", relay_never="10.66.0.0/16")
        for authenticated, listener in ((False, False), (True, False), (False, True), (True, True)):
            grant = p.relay_grant("10.66.1.1", listener, authenticated)
            assert grant == fc.GRANT_NEVER
            verdict = p.decide_rcpt("TO:<x@elsewhere.test>", grant)
            assert verdict.rule == fc.RULE_RELAY_NEVER
            assert p.refusal_for(verdict).reply == p.replies["RELAY_DENIED"]  # type: ignore[union-attr]
            assert rcpt(p, "user@example.test", grant)[0] == fc.ACTION_FORWARD

    @pytest.mark.parametrize(
        ("address", "env"),
        [
            ("user@EXAMPLE.TEST", {}),
            ("user@mail.example.test", {"local_domains": ".example.test"}),
            ('"john.doe"@example.test', {}),
            ('"john doe"@example.test', {}),
            ("user@bücher.example", {"local_domains": "xn--bcher-kva.example"}),
            ("user@xn--bcher-kva.example", {"local_domains": "bücher.example"}),
            ("Postmaster", {}),
            ("first.last+tag@example.test", {}),
        ],
        ids=["upper-case-domain", "subdomain-wildcard", "quoted-harmless", "quoted-space", "u-label", "a-label",
             "postmaster", "plus-tag"],
    )
    def test_no_false_rejects(self, address: str, env: dict[str, str]) -> None:
        assert rcpt(policy(**env), address)[0] == fc.ACTION_FORWARD


class TestReplies:
    def test_configured_relay_reply_is_inherited_unless_set(self) -> None:
        p = policy(reply_relay_denied="550 5.7.1 No relaying here", reply_relay_never="554 5.7.1 Never from you")
        assert p.replies["RELAY_DENIED"] == Reply(550, "5.7.1", "No relaying here")
        assert p.replies["ENCAPSULATED"] == p.replies["RELAY_DENIED"]
        assert p.replies["RELAY_NEVER"] == Reply(554, "5.7.1", "Never from you")

    def test_soft_mode_turns_policy_5xx_into_4xx(self) -> None:
        p = policy(soft_reject="yes")
        assert p.replies["RELAY_DENIED"] == Reply(454, "4.7.1", "Relay access denied")
        assert p.replies["UNKNOWN_USER"] == Reply(450, "4.1.1", POLICY_DEFAULTS["UNKNOWN_USER"].text)
        assert p.replies["TOO_MANY_CONNECTIONS"] == POLICY_DEFAULTS["TOO_MANY_CONNECTIONS"]  # 4xx stays
        assert all(reply.code < 500 for reply in p.replies.values())

    def test_a_new_policy_never_changes_a_live_one(self) -> None:
        old = policy(local_domains="example.test")
        new = policy(local_domains="other.test")
        assert rcpt(old, "u@example.test")[0] == fc.ACTION_FORWARD
        assert rcpt(old, "u@other.test")[1] == fc.RULE_RELAY_DENIED
        assert rcpt(new, "u@other.test")[0] == fc.ACTION_FORWARD
