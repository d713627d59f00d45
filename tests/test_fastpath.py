"""The fast-path API, run against both twins: the compiled module and the pure-Python one.

Both twins are tested whatever ``EDGEPROXY_NO_EXTENSIONS`` says (it only picks the one the proxy
uses); the compiled one is skipped only when it does not import and the switch is on. Without
the switch a missing extension fails here, so a broken build cannot pass on the fallback.
"""

from __future__ import annotations

import importlib
import os
import time
from types import ModuleType

import pytest

from edgeproxy import fastpath_common as fc
from edgeproxy.errors import ParseError
from edgeproxy.fastpath import parse_no_extensions

# The same test as edgeproxy.fastpath's, so "switched off" means the same thing here.
NO_EXTENSIONS = parse_no_extensions(os.environ.get("EDGEPROXY_NO_EXTENSIONS"))
TWIN_NAMES = ("_fastpath_py", "_fastpath")


def load_twin(name: str) -> ModuleType:
    """One twin; the compiled one must import unless EDGEPROXY_NO_EXTENSIONS is set."""
    try:
        return importlib.import_module(f"edgeproxy.{name}")
    except ImportError as error:
        if name == "_fastpath" and NO_EXTENSIONS:
            pytest.skip(f"the compiled twin is not built and EDGEPROXY_NO_EXTENSIONS is set ({error})")
        raise


@pytest.fixture(params=TWIN_NAMES, ids=["py", "c"])
def fp(request: pytest.FixtureRequest) -> ModuleType:
    return load_twin(request.param)


def reason(call, *args) -> str:
    with pytest.raises(ParseError) as error:
        call(*args)
    return error.value.reason


# ---------------------------------------------------------------------------------------------
# Command lines


class TestCommandTokenizer:
    def test_verb_is_upper_cased_and_argument_kept(self, fp) -> None:
        assert fp.parse_command(b"mail FROM:<a@b.test> SIZE=10\r\n", False, 512) == ("MAIL", "FROM:<a@b.test> SIZE=10")
        assert fp.parse_command(b"rCpT TO:<a@b.test>\r\n", False, 512) == ("RCPT", "TO:<a@b.test>")
        assert fp.parse_command(b"QUIT\r\n", False, 512) == ("QUIT", "")
        assert fp.parse_command(b"\r\n", False, 512) == ("", "")

    def test_blanks_around_the_argument(self, fp) -> None:
        assert fp.parse_command(b"NOOP   \r\n", False, 512) == ("NOOP", "")
        # Leading blanks of the argument stay (the path parser allows one after the colon).
        assert fp.parse_command(b"MAIL FROM: <a@b.test>  \r\n", False, 512) == ("MAIL", "FROM: <a@b.test>")
        assert fp.parse_command(b"HELO  x\r\n", False, 512) == ("HELO", " x")

    def test_length_limit_counts_the_crlf(self, fp) -> None:
        line = b"NOOP " + b"x" * 505 + b"\r\n"
        assert len(line) == 512
        assert fp.parse_command(line, False, 512)[0] == "NOOP"
        assert reason(fp.parse_command, line, False, 511) == fc.REASON_LINE_TOO_LONG

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            (b"NOOP" + b"x" * 600 + b"\r\n", fc.REASON_LINE_TOO_LONG),
            (b"NO\rOP\r\n", fc.REASON_BARE_CR),
            (b"NOOP\r\r\n", fc.REASON_BARE_CR),
            (b"NOOP\n", fc.REASON_BARE_LF),
            (b"NO\nOP\r\n", fc.REASON_BARE_LF),
            (b"NO\x00OP\r\n", fc.REASON_NUL),
            ("MAIL FROM:<jörg@b.test>\r\n".encode(), fc.REASON_EIGHT_BIT),
            (b"MAIL \xff\r\n", fc.REASON_EIGHT_BIT),  # 8-bit refused before its UTF-8 is looked at
            (b"NOOP", fc.REASON_SYNTAX),
            (b"NOOP\r", fc.REASON_SYNTAX),
            (b"", fc.REASON_SYNTAX),
            (b"\n", fc.REASON_BARE_LF),
            (b"NO\rOP\x00\n\xff\r\n", fc.REASON_BARE_CR),  # CR, then LF, then NUL, then 8-bit
            (b"NOOP\x00\n\r\n", fc.REASON_BARE_LF),
        ],
        ids=["too-long", "bare-cr", "cr-cr-lf", "bare-lf-end", "bare-lf-inside", "nul", "eight-bit", "eight-bit-bad",
             "no-line-end", "cr-only-end", "empty", "lf-only", "precedence-cr", "precedence-lf"],
    )
    def test_refusals(self, fp, line: bytes, expected: str) -> None:
        assert reason(fp.parse_command, line, False, 512) == expected

    def test_utf8_only_with_smtputf8_and_only_valid(self, fp) -> None:
        assert fp.parse_command("MAIL FROM:<jörg@b.test>\r\n".encode(), True, 512) == ("MAIL", "FROM:<jörg@b.test>")
        assert fp.parse_command("mäil x \r\n".encode(), True, 512) == ("MÄIL", "x")
        assert reason(fp.parse_command, b"MAIL \xff\xfe\r\n", True, 512) == fc.REASON_BAD_UTF8
        assert reason(fp.parse_command, b"MAIL\xc3 x\r\n", True, 512) == fc.REASON_BAD_UTF8  # cut by the space
        assert reason(fp.parse_command, b"MAIL \xed\xa0\x80\r\n", True, 512) == fc.REASON_BAD_UTF8  # a surrogate

    def test_bytearray_lines(self, fp) -> None:
        assert fp.parse_command(bytearray(b"data\r\n"), False, 512) == ("DATA", "")


# ---------------------------------------------------------------------------------------------
# Paths


class TestPathParser:
    def test_plain_paths_and_params(self, fp) -> None:
        path = fp.parse_mail_from("FROM:<Alice@Example.TEST> SIZE=1000 BODY=8BITMIME SMTPUTF8")
        assert path == fc.ParsedPath("Alice@example.test", "Alice", "example.test", 0,
                                     {"SIZE": "1000", "BODY": "8BITMIME", "SMTPUTF8": None})
        assert type(path) is fc.ParsedPath
        assert fp.parse_rcpt_to("TO:<bob@example.test>") == fc.ParsedPath(
            "bob@example.test", "bob", "example.test", 0, {})

    def test_verb_argument_prefix_is_case_insensitive_and_space_after_colon_allowed(self, fp) -> None:
        assert fp.parse_rcpt_to("to: <bob@example.test>").address == "bob@example.test"
        assert fp.parse_mail_from("from:  <bob@example.test>").address == "bob@example.test"
        assert reason(fp.parse_mail_from, "FROM <bob@example.test>") == fc.REASON_SYNTAX

    def test_case_folding(self, fp) -> None:
        # The domain is case-folded, the local part is kept as written (RFC 5321 §2.4).
        path = fp.parse_rcpt_to("TO:<John.Doe@EXAMPLE.Test.>")
        assert (path.address, path.local, path.domain) == ("John.Doe@example.test", "John.Doe", "example.test")
        assert fp.canonical_domain("MiXeD.Example") == "mixed.example"

    def test_null_path_only_for_mail(self, fp) -> None:
        assert fp.parse_mail_from("FROM:<>") == fc.ParsedPath("", "", "", 0, {})
        assert fp.parse_mail_from("FROM:<> BODY=7BIT").params == {"BODY": "7BIT"}
        assert reason(fp.parse_rcpt_to, "TO:<>") == fc.REASON_NULL_RECIPIENT

    def test_bare_postmaster(self, fp) -> None:
        assert fp.parse_rcpt_to("TO:<Postmaster>") == fc.ParsedPath("Postmaster", "Postmaster", "", 0, {})
        assert reason(fp.parse_rcpt_to, "TO:<someone>") == fc.REASON_SYNTAX
        assert reason(fp.parse_mail_from, "FROM:<postmaster>") == fc.REASON_SYNTAX  # only as a recipient

    @pytest.mark.parametrize(
        "arg",
        ["TO:bob@example.test", "TO:<bob@example.test", "TO:bob@example.test>", "TO:<.bob@example.test>",
         "TO:<bo..b@example.test>", "TO:<bob.@example.test>", "TO:<bo b@example.test>", "XX:<bob@example.test>",
         "TO:<bob@example.test>x", "TO:<@example.test>", "TO:", "", "TO:<bo(b@example.test>",
         'TO:<"unterminated@example.test>', 'TO:<"a"b@example.test>', 'TO:<"a">'],
    )
    def test_syntax_errors(self, fp, arg: str) -> None:
        assert reason(fp.parse_rcpt_to, arg) == fc.REASON_SYNTAX

    def test_esmtp_parameters(self, fp) -> None:
        path = fp.parse_mail_from("FROM:<a@b.test>  size=10   body=8BITMIME smtputf8 ")
        assert path.params == {"SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": None}  # keywords upper-cased
        assert fp.parse_rcpt_to("TO:<a@b.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b.test").params == {
            "NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;a@b.test"}

    @pytest.mark.parametrize(
        "arg",
        ["TO:<b@e.test> =x", "TO:<b@e.test> K=", "TO:<b@e.test> -K=1", "TO:<b@e.test> K=a=b", "TO:<b@e.test> K_1",
         "TO:<b@e.test> K=a\tb", "TO:<b@e.test> K=\x7f", "TO:<b@e.test> SIZE=1 =2"],
        ids=["no-keyword", "empty-value", "leading-dash", "equals-in-value", "bad-keyword", "tab-in-value",
             "del-in-value", "second-bad"],
    )
    def test_bad_parameters(self, fp, arg: str) -> None:
        assert reason(fp.parse_rcpt_to, arg) == fc.REASON_BAD_PARAMETER

    def test_quoted_harmless_local_part_has_no_flags(self, fp) -> None:
        path = fp.parse_rcpt_to('TO:<"john doe"@example.test>')
        assert path == fc.ParsedPath('"john doe"@example.test', '"john doe"', "example.test", 0, {})

    @pytest.mark.parametrize(
        ("mailbox", "flag"),
        [
            ("user%elsewhere.test@example.test", fc.ENC_PERCENT),
            ("elsewhere.test!user@example.test", fc.ENC_BANG),
            ("@a.test,@b.test:user@example.test", fc.ENC_SOURCE_ROUTE),
            ('"user@elsewhere.test"@example.test', fc.ENC_QUOTED),
            ('"user%elsewhere"@example.test', fc.ENC_QUOTED),
            ('"elsewhere!user"@example.test', fc.ENC_QUOTED),
            ('"user\\@elsewhere"@example.test', fc.ENC_QUOTED),
            ("user@elsewhere.test@example.test", fc.ENC_MULTIPLE_AT),
            ("user@example.test.", fc.ENC_TRAILING),
            ("user@", fc.ENC_TRAILING),
            ("user@elsewhere.test@", fc.ENC_TRAILING),
            ("user@[192.0.2.1]", fc.ENC_IP_LITERAL),
            ("user@[IPv6:2001:db8::1]", fc.ENC_IP_LITERAL),
            ("IMCEASMTP-user+40elsewhere+2Etest@example.test", fc.ENC_IMCEA),
            ("imceaex-_o=org_ou=x@example.test", fc.ENC_IMCEA),
        ],
        ids=["percent", "bang", "source-route", "quoted-at", "quoted-percent", "quoted-bang", "quoted-escaped-at",
             "multiple-at", "trailing-dot", "trailing-at-alone", "trailing-at", "ipv4-literal", "ipv6-literal",
             "imcea", "imcea-lower-case"],
    )
    def test_each_encapsulation_form_is_flagged(self, fp, mailbox: str, flag: int) -> None:
        assert fp.parse_rcpt_to(f"TO:<{mailbox}>").flags & flag
        assert fp.parse_mail_from(f"FROM:<{mailbox}>").flags & flag

    @pytest.mark.parametrize(
        "mailbox", ["user@example.test", "imcea@example.test", "IMCEASMTP@example.test", "user-name+tag@example.test",
                    "a.b.c@x-y.example.test"],
    )
    def test_harmless_forms_are_not_flagged(self, fp, mailbox: str) -> None:
        assert fp.parse_rcpt_to(f"TO:<{mailbox}>").flags == 0

    def test_encapsulated_forms_keep_the_real_domain(self, fp) -> None:
        assert fp.parse_rcpt_to("TO:<@a.test,@b.test:user@Example.test>").address == "user@example.test"
        path = fp.parse_rcpt_to("TO:<user@elsewhere.test@example.test@>")
        assert (path.local, path.domain, path.flags) == (
            "user@elsewhere.test", "example.test", fc.ENC_MULTIPLE_AT | fc.ENC_TRAILING)
        assert fp.parse_rcpt_to("TO:<u@[IPv6:2001:DB8:0::1]>").domain == "[ipv6:2001:db8::1]"

    def test_bad_domains(self, fp) -> None:
        for domain in ["-a.test", "a-.test", "a..test", "a_b.test", "[192.0.2.300]", "[IPv6:zz::1]", "[]", "a.test.."]:
            assert reason(fp.parse_rcpt_to, f"TO:<u@{domain}>") == fc.REASON_BAD_DOMAIN, domain
        assert reason(fp.parse_rcpt_to, "TO:<@bad_hop:u@example.test>") == fc.REASON_BAD_DOMAIN

    def test_idna_forms_are_equivalent(self, fp) -> None:
        assert fp.parse_rcpt_to("TO:<u@bücher.example>").domain == "xn--bcher-kva.example"
        assert fp.parse_rcpt_to("TO:<u@BÜCHER.example>").domain == "xn--bcher-kva.example"
        assert fp.parse_rcpt_to("TO:<u@XN--BCHER-KVA.example>").domain == "xn--bcher-kva.example"
        assert fp.canonical_domain("straße.example") == "xn--strae-oqa.example"  # IDNA 2008, not "ss"
        assert reason(fp.canonical_domain, "a\u200db.example") == fc.REASON_BAD_DOMAIN

    def test_length_limits(self, fp) -> None:
        assert fp.parse_rcpt_to(f"TO:<{'a' * 64}@example.test>").local == "a" * 64
        assert reason(fp.parse_rcpt_to, f"TO:<{'a' * 65}@example.test>") == fc.REASON_PATH_TOO_LONG
        assert reason(fp.parse_rcpt_to, f"TO:<{'ü' * 33}@example.test>") == fc.REASON_PATH_TOO_LONG  # octets
        assert reason(fp.parse_rcpt_to, f"TO:<a@{'b' * 64}.test>") == fc.REASON_BAD_DOMAIN  # a label over 63
        long_domain = ".".join(["d" * 60] * 5)
        assert reason(fp.parse_rcpt_to, f"TO:<a@{long_domain}>") == fc.REASON_PATH_TOO_LONG
        assert reason(fp.canonical_domain, long_domain) == fc.REASON_BAD_DOMAIN  # over 255


# ---------------------------------------------------------------------------------------------
# Domain and address sets


class TestDomainsAndAddresses:
    def test_domain_set_exact_and_suffix(self, fp) -> None:
        domains = fp.DomainSet(["Example.TEST.", " .sub.test ", "bücher.example"])
        assert "example.test" in domains
        assert "a.sub.test" in domains and "a.b.sub.test" in domains
        assert "sub.test" not in domains  # a wildcard matches subdomains, not the apex
        assert "xsub.test" not in domains
        assert "xn--bcher-kva.example" in domains
        assert "other.test" not in domains and 42 not in domains and None not in domains
        assert len(domains) == 3
        assert domains.entries() == ["example.test", "xn--bcher-kva.example", ".sub.test"]

    def test_domain_set_rejects_bad_entries(self, fp) -> None:
        with pytest.raises(ValueError, match=r"invalid domain 'no spaces\.test'"):
            fp.DomainSet(["no spaces.test"])
        with pytest.raises(ValueError, match=r"invalid domain '\.'"):
            fp.DomainSet(["."])

    def test_cidr_sets(self, fp) -> None:
        cidrs = fp.CidrSet(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::ffff:198.51.100.0/120"])
        assert len(cidrs) == 4
        assert "10.1.2.3" in cidrs and "192.0.2.7" in cidrs and "192.0.2.8" not in cidrs
        assert "2001:db8::5" in cidrs and "2001:DB8::5" in cidrs and "2001:db9::5" not in cidrs
        assert "::ffff:10.9.9.9" in cidrs and "::FFFF:10.9.9.9" in cidrs  # IPv4-mapped clients match IPv4
        assert "::ffff:11.9.9.9" not in cidrs
        assert "198.51.100.9" in cidrs  # an IPv4-mapped entry is an IPv4 entry
        assert "2001:db8::1%eth0" in cidrs  # the scope is not part of the address
        assert "fe80::1%eth0" not in cidrs
        assert None not in cidrs and 167772161 not in cidrs

    def test_cidr_set_names_the_bad_entry(self, fp) -> None:
        with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33'"):
            fp.CidrSet(["10.0.0.0/33"])
        with pytest.raises(ValueError, match=r"'not-an-address'"):
            fp.CidrSet(["not-an-address"])

    def test_cidr_host_bits_are_masked(self, fp) -> None:
        cidrs = fp.CidrSet(["10.1.2.3/8"])
        assert "10.200.0.1" in cidrs


# ---------------------------------------------------------------------------------------------
# The RCPT verdict


def test_rcpt_matcher_rules(fp) -> None:
    matcher = fp.RcptMatcher(fp.DomainSet(["example.test", "open.test", "[192.0.2.1]"]), fp.DomainSet(["backup.test"]),
                             {"old.test": "example.test"}, {"example.test": frozenset({"bob", "john.doe"})})
    decide = matcher.decide
    verdict = decide("TO:<Bob@example.test> NOTIFY=NEVER", fc.GRANT_NONE)
    assert verdict == fc.RcptVerdict(fc.ACTION_FORWARD, fc.RULE_LOCAL_DIRECTORY, "Bob@example.test", "example.test",
                                     {"NOTIFY": "NEVER"})
    assert type(verdict) is fc.RcptVerdict
    assert decide('TO:<"John.Doe"@example.test>', fc.GRANT_NONE).rule == fc.RULE_LOCAL_DIRECTORY  # unquoted key
    assert decide("TO:<eve@example.test>", fc.GRANT_NONE)[:2] == (fc.ACTION_REJECT, fc.RULE_UNKNOWN_USER)
    assert decide("TO:<bob@old.test>", fc.GRANT_NONE)[:4] == (
        fc.ACTION_FORWARD, fc.RULE_LOCAL_DIRECTORY, "bob@example.test", "example.test")
    assert decide("TO:<x@open.test>", fc.GRANT_NONE)[:2] == (fc.ACTION_FORWARD, fc.RULE_LOCAL)
    assert decide("TO:<x@backup.test>", fc.GRANT_NONE)[:2] == (fc.ACTION_FORWARD, fc.RULE_RELAY_DOMAIN)
    assert decide("TO:<postmaster>", fc.GRANT_NONE)[:3] == (fc.ACTION_FORWARD, fc.RULE_LOCAL, "postmaster")
    for grant, expected in [
        (fc.GRANT_NONE, (fc.ACTION_REJECT, fc.RULE_RELAY_DENIED)),
        (fc.GRANT_NEVER, (fc.ACTION_REJECT, fc.RULE_RELAY_NEVER)),
        (fc.GRANT_AUTHENTICATED, (fc.ACTION_FORWARD, fc.RULE_RELAY_AUTHENTICATED)),
        (fc.GRANT_ALLOW_LIST, (fc.ACTION_FORWARD, fc.RULE_RELAY_ALLOW_LIST)),
        (fc.GRANT_LISTENER, (fc.ACTION_FORWARD, fc.RULE_RELAY_LISTENER)),
    ]:
        assert decide("TO:<x@far.test>", grant)[:2] == expected, grant
    assert decide("TO:<x%far.test@open.test>", fc.GRANT_NONE)[:2] == (fc.ACTION_REJECT, fc.RULE_ENCAPSULATED)
    assert decide("TO:<x%far.test@open.test>", fc.GRANT_NEVER)[:2] == (fc.ACTION_REJECT, fc.RULE_RELAY_NEVER)
    assert decide("TO:<x%far.test@open.test>", fc.GRANT_AUTHENTICATED)[:2] == (fc.ACTION_FORWARD, fc.RULE_LOCAL)
    # A closed directory still applies to an authenticated sender's encapsulated address.
    assert decide("TO:<x%far.test@example.test>", fc.GRANT_AUTHENTICATED).rule == fc.RULE_UNKNOWN_USER
    # Our own address literal is no encapsulation; any other one is.
    assert decide("TO:<x@[192.0.2.1]>", fc.GRANT_NONE)[:2] == (fc.ACTION_FORWARD, fc.RULE_LOCAL)
    assert decide("TO:<x@[192.0.2.2]>", fc.GRANT_NONE)[:2] == (fc.ACTION_REJECT, fc.RULE_ENCAPSULATED)
    # "user@" has no domain: refused for all, a syntax error where encapsulation would be allowed.
    assert decide("TO:<x@>", fc.GRANT_NONE)[:2] == (fc.ACTION_REJECT, fc.RULE_ENCAPSULATED)
    assert reason(decide, "TO:<x@>", fc.GRANT_AUTHENTICATED) == fc.REASON_SYNTAX
    assert reason(decide, "TO:<>", fc.GRANT_NONE) == fc.REASON_NULL_RECIPIENT
    assert reason(decide, "FROM:<x@example.test>", fc.GRANT_NONE) == fc.REASON_SYNTAX


def test_rcpt_matcher_accepts_any_domain_container(fp) -> None:
    matcher = fp.RcptMatcher({"example.test"}, frozenset(), {}, {})
    assert matcher.decide("TO:<x@example.test>", fc.GRANT_NONE).rule == fc.RULE_LOCAL
    assert matcher.decide("TO:<x@far.test>", fc.GRANT_NONE).rule == fc.RULE_RELAY_DENIED


# ---------------------------------------------------------------------------------------------
# The DATA scanner


def scan(fp, chunks: list[bytes], max_line: int = 1000, max_size: int = 10**6) -> tuple[int, int, int]:
    """Feed ``chunks``; return where the body ended in the whole input (-1), the violation, the size."""
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

    def test_end_marker_in_one_chunk(self, fp) -> None:
        end = self.BODY.index(b"NEXT")
        assert scan(fp, [self.BODY]) == (end, fc.VIOLATION_NONE, end - 3)

    def test_end_marker_split_at_every_chunk_boundary(self, fp) -> None:
        end = self.BODY.index(b"NEXT")
        for cut in range(len(self.BODY) + 1):
            assert scan(fp, [self.BODY[:cut], self.BODY[cut:]]) == (end, fc.VIOLATION_NONE, end - 3), cut
        for first in range(len(self.BODY)):
            for second in range(first, len(self.BODY)):
                chunks = [self.BODY[:first], self.BODY[first:second], self.BODY[second:]]
                assert scan(fp, chunks) == (end, fc.VIOLATION_NONE, end - 3), (first, second)
        assert scan(fp, [bytes([octet]) for octet in self.BODY]) == (end, fc.VIOLATION_NONE, end - 3)

    def test_attributes(self, fp) -> None:
        scanner = fp.DataScanner(1000, 5000)
        assert (scanner.max_line_length, scanner.max_size, scanner.violation, scanner.size) == (
            1000, 5000, fc.VIOLATION_NONE, 0)
        assert scanner.feed(b"abc\r\n") == -1
        assert scanner.size == 5

    def test_dot_stuffed_lines_do_not_end_the_body(self, fp) -> None:
        for line in (b"..\r\n", b"..x\r\n", b". \r\n", b".x\r\n"):
            body = b"a\r\n" + line + b"b\r\n.\r\n"
            assert scan(fp, [body]) == (len(body), fc.VIOLATION_NONE, len(body) - 3), line

    def test_empty_body(self, fp) -> None:
        assert scan(fp, [b".\r\n"]) == (3, fc.VIOLATION_NONE, 0)
        assert scan(fp, [b".\r\nQUIT\r\n"]) == (3, fc.VIOLATION_NONE, 0)
        assert scan(fp, [b"", b".", b"", b"\r", b"\n"]) == (3, fc.VIOLATION_NONE, 0)
        assert scan(fp, [b"\r\n.\r\n"]) == (5, fc.VIOLATION_NONE, 2)

    @pytest.mark.parametrize(
        ("fake_end", "violation"),
        [(b"\n.\r\n", fc.VIOLATION_BARE_LF), (b"\r.\r\n", fc.VIOLATION_BARE_CR), (b"\n.\n", fc.VIOLATION_BARE_LF),
         (b"\r\n.\n", fc.VIOLATION_BARE_LF), (b"\r\n.\r", fc.VIOLATION_BARE_CR), (b"\r\n.\r\r\n", fc.VIOLATION_BARE_CR),
         (b"\r\n\n.\r\n", fc.VIOLATION_BARE_LF), (b"\r\n\r.\r\n", fc.VIOLATION_BARE_CR)],
        ids=["lf-dot-crlf", "cr-dot-crlf", "lf-dot-lf", "crlf-dot-lf", "crlf-dot-cr", "crlf-dot-cr-crlf",
             "crlf-lf-dot-crlf", "crlf-cr-dot-crlf"],
    )
    def test_smuggling_forms_never_end_the_body(self, fp, fake_end: bytes, violation: int) -> None:
        body = b"a" + fake_end + b"MAIL FROM:<x@y.test>\r\n.\r\n"
        assert scan(fp, [body]) == (len(body), violation, len(body) - 3)
        # Nor when they arrive one octet at a time.
        assert scan(fp, [bytes([octet]) for octet in body]) == (len(body), violation, len(body) - 3)

    @pytest.mark.parametrize(
        ("body", "violation"),
        [(b"a\rb\r\n.\r\n", fc.VIOLATION_BARE_CR), (b"a\nb\r\n.\r\n", fc.VIOLATION_BARE_LF),
         (b"\r\r\n.\r\n", fc.VIOLATION_BARE_CR), (b"\n\r\n.\r\n", fc.VIOLATION_BARE_LF),
         (b"a\rb\nc\r\n.\r\n", fc.VIOLATION_BARE_CR), (b"a\nb\rc\r\n.\r\n", fc.VIOLATION_BARE_LF)],
        ids=["bare-cr", "bare-lf", "cr-at-line-start", "lf-at-line-start", "first-is-kept-cr", "first-is-kept-lf"],
    )
    def test_bare_cr_and_lf_are_violations(self, fp, body: bytes, violation: int) -> None:
        assert scan(fp, [body]) == (len(body), violation, len(body) - 3)

    def test_line_too_long(self, fp) -> None:
        assert scan(fp, [b"x" * 999 + b"\r\n.\r\n"])[1] == fc.VIOLATION_LINE_TOO_LONG
        assert scan(fp, [b"x" * 998 + b"\r\n.\r\n"])[1] == fc.VIOLATION_NONE  # 1000 with the CRLF
        assert scan(fp, [b"x" * 500, b"x" * 499, b"\r\n.\r\n"])[1] == fc.VIOLATION_LINE_TOO_LONG
        assert scan(fp, [b"x" * 998 + b"\r\n" + b"y" * 998 + b"\r\n.\r\n"])[1] == fc.VIOLATION_NONE

    def test_too_big(self, fp) -> None:
        assert scan(fp, [b"abcd\r\n.\r\n"], max_size=5) == (9, fc.VIOLATION_TOO_BIG, 6)
        assert scan(fp, [b"abc\r\n.\r\n"], max_size=5) == (8, fc.VIOLATION_NONE, 5)
        assert scan(fp, [b"abc\r\n", b".\r\n"], max_size=5) == (8, fc.VIOLATION_NONE, 5)
        scanner = fp.DataScanner(1000, 5)
        assert scanner.feed(b"x" * 9) == -1  # known too big before the end arrives
        assert scanner.violation == fc.VIOLATION_TOO_BIG

    def test_bytearray_chunks(self, fp) -> None:
        assert scan(fp, [bytearray(b"a\r\n"), bytearray(b".\r\n")]) == (6, fc.VIOLATION_NONE, 3)

    # A NUL octet anywhere is a violation: a backend that strips NULs would read "\x00." or
    # ".\x00" between CRLFs as the end of data and the rest as commands (SMTP smuggling).
    NUL_BODIES = (
        (b"\x00abc\r\n.\r\n", fc.VIOLATION_NUL),  # at the start of the body (a line start)
        (b"a\r\n\x00bc\r\n.\r\n", fc.VIOLATION_NUL),  # at the start of a line
        (b"a\x00b\r\n.\r\n", fc.VIOLATION_NUL),  # mid-line
        (b"ab\x00\r\n.\r\n", fc.VIOLATION_NUL),  # just before the CRLF
        (b"a\r\n\x00\r\n.\r\n", fc.VIOLATION_NUL),  # a line of one NUL
        (b"\x00\x00\x00\r\n.\r\n", fc.VIOLATION_NUL),
        (b"a\x00b\rc\r\n.\r\n", fc.VIOLATION_NUL),  # NUL before a bare CR: the first seen is kept
        (b"a\rb\x00c\r\n.\r\n", fc.VIOLATION_BARE_CR),  # and after one
        (b"a\r\x00\r\n.\r\n", fc.VIOLATION_BARE_CR),  # the CR right before the NUL is bare
        (b"a\x00\rb\r\n.\r\n", fc.VIOLATION_NUL),
        (b"a\x00b\nc\r\n.\r\n", fc.VIOLATION_NUL),  # the same with a bare LF
        (b"a\nb\x00c\r\n.\r\n", fc.VIOLATION_BARE_LF),
        (b"a\n\x00\r\n.\r\n", fc.VIOLATION_BARE_LF),
        (b"x" * 10 + b"\x00" + b"x" * 990 + b"\r\n.\r\n", fc.VIOLATION_NUL),  # before the line is too long
        (b"x" * 999 + b"\x00\r\n.\r\n", fc.VIOLATION_LINE_TOO_LONG),  # after it
        # The octet that makes the line too long is itself a NUL: noted first, as a bare CR or LF.
        (b"x" * 998 + b"\x00\r\n.\r\n", fc.VIOLATION_NUL),
    )

    @pytest.mark.parametrize(("body", "violation"), NUL_BODIES)
    def test_nul_is_a_violation(self, fp, body: bytes, violation: int) -> None:
        assert scan(fp, [body]) == (len(body), violation, len(body) - 3)

    @pytest.mark.parametrize(
        ("fake_end", "violation"),
        [(b"\r\n\x00.\r\n", fc.VIOLATION_NUL), (b"\r\n.\x00\r\n", fc.VIOLATION_NUL),
         (b"\r\n\x00.\x00\r\n", fc.VIOLATION_NUL), (b"\r\n\x00\x00.\r\n", fc.VIOLATION_NUL),
         (b"\r\n.\r\x00\n", fc.VIOLATION_BARE_CR), (b"\r\x00\n.\r\n", fc.VIOLATION_BARE_CR),
         (b"\r\n\x00\n.\r\n", fc.VIOLATION_NUL)],
        ids=["nul-dot", "dot-nul", "nul-dot-nul", "nul-nul-dot", "dot-cr-nul-lf", "cr-nul-lf-dot", "nul-lf-dot"],
    )
    def test_nul_smuggling_forms_never_end_the_body(self, fp, fake_end: bytes, violation: int) -> None:
        body = b"a" + fake_end + b"MAIL FROM:<x@y.test>\r\n.\r\n"
        assert scan(fp, [body]) == (len(body), violation, len(body) - 3)
        assert scan(fp, [bytes([octet]) for octet in body]) == (len(body), violation, len(body) - 3)
        if fake_end.startswith(b"\r\n"):  # the same at the very start of the body, a line start
            body = fake_end[2:] + b"QUIT\r\n.\r\n"
            assert scan(fp, [body]) == (len(body), violation, len(body) - 3)

    def test_nul_split_across_chunks(self, fp) -> None:
        body = b"a\r\n\x00.\r\nb\x00\r\n.\r\nNEXT\r\n"
        end = body.index(b"NEXT")
        expected = (end, fc.VIOLATION_NUL, end - 3)
        assert scan(fp, [body]) == expected
        for cut in range(len(body) + 1):
            assert scan(fp, [body[:cut], body[cut:]]) == expected, cut
        for first in range(len(body)):
            for second in range(first, len(body)):
                assert scan(fp, [body[:first], body[first:second], body[second:]]) == expected, (first, second)
        assert scan(fp, [b"a\r\n", b"\x00", b".", b"\r", b"\n", b"b\r\n.\r\n"]) == (13, fc.VIOLATION_NUL, 10)
        assert scan(fp, [bytearray(body[:4]), bytearray(body[4:])]) == expected

    def test_nul_counts_in_the_line_and_the_size(self, fp) -> None:
        scanner = fp.DataScanner(1000, 10**6)
        assert scanner.feed(b"a\x00b") == -1
        assert (scanner.violation, scanner.size, scanner._line_length) == (fc.VIOLATION_NUL, 3, 3)
        assert scanner.feed(b"\x00\r\n") == -1
        assert (scanner.size, scanner._line_length) == (6, 0)
        assert scan(fp, [b"\x00" * 998 + b"\r\n.\r\n"]) == (1003, fc.VIOLATION_NUL, 1000)

    def test_nul_wins_over_too_big(self, fp) -> None:
        body = b"abcdef\x00\r\n.\r\n"
        assert scan(fp, [body], max_size=5) == (len(body), fc.VIOLATION_NUL, len(body) - 3)
        assert scan(fp, [body[:6], body[6:]], max_size=5) == (len(body), fc.VIOLATION_NUL, len(body) - 3)
        assert scan(fp, [b"\x00" + b"x" * 20 + b"\r\n.\r\n"], max_size=5)[1] == fc.VIOLATION_NUL
        scanner = fp.DataScanner(1000, 5)
        assert scanner.feed(b"x" * 9) == -1
        assert scanner.violation == fc.VIOLATION_TOO_BIG  # known too big before the NUL arrives
        assert scanner.feed(b"\x00\r\n.\r\n") == 6
        assert scanner.violation == fc.VIOLATION_NUL  # the reason does not depend on the cut
        # A NUL-free over-size body stays too big.
        assert scan(fp, [b"x" * 9, b"\r\n.\r\n"], max_size=5)[1] == fc.VIOLATION_TOO_BIG

    @pytest.mark.parametrize("max_size", [5, 50, 10**6])
    @pytest.mark.parametrize("max_line", [3, 6, 1000])
    def test_nul_results_do_not_depend_on_chunking(self, fp, max_line: int, max_size: int) -> None:
        bodies = [
            *(body for body, _ in self.NUL_BODIES),
            b"a\r\n\x00.\r\nMAIL FROM:<x@y.test>\r\n.\r\n", b"\x00.\r\n.\r\n", b".\x00\r\n.\r\n",
            b"\r\x00\n\x00\r\r\n.\r\n", b"\x00\n.\r\n", b"ab\x00", b"\x00" * 40,
        ]
        for body in bodies:
            whole = scan(fp, [body], max_line, max_size)
            assert scan(fp, [bytes([octet]) for octet in body], max_line, max_size) == whole, body
            assert scan(fp, [body[:len(body) // 2], body[len(body) // 2:]], max_line, max_size) == whole, body
            assert scan(fp, [bytearray(body)], max_line, max_size) == whole, body


@pytest.mark.parametrize(
    "body",
    [b"\r" * (4 << 20), b"\x00" * (4 << 20), b"\r" * (4 << 20) + b"\x00", b"\x00\r" * (2 << 20),
     b"\r\x00" * (2 << 20), b"\n" * (4 << 20), b"\r" * (4 << 20) + b"\n"],
    ids=["bare-crs", "nuls", "bare-crs-then-nul", "nul-cr", "cr-nul", "bare-lfs", "bare-crs-then-lf"],
)
def test_compiled_scanner_is_linear_on_runs_of_faults(body: bytes) -> None:
    """Each bare CR, LF or NUL must not make the scanner search the rest of the chunk again."""
    compiled = load_twin("_fastpath")
    scanner = compiled.DataScanner(1000, 10**9)
    start = time.perf_counter()
    assert scanner.feed(body) == -1
    assert time.perf_counter() - start < 0.5  # ~10-50 ms linear; quadratic would take minutes
    assert scanner.violation != fc.VIOLATION_NONE
    assert scanner.size == len(body)


class _CountingBytes(bytes):
    """Bytes that count the octets their find() looks at."""

    examined = 0

    def find(self, sub, start=0, end=None) -> int:  # type: ignore[override]
        found = super().find(sub, start, end)
        stop = len(self) if end is None else min(end, len(self))
        type(self).examined += (found + 1 if found >= 0 else stop) - start
        return found


@pytest.mark.parametrize(
    "body",
    [b"\r" * 20_000 + b"\x00", b"\x00" * 20_000 + b"\n", b"\x00\r" * 10_000, b"\r" * 20_000 + b"\n",
     b"\r\n" * 10_000 + b"\x00", b"\r" * 10_000 + b"\x00" * 10_000 + b"\n"],
    ids=["bare-crs-then-nul", "nuls-then-lf", "nul-cr", "bare-crs-then-lf", "lines-then-nul", "crs-nuls-lf"],
)
def test_twin_scanner_is_linear_on_runs_of_faults(body: bytes) -> None:
    """The same for the twin, counted: its searches look at each octet a bounded number of times."""
    twin = load_twin("_fastpath_py")
    _CountingBytes.examined = 0
    assert twin.DataScanner(1000, 10**9).feed(_CountingBytes(body)) == -1
    assert _CountingBytes.examined <= 3 * len(body)  # one search each for LF, NUL and CR
