"""Both fast-path twins fed the same generated input: identical results, identical exceptions.

Strategies mix what a client really sends (SMTP verbs, valid paths and parameters) with every
encapsulation character, quoting, IDNA, address literals and raw text, so both the compiled
common path and its hand-offs to the twin's code are exercised.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeproxy import _fastpath_py as py
from edgeproxy import fastpath_common as fc
from tests.test_fastpath import load_twin

EXAMPLES = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def c() -> ModuleType:
    return load_twin("_fastpath")  # fails without the extension, unless EDGEPROXY_NO_EXTENSIONS


def outcome(call: Callable[[], object]) -> object:
    """A result, or the exception as comparable values (type, reason or message)."""
    try:
        return ("ok", call())
    except fc.ParseError as error:
        return ("ParseError", error.reason)
    except Exception as error:  # any other escape must at least be the same one
        return (type(error).__name__, str(error))


def same(c: ModuleType, function_name: str, *args: object) -> None:
    expected = outcome(lambda: getattr(py, function_name)(*args))
    actual = outcome(lambda: getattr(c, function_name)(*args))
    assert actual == expected, args
    if expected[0] == "ok":
        assert type(actual[1]) is type(expected[1])


# -- generated SMTP-ish text ------------------------------------------------------------------

LOCAL_PIECES = ["user", "John.Doe", "a", "Z", "%", "!", "@", ".", "..", '"', "\\", '\\"', " ", "+tag", "IMCEASMTP-",
                "imceaex-", "IMCEA", "ü", "-", "(", ")", ",", ":", "<", ">", "[", "\x01", "\x7f", "=", "x" * 30, "ı"]
DOMAIN_PIECES = ["example", ".", "test", "-", "EXAMPLE", "xn--bcher-kva", "XN--BCHER-KVA", "bücher", "straße", "[",
                 "]", "192.0.2.1", "192.0.2.300", "IPv6:", "ipv6:", "2001:db8::1", "::ffff:1.2.3.4", "a" * 63,
                 "b" * 64, "_", "@", "", "。", "\u200d", "0", "%"]
PARAM_PIECES = ["", " SIZE=1000", " size=1000", " BODY=8BITMIME", " SMTPUTF8", " NOTIFY=SUCCESS,FAILURE", " =x", " K=",
                " -A=1", " A=b=c", "  X", " ORCPT=rfc822;a@b", " K=ü", " K=a\tb", " K_1", " A-1=x ", " K=\x7f", " "]
raw_locals = st.lists(st.sampled_from(LOCAL_PIECES), max_size=6).map("".join)
raw_domains = st.lists(st.sampled_from(DOMAIN_PIECES), max_size=6).map("".join)
# Mostly well-formed pieces, so that most generated paths get past the syntax checks and their
# flags, addresses and parameters are compared too, not only the first error.
atoms = st.sampled_from(["user", "John", "doe", "a", "Z9", "+tag", "o'neil", "x" * 30, "IMCEASMTP-x", "imcea", "ü"])
dot_strings = st.lists(atoms, min_size=1, max_size=3).map(".".join)
encapsulated_locals = st.builds(
    lambda a, sep, b: a + sep + b, dot_strings, st.sampled_from(["%", "!", "@", "@@", ".", "..", "", '"', "@."]),
    st.one_of(dot_strings, st.just("")),
)
quoted_locals = st.text(alphabet=st.sampled_from(list('ab @%!.\\"\x01ü')), max_size=8).map(lambda t: f'"{t}"')
local_parts = st.one_of(dot_strings, encapsulated_locals, quoted_locals, raw_locals)
labels = st.sampled_from(["example", "test", "EXAMPLE", "xn--bcher-kva", "bücher", "a" * 63, "sub", "b-c", "9"])
dotted_domains = st.builds(lambda ls, dot: ".".join(ls) + dot, st.lists(labels, min_size=1, max_size=4),
                           st.sampled_from(["", "", "", "."]))
literals = st.sampled_from(["[192.0.2.1]", "[IPv6:2001:db8::1]", "[ipv6:2001:DB8:0::1]", "[ipv6:::ffff:1.2.3.4]",
                            "[192.0.2.300]", "[1.2.3]", "[IPv6:fe80::1%eth0]", "[192.0.2.1]."])
domains = st.one_of(dotted_domains, literals, raw_domains)
routes = st.sampled_from(["", "", "", "@a.test:", "@a.test,@b.test:", "@:", "@bad domain:", "@a.test", "@[1.2.3.4]:"])
params = st.lists(st.sampled_from(PARAM_PIECES), max_size=3).map("".join)
paths = st.builds(
    lambda prefix, space, route, local, at, domain, close, params: (
        f"{prefix}{space}<{route}{local}{at}{domain}{close}{params}"
    ),
    st.sampled_from(["TO:", "TO:", "to:", "To:", "FROM:", "from:", "TO", "X:", "ıO:", "TO:<"]),
    st.sampled_from(["", "", " ", "  "]),
    routes,
    local_parts,
    st.sampled_from(["@", "@", "@", "", "@@", "@a@"]),
    domains,
    st.sampled_from([">", ">", ">", "", ">>", "> ", "@>", ".>"]),
    params,
)
# Recipients in and around the matchers' configuration below, as real clients send them.
CONFIGURED = ["example.test", "EXAMPLE.test.", "x.sub.test", "sub.test", "old.test", "gone.test", "a.sub.test",
              "backup.test", "x.relay.test", "far.test", "[192.0.2.1]", "[IPv6:2001:db8::1]", "[192.0.2.2]",
              "bücher.example", "xn--bcher-kva.example"]
recipients = st.builds(
    lambda local, domain, params: f"TO:<{local}@{domain}>{params}",
    st.one_of(dot_strings, encapsulated_locals, quoted_locals, st.sampled_from(["User", '"user"', '"John.Doe"'])),
    st.sampled_from(CONFIGURED),
    params,
)
any_text = st.text(max_size=60)
path_args = st.one_of(paths, any_text, paths.map(lambda p: p.replace("<", "", 1)))


@EXAMPLES
@given(path_args)
def test_path_parsers_agree(c, arg: str) -> None:
    same(c, "parse_rcpt_to", arg)
    same(c, "parse_mail_from", arg)
    same(c, "parse_mail_from", "FROM:" + arg[3:])


@EXAMPLES
@given(st.one_of(domains, any_text))
def test_canonical_domain_agrees(c, text: str) -> None:
    same(c, "canonical_domain", text)


VERBS = [b"MAIL", b"mail", b"RCPT", b"rcpt", b"DATA", b"EHLO", b"HELO", b"BDAT", b"QUIT", b"RSET", b"NOOP", b"",
         b"NO\x00OP", "MÄIL".encode(), b"\xff"]
command_lines = st.one_of(
    st.binary(max_size=80),
    st.builds(
        lambda verb, arg, end: verb + arg + end,
        st.sampled_from(VERBS),
        st.one_of(
            st.just(b""),
            st.binary(max_size=40).map(lambda b: b" " + b),
            path_args.map(lambda p: (" " + p).encode("utf-8")),
            st.sampled_from([b" ", b"   ", b" x  ", b"\t x", b" \xc3", b" \xc3\xa4 ", b"\xc3 x", b" \xed\xa0\x80",
                             b" x\t", b" \x01", b" x \t ", b"\t", b" \x0b"]),
        ),
        st.sampled_from([b"\r\n", b"\n", b"\r", b"", b"\r\r\n", b" \r\n", b"\x00\r\n"]),
    ),
)


@EXAMPLES
@given(command_lines, st.booleans(), st.sampled_from([0, 10, 64, 512, 10**30]), st.booleans())
def test_command_tokenizers_agree(c, line: bytes, smtputf8: bool, max_length: int, as_bytearray: bool) -> None:
    same(c, "parse_command", bytearray(line) if as_bytearray else line, smtputf8, max_length)


@EXAMPLES
@given(st.lists(st.one_of(domains, any_text, st.sampled_from([".sub.test", ".Sub.Test.", " a.test ", "."])),
                max_size=5),
       st.lists(st.one_of(domains, any_text, st.sampled_from(["x.sub.test", "sub.test", "a.test"])), max_size=4))
def test_domain_sets_agree(c, entries: list[str], probes: list[str]) -> None:
    expected = outcome(lambda: py.DomainSet(entries).entries())
    assert outcome(lambda: c.DomainSet(entries).entries()) == expected
    if expected[0] != "ok":
        return
    python_set, compiled_set = py.DomainSet(entries), c.DomainSet(entries)
    assert len(compiled_set) == len(python_set)
    for probe in probes:
        canonical = outcome(lambda probe=probe: py.canonical_domain(probe))
        for candidate in [probe, *([canonical[1]] if canonical[0] == "ok" else [])]:
            assert (candidate in compiled_set) == (candidate in python_set), candidate


ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
# Near-misses of a dotted quad: leading zeros, too few or many parts, octets over 255, junk.
odd_ipv4 = st.one_of(
    st.lists(st.sampled_from(["0", "00", "01", "1", "10", "255", "256", "999", "099", "1234"]), min_size=4,
             max_size=4).map(".".join),
    st.lists(st.sampled_from(["0", "00", "1", "255", "256", "", "a", " ", "1/8"]), min_size=1, max_size=6).map(
        ".".join
    ),
)
prefixes = st.one_of(
    st.builds(lambda a, n: f"{a}/{n}", ipv4, st.integers(0, 33)),
    st.builds(lambda a, n: f"{a}/{n}", ipv6, st.integers(0, 129)),
    ipv4,
    ipv6,
    st.sampled_from(["::ffff:10.0.0.0/104", "::ffff:0:0/95", " 192.0.2.0/24 ", "10.0.0.0/255.0.0.0", "::/0",
                     "0.0.0.0/0", "fe80::1%eth0"]),
    any_text,
)
clients = st.one_of(
    ipv4,
    ipv6,
    ipv4.map(lambda a: "::ffff:" + a),
    ipv4.map(lambda a: "::FFFF:" + a),
    ipv6.map(lambda a: a + "%eth0"),
    ipv4.map(lambda a: "::ffff:" + a + "%1"),
    odd_ipv4,
    odd_ipv4.map(lambda a: "::ffff:" + a),
    st.sampled_from(["10.0.0.1\x00junk", "10.1.2.3/8", "", ":", "::ffff:", "1.2.3.4 ", "١.٢.٣.٤", "::ffff:١.2.3.4"]),
    any_text,
)


@EXAMPLES
@given(st.lists(prefixes, max_size=6), st.lists(clients, min_size=1, max_size=6))
def test_cidr_sets_agree(c, entries: list[str], probes: list[str]) -> None:
    expected = outcome(lambda: len(py.CidrSet(entries)))
    assert outcome(lambda: len(c.CidrSet(entries))) == expected
    if expected[0] != "ok":
        return
    python_set, compiled_set = py.CidrSet(entries), c.CidrSet(entries)
    for probe in [*probes, *(entry.split("/")[0] for entry in entries), None, 3]:
        assert outcome(lambda probe=probe: probe in compiled_set) == outcome(lambda probe=probe: probe in python_set), (
            probe)


class Grant(enum.IntEnum):
    AUTHENTICATED = fc.GRANT_AUTHENTICATED


GRANTS = [fc.GRANT_NONE, fc.GRANT_AUTHENTICATED, fc.GRANT_ALLOW_LIST, fc.GRANT_LISTENER, fc.GRANT_NEVER]


def matchers(twin: ModuleType) -> list[object]:
    """The same configurations built by one twin: its own DomainSets, and plain sets."""
    local = ["example.test", ".sub.test", "[192.0.2.1]", "[IPv6:2001:db8::1]", "xn--bcher-kva.example"]
    relay = ["backup.test", ".relay.test"]
    rewrite = {"old.test": "example.test", "gone.test": "far.test", "a.sub.test": "b.sub.test"}
    directories = {"example.test": frozenset({"user", "john.doe", "a", "imceasmtp-x"}), "b.sub.test": frozenset()}
    return [
        twin.RcptMatcher(twin.DomainSet(local), twin.DomainSet(relay), rewrite, directories),
        twin.RcptMatcher(twin.DomainSet(local), twin.DomainSet([]), {}, {}),
        twin.RcptMatcher({"example.test", "[192.0.2.1]"}, py.DomainSet(relay), {}, directories),
    ]


@pytest.fixture(scope="module")
def matcher_pairs(c) -> list[tuple[object, object]]:
    return list(zip(matchers(py), matchers(c), strict=True))


@EXAMPLES
@given(st.one_of(recipients, paths, path_args), st.sampled_from([*GRANTS, True, 99, -1, Grant.AUTHENTICATED]))
def test_rcpt_verdicts_agree(matcher_pairs, arg: str, grant: int) -> None:
    for python_matcher, compiled_matcher in matcher_pairs:
        expected = outcome(lambda m=python_matcher: m.decide(arg, grant))
        actual = outcome(lambda m=compiled_matcher: m.decide(arg, grant))
        assert actual == expected, (arg, grant)
        if expected[0] == "ok":
            assert type(actual[1]) is fc.RcptVerdict


@EXAMPLES
@given(st.one_of(recipients, paths))
def test_every_grant_decides_alike(matcher_pairs, arg: str) -> None:
    for python_matcher, compiled_matcher in matcher_pairs:
        for grant in GRANTS:
            expected = outcome(lambda m=python_matcher, g=grant: m.decide(arg, g))
            assert outcome(lambda m=compiled_matcher, g=grant: m.decide(arg, g)) == expected, (arg, grant)


# NUL octets alone and in the forms a NUL-stripping backend would read as the end of data.
body_pieces = st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"xyz" * 5, b"\r\n.\r\n", b"\n.\r\n",
                               b"\r.\r\n", b"\x00", b"\xff", b"\r\r\r", b"\n\n", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n",
                               b"\x00.", b"\x00\x00", b"\r\x00\n"])
bodies = st.lists(body_pieces, max_size=40).map(b"".join)


@EXAMPLES
@given(
    bodies,
    st.lists(st.integers(0, 300), max_size=6),
    st.sampled_from([0, 3, 6, 20, 1000]),
    st.sampled_from([0, 5, 50, 10**6]),
    st.booleans(),
)
def test_data_scanners_agree(c, body: bytes, cuts: list[int], max_line: int, max_size: int, as_bytearray: bool) -> None:
    chunks, previous = [], 0
    for cut in [*sorted(min(cut, len(body)) for cut in cuts), len(body)]:
        chunks.append(body[previous:cut])
        previous = cut
    scanners = [py.DataScanner(max_line, max_size), c.DataScanner(max_line, max_size)]
    for chunk in chunks:
        data = bytearray(chunk) if as_bytearray else chunk
        ends = [scanner.feed(data) for scanner in scanners]
        assert ends[0] == ends[1], chunks
        states = [(s.violation, s.size, s.max_line_length, s.max_size) for s in scanners]
        assert states[0] == states[1], chunks
        if ends[0] >= 0:
            break


def scan_in_chunks(module: ModuleType, chunks: list[bytes], max_line: int, max_size: int) -> tuple[int, int, int]:
    scanner, offset = module.DataScanner(max_line, max_size), 0
    for chunk in chunks:
        end = scanner.feed(chunk)
        if end >= 0:
            return offset + end, scanner.violation, scanner.size
        offset += len(chunk)
    return -1, scanner.violation, scanner.size


@EXAMPLES
@given(
    bodies,
    st.lists(st.integers(0, 300), max_size=6),
    st.sampled_from([0, 3, 6, 20, 1000]),
    st.sampled_from([0, 5, 50, 10**6]),
)
def test_data_scan_does_not_depend_on_chunking(c, body: bytes, cuts: list[int], max_line: int, max_size: int) -> None:
    """The end, the violation and the size are the same however TCP cut the body, in both twins."""
    chunks, previous = [], 0
    for cut in [*sorted(min(cut, len(body)) for cut in cuts), len(body)]:
        chunks.append(body[previous:cut])
        previous = cut
    for module in (py, c):
        whole = scan_in_chunks(module, [body], max_line, max_size)
        assert scan_in_chunks(module, chunks, max_line, max_size) == whole, (module.__name__, chunks)
        octets = [body[index:index + 1] for index in range(len(body))]
        assert scan_in_chunks(module, octets, max_line, max_size) == whole, module.__name__
