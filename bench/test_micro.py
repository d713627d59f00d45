"""Fast-path micro benchmarks: each workload on the compiled module and on the pure-Python twin.

Not part of the test suite. Run: ``python -m pytest bench/test_micro.py --benchmark-only``
(or ``python -m bench micro``); compare within a group, never across machines.
"""

from __future__ import annotations

import importlib
import ipaddress
import random
from types import ModuleType

import pytest

from edgeproxy import fastpath_common as fc

TWINS = [importlib.import_module("edgeproxy._fastpath")]
TWINS.append(importlib.import_module("edgeproxy._fastpath_py"))
IDS = ["c", "py"]


@pytest.fixture(params=TWINS, ids=IDS)
def fp(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


def prefixes(count: int) -> list[str]:
    generator = random.Random(count)  # the same prefixes every run
    entries = set()
    while len(entries) < count:
        length = generator.randint(8, 32)
        address = ipaddress.IPv4Address(generator.getrandbits(32))
        entries.add(str(ipaddress.IPv4Network(f"{address}/{length}", strict=False)))
    return sorted(entries)


def test_tokenizer(benchmark, fp) -> None:
    benchmark.group = "tokenizer"
    result = benchmark(fp.parse_command, b"RCPT TO:<someone@example.test> NOTIFY=NEVER\r\n", False, 512)
    assert result[0] == "RCPT"


def test_path_parser(benchmark, fp) -> None:
    benchmark.group = "path parser"
    result = benchmark(fp.parse_mail_from, "FROM:<sender.name@example.org> SIZE=2048")
    assert result.domain == "example.org"


def test_rcpt_verdict(benchmark, fp) -> None:
    benchmark.group = "rcpt verdict"
    matcher = fp.RcptMatcher(fp.DomainSet(["example.test", ".example.test"]), fp.DomainSet(["backup.test"]),
                             {"old.test": "example.test"}, {})
    verdict = benchmark(matcher.decide, "TO:<user@example.test>", fc.GRANT_NONE)
    assert verdict.action == fc.ACTION_FORWARD


def test_rcpt_verdict_relay_attempt(benchmark, fp) -> None:
    benchmark.group = "rcpt verdict (relay attempt)"
    matcher = fp.RcptMatcher(fp.DomainSet(["example.test"]), fp.DomainSet([]), {}, {})
    verdict = benchmark(matcher.decide, "TO:<victim@elsewhere.test>", fc.GRANT_NONE)
    assert verdict.rule == fc.RULE_RELAY_DENIED


@pytest.mark.parametrize("count", [10, 100_000], ids=["10-prefixes", "100k-prefixes"])
def test_cidr_lookup(benchmark, fp, count: int) -> None:
    benchmark.group = "cidr lookup"
    cidrs = fp.CidrSet(prefixes(count))
    benchmark(cidrs.__contains__, "203.0.113.77")


def test_data_scanner_100k(benchmark, fp) -> None:
    benchmark.group = "data scanner 100 KB"
    body = (b"x" * 76 + b"\r\n") * 1300 + b".\r\n"

    def scan() -> int:
        return fp.DataScanner(1000, 10**7).feed(body)

    assert benchmark(scan) == len(body)
