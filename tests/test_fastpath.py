"""The fast-path API, run against both twins: the compiled module and the pure-Python one."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

from edgeproxy import fastpath_common as fc
from edgeproxy.errors import ParseError

NO_EXTENSIONS = os.environ.get("EDGEPROXY_NO_EXTENSIONS", "").lower() in ("1", "true", "yes")


def load_twins() -> list[ModuleType]:
    twins = [importlib.import_module("edgeproxy._fastpath_py")]
    try:
        twins.append(importlib.import_module("edgeproxy._fastpath"))
    except ImportError:
        if not NO_EXTENSIONS:
            raise  # a broken build must fail here, not pass on the fallback
    return twins


TWINS = load_twins()


@pytest.fixture(params=TWINS, ids=lambda module: module.__name__.rsplit(".", 1)[-1])
def fp(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


def reason(call, *args) -> str:
    with pytest.raises(ParseError) as error:
        call(*args)
    return error.value.reason


class TestCommandTokenizer:
    def test_verb_is_upper_cased_and_argument_kept(self, fp) -> None:
        assert fp.parse_command(b"mail FROM:<a@b.test> SIZE=10\r\n", False, 512) == ("MAIL", "FROM:<a@b.test> SIZE=10")
        assert fp.parse_command(b"QUIT\r\n", False, 512) == ("QUIT", "")
        assert fp.parse_command(b"NOOP   \r\n", False, 512) == ("NOOP", "")

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            (b"NOOP" + b"x" * 600 + b"\r\n", fc.REASON_LINE_TOO_LONG),
            (b"NO\rOP\r\n", fc.REASON_BARE_CR),
            (b"NOOP\n", fc.REASON_BARE_LF),
            (b"NO\nOP\r\n", fc.REASON_BARE_LF),
            (b"NO\x00OP\r\n", fc.REASON_NUL),
            ("MAIL FROM:<jörg@b.test>\r\n".encode(), fc.REASON_EIGHT_BIT),
            (b"NOOP", fc.REASON_SYNTAX),
        ],
        ids=["too-long", "bare-cr", "bare-lf-end", "bare-lf-inside", "nul", "eight-bit", "no-line-end"],
    )
    def test_refusals(self, fp, line: bytes, expected: str) -> None:
        assert reason(fp.parse_command, line, False, 512) == expected

    def test_utf8_only_with_smtputf8_and_only_valid(self, fp) -> None:
        assert fp.parse_command("MAIL FROM:<jörg@b.test>\r\n".encode(), True, 512)[1] == "FROM:<jörg@b.test>"
        assert reason(fp.parse_command, b"MAIL \xff\xfe\r\n", True, 512) == fc.REASON_BAD_UTF8


class TestPathParser:
    def test_plain_paths_and_params(self, fp) -> None:
        path = fp.parse_mail_from("FROM:<Alice@Example.TEST> SIZE=1000 BODY=8BITMIME SMTPUTF8")
        assert path == fc.ParsedPath("Alice@example.test", "Alice", "example.test", 0,
                                     {"SIZE": "1000", "BODY": "8BITMIME", "SMTPUTF8": None})
        assert fp.parse_rcpt_to("to: <bob@example.test>").address == "bob@example.test"

    def test_null_path_only_for_mail(self, fp) -> None:
        assert fp.parse_mail_from("FROM:<>").address == ""
        assert reason(fp.parse_rcpt_to, "TO:<>") == fc.REASON_NULL_RECIPIENT

    def test_bare_postmaster(self, fp) -> None:
        assert fp.parse_rcpt_to("TO:<Postmaster>") == fc.ParsedPath("Postmaster", "Postmaster", "", 0, {})
        assert reason(fp.parse_rcpt_to, "TO:<someone>") == fc.REASON_SYNTAX

    @pytest.mark.parametrize(
        "arg",
        ["TO:bob@example.test", "TO:<bob@example.test", "TO:<.bob@example.test>", "TO:<bo..b@example.test>",
         "TO:<bob.@example.test>", "TO:<bo b@example.test>", "XX:<bob@example.test>", "TO:<bob@example.test>x"],
    )
    def test_syntax_errors(self, fp, arg: str) -> None:
        assert reason(fp.parse_rcpt_to, arg) == fc.REASON_SYNTAX

    @pytest.mark.parametrize(
        "arg", ["TO:<b@e.test> =x", "TO:<b@e.test> K=", "TO:<b@e.test> -K=1", "TO:<b@e.test> K=a=b"]
    )
    def test_bad_parameters(self, fp, arg: str) -> None:
        assert reason(fp.parse_rcpt_to, arg) == fc.REASON_BAD_PARAMETER

    def test_quoted_harmless_local_part_has_no_flags(self, fp) -> None:
        path = fp.parse_rcpt_to('TO:<"john doe"@example.test>')
        assert (path.local, path.domain, path.flags) == ('"john doe"', "example.test", 0)

    @pytest.mark.parametrize(
        ("mailbox", "flag"),
        [
            ("user%elsewhere.test@example.test", fc.ENC_PERCENT),
            ("elsewhere.test!user@example.test", fc.ENC_BANG),
            ("@a.test,@b.test:user@example.test", fc.ENC_SOURCE_ROUTE),
            ('"user@elsewhere.test"@example.test', fc.ENC_QUOTED),
            ('"user%elsewhere"@example.test', fc.ENC_QUOTED),
            ('"elsewhere!user"@example.test', fc.ENC_QUOTED),
            ("user@elsewhere.test@example.test", fc.ENC_MULTIPLE_AT),
            ("user@example.test.", fc.ENC_TRAILING),
            ("user@", fc.ENC_TRAILING),
            ("user@[192.0.2.1]", fc.ENC_IP_LITERAL),
            ("user@[IPv6:2001:db8::1]", fc.ENC_IP_LITERAL),
            ("IMCEASMTP-user+40elsewhere+2Etest@example.test", fc.ENC_IMCEA),
        ],
        ids=["percent", "bang", "source-route", "quoted-at", "quoted-percent", "quoted-bang", "multiple-at",
             "trailing-dot", "trailing-at", "ipv4-literal", "ipv6-literal", "imcea"],
    )
    def test_each_encapsulation_form_is_flagged(self, fp, mailbox: str, flag: int) -> None:
        assert fp.parse_rcpt_to(f"TO:<{mailbox}>").flags & flag

    def test_source_route_is_dropped_from_the_forwarded_address(self, fp) -> None:
        assert fp.parse_rcpt_to("TO:<@a.test,@b.test:user@Example.test>").address == "user@example.test"

    def test_idna_forms_are_equivalent(self, fp) -> None:
        assert fp.parse_rcpt_to("TO:<u@bücher.example>").domain == "xn--bcher-kva.example"
        assert fp.parse_rcpt_to("TO:<u@XN--BCHER-KVA.example>").domain == "xn--bcher-kva.example"

    def test_length_limits(self, fp) -> None:
        assert reason(fp.parse_rcpt_to, f"TO:<{'a' * 65}@example.test>") == fc.REASON_PATH_TOO_LONG
        assert reason(fp.parse_rcpt_to, f"TO:<a@{'b' * 64}.test>") == fc.REASON_BAD_DOMAIN
        long_domain = ".".join(["d" * 60] * 5)
        assert reason(fp.parse_rcpt_to, f"TO:<a@{long_domain}>") == fc.REASON_PATH_TOO_LONG


class TestDomainsAndAddresses:
    def test_domain_set_exact_and_suffix(self, fp) -> None:
        domains = fp.DomainSet(["Example.TEST.", ".sub.test", "bücher.example"])
        assert "example.test" in domains
        assert "a.sub.test" in domains and "a.b.sub.test" in domains
        assert "sub.test" not in domains  # a wildcard matches subdomains, not the apex
        assert "xn--bcher-kva.example" in domains
        assert "other.test" not in domains and 42 not in domains
        assert len(domains) == 3

    def test_domain_set_rejects_bad_entries(self, fp) -> None:
        with pytest.raises(ValueError, match=r"invalid domain 'no spaces\.test'"):
            fp.DomainSet(["no spaces.test"])

    def test_cidr_sets(self, fp) -> None:
        cidrs = fp.CidrSet(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::ffff:198.51.100.0/120"])
        assert "10.1.2.3" in cidrs and "192.0.2.7" in cidrs and "192.0.2.8" not in cidrs
        assert "2001:db8::5" in cidrs and "2001:db9::5" not in cidrs
        assert "::ffff:10.9.9.9" in cidrs  # IPv4-mapped clients match IPv4 entries
        assert "198.51.100.9" in cidrs
        assert "fe80::1%eth0" not in cidrs

    def test_cidr_set_names_the_bad_entry(self, fp) -> None:
        with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33'"):
            fp.CidrSet(["10.0.0.0/33"])


def scan(fp, chunks: list[bytes], max_line: int = 1000, max_size: int = 10**6) -> tuple[int, int, int]:
    scanner = fp.DataScanner(max_line, max_size)
    offset = 0
    for chunk in chunks:
        end = scanner.feed(chunk)
        if end >= 0:
            return offset + end, scanner.violation, scanner.size
        offset += len(chunk)
    return -1, scanner.violation, scanner.size


class TestDataScanner:
    BODY = b"Subject: x\r\n\r\nline\r\n..stuffed\r\n.\r\nNEXT COMMAND\r\n"

    def test_end_marker_at_every_chunk_boundary(self, fp) -> None:
        end = self.BODY.index(b"NEXT")
        for cut in range(len(self.BODY)):
            assert scan(fp, [self.BODY[:cut], self.BODY[cut:]]) == (end, fc.VIOLATION_NONE, end - 3)
        assert scan(fp, [bytes([b]) for b in self.BODY]) == (end, fc.VIOLATION_NONE, end - 3)

    def test_empty_body(self, fp) -> None:
        assert scan(fp, [b".\r\n"]) == (3, fc.VIOLATION_NONE, 0)

    @pytest.mark.parametrize(
        ("fake_end", "violation"),
        [(b"\n.\r\n", fc.VIOLATION_BARE_LF), (b"\r.\r\n", fc.VIOLATION_BARE_CR), (b"\n.\n", fc.VIOLATION_BARE_LF),
         (b"\r\n.\n", fc.VIOLATION_BARE_LF), (b"\r\n.\r", fc.VIOLATION_BARE_CR)],
        ids=["lf-dot-crlf", "cr-dot-crlf", "lf-dot-lf", "crlf-dot-lf", "crlf-dot-cr"],
    )
    def test_smuggling_forms_never_end_the_body(self, fp, fake_end: bytes, violation: int) -> None:
        body = b"a" + fake_end + b"MAIL FROM:<x@y.test>\r\n.\r\n"
        assert scan(fp, [body]) == (len(body), violation, len(body) - 3)

    def test_line_too_long_and_too_big(self, fp) -> None:
        assert scan(fp, [b"x" * 999 + b"\r\n.\r\n"])[1] == fc.VIOLATION_LINE_TOO_LONG
        assert scan(fp, [b"x" * 998 + b"\r\n.\r\n"])[1] == fc.VIOLATION_NONE
        assert scan(fp, [b"abcd\r\n.\r\n"], max_size=5)[1] == fc.VIOLATION_TOO_BIG
        assert scan(fp, [b"abc\r\n.\r\n"], max_size=5)[1] == fc.VIOLATION_NONE


def test_rcpt_matcher_rules(fp) -> None:
    matcher = fp.RcptMatcher(fp.DomainSet(["example.test", "open.test"]), fp.DomainSet(["backup.test"]),
                             {"old.test": "example.test"}, {"example.test": frozenset({"bob"})})
    decide = matcher.decide
    assert decide("TO:<Bob@example.test>", fc.GRANT_NONE)[:2] == (fc.ACTION_FORWARD, fc.RULE_LOCAL_DIRECTORY)
    assert decide("TO:<eve@example.test>", fc.GRANT_NONE)[:2] == (fc.ACTION_REJECT, fc.RULE_UNKNOWN_USER)
    assert decide("TO:<bob@old.test>", fc.GRANT_NONE).address == "bob@example.test"
    assert decide("TO:<x@backup.test>", fc.GRANT_NONE).rule == fc.RULE_RELAY_DOMAIN
    assert decide("TO:<x@far.test>", fc.GRANT_NONE).rule == fc.RULE_RELAY_DENIED
    assert decide("TO:<x@far.test>", fc.GRANT_NEVER).rule == fc.RULE_RELAY_NEVER
    assert decide("TO:<x@far.test>", fc.GRANT_ALLOW_LIST).rule == fc.RULE_RELAY_ALLOW_LIST
    assert decide("TO:<x%far.test@open.test>", fc.GRANT_NONE).rule == fc.RULE_ENCAPSULATED
    assert decide("TO:<x%far.test@open.test>", fc.GRANT_AUTHENTICATED)[:2] == (fc.ACTION_FORWARD, fc.RULE_LOCAL)
    # A closed directory still applies to an authenticated sender's encapsulated address.
    assert decide("TO:<x%far.test@example.test>", fc.GRANT_AUTHENTICATED).rule == fc.RULE_UNKNOWN_USER
