"""Both fast-path twins fed the same generated input: identical results, identical exceptions."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy import _fastpath_py as py
from edgeproxy import fastpath_common as fc
from tests.test_fastpath import TWINS

if len(TWINS) < 2:
    pytest.skip("the compiled twin is not built (EDGEPROXY_NO_EXTENSIONS)", allow_module_level=True)
c = TWINS[1]
EXAMPLES = settings(max_examples=400, deadline=None)


def outcome(call: Callable[[], object]) -> object:
    """A result, or the exception as comparable values."""
    try:
        return ("ok", call())
    except fc.ParseError as error:
        return ("ParseError", error.reason)
    except (ValueError, TypeError) as error:
        return (type(error).__name__, str(error))


def same(function_name: str, *args: object) -> None:
    expected = outcome(lambda: getattr(py, function_name)(*args))
    assert outcome(lambda: getattr(c, function_name)(*args)) == expected, args


# -- generated SMTP-ish text ------------------------------------------------------------------

LOCAL_PIECES = ["user", "John.Doe", "a", "%", "!", "@", ".", "..", '"', "\\", " ", "+tag", "IMCEASMTP-", "ü", "-",
                "(", ")", ",", ":", "<", "\x01"]
DOMAIN_PIECES = ["example", ".", "test", "-", "EXAMPLE", "xn--bcher-kva", "bücher", "[", "]", "192.0.2.1",
                 "IPv6:", "2001:db8::1", "a" * 63, "b" * 64, "_", "@", ""]
PARAM_PIECES = ["", " SIZE=1000", " BODY=8BITMIME", " SMTPUTF8", " NOTIFY=SUCCESS,FAILURE", " =x", " K=",
                " -A=1", " A=b=c", "  X", " ORCPT=rfc822;a@b"]
local_parts = st.lists(st.sampled_from(LOCAL_PIECES), max_size=6).map("".join)
domains = st.lists(st.sampled_from(DOMAIN_PIECES), max_size=6).map("".join)
routes = st.sampled_from(["", "@a.test:", "@a.test,@b.test:", "@:", "@bad domain:"])
paths = st.builds(
    lambda prefix, space, route, local, at, domain, close, params: (
        f"{prefix}{space}<{route}{local}{at}{domain}{close}{params}"
    ),
    st.sampled_from(["TO:", "to:", "FROM:", "From:", "TO", "X:"]),
    st.sampled_from(["", " ", "  "]),
    routes,
    local_parts,
    st.sampled_from(["@", "", "@@"]),
    domains,
    st.sampled_from([">", "", ">>", "> "]),
    st.sampled_from(PARAM_PIECES),
)
any_text = st.text(max_size=60)


@EXAMPLES
@given(st.one_of(paths, any_text))
def test_path_parsers_agree(arg: str) -> None:
    same("parse_rcpt_to", arg)
    same("parse_mail_from", arg)


@EXAMPLES
@given(st.one_of(domains, any_text))
def test_canonical_domain_agrees(text: str) -> None:
    same("canonical_domain", text)


command_lines = st.one_of(
    st.binary(max_size=80),
    st.builds(
        lambda verb, arg, end: verb + arg + end,
        st.sampled_from([b"MAIL", b"rcpt", b"DATA", b"EHLO", b"", b"NO\x00OP", b"QUIT"]),
        st.one_of(st.just(b""), st.binary(max_size=40), paths.map(lambda p: (" " + p).encode("utf-8"))),
        st.sampled_from([b"\r\n", b"\n", b"\r", b"", b"\r\r\n"]),
    ),
)


@EXAMPLES
@given(command_lines, st.booleans(), st.sampled_from([10, 64, 512]))
def test_command_tokenizers_agree(line: bytes, smtputf8: bool, max_length: int) -> None:
    same("parse_command", line, smtputf8, max_length)


@EXAMPLES
@given(st.lists(st.one_of(domains, any_text, st.just(".sub.test")), max_size=5), st.one_of(domains, any_text))
def test_domain_sets_agree(entries: list[str], probe: str) -> None:
    expected = outcome(lambda: py.DomainSet(entries).entries())
    assert outcome(lambda: c.DomainSet(entries).entries()) == expected
    if expected[0] == "ok":
        canonical = outcome(lambda: py.canonical_domain(probe))
        candidates = [probe] + ([canonical[1]] if canonical[0] == "ok" else [])
        for candidate in candidates:
            assert (candidate in c.DomainSet(entries)) == (candidate in py.DomainSet(entries))


ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
prefixes = st.one_of(
    st.builds(lambda a, n: f"{a}/{n}", ipv4, st.integers(0, 33)),
    st.builds(lambda a, n: f"{a}/{n}", ipv6, st.integers(0, 129)),
    ipv4,
    st.just("::ffff:10.0.0.0/104"),
    any_text,
)
clients = st.one_of(ipv4, ipv6, ipv4.map(lambda a: "::ffff:" + a), st.just("fe80::1%eth0"))


@EXAMPLES
@given(st.lists(prefixes, max_size=6), st.lists(clients, min_size=1, max_size=5))
def test_cidr_sets_agree(entries: list[str], probes: list[str]) -> None:
    expected = outcome(lambda: len(py.CidrSet(entries)))
    assert outcome(lambda: len(c.CidrSet(entries))) == expected
    if expected[0] == "ok":
        python_set, compiled_set = py.CidrSet(entries), c.CidrSet(entries)
        for probe in probes + [entry.split("/")[0] for entry in entries]:
            assert (probe in compiled_set) == (probe in python_set), probe


MATCHERS = [
    (
        twin.RcptMatcher(
            twin.DomainSet(["example.test", ".sub.test", "[192.0.2.1]", "xn--bcher-kva.example"]),
            twin.DomainSet(["backup.test"]),
            {"old.test": "example.test", "gone.test": "far.test"},
            {"example.test": frozenset({"user", "john.doe"})},
        )
    )
    for twin in (py, c)
]


@EXAMPLES
@given(paths, st.sampled_from([fc.GRANT_NONE, fc.GRANT_AUTHENTICATED, fc.GRANT_ALLOW_LIST, fc.GRANT_LISTENER,
                               fc.GRANT_NEVER]))
def test_rcpt_verdicts_agree(arg: str, grant: int) -> None:
    expected = outcome(lambda: MATCHERS[0].decide(arg, grant))
    assert outcome(lambda: MATCHERS[1].decide(arg, grant)) == expected, arg


body_pieces = st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"xyz" * 5, b"\r\n.\r\n", b"\n.\r\n", b"\x00"])
bodies = st.lists(body_pieces, max_size=30).map(b"".join)


@EXAMPLES
@given(
    bodies,
    st.lists(st.integers(0, 200), max_size=5),
    st.sampled_from([6, 20, 1000]),
    st.sampled_from([5, 50, 10**6]),
)
def test_data_scanners_agree(body: bytes, cuts: list[int], max_line: int, max_size: int) -> None:
    chunks, previous = [], 0
    for cut in [*sorted(min(cut, len(body)) for cut in cuts), len(body)]:
        chunks.append(body[previous:cut])
        previous = cut
    scanners = [py.DataScanner(max_line, max_size), c.DataScanner(max_line, max_size)]
    for chunk in chunks:
        ends = [scanner.feed(chunk) for scanner in scanners]
        assert ends[0] == ends[1]
        assert (scanners[0].violation, scanners[0].size) == (scanners[1].violation, scanners[1].size)
        if ends[0] >= 0:
            break
