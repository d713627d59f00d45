"""``python -m bench``: edgeproxy under load on loopback, beside the references, in one run.

    python -m bench --scenario relay-storm,deliver --concurrency 10,100 --duration 10
    python -m bench --scenario idle-hold --idle-connections 10000
    python -m bench micro            # the fast-path micro benchmarks (pytest-benchmark)
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import report, runner
from bench.servers import HAPROXY, PrivatePostfix

LOAD_SCENARIOS = ("relay-storm", "deliver", "mixed", "pipelined")
HELD_SCENARIOS = ("idle-hold", "slow-clients")


def installed_references() -> list[str]:
    found = ["direct"]
    if shutil.which(HAPROXY) or Path(HAPROXY).exists():
        found.append("haproxy")
    if PrivatePostfix.available():
        found.append("postfix")
    return found


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="relay-storm,deliver",
                        help=f"comma-separated: {', '.join(LOAD_SCENARIOS + HELD_SCENARIOS)}")
    parser.add_argument("--concurrency", default="10,100", help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per run (default %(default)s)")
    parser.add_argument("--sessions", type=int, default=0, help="sessions per run instead of a duration")
    parser.add_argument("--message-size", type=int, default=2048, help="octets (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="edgeproxy worker processes")
    parser.add_argument("--processes", type=int, default=2, help="load-generator processes")
    parser.add_argument("--references", default=None, help="comma-separated of direct,haproxy,postfix "
                                                            "(default: all installed)")
    parser.add_argument("--idle-connections", type=int, default=10000, help="for idle-hold")
    parser.add_argument("--slow-clients", type=int, default=500, help="for slow-clients")
    parser.add_argument("--output", default=None, help="directory (default bench-results/<timestamp>)")
    parser.add_argument("--quick", action="store_true", help="a tiny bounded run, for the test suite")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.duration, args.idle_connections, args.slow_clients = "4", 1.5, 200, 20
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["micro"]:
        command = [sys.executable, "-m", "pytest", "bench/test_micro.py", "--benchmark-only", *argv[1:]]
        return subprocess.call(command)
    args = parse_args(argv)
    scenarios = [s for s in args.scenario.split(",") if s]
    unknown = set(scenarios) - set(LOAD_SCENARIOS + HELD_SCENARIOS)
    if unknown:
        print(f"python -m bench: unknown scenario(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    references = args.references.split(",") if args.references else installed_references()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    output = Path(args.output or f"bench-results/{time.strftime('%Y%m%d-%H%M%S')}")
    rows: list[runner.Measurement] = []
    held: list[dict[str, object]] = []
    plan = [(s, system, c) for s in scenarios if s in LOAD_SCENARIOS for c in concurrencies
            for system in ["edgeproxy", *references]]
    for number, (scenario, system, concurrency) in enumerate(plan, 1):
        runner.progress(f"[{number}/{len(plan)}] {scenario} via {system} at concurrency {concurrency} ...")
        rows.append(runner.measure(scenario, system, concurrency, args.duration, args.sessions, args.message_size,
                                   args.workers, args.processes))
    for scenario in scenarios:
        if scenario in HELD_SCENARIOS:
            kind, count = ("idle", args.idle_connections) if scenario == "idle-hold" else ("slow", args.slow_clients)
            runner.progress(f"{scenario}: {count} clients beside deliver ...")
            held.append(runner.measure_under_load(kind, count, concurrencies[0], args.duration, args.message_size,
                                                  args.workers, args.processes))
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
    report.write(output, rows, held, command)
    print(report.table(rows))
    for name, value, verdict in report.targets(rows, held):
        print(f"{verdict.upper():5} {name}: {value}")
    print(f"\nreport: {output / 'report.md'}  (results.json and plots alongside)")
    correct = all(r.correct for r in rows) and not any(h["problems"] or h["failed"] for h in held)
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
