"""One measured run: a system under test in front of a fresh sink, a load, and the counts."""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from bench import hostile, loadgen
from bench.servers import (
    EdgeproxyBuild,
    EdgeproxyServer,
    HaproxyTcp,
    PostfixRelayPolicy,
    Server,
    SmtpSink,
    process_tree,
)

TOKEN = re.compile(rb"Subject: bench (\S+)")
BASELINE = "edgeproxy@baseline"
DEFAULT_MAX_CONNECTIONS = 1000  # edgeproxy's default EDGEPROXY_MAX_CONNECTIONS, per worker


def is_edgeproxy(system: str) -> bool:
    return system == "edgeproxy" or system.startswith("edgeproxy@")


def has_relay_policy(system: str) -> bool:
    return is_edgeproxy(system) or system == "postfix"


@dataclass
class Setup:
    """What every run of one ``python -m bench`` shares."""

    duration: float = 8.0
    sessions: int = 0
    message_size: int = 2048
    workers: int = 1
    processes: int = 2
    session_timeout: float = 60.0
    hostile_clients: int = 30
    hostile_max_bytes: int = 64 * 2**20
    backend_limit: int = 100  # the hostile scenario's sink: sessions served at once
    builds: dict[str, EdgeproxyBuild] = field(default_factory=lambda: {"edgeproxy": EdgeproxyBuild()})


def proxy_settings(clients: int) -> dict[str, str]:
    """edgeproxy's defaults, except what this load needs: all of it comes from 127.0.0.1, and
    more than the default connections per worker when that many clients are held at once. The
    log level only keeps the (untimed) log file small."""
    settings = {"EDGEPROXY_LOCAL_DOMAINS": "example.test", "EDGEPROXY_MAX_CONNECTIONS_PER_IP": "0",
                "EDGEPROXY_LOG_LEVEL": "warning"}
    if clients + 100 > DEFAULT_MAX_CONNECTIONS:
        settings["EDGEPROXY_MAX_CONNECTIONS"] = str(clients + 100)
    return settings


def format_reasons(errors: dict[str, int]) -> str:
    """``12× 451 4.3.2 at DATA, 2× ConnectionResetError waiting for greeting``, most first."""
    return ", ".join(f"{count}× {reason}" for reason, count in sorted(errors.items(), key=lambda i: (-i[1], i[0])))


def failed_text(failed: int, errors: dict[str, int]) -> str:
    return f"{failed} sessions failed: {format_reasons(errors)}" if failed else ""


@dataclass
class Measurement:
    scenario: str
    system: str
    concurrency: int
    sessions: int
    sessions_per_s: float
    messages_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    sut_cpu_s: float
    sessions_per_cpu_s: float
    messages_per_cpu_s: float
    peak_rss_mb: float
    loadgen_cpu_s: float
    refused: int
    relayed: int
    delivered: int
    failed: int
    sink_messages: int
    correct: bool
    problems: str
    failures: dict[str, int] = field(default_factory=dict)  # failed sessions by reason
    settings: dict[str, str] = field(default_factory=dict)  # EDGEPROXY_* set (edgeproxy systems)
    peak_backend_connections: int | None = None  # hostile: ESTABLISHED connections the sink held
    peak_backend_queued: int | None = None  # hostile: ... and those waiting in its listen backlog
    peak_backend_established: int | None = None  # hostile: both at once (the sample with the most)
    hostile: dict[str, object] | None = None  # hostile: per kind, what the hostile clients did

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


SS = shutil.which("ss") or "/usr/bin/ss"


def backend_connections(port: int) -> tuple[int, int]:
    """(held, queued): ESTABLISHED TCP connections to ``port`` that its listener has accepted,
    and those complete but still waiting in its listen backlog (the listener's Recv-Q).

    From ``ss -tnH state established state listening '( sport = :port )'``: the kernel filters
    (netlink), so it stays cheap (~5 ms) however many TIME-WAIT sockets a run leaves, where
    psutil.net_connections (reading /proc/net/tcp and every process's descriptors) took 130 ms a
    call here. Without ss: /proc/net/tcp, whose not-yet-accepted sockets have inode 0."""
    if Path(SS).exists():
        out = subprocess.run([SS, "-tnH", "state", "established", "state", "listening", f"( sport = :{port} )"],
                             capture_output=True, text=True, timeout=10).stdout
        established = queued = 0
        for line in out.splitlines():
            fields = line.split()
            if fields and fields[0] == "LISTEN":
                queued += int(fields[1])
            elif fields and fields[0] == "ESTAB":
                established += 1
        return established - queued, queued
    held = queued = 0
    suffix = f":{port:04X}"
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == "01" and fields[1].endswith(suffix):
                if fields[9] == "0":
                    queued += 1
                else:
                    held += 1
    return held, queued


class Sampler:
    """Polls the system under test's CPU and RSS (and, given the ``backend`` port, the connections
    its backend holds) every 0.2 s while the load runs."""

    def __init__(self, pids: list[int], backend: int | None = None) -> None:
        self.pids = pids
        self.backend = backend
        self.peak_rss = 0
        self.peak_backend = self.peak_queued = self.peak_established = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._cpu_start = self.cpu()

    def cpu(self) -> float:
        total = 0.0
        for process in process_tree(self.pids):
            try:
                times = process.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
            except psutil.NoSuchProcess:
                continue
        return total

    def rss(self) -> int:
        total = 0
        for process in process_tree(self.pids):
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self.rss())
        if self.backend is not None:
            held, queued = backend_connections(self.backend)
            self.peak_backend = max(self.peak_backend, held)
            self.peak_queued = max(self.peak_queued, queued)
            self.peak_established = max(self.peak_established, held + queued)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.cpu_used = self.cpu() - self._cpu_start


def start_system(system: str, sink: SmtpSink, stack: ExitStack, setup: Setup, clients: int) -> Server | None:
    """Start ``system`` in front of ``sink`` for a load of ``clients`` connections at once."""
    if system == "direct":
        return None
    if is_edgeproxy(system):
        return stack.enter_context(EdgeproxyServer(sink.address, workers=setup.workers, build=setup.builds[system],
                                                   settings=proxy_settings(clients)))
    if system == "haproxy":
        return stack.enter_context(HaproxyTcp(sink.address))
    if system == "postfix":
        return stack.enter_context(PostfixRelayPolicy(sink.address))
    raise ValueError(f"unknown system {system!r}")


def settings_of(server: Server | None) -> dict[str, str]:
    if not isinstance(server, EdgeproxyServer):
        return {}
    shown = {k: v for k, v in server.env.items() if k not in ("EDGEPROXY_LISTEN", "EDGEPROXY_BACKEND")}
    return shown | {name: "(unknown to this build: not set)" for name in server.skipped}


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


def check(system: str, result: loadgen.Result, sink: SmtpSink) -> tuple[int, list[str]]:
    """Every acknowledged message in the sink exactly once, nothing else; no relay got through."""
    found: Counter[str] = Counter()
    messages = sink.messages()
    for content in messages:
        for match in TOKEN.finditer(content):
            found[match.group(1).decode()] += 1
    problems = []
    acknowledged = Counter(result.tokens)
    if found != acknowledged:
        missing = sum((acknowledged - found).values())
        extra = sum((found - acknowledged).values())
        problems.append(f"sink differs from acknowledgements: {missing} missing, {extra} unacknowledged or doubled")
    if has_relay_policy(system):
        if result.relayed:
            problems.append(f"{result.relayed} relay attempts accepted")
        if any(b"victim@elsewhere.test" in content for content in messages):
            problems.append("a refused relay reached the sink")
    return len(messages), problems


def measure(scenario: str, system: str, concurrency: int, setup: Setup) -> Measurement:
    with ExitStack() as stack:
        sink = stack.enter_context(SmtpSink())
        server = start_system(system, sink, stack, setup, concurrency)
        target = server if server is not None else sink
        pids = target.pids()
        job = loadgen.Job(target.host, target.port, scenario, concurrency, setup.duration, setup.sessions,
                          setup.message_size, session_timeout=setup.session_timeout)
        with Sampler(pids) as sampler:
            result = loadgen.run_load(job, setup.processes)
        time.sleep(0.3)  # the sink's last files
        sink_count, problems = check(system, result, sink)
    cpu = sampler.cpu_used
    return _measurement(scenario, system, concurrency, setup, result, cpu, sampler, sink_count, problems,
                        correct=not problems and result.failed == 0, settings=settings_of(server))


def _measurement(scenario: str, system: str, concurrency: int, setup: Setup, result: loadgen.Result, cpu: float,
                 sampler: Sampler, sink_count: int, problems: list[str], correct: bool,
                 settings: dict[str, str], **extra: object) -> Measurement:
    elapsed = result.elapsed or setup.duration
    messages = result.delivered
    return Measurement(
        scenario=scenario, system=system, concurrency=concurrency, sessions=result.sessions,
        sessions_per_s=result.sessions / elapsed, messages_per_s=messages / elapsed,
        p50_ms=percentile(result.latencies, 0.5), p90_ms=percentile(result.latencies, 0.9),
        p99_ms=percentile(result.latencies, 0.99), sut_cpu_s=cpu,
        sessions_per_cpu_s=result.sessions / cpu if cpu > 0 else 0.0,
        messages_per_cpu_s=messages / cpu if cpu > 0 else 0.0,
        peak_rss_mb=sampler.peak_rss / 2**20, loadgen_cpu_s=result.cpu, refused=result.refused,
        relayed=result.relayed, delivered=result.delivered, failed=result.failed, sink_messages=sink_count,
        correct=correct, problems="; ".join(filter(None, [*problems, failed_text(result.failed, result.errors)])),
        failures=dict(result.errors), settings=settings, **extra,  # type: ignore[arg-type]
    )


def measure_hostile(system: str, concurrency: int, setup: Setup) -> Measurement:
    """``deliver`` at ``concurrency`` beside ``setup.hostile_clients`` hostile clients, against a
    sink that serves at most ``setup.backend_limit`` sessions at once."""
    counts = hostile.split(setup.hostile_clients)
    with ExitStack() as stack:
        sink = stack.enter_context(SmtpSink(max_sessions=setup.backend_limit))
        server = start_system(system, sink, stack, setup, concurrency + setup.hostile_clients)
        target = server if server is not None else sink
        job = loadgen.Job(target.host, target.port, "hostile", concurrency, setup.duration, setup.sessions,
                          setup.message_size, session_timeout=setup.session_timeout)
        with Sampler(target.pids(), backend=sink.port) as sampler:
            rss_start = sampler.peak_rss
            clients = hostile.HostileProcess(target.host, target.port, counts, setup.hostile_max_bytes,
                                             setup.message_size, setup.session_timeout,
                                             limit=setup.duration + setup.session_timeout + 120)
            try:
                clients.start()
                cpu_start = sampler.cpu()
                result = loadgen.run_load(job, setup.processes)
                cpu = sampler.cpu() - cpu_start
            finally:
                kinds = clients.finish()
        time.sleep(0.3)  # the sink's last files
        checked = loadgen.Result()
        checked.merge(result)
        for stats in kinds.values():
            checked.tokens.extend(stats.pop("tokens"))
        sink_count, problems = check(system, checked, sink)
    if not kinds:
        problems.append("the hostile clients' process reported nothing")
    for stats in kinds.values():
        times = stats.pop("close_after_s")
        stats["close_after_s"] = ({"min": min(times), "median": statistics.median(times), "max": max(times)}
                                  if times else None)
    details = {"clients": counts, "max_bytes_per_client": setup.hostile_max_bytes,
               "backend_limit": setup.backend_limit, "rss_start_mb": rss_start / 2**20, "kinds": kinds}
    # Correct: the sink holds exactly what was acknowledged. Failed normal sessions are what the
    # scenario measures, reported by reason, not a fault of the harness.
    return _measurement("hostile", system, concurrency, setup, result, cpu, sampler, sink_count, problems,
                        correct=not problems, settings=settings_of(server),
                        peak_backend_connections=sampler.peak_backend, peak_backend_queued=sampler.peak_queued,
                        peak_backend_established=sampler.peak_established, hostile=details)


def measure_under_load(kind: str, count: int, concurrency: int, system: str, setup: Setup) -> dict[str, object]:
    """``deliver`` through an edgeproxy system alone, then beside ``count`` idle or trickling clients."""
    with ExitStack() as stack:
        sink = stack.enter_context(SmtpSink())
        proxy = start_system(system, sink, stack, setup, concurrency + count)
        assert proxy is not None
        job = loadgen.Job(proxy.host, proxy.port, "deliver", concurrency, setup.duration, 0, setup.message_size,
                          session_timeout=setup.session_timeout)
        sampler = Sampler(proxy.pids())
        rss_before = sampler.rss()
        unloaded = loadgen.run_load(job, setup.processes)
        holder, ready = loadgen.background(kind, proxy.host, proxy.port, count, setup.duration * 2 + 30)
        ready.wait(120)  # type: ignore[attr-defined]
        time.sleep(1)
        rss_loaded = sampler.rss()
        loaded = loadgen.run_load(job, setup.processes)
        holder.terminate()
        holder.join(10)
        time.sleep(0.3)
        both = loadgen.Result()
        both.merge(unloaded)
        both.merge(loaded)
        _, problems = check(system, both, sink)
    if both.failed:
        problems.append(failed_text(both.failed, both.errors))
    rate = {name: r.delivered / (r.elapsed or setup.duration) for name, r in (("unloaded", unloaded),
                                                                              ("loaded", loaded))}
    return {
        "scenario": f"{kind}-hold" if kind == "idle" else "slow-clients", "system": system, "clients": count,
        "concurrency": concurrency, "rss_before_mb": rss_before / 2**20, "rss_loaded_mb": rss_loaded / 2**20,
        "rss_per_connection_kb": (rss_loaded - rss_before) / 1024 / max(count, 1),
        "unloaded_messages_per_s": rate["unloaded"], "loaded_messages_per_s": rate["loaded"],
        "loaded_fraction": rate["loaded"] / rate["unloaded"] if rate["unloaded"] else 0.0,
        "unloaded_p99_ms": percentile(unloaded.latencies, 0.99), "loaded_p99_ms": percentile(loaded.latencies, 0.99),
        "failed": both.failed, "failures": dict(both.errors), "problems": problems,
        "settings": settings_of(proxy),
    }


def progress(text: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{text}")
        sys.stderr.flush()
    else:
        print(text, file=sys.stderr, flush=True)

