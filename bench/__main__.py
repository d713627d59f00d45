"""``python -m bench``: edgeproxy under load on loopback, beside the references, in one run.

    python -m bench --scenario relay-storm,deliver --concurrency 10,100 --duration 10
    python -m bench --scenario idle-hold --idle-connections 10000
    python -m bench --scenario hostile --hostile-clients 30
    python -m bench --baseline ../edgeproxy-old   # adds edgeproxy@baseline: before/after in one run
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
from bench.servers import HAPROXY, EdgeproxyBuild, PrivatePostfix

LOAD_SCENARIOS = ("relay-storm", "deliver", "mixed", "pipelined")
HELD_SCENARIOS = ("idle-hold", "slow-clients")
HOSTILE_SCENARIOS = ("hostile",)
HOSTILE_REFERENCES = ("direct",)  # an L4 hop or Postfix adds nothing to read against the proxy's defences


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
                        help=f"comma-separated: {', '.join(LOAD_SCENARIOS + HELD_SCENARIOS + HOSTILE_SCENARIOS)}")
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
    parser.add_argument("--hostile-clients", type=int, default=None,
                        help="for hostile: never-read, rcpt-flood and idle clients, a third each (default 30)")
    parser.add_argument("--hostile-max-mb", type=float, default=64,
                        help="for hostile: MB a hostile client writes at most (default %(default)s)")
    parser.add_argument("--backend-limit", type=int, default=100,
                        help="for hostile: sessions the sink serves at once (smtp-sink -m; default %(default)s)")
    parser.add_argument("--session-timeout", type=float, default=60,
                        help="seconds before an unfinished session fails as a timeout (default %(default)s)")
    parser.add_argument("--baseline", default=None, metavar="PATH",
                        help="also run edgeproxy@baseline: the edgeproxy source checkout at PATH (extension built "
                             "in place), same settings and scenarios")
    parser.add_argument("--output", default=None, help="directory (default bench-results/<timestamp>)")
    parser.add_argument("--quick", action="store_true", help="a tiny bounded run, for the test suite")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.duration, args.idle_connections, args.slow_clients = "4", 1.5, 200, 20
        args.hostile_clients = 6 if args.hostile_clients is None else args.hostile_clients
    if args.hostile_clients is None:
        args.hostile_clients = 30
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["micro"]:
        command = [sys.executable, "-m", "pytest", "bench/test_micro.py", "--benchmark-only", *argv[1:]]
        return subprocess.call(command)
    args = parse_args(argv)
    scenarios = [s for s in args.scenario.split(",") if s]
    unknown = set(scenarios) - set(LOAD_SCENARIOS + HELD_SCENARIOS + HOSTILE_SCENARIOS)
    if unknown:
        print(f"python -m bench: unknown scenario(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    references = args.references.split(",") if args.references else installed_references()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    output = Path(args.output or f"bench-results/{time.strftime('%Y%m%d-%H%M%S')}")
    builds = {"edgeproxy": EdgeproxyBuild()}
    if args.baseline:
        try:
            builds[runner.BASELINE] = EdgeproxyBuild(runner.BASELINE, Path(args.baseline).resolve())
        except ValueError as error:
            print(f"python -m bench: --baseline: {error}", file=sys.stderr)
            return 2
    try:
        systems = [describe(build) for build in builds.values()]
    except RuntimeError as error:
        print(f"python -m bench: {error}", file=sys.stderr)
        return 2
    setup = runner.Setup(duration=args.duration, sessions=args.sessions, message_size=args.message_size,
                         workers=args.workers, processes=args.processes, session_timeout=args.session_timeout,
                         hostile_clients=args.hostile_clients, hostile_max_bytes=int(args.hostile_max_mb * 2**20),
                         backend_limit=args.backend_limit, builds=builds)
    rows: list[runner.Measurement] = []
    held: list[dict[str, object]] = []
    proxies = list(builds)
    plan = [(s, system, c) for s in scenarios if s in LOAD_SCENARIOS for c in concurrencies
            for system in [*proxies, *references]]
    plan += [(s, system, c) for s in scenarios if s in HOSTILE_SCENARIOS for c in concurrencies
             for system in [*proxies, *(r for r in references if r in HOSTILE_REFERENCES)]]
    for number, (scenario, system, concurrency) in enumerate(plan, 1):
        runner.progress(f"[{number}/{len(plan)}] {scenario} via {system} at concurrency {concurrency} ...")
        if scenario in HOSTILE_SCENARIOS:
            rows.append(runner.measure_hostile(system, concurrency, setup))
        else:
            rows.append(runner.measure(scenario, system, concurrency, setup))
    for scenario in scenarios:
        if scenario in HELD_SCENARIOS:
            kind, count = ("idle", args.idle_connections) if scenario == "idle-hold" else ("slow", args.slow_clients)
            for system in proxies:
                runner.progress(f"{scenario}: {count} clients beside deliver via {system} ...")
                held.append(runner.measure_under_load(kind, count, concurrencies[0], system, setup))
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
    report.write(output, rows, held, command, systems)
    print(report.terminal(rows, held, systems))
    print(f"\nreport: {output / 'report.md'}  (results.json and plots alongside)")
    correct = all(r.correct for r in rows) and not any(h["problems"] or h["failed"] for h in held)
    return 0 if correct else 1


def describe(build: EdgeproxyBuild) -> dict[str, object]:
    found = build.describe()
    print(f"{found['system']}: runs {found['imports']} (checkout at {found['commit'] or '?'}, fast path "
          f"{found['fastpath']})", file=sys.stderr, flush=True)
    return found


if __name__ == "__main__":
    sys.exit(main())
