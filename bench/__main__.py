"""``python -m bench``: edgeproxy under load on loopback, beside the references, in one run.

    python -m bench --scenario relay-storm,deliver --concurrency 10,100 --duration 10
    python -m bench --scenario idle-hold --idle-connections 10000
    python -m bench --scenario hostile --hostile-clients 30
    python -m bench --scenario deliver-tls --references direct,postfix   # STARTTLS per session
    python -m bench --scenario held-input        # 100 clients writing NOOPs behind a held RCPT
    python -m bench --scenario deliver --concurrency 300 --workers 2 --backend-limit 100
    python -m bench --baseline ../edgeproxy-old   # adds edgeproxy@baseline: before/after in one run
    python -m bench --sources 1      # every client from 127.0.0.1, as before (default: 64 addresses)
    python -m bench micro            # the fast-path micro benchmarks (pytest-benchmark)
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import loadgen, report, runner
from bench.servers import HAPROXY, EdgeproxyBuild, PrivatePostfix, make_certificate

LOAD_SCENARIOS = ("relay-storm", "deliver", "mixed", "pipelined")
HELD_SCENARIOS = ("idle-hold", "slow-clients")
HOSTILE_SCENARIOS = ("hostile",)
TLS_SCENARIOS = ("deliver-tls",)
HELD_INPUT_SCENARIOS = ("held-input",)
ALL_SCENARIOS = LOAD_SCENARIOS + TLS_SCENARIOS + HELD_SCENARIOS + HOSTILE_SCENARIOS + HELD_INPUT_SCENARIOS
HOSTILE_REFERENCES = ("direct",)  # an L4 hop or Postfix adds nothing to read against the proxy's defences
TLS_REFERENCES = ("postfix",)  # direct runs the plaintext floor; HAProxy in TCP mode cannot do STARTTLS
# Run beside edgeproxy (at the default log level, info) in the load scenarios unless
# --no-warning-variant: the same build logging warnings only, for what the info lines cost.
WARNING = "edgeproxy@warning"
WARNING_SETTINGS = (("EDGEPROXY_LOG_LEVEL", "warning"),)


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
                        help=f"comma-separated: {', '.join(ALL_SCENARIOS)}")
    parser.add_argument("--concurrency", default="10,100", help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=None, help="seconds per run (default 8; 1.5 with --quick)")
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
    parser.add_argument("--backend-limit", type=int, default=None,
                        help="sessions the sink serves at once, every scenario (smtp-sink -m; default: smtp-sink's "
                             "own 256, and 100 for hostile)")
    parser.add_argument("--tls-resumption", choices=("on", "off", "both"), default="both",
                        help="for deliver-tls: offer the last TLS session to each handshake, or not, or both rows "
                             "(default %(default)s)")
    parser.add_argument("--tls-key", choices=("ec", "rsa"), default="ec",
                        help="for deliver-tls: the throwaway certificate's key, P-256 or RSA 2048 "
                             "(default %(default)s)")
    parser.add_argument("--held-clients", type=int, default=None,
                        help="for held-input: clients writing NOOPs behind a held RCPT (default 100)")
    parser.add_argument("--held-deliver-clients", type=int, default=None,
                        help="for held-input: normal deliver clients beside them (default 10)")
    parser.add_argument("--held-max-mb", type=float, default=64,
                        help="for held-input: MB a held client writes at most (default %(default)s)")
    parser.add_argument("--held-rcpt-delay", type=float, default=None,
                        help="for held-input: seconds the backend holds the RCPT reply (default: --duration + 30)")
    parser.add_argument("--held-rss-guard-mb", type=float, default=4096,
                        help="for held-input: the held clients stop if the system's RSS passes this "
                             "(default %(default)s)")
    parser.add_argument("--session-timeout", type=float, default=60,
                        help="seconds before an unfinished session fails as a timeout (default %(default)s)")
    parser.add_argument("--baseline", default=None, metavar="PATH",
                        help="also run edgeproxy@baseline: the edgeproxy source checkout at PATH (extension built "
                             "in place), same settings and scenarios")
    parser.add_argument("--variant", action="append", nargs="+", default=[], metavar="NAME SETTING=VALUE",
                        help="also run edgeproxy@NAME: the installed edgeproxy with these settings over the "
                             "bench's (EDGEPROXY_ prefix optional), e.g. --variant metrics "
                             "METRICS_LISTEN=127.0.0.1:0; repeatable")
    parser.add_argument("--no-warning-variant", action="store_true",
                        help=f"leave out {WARNING} (EDGEPROXY_LOG_LEVEL=warning), otherwise run beside edgeproxy "
                             f"in {', '.join(LOAD_SCENARIOS)}")
    parser.add_argument("--sources", type=int, default=loadgen.DEFAULT_SOURCES,
                        help="source addresses the load generator's clients take in turn, 127.1.0.1 and up; 1: "
                             "127.0.0.1 alone (default %(default)s)")
    parser.add_argument("--settle", type=float, default=None,
                        help="seconds a run waits at most, before it starts, for the machine's TIME-WAIT sockets "
                             "to fall below half the ephemeral ports of the clients' source addresses "
                             f"({runner.time_wait_calm(1):,} a source; default 5 s, 1 with --quick)")
    parser.add_argument("--output", default=None, help="directory (default bench-results/<timestamp>)")
    parser.add_argument("--quick", action="store_true", help="a tiny bounded run, for the test suite")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.idle_connections, args.slow_clients = "4", 200, 20
        args.duration = 1.5 if args.duration is None else args.duration
        args.hostile_clients = 6 if args.hostile_clients is None else args.hostile_clients
        args.held_clients = 10 if args.held_clients is None else args.held_clients
        args.held_deliver_clients = 2 if args.held_deliver_clients is None else args.held_deliver_clients
        args.settle = 1.0 if args.settle is None else args.settle
    args.settle = 5.0 if args.settle is None else args.settle
    args.duration = 8.0 if args.duration is None else args.duration
    args.hostile_clients = 30 if args.hostile_clients is None else args.hostile_clients
    args.held_clients = 100 if args.held_clients is None else args.held_clients
    args.held_deliver_clients = 10 if args.held_deliver_clients is None else args.held_deliver_clients
    return args


def tls_plan(args: argparse.Namespace) -> list[str]:
    """The deliver-tls scenario's rows, in order (see runner.TLS_ROWS)."""
    modes = {"off": [""], "on": ["/resumed"], "both": ["", "/resumed"]}[args.tls_resumption]
    return ([f"deliver-tls{mode}" for mode in modes] + [f"tls-handshake-only{mode}" for mode in modes]
            + ["ehlo-only"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["micro"]:
        command = [sys.executable, "-m", "pytest", "bench/test_micro.py", "--benchmark-only", *argv[1:]]
        return subprocess.call(command)
    args = parse_args(argv)
    scenarios = [s for s in args.scenario.split(",") if s]
    unknown = set(scenarios) - set(ALL_SCENARIOS)
    if unknown:
        print(f"python -m bench: unknown scenario(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if not 1 <= args.sources <= loadgen.MAX_SOURCES:
        print(f"python -m bench: --sources: 1 to {loadgen.MAX_SOURCES}", file=sys.stderr)
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
    for name, *assignments in args.variant:
        pairs = [assignment.partition("=") for assignment in assignments]
        if not assignments or any(not sep or not key for key, sep, _ in pairs):
            print(f"python -m bench: --variant {name}: expected NAME SETTING=VALUE ...", file=sys.stderr)
            return 2
        settings = tuple((key if key.startswith("EDGEPROXY_") else f"EDGEPROXY_{key}", value)
                         for key, _, value in pairs)
        builds[f"edgeproxy@{name}"] = EdgeproxyBuild(f"edgeproxy@{name}", settings=settings)
    load_only: tuple[str, ...] = ()
    if not args.no_warning_variant and WARNING not in builds:  # an explicit --variant warning runs everywhere
        builds = {"edgeproxy": builds.pop("edgeproxy"), WARNING: EdgeproxyBuild(WARNING, settings=WARNING_SETTINGS),
                  **builds}
        load_only = (WARNING,)
    try:
        systems = [describe(build) for build in builds.values()]
    except RuntimeError as error:
        print(f"python -m bench: {error}", file=sys.stderr)
        return 2
    setup = runner.Setup(duration=args.duration, sessions=args.sessions, message_size=args.message_size,
                         workers=args.workers, processes=args.processes, session_timeout=args.session_timeout,
                         hostile_clients=args.hostile_clients, hostile_max_bytes=int(args.hostile_max_mb * 2**20),
                         backend_limit=args.backend_limit, builds=builds, held_clients=args.held_clients,
                         held_deliver_clients=args.held_deliver_clients,
                         held_max_bytes=int(args.held_max_mb * 2**20), held_rcpt_delay=args.held_rcpt_delay,
                         held_rss_guard=int(args.held_rss_guard_mb * 2**20), sources=args.sources,
                         settle=args.settle, load_only=load_only)
    with tempfile.TemporaryDirectory(prefix="edgeproxy-bench-tls-") as directory:
        if any(s in TLS_SCENARIOS for s in scenarios):
            setup.tls_cert, setup.tls_key = make_certificate(Path(directory), args.tls_key)  # gone at the end
        rows, held, notes = run_plan(args, scenarios, concurrencies, references, setup)
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
    report.write(output, rows, held, command, systems, notes)
    print(report.terminal(rows, held, systems, notes))
    print(f"\nreport: {output / 'report.md'}  (results.json and plots alongside)")
    correct = all(r.correct for r in rows) and not any(h["problems"] or h["failed"] for h in held)
    return 0 if correct else 1


def run_plan(args: argparse.Namespace, scenarios: list[str], concurrencies: list[int], references: list[str],
             setup: runner.Setup) -> tuple[list[runner.Measurement], list[dict[str, object]], list[str]]:
    rows: list[runner.Measurement] = []
    held: list[dict[str, object]] = []
    notes: list[str] = []
    proxies = [name for name in setup.builds if name not in setup.load_only]  # all but in the load scenarios
    plan = [(s, system, c) for s in scenarios if s in LOAD_SCENARIOS for c in concurrencies
            for system in [*setup.builds, *references]]
    if any(s in TLS_SCENARIOS for s in scenarios):
        tls_proxies = []
        for name in proxies:
            if setup.builds[name].knows("EDGEPROXY_TLS_CERT", str(setup.tls_cert)):
                tls_proxies.append(name)
            else:
                notes.append(f"deliver-tls: {name} has no EDGEPROXY_TLS_CERT (no STARTTLS in that build): not run")
        tls_systems = [*tls_proxies, *(r for r in references if r in TLS_REFERENCES)]
        notes.append(f"deliver-tls: STARTTLS with a throwaway self-signed certificate made for this run "
                     f"({'ECDSA P-256' if args.tls_key == 'ec' else 'RSA 2048'}); clients verify nothing and take "
                     "the defaults (TLS 1.3)")
        for concurrency in concurrencies:
            for number, row in enumerate(tls_plan(args)):
                plan += [(row, system, concurrency) for system in tls_systems]
                if number == 0 and "direct" in references:
                    plan.append((runner.FLOOR, "direct", concurrency))  # plaintext deliver: the floor
    plan += [(s, system, c) for s in scenarios if s in HOSTILE_SCENARIOS for c in concurrencies
             for system in [*proxies, *(r for r in references if r in HOSTILE_REFERENCES)]]
    plan += [(s, system, setup.held_deliver_clients) for s in scenarios if s in HELD_INPUT_SCENARIOS
             for system in proxies]
    for number, (scenario, system, concurrency) in enumerate(plan, 1):
        runner.progress(f"[{number}/{len(plan)}] {scenario} via {system} at concurrency {concurrency} ...")
        time_wait, waited = runner.settle(setup.settle, setup.sources)
        if scenario in HOSTILE_SCENARIOS:
            row = runner.measure_hostile(system, concurrency, setup)
        elif scenario in HELD_INPUT_SCENARIOS:
            row = runner.measure_held_input(system, setup)
        else:
            row = runner.measure(scenario, system, concurrency, setup)
        row.time_wait_start, row.settle_s = time_wait, waited
        rows.append(row)
    for scenario in scenarios:
        if scenario in HELD_SCENARIOS:
            kind, count = ("idle", args.idle_connections) if scenario == "idle-hold" else ("slow", args.slow_clients)
            for system in proxies:
                runner.progress(f"{scenario}: {count} clients beside deliver via {system} ...")
                time_wait, waited = runner.settle(setup.settle, setup.sources)
                held.append(runner.measure_under_load(kind, count, concurrencies[0], system, setup)
                            | {"time_wait_start": time_wait, "settle_s": waited})
    notes += source_notes(setup, rows, held)
    return rows, held, notes


def source_notes(setup: runner.Setup, rows: list[runner.Measurement], held: list[dict[str, object]]) -> list[str]:
    """Where the clients came from, and whether the cells began with the ports of earlier ones in TIME-WAIT."""
    addresses = loadgen.source_addresses(setup.sources)
    notes = [f"clients connect from {len(addresses)} loopback addresses, {addresses[0]} to {addresses[-1]}, in "
             "turn (hostile, held and idle clients from 127.0.0.1)" if addresses else
             "clients connect from 127.0.0.1 (--sources 1)"]
    cells = [(row.time_wait_start, row.settle_s) for row in rows]
    cells += [(hold.get("time_wait_start"), hold.get("settle_s")) for hold in held]  # type: ignore[misc]
    waited = [s for _, s in cells if s is not None and s >= 0.25]
    calm = runner.time_wait_calm(setup.sources)
    above = [int(t) for t, _ in cells if t is not None and t > calm]  # type: ignore[arg-type]
    if waited:
        notes.append(f"{len(waited)} of {len(cells)} runs waited (up to {setup.settle:g} s, {sum(waited):.0f} s in "
                     f"all) for the machine's TIME-WAIT sockets to fall below {calm:,}"
                     + (f"; {len(above)} started above it (at most {max(above):,})" if above else ""))
    limit = runner.time_wait_limit()
    full = [t for t, _ in cells if limit and t is not None and t >= limit]  # type: ignore[operator]
    if full:
        notes.append(f"{len(full)} of {len(cells)} runs started with the machine's TIME-WAIT table full "
                     f"(net.ipv4.tcp_max_tw_buckets = {limit:,}): while it stays full, closing connections skip "
                     "TIME-WAIT")
    return notes


def describe(build: EdgeproxyBuild) -> dict[str, object]:
    found = build.describe()
    print(f"{found['system']}: runs {found['imports']} (checkout at {found['commit'] or '?'}, fast path "
          f"{found['fastpath']})", file=sys.stderr, flush=True)
    return found


if __name__ == "__main__":
    sys.exit(main())
