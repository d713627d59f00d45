"""Fast-path micro benchmarks: each workload on the compiled module and on the pure-Python twin.

Not part of the test suite. Run: ``python -m pytest bench/test_micro.py --benchmark-only``
(or ``python -m bench micro``); compare within a group, never across machines. The compiled
module must be built (``pip install -e .``): without it this file fails rather than measure the
twin twice.
"""

from __future__ import annotations

import importlib
import ipaddress
import operator
import random
import time
from collections.abc import Callable
from types import ModuleType

import pytest

from edgeproxy import fastpath_common as fc

TWINS = {"c": importlib.import_module("edgeproxy._fastpath"), "py": importlib.import_module("edgeproxy._fastpath_py")}


@pytest.fixture(params=list(TWINS.values()), ids=list(TWINS))
def fp(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


def measure(benchmark, function: Callable[..., object], *args: object) -> object:
    """Time ``function(*args)`` with many calls per round.

    pytest-benchmark's own overhead per round (~0.1-0.2 µs) is as long as one compiled call, so
    one call per round would mostly time the harness. Rounds of ~1 ms, ~0.5 s per benchmark.
    """
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.01:
        function(*args)
        calls += 1
    per_call = 0.01 / calls
    iterations = max(1, int(0.001 / per_call))
    rounds = max(5, int(0.5 / (iterations * per_call)))
    return benchmark.pedantic(function, args=args, iterations=iterations, rounds=rounds, warmup_rounds=1)


def prefixes(count: int) -> list[str]:
    """``count`` distinct IPv4 prefixes, the same ones every run."""
    generator = random.Random(count)
    entries = set()
    while len(entries) < count:
        length = generator.randint(8, 32)
        address = ipaddress.IPv4Address(generator.getrandbits(32))
        entries.add(str(ipaddress.IPv4Network(f"{address}/{length}", strict=False)))
    return sorted(entries)


def test_tokenizer(benchmark, fp) -> None:
    benchmark.group = "tokenizer"
    result = measure(benchmark, fp.parse_command, b"RCPT TO:<someone@example.test> NOTIFY=NEVER\r\n", False, 512)
    assert result == ("RCPT", "TO:<someone@example.test> NOTIFY=NEVER")


def test_path_parser(benchmark, fp) -> None:
    benchmark.group = "path parser"
    result = measure(benchmark, fp.parse_mail_from, "FROM:<sender.name@example.org> SIZE=2048")
    assert result == fc.ParsedPath("sender.name@example.org", "sender.name", "example.org", 0, {"SIZE": "2048"})


def test_rcpt_verdict(benchmark, fp) -> None:
    benchmark.group = "rcpt verdict"
    matcher = fp.RcptMatcher(fp.DomainSet(["example.test", ".example.test"]), fp.DomainSet(["backup.test"]),
                             {"old.test": "example.test"}, {})
    verdict = measure(benchmark, matcher.decide, "TO:<user@example.test>", fc.GRANT_NONE)
    assert verdict == fc.RcptVerdict(fc.ACTION_FORWARD, fc.RULE_LOCAL, "user@example.test", "example.test", {})


def test_rcpt_verdict_relay_attempt(benchmark, fp) -> None:
    benchmark.group = "rcpt verdict (relay attempt)"
    matcher = fp.RcptMatcher(fp.DomainSet(["example.test"]), fp.DomainSet([]), {}, {})
    verdict = measure(benchmark, matcher.decide, "TO:<victim@elsewhere.test>", fc.GRANT_NONE)
    assert verdict.rule == fc.RULE_RELAY_DENIED


@pytest.mark.parametrize("count", [10, 100_000], ids=["10-prefixes", "100k-prefixes"])
def test_cidr_lookup(benchmark, fp, count: int) -> None:
    benchmark.group = "cidr lookup"
    cidrs = fp.CidrSet(prefixes(count))
    assert len(cidrs) == count
    # operator.contains is the `in` operator without the cost of a bound method-wrapper call.
    assert measure(benchmark, operator.contains, cidrs, "203.0.113.77") == ("203.0.113.77" in cidrs)


def test_data_scanner_100k(benchmark, fp) -> None:
    benchmark.group = "data scanner 100 KB"
    body = (b"x" * 76 + b"\r\n") * 1300 + b".\r\n"

    def scan() -> int:
        return fp.DataScanner(1000, 10**7).feed(body)

    assert measure(benchmark, scan) == len(body)
