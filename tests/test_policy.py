"""The relay policy of design.md §2, one test per rule, through ``Policy(Settings.from_env({...}))``.

Settings are built from a mapping of ``EDGEPROXY_*`` variables, as an operator would write them;
replies are compared with ``settings.replies`` and the constants in ``smtp/replies``, not with
copied strings (except where a test is about a configured text itself). Nothing here depends on
which fast-path twin is loaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgeproxy import fastpath_common as fc
from edgeproxy.config import Settings
from edgeproxy.errors import ParseError
from edgeproxy.fastpath import RcptVerdict, parse_mail_from
from edgeproxy.listener import ListenerKind
from edgeproxy.policy import Policy, Refusal
from edgeproxy.refusals import POLICY_DEFAULTS, POLICY_INHERITS, POLICY_RULES
from edgeproxy.reply import Reply

LOCAL = "example.test"  # EDGEPROXY_LOCAL_DOMAINS' default
FOREIGN = "elsewhere.test"
ALL_GRANTS = (fc.GRANT_NONE, fc.GRANT_AUTHENTICATED, fc.GRANT_ALLOW_LIST, fc.GRANT_LISTENER, fc.GRANT_NEVER)


def settings(**env: str) -> Settings:
    """Settings from ``EDGEPROXY_<KEY>`` variables; the hostname is fixed so no DNS is asked."""
    environ = {"EDGEPROXY_HOSTNAME": "mx.example.test"}
    environ.update({f"EDGEPROXY_{key.upper()}": value for key, value in env.items()})
    return Settings.from_env(environ)


def policy(**env: str) -> Policy:
    return Policy(settings(**env))


def decide(p: Policy, address: str, grant: int = fc.GRANT_NONE) -> RcptVerdict:
    return p.decide_rcpt(f"TO:<{address}>", grant)


def refusal(p: Policy, verdict: RcptVerdict) -> Refusal:
    found = p.refusal_for(verdict)
    assert found is not None, f"expected a refusal for {verdict}"
    return found


def sender(p: Policy, path: str, size_limit: int | None = None) -> Refusal | None:
    return p.check_sender(parse_mail_from(f"FROM:{path}"), size_limit)


def assert_forwarded(verdict: RcptVerdict, rule: int) -> None:
    assert (verdict.action, fc.RULE_NAMES[verdict.rule]) == (fc.ACTION_FORWARD, fc.RULE_NAMES[rule]), verdict


def assert_refused(p: Policy, verdict: RcptVerdict, rule: int, reply_name: str) -> None:
    assert (verdict.action, fc.RULE_NAMES[verdict.rule]) == (fc.ACTION_REJECT, fc.RULE_NAMES[rule]), verdict
    assert refusal(p, verdict).reply == p.settings.replies[reply_name]


# -- at connect ---------------------------------------------------------------------------------


class TestConnect:
    def test_connect_deny_list(self) -> None:
        p = policy(connect_deny="192.0.2.0/24,2001:db8:bad::/48")
        for client in ("192.0.2.9", "2001:db8:bad::1", "::ffff:192.0.2.9"):
            found = p.check_connect(client)
            assert found is not None, client
            assert found.reply == p.settings.replies["CONNECT_DENIED"] == POLICY_DEFAULTS["CONNECT_DENIED"]
        assert p.check_connect("198.51.100.1") is None
        assert p.check_connect("2001:db8:600d::1") is None

    def test_connect_allow_list_refuses_everyone_outside_it(self) -> None:
        p = policy(connect_allow="10.0.0.0/8,2001:db8::/32")
        for client in ("10.2.3.4", "2001:db8::7", "::ffff:10.2.3.4"):
            assert p.check_connect(client) is None, client
        for client in ("192.0.2.1", "2001:db8f::1"):
            found = p.check_connect(client)
            assert found is not None and found.reply == p.settings.replies["CONNECT_DENIED"], client

    def test_deny_list_wins_inside_the_allow_list(self) -> None:
        p = policy(connect_allow="10.0.0.0/8", connect_deny="10.66.0.0/16")
        assert p.check_connect("10.1.1.1") is None
        assert p.check_connect("10.66.1.1") is not None

    def test_no_lists_refuse_nobody(self) -> None:
        p = policy()
        assert p.check_connect("192.0.2.1") is None and p.check_connect("2001:db8::1") is None


# -- at MAIL FROM -------------------------------------------------------------------------------


class TestSender:
    def test_deny_by_address(self) -> None:
        p = policy(sender_deny="Spam@Bad.example")
        for path in ("<spam@bad.example>", "<SPAM@BAD.EXAMPLE>"):
            found = sender(p, path)
            assert found is not None and found.reply == p.settings.replies["SENDER_DENIED"], path
        assert sender(p, "<ham@bad.example>") is None

    def test_deny_by_address_is_not_evaded_by_quoting_the_local_part(self) -> None:
        # "spam"@bad.example is the same mailbox as spam@bad.example (RFC 5321 §4.1.2).
        assert sender(policy(sender_deny="spam@bad.example"), '<"spam"@bad.example>') is not None

    def test_deny_by_domain(self) -> None:
        p = policy(sender_deny="bad.example")
        found = sender(p, "<anyone@BAD.example>")
        assert found is not None and found.reply == p.settings.replies["SENDER_DENIED"]
        assert sender(p, "<anyone@sub.bad.example>") is None  # a bare domain is exact
        assert sender(p, "<anyone@good.example>") is None

    def test_deny_by_wildcard(self) -> None:
        p = policy(sender_deny=".bad.example")
        for path in ("<x@mail.bad.example>", "<x@a.b.BAD.example>"):
            found = sender(p, path)
            assert found is not None and found.reply == p.settings.replies["SENDER_DENIED"], path
        assert sender(p, "<x@bad.example>") is None  # the apex is not a subdomain
        assert sender(p, "<x@notbad.example>") is None

    def test_null_sender_is_never_refused(self) -> None:
        p = policy(sender_deny=f"{LOCAL},.{LOCAL},bad.example,spam@bad.example")
        assert sender(p, "<>") is None
        assert sender(p, "<> SIZE=1000") is None

    def test_our_own_domain_is_not_refused_by_a_domain_entry(self) -> None:
        p = policy(local_domains=f"{LOCAL},.{LOCAL}", sender_deny=f"{LOCAL},.{LOCAL},boss@{LOCAL}")
        assert sender(p, f"<anyone@{LOCAL}>") is None
        assert sender(p, f"<anyone@mail.{LOCAL}>") is None
        found = sender(p, f"<boss@{LOCAL}>")  # listed by address: refused
        assert found is not None and found.reply == p.settings.replies["SENDER_DENIED"]

    def test_size_over_the_limit(self) -> None:
        p = policy(max_message_size="1000")
        found = sender(p, "<a@b.test> SIZE=1001")
        assert found is not None
        assert found.reply == p.settings.replies["MESSAGE_TOO_BIG"] == POLICY_DEFAULTS["MESSAGE_TOO_BIG"]
        assert (found.reply.code, found.reply.enhanced) == (552, "5.3.4")
        assert sender(p, "<a@b.test> SIZE=1000") is None
        assert sender(p, "<a@b.test>") is None

    def test_a_lower_backend_size_limit_applies(self) -> None:
        p = policy(max_message_size="1000")
        found = sender(p, "<a@b.test> SIZE=900", size_limit=800)
        assert found is not None and found.reply == p.settings.replies["MESSAGE_TOO_BIG"]


# -- at RCPT TO: rule 1, syntax -----------------------------------------------------------------


@pytest.mark.parametrize(
    "arg",
    [
        "TO:<no spaces@example.test>",
        "TO:user@example.test",
        "TO:<>",
        "TO:<@example.test>",
        "TO:<user@exa_mple.test>",
        "TO:<user..x@example.test>",
        "TO:<user@example.test",
        'TO:<"unterminated@example.test>',
        "TO:<user@example.test> BAD=",
    ],
    ids=["space", "no-brackets", "null", "no-local-part", "bad-domain", "double-dot", "unclosed",
         "unterminated-quote", "empty-parameter-value"],
)
@pytest.mark.parametrize("grant", ALL_GRANTS, ids=lambda grant: f"grant{grant}")
def test_rcpt_syntax_error_raises_parse_error(arg: str, grant: int) -> None:
    with pytest.raises(ParseError):
        policy().decide_rcpt(arg, grant)


# -- rule 2, encapsulation ----------------------------------------------------------------------

# Each form with the text after the last "@" local (where the form has one): the backend could
# decode them into a foreign destination.
ENCAPSULATED = {
    "percent": f"user%{FOREIGN}@{LOCAL}",
    "bang": f"{FOREIGN}!user@{LOCAL}",
    "source-route": f"@relay.test:user@{LOCAL}",
    "source-route-two-hops": f"@a.test,@b.test:user@{LOCAL}",
    "quoted-at": f'"user@{FOREIGN}"@{LOCAL}',
    "quoted-percent": f'"user%{FOREIGN}"@{LOCAL}',
    "quoted-bang": f'"{FOREIGN}!user"@{LOCAL}',
    "several-at": f"user@{FOREIGN}@{LOCAL}",
    "trailing-dot": f"user@{LOCAL}.",
    "trailing-at": f"user@{LOCAL}@",
    "foreign-ipv4-literal": "user@[192.0.2.99]",
    "foreign-ipv6-literal": "user@[IPv6:2001:db8::99]",
    "imcea-smtp": f"IMCEASMTP-user+40{FOREIGN.replace('.', '+2E')}@{LOCAL}",
    "imcea-ex": f"imceaex-_o=org_ou=site_cn=user@{LOCAL}",
}


@pytest.mark.parametrize("address", ENCAPSULATED.values(), ids=ENCAPSULATED.keys())
def test_encapsulated_form_is_a_relay_attempt_for_an_unauthorized_client(address: str) -> None:
    p = policy(local_domains=f"{LOCAL},[192.0.2.1]")
    grant = p.relay_grant("192.0.2.7", ListenerKind.SMTP)
    assert_refused(p, decide(p, address, grant), fc.RULE_ENCAPSULATED, "ENCAPSULATED")


@pytest.mark.parametrize("address", ENCAPSULATED.values(), ids=ENCAPSULATED.keys())
@pytest.mark.parametrize("who", ["authenticated", "allow-listed-ipv4", "allow-listed-ipv6", "relay-listener"])
def test_encapsulated_form_is_forwarded_for_a_client_that_may_relay(address: str, who: str) -> None:
    p = policy(relay_allow="10.0.0.0/8,2001:db8:1::/48")
    grant = {
        "authenticated": p.relay_grant("192.0.2.7", ListenerKind.SMTP, authenticated=True),
        "allow-listed-ipv4": p.relay_grant("10.1.2.3", ListenerKind.SMTP),
        "allow-listed-ipv6": p.relay_grant("2001:db8:1::5", ListenerKind.SMTP),
        "relay-listener": p.relay_grant("192.0.2.7", ListenerKind.RELAY),
    }[who]
    verdict = decide(p, address, grant)
    assert verdict.action == fc.ACTION_FORWARD, verdict
    assert p.refusal_for(verdict) is None


@pytest.mark.parametrize("address", ENCAPSULATED.values(), ids=ENCAPSULATED.keys())
def test_encapsulated_form_from_a_never_host_is_refused_as_relay_never(address: str) -> None:
    p = policy(relay_never="10.66.0.0/16")
    grant = p.relay_grant("10.66.1.1", ListenerKind.RELAY, authenticated=True)
    assert_refused(p, decide(p, address, grant), fc.RULE_RELAY_NEVER, "RELAY_NEVER")


def test_source_route_is_not_passed_to_the_backend() -> None:
    verdict = decide(policy(), f"@a.test,@b.test:user@{LOCAL}", fc.GRANT_AUTHENTICATED)
    assert (verdict.address, verdict.domain) == (f"user@{LOCAL}", LOCAL)


@pytest.mark.parametrize(
    ("listed", "address"),
    [("[192.0.2.1]", "user@[192.0.2.1]"), ("[IPv6:2001:db8::1]", "user@[IPv6:2001:DB8:0::1]")],
    ids=["ipv4", "ipv6"],
)
def test_an_ip_literal_of_ours_is_local(listed: str, address: str) -> None:
    p = policy(local_domains=f"{LOCAL},{listed}")
    for grant in (fc.GRANT_NONE, fc.GRANT_NEVER):
        assert_forwarded(decide(p, address, grant), fc.RULE_LOCAL)


# -- rule 3, the rewrite map --------------------------------------------------------------------


class TestRewrite:
    def test_verdict_carries_the_rewritten_address(self) -> None:
        p = policy(local_domains="compaq.com", rewrite="dec.com=compaq.com")
        verdict = decide(p, "Ken.Olsen@DEC.com")
        assert_forwarded(verdict, fc.RULE_LOCAL)
        assert (verdict.address, verdict.domain) == ("Ken.Olsen@compaq.com", "compaq.com")

    def test_the_rewritten_domains_directory_applies(self) -> None:
        p = policy(local_domains="compaq.com", rewrite="dec.com=compaq.com", recipients="ken@compaq.com")
        assert_forwarded(decide(p, "ken@dec.com"), fc.RULE_LOCAL_DIRECTORY)
        verdict = decide(p, "bob@dec.com")
        assert_refused(p, verdict, fc.RULE_UNKNOWN_USER, "UNKNOWN_USER")
        assert verdict.address == "bob@compaq.com"

    def test_a_local_domain_rewritten_to_a_foreign_one_is_a_relay(self) -> None:
        p = policy(local_domains="dec.com", rewrite="dec.com=compaq.com")
        verdict = decide(p, "ken@dec.com")
        assert_refused(p, verdict, fc.RULE_RELAY_DENIED, "RELAY_DENIED")
        assert verdict.domain == "compaq.com"
        assert_forwarded(decide(p, "ken@dec.com", fc.GRANT_AUTHENTICATED), fc.RULE_RELAY_AUTHENTICATED)

    def test_rewritten_to_a_relay_domain(self) -> None:
        p = policy(relay_domains="compaq.com", rewrite="dec.com=compaq.com")
        verdict = decide(p, "ken@dec.com")
        assert_forwarded(verdict, fc.RULE_RELAY_DOMAIN)
        assert verdict.address == "ken@compaq.com"

    def test_encapsulation_is_still_refused_before_the_rewrite(self) -> None:
        p = policy(local_domains="compaq.com", rewrite="dec.com=compaq.com")
        assert_refused(p, decide(p, f"ken%{FOREIGN}@dec.com"), fc.RULE_ENCAPSULATED, "ENCAPSULATED")


# -- rule 4, local domains and the recipient directory ------------------------------------------


@pytest.fixture(scope="module")
def directory_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("directory") / "recipients"
    lines = ["# staff of example.test", ""]
    lines += [f"user{n}@{LOCAL}   # desk {n}" if n % 1000 == 0 else f"user{n}@{LOCAL}" for n in range(25_000)]
    lines += ["", "# and one with a quoted-looking name", f"john.doe@{LOCAL}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class TestDirectory:
    def directory_policy(self, path: Path) -> Policy:
        return policy(local_domains=f"{LOCAL},open.test", recipients=f"@{path}")

    def test_the_file_is_read_whole(self, directory_file: Path) -> None:
        assert len(settings(recipients=f"@{directory_file}").recipients) == 25_001

    def test_listed_recipient_is_forwarded(self, directory_file: Path) -> None:
        p = self.directory_policy(directory_file)
        for address in (f"user0@{LOCAL}", f"user24999@{LOCAL}", f"User12345@{LOCAL.upper()}"):
            verdict = decide(p, address)
            assert_forwarded(verdict, fc.RULE_LOCAL_DIRECTORY)
            assert p.refusal_for(verdict) is None

    def test_unlisted_recipient_is_refused_at_rcpt(self, directory_file: Path) -> None:
        p = self.directory_policy(directory_file)
        for grant in (fc.GRANT_NONE, fc.GRANT_AUTHENTICATED):
            verdict = decide(p, f"user25000@{LOCAL}", grant)
            assert_refused(p, verdict, fc.RULE_UNKNOWN_USER, "UNKNOWN_USER")
        reply = refusal(p, decide(p, f"nobody@{LOCAL}")).reply
        assert reply == POLICY_DEFAULTS["UNKNOWN_USER"]
        assert (reply.code, reply.enhanced) == (550, "5.1.1")

    def test_local_domain_without_a_directory_is_forwarded(self, directory_file: Path) -> None:
        p = self.directory_policy(directory_file)
        assert_forwarded(decide(p, "anyone@open.test"), fc.RULE_LOCAL)

    def test_quoted_harmless_local_part_is_found_in_the_directory(self, directory_file: Path) -> None:
        p = self.directory_policy(directory_file)
        assert_forwarded(decide(p, f'"john.doe"@{LOCAL}'), fc.RULE_LOCAL_DIRECTORY)

    def test_trailing_at_from_an_authorized_client_still_meets_the_directory(self, directory_file: Path) -> None:
        p = self.directory_policy(directory_file)
        verdict = decide(p, f"nobody@{LOCAL}@", fc.GRANT_AUTHENTICATED)
        assert verdict.address == f"nobody@{LOCAL}"  # what the backend would receive
        assert_refused(p, verdict, fc.RULE_UNKNOWN_USER, "UNKNOWN_USER")


# -- rules 5 and 6: relay domains and foreign domains -------------------------------------------


class TestRelay:
    def test_relay_domain_is_accepted_from_anyone(self) -> None:
        p = policy(relay_domains="backup.test,.partner.test")
        for grant in (fc.GRANT_NONE, fc.GRANT_AUTHENTICATED, fc.GRANT_LISTENER):
            assert_forwarded(decide(p, "x@backup.test", grant), fc.RULE_RELAY_DOMAIN)
            assert_forwarded(decide(p, "x@mx.PARTNER.test", grant), fc.RULE_RELAY_DOMAIN)

    def test_foreign_domain_is_refused_without_a_grant(self) -> None:
        p = policy(relay_allow="10.0.0.0/8")
        grant = p.relay_grant("192.0.2.7", ListenerKind.SMTP)
        assert grant == fc.GRANT_NONE
        verdict = decide(p, f"x@{FOREIGN}", grant)
        assert_refused(p, verdict, fc.RULE_RELAY_DENIED, "RELAY_DENIED")
        reply = refusal(p, verdict).reply
        assert reply == POLICY_DEFAULTS["RELAY_DENIED"]
        assert (reply.code, reply.enhanced) == (554, "5.7.1")

    def test_foreign_domain_for_an_authenticated_client(self) -> None:
        p = policy()
        grant = p.relay_grant("192.0.2.7", ListenerKind.SMTP, authenticated=True)
        assert_forwarded(decide(p, f"x@{FOREIGN}", grant), fc.RULE_RELAY_AUTHENTICATED)

    @pytest.mark.parametrize("client", ["10.1.1.1", "10.255.255.255", "2001:db8::1", "2001:db8:ffff::9"])
    def test_foreign_domain_for_an_allow_listed_client(self, client: str) -> None:
        p = policy(relay_allow="10.0.0.0/8,2001:db8::/32")
        assert_forwarded(decide(p, f"x@{FOREIGN}", p.relay_grant(client, ListenerKind.SMTP)), fc.RULE_RELAY_ALLOW_LIST)

    @pytest.mark.parametrize("client", ["11.0.0.1", "9.255.255.255", "2001:db9::1", "::1"])
    def test_foreign_domain_for_a_client_just_outside_the_allow_list(self, client: str) -> None:
        p = policy(relay_allow="10.0.0.0/8,2001:db8::/32")
        verdict = decide(p, f"x@{FOREIGN}", p.relay_grant(client, ListenerKind.SMTP))
        assert_refused(p, verdict, fc.RULE_RELAY_DENIED, "RELAY_DENIED")

    def test_trailing_at_from_an_authorized_client_is_decided_on_its_real_domain(self) -> None:
        p = policy()
        verdict = decide(p, f"user@{FOREIGN}@", fc.GRANT_AUTHENTICATED)
        assert verdict.address == f"user@{FOREIGN}"  # what the backend would receive
        assert (verdict.domain, fc.RULE_NAMES[verdict.rule]) == (FOREIGN, "relay_authenticated")

    def test_foreign_domain_on_a_relay_listener(self) -> None:
        p = policy()
        grant = p.relay_grant("192.0.2.7", ListenerKind.RELAY)
        assert_forwarded(decide(p, f"x@{FOREIGN}", grant), fc.RULE_RELAY_LISTENER)


class TestNever:
    @pytest.mark.parametrize(("authenticated", "listener"), [(False, False), (True, False), (False, True),
                                                             (True, True)])
    @pytest.mark.parametrize("client", ["10.66.1.1", "2001:db8:66::1", "::ffff:10.66.1.1"])
    def test_never_overrides_allow_list_listener_and_authentication(
        self, client: str, authenticated: bool, listener: bool
    ) -> None:
        p = policy(relay_allow="10.0.0.0/8,2001:db8::/32", relay_never="10.66.0.0/16,2001:db8:66::/48")
        grant = p.relay_grant(client, listener, authenticated)
        assert grant == fc.GRANT_NEVER
        assert_refused(p, decide(p, f"x@{FOREIGN}", grant), fc.RULE_RELAY_NEVER, "RELAY_NEVER")

    def test_a_never_host_may_still_deliver_to_local_recipients(self) -> None:
        p = policy(relay_never="10.66.0.0/16", local_domains=f"{LOCAL},dir.test", recipients="ken@dir.test")
        grant = p.relay_grant("10.66.1.1", ListenerKind.SMTP)
        assert_forwarded(decide(p, f"user@{LOCAL}", grant), fc.RULE_LOCAL)
        assert_forwarded(decide(p, "ken@dir.test", grant), fc.RULE_LOCAL_DIRECTORY)
        assert_forwarded(decide(p, "postmaster", grant), fc.RULE_LOCAL)
        assert_refused(p, decide(p, "bob@dir.test", grant), fc.RULE_UNKNOWN_USER, "UNKNOWN_USER")
        assert p.check_connect("10.66.1.1") is None  # NEVER forbids relaying only


# -- the false rejects that would hurt users ----------------------------------------------------


class TestNoFalseRejects:
    @pytest.mark.parametrize(
        ("configured", "address"),
        [("example.test", "user@EXAMPLE.TEST"), ("Example.TEST", "user@example.test"),
         ("example.test", "User@Example.Test")],
        ids=["upper-case-rcpt", "upper-case-config", "mixed"],
    )
    def test_upper_case_local_domain(self, configured: str, address: str) -> None:
        assert_forwarded(decide(policy(local_domains=configured), address), fc.RULE_LOCAL)

    @pytest.mark.parametrize("address", ["u@mail.example.com", "u@a.b.EXAMPLE.com", "u@MAIL.example.com"])
    def test_subdomain_wildcard(self, address: str) -> None:
        assert_forwarded(decide(policy(local_domains=".example.com"), address), fc.RULE_LOCAL)

    def test_subdomain_wildcard_is_not_a_suffix_match(self) -> None:
        p = policy(local_domains=".example.com")
        assert_refused(p, decide(p, "u@badexample.com"), fc.RULE_RELAY_DENIED, "RELAY_DENIED")

    @pytest.mark.parametrize("client", ["2001:db8::1", "2001:DB8:0:0::1", "2001:db8:ffff:ffff::1"])
    def test_ipv6_client_in_the_allow_list(self, client: str) -> None:
        p = policy(relay_allow="2001:db8::/32")
        assert p.relay_grant(client, ListenerKind.SMTP) == fc.GRANT_ALLOW_LIST
        assert_forwarded(decide(p, f"x@{FOREIGN}", p.relay_grant(client, ListenerKind.SMTP)), fc.RULE_RELAY_ALLOW_LIST)

    @pytest.mark.parametrize("client", ["::ffff:10.1.2.3", "::FFFF:10.1.2.3"])
    def test_ipv4_mapped_client_matches_an_ipv4_prefix(self, client: str) -> None:
        p = policy(relay_allow="10.0.0.0/8")
        assert p.relay_grant(client, ListenerKind.SMTP) == fc.GRANT_ALLOW_LIST
        assert_forwarded(decide(p, f"x@{FOREIGN}", p.relay_grant(client, ListenerKind.SMTP)), fc.RULE_RELAY_ALLOW_LIST)

    def test_null_sender(self) -> None:
        p = policy(sender_deny=f"{LOCAL},.test,bad.example")
        assert sender(p, "<>") is None

    @pytest.mark.parametrize("local_part", ['"john.doe"', '"john doe"', '"john"'])
    def test_quoted_harmless_local_part(self, local_part: str) -> None:
        p = policy()
        verdict = decide(p, f"{local_part}@{LOCAL}")
        assert_forwarded(verdict, fc.RULE_LOCAL)
        assert verdict.address == f"{local_part}@{LOCAL}"

    @pytest.mark.parametrize(
        ("configured", "address"),
        [("xn--bcher-kva.example", "user@bücher.example"), ("bücher.example", "user@xn--bcher-kva.example"),
         ("BÜCHER.example", "user@XN--BCHER-KVA.example"), ("bücher.example", "user@bücher.example")],
        ids=["a-label-config-u-label-rcpt", "u-label-config-a-label-rcpt", "upper-case", "u-label-both"],
    )
    def test_idna_u_label_and_a_label_are_one_domain(self, configured: str, address: str) -> None:
        verdict = decide(policy(local_domains=configured), address)
        assert_forwarded(verdict, fc.RULE_LOCAL)
        assert verdict.domain == "xn--bcher-kva.example"

    @pytest.mark.parametrize(
        ("configured", "address"),
        [("straße.example", "user@xn--strae-oqa.example"), ("xn--strae-oqa.example", "user@straße.example")],
        ids=["u-label-config", "a-label-config"],
    )
    def test_idna_2008_deviation_character(self, configured: str, address: str) -> None:
        assert_forwarded(decide(policy(local_domains=configured), address), fc.RULE_LOCAL)

    @pytest.mark.parametrize("address", ["postmaster", "Postmaster", "POSTMASTER"])
    @pytest.mark.parametrize("grant", ALL_GRANTS, ids=lambda grant: f"grant{grant}")
    def test_postmaster_without_a_domain(self, address: str, grant: int) -> None:
        verdict = decide(policy(recipients=f"someone@{LOCAL}"), address, grant)
        assert_forwarded(verdict, fc.RULE_LOCAL)
        assert verdict.address == address

    def test_plus_tag_and_dots(self) -> None:
        assert_forwarded(decide(policy(), f"first.last+tag@{LOCAL}"), fc.RULE_LOCAL)


# -- the reply table ----------------------------------------------------------------------------


class TestReplies:
    def test_defaults(self) -> None:
        replies = settings().replies
        for rule in POLICY_RULES:
            expected = POLICY_DEFAULTS[rule] if rule in POLICY_DEFAULTS else POLICY_DEFAULTS[POLICY_INHERITS[rule]]
            assert replies[rule] == expected, rule

    def test_configured_relay_reply_is_used_and_inherited(self) -> None:
        p = policy(reply_relay_denied="550 5.7.1 No relaying here", relay_never="10.66.0.0/16")
        configured = Reply(550, "5.7.1", "No relaying here")
        assert refusal(p, decide(p, f"x@{FOREIGN}")).reply == configured
        assert refusal(p, decide(p, f"x%{FOREIGN}@{LOCAL}")).reply == configured
        assert refusal(p, decide(p, f"x@{FOREIGN}", p.relay_grant("10.66.1.1", ListenerKind.SMTP))).reply == configured

    def test_inheriting_replies_set_themselves_win(self) -> None:
        p = policy(
            reply_relay_denied="550 5.7.1 No relaying here",
            reply_encapsulated="553 5.7.1 No source routes or percent hacks",
            reply_relay_never="554 5.7.1 Never from you",
            relay_never="10.66.0.0/16",
        )
        assert refusal(p, decide(p, f"x@{FOREIGN}")).reply == Reply(550, "5.7.1", "No relaying here")
        assert refusal(p, decide(p, f"x%{FOREIGN}@{LOCAL}")).reply == Reply(
            553, "5.7.1", "No source routes or percent hacks")
        never = p.relay_grant("10.66.1.1", ListenerKind.SMTP)
        assert refusal(p, decide(p, f"x@{FOREIGN}", never)).reply == Reply(554, "5.7.1", "Never from you")

    def test_configured_unknown_user_reply(self) -> None:
        p = policy(recipients=f"ken@{LOCAL}", reply_unknown_user="550 5.1.1 No such mailbox here")
        assert refusal(p, decide(p, f"bob@{LOCAL}")).reply == Reply(550, "5.1.1", "No such mailbox here")

    def test_soft_mode_turns_policy_5xx_into_4xx(self) -> None:
        soft = settings(soft_reject="yes").replies
        hard = settings().replies
        for rule in POLICY_RULES:
            if hard[rule].code >= 500:
                assert soft[rule].code == hard[rule].code - 100, rule
                assert soft[rule].enhanced == "4" + hard[rule].enhanced[1:], rule
                assert soft[rule].text == hard[rule].text, rule
            else:
                assert soft[rule] == hard[rule], rule  # 4xx left alone
        assert all(400 <= reply.code < 500 and reply.enhanced.startswith("4.") for reply in soft.values())

    def test_soft_mode_reaches_every_refusal(self) -> None:
        p = policy(soft_reject="1", connect_deny="192.0.2.0/24", recipients=f"ken@{LOCAL}",
                   sender_deny="bad.example", max_message_size="10", relay_never="10.66.0.0/16")
        found = [
            p.check_connect("192.0.2.1"),
            sender(p, "<x@bad.example>"),
            sender(p, "<x@ok.example> SIZE=11"),
            p.refusal_for(decide(p, f"x@{FOREIGN}")),
            p.refusal_for(decide(p, f"x%{FOREIGN}@{LOCAL}")),
            p.refusal_for(decide(p, f"bob@{LOCAL}")),
            p.refusal_for(decide(p, f"x@{FOREIGN}", p.relay_grant("10.66.1.1", ListenerKind.SMTP))),
        ]
        for item in found:
            assert item is not None
            assert item.reply.code // 100 == 4 and item.reply.enhanced[0] == "4", item

    def test_soft_mode_softens_a_configured_reply_and_leaves_a_configured_4xx(self) -> None:
        replies = settings(soft_reject="true", reply_relay_denied="550 5.7.1 No relaying here",
                           reply_unknown_user="450 4.1.1 Try again later").replies
        assert replies["RELAY_DENIED"] == Reply(450, "4.7.1", "No relaying here")
        assert replies["ENCAPSULATED"] == replies["RELAY_NEVER"] == replies["RELAY_DENIED"]
        assert replies["UNKNOWN_USER"] == Reply(450, "4.1.1", "Try again later")


# -- reload -------------------------------------------------------------------------------------


class TestReload:
    def test_a_new_policy_does_not_change_a_live_one(self) -> None:
        old = policy(local_domains=LOCAL, relay_allow="10.0.0.0/8", reply_relay_denied="550 5.7.1 Old text")
        before = refusal(old, decide(old, f"u@{FOREIGN}")).reply
        new = policy(local_domains="other.test", relay_allow="192.0.2.0/24", reply_relay_denied="550 5.7.1 New")
        assert_forwarded(decide(old, f"u@{LOCAL}"), fc.RULE_LOCAL)
        assert_refused(old, decide(old, "u@other.test"), fc.RULE_RELAY_DENIED, "RELAY_DENIED")
        assert old.relay_grant("10.1.1.1", ListenerKind.SMTP) == fc.GRANT_ALLOW_LIST
        assert old.relay_grant("192.0.2.1", ListenerKind.SMTP) == fc.GRANT_NONE
        assert refusal(old, decide(old, f"u@{FOREIGN}")).reply == before
        assert_forwarded(decide(new, "u@other.test"), fc.RULE_LOCAL)
        assert new.relay_grant("192.0.2.1", ListenerKind.SMTP) == fc.GRANT_ALLOW_LIST

    def test_a_changed_list_file_reaches_only_the_new_policy(self, tmp_path: Path) -> None:
        listing = tmp_path / "recipients"
        listing.write_text(f"ken@{LOCAL}\n", encoding="utf-8")
        old = policy(recipients=f"@{listing}")
        listing.write_text(f"bob@{LOCAL}\n", encoding="utf-8")
        new = policy(recipients=f"@{listing}")
        assert_forwarded(decide(old, f"ken@{LOCAL}"), fc.RULE_LOCAL_DIRECTORY)
        assert_refused(old, decide(old, f"bob@{LOCAL}"), fc.RULE_UNKNOWN_USER, "UNKNOWN_USER")
        assert_forwarded(decide(new, f"bob@{LOCAL}"), fc.RULE_LOCAL_DIRECTORY)
        assert_refused(new, decide(new, f"ken@{LOCAL}"), fc.RULE_UNKNOWN_USER, "UNKNOWN_USER")

    def test_settings_are_frozen(self) -> None:
        live = settings()
        with pytest.raises(dataclasses.FrozenInstanceError):
            live.local_domains = ("other.test",)  # type: ignore[misc]
