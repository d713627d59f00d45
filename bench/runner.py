"""One measured run: a system under test in front of a fresh sink, a load, and the counts."""

from __future__ import annotations

import dataclasses
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
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
    SlowSink,
    SmtpSink,
    process_tree,
)

TOKEN = re.compile(rb"Subject: bench (\S+)")
BASELINE = "edgeproxy@baseline"
DEFAULT_MAX_CONNECTIONS = 1000  # edgeproxy's default EDGEPROXY_MAX_CONNECTIONS, per worker
HOSTILE_BACKEND_LIMIT = 100  # the hostile scenario's sink, unless --backend-limit says otherwise

# The rows of the deliver-tls scenario: (what the load generator runs, offering the last session).
# The plaintext ehlo-only row and the handshake-only rows give the share of CPU in the handshake.
TLS_ROWS = {
    "deliver-tls": (loadgen.DELIVER_TLS, False),
    "deliver-tls/resumed": (loadgen.DELIVER_TLS, True),
    "tls-handshake-only": (loadgen.HANDSHAKE_ONLY, False),
    "tls-handshake-only/resumed": (loadgen.HANDSHAKE_ONLY, True),
    "ehlo-only": (loadgen.EHLO_ONLY, False),
}
FLOOR = "deliver-tls"  # direct's row: plaintext deliver to the sink, the floor


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
    backend_limit: int | None = None  # sessions the sink serves at once; None: smtp-sink's own (256)
    builds: dict[str, EdgeproxyBuild] = field(default_factory=lambda: {"edgeproxy": EdgeproxyBuild()})
    tls_cert: Path | None = None  # deliver-tls: a throwaway certificate made for this run
    tls_key: Path | None = None
    held_clients: int = 100
    held_deliver_clients: int = 10
    held_max_bytes: int = 64 * 2**20
    held_rcpt_delay: float | None = None  # None: the run's duration + 30 s, never answered within it
    held_rss_guard: int = 4 * 2**30  # held-input: the writers stop if the system's RSS passes this
    sources: int = loadgen.DEFAULT_SOURCES  # the load generator's source addresses (1: 127.0.0.1 alone)
    settle: float = 5.0  # seconds a cell waits at most for the machine's TIME-WAIT sockets to fall
    load_only: tuple[str, ...] = ()  # systems run in the load scenarios only (the automatic edgeproxy@warning)

    def job(self, host: str, port: int, scenario: str, concurrency: int, **extra: object) -> loadgen.Job:
        return loadgen.Job(host, port, scenario, concurrency, self.duration, self.sessions, self.message_size,
                           session_timeout=self.session_timeout, sources=self.sources, **extra)  # type: ignore[arg-type]

    def sink_limit(self, scenario: str) -> int | None:
        return self.backend_limit if self.backend_limit or scenario != "hostile" else HOSTILE_BACKEND_LIMIT


def proxy_settings(clients: int) -> dict[str, str]:
    """edgeproxy's defaults, except what this load needs: all of it comes from a few loopback
    addresses, and more than the default connections per worker when that many clients are held
    at once. The log level is the default (info: a line a session), written to a file."""
    settings = {"EDGEPROXY_LOCAL_DOMAINS": "example.test", "EDGEPROXY_MAX_CONNECTIONS_PER_IP": "0"}
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
    peak_backend_connections: int | None = None  # ESTABLISHED connections the sink held at most
    peak_backend_queued: int | None = None  # ... and those waiting in its listen backlog
    peak_backend_established: int | None = None  # both at once (the sample with the most)
    backend_limit: int | None = None  # sessions the sink served at once at most (None: smtp-sink's 256)
    hostile: dict[str, object] | None = None  # hostile: per kind, what the hostile clients did
    tls: dict[str, object] | None = None  # deliver-tls rows: mode, handshakes, resumed, versions
    held_input: dict[str, object] | None = None  # held-input: the held clients, RSS, deliver beside them
    other_cpu_s: float | None = None  # the machine's CPU used by none of the run's processes meanwhile
    log_bytes: int | None = None  # edgeproxy systems: what it wrote to its log (stderr, a file) during the load
    time_wait_start: int | None = None  # the machine's TIME-WAIT sockets when the cell started
    settle_s: float | None = None  # ... after waiting this long for them to fall (see settle)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


SS = shutil.which("ss") or "/usr/bin/ss"


def time_wait_count() -> int | None:
    """The machine's (network namespace's) TCP sockets in TIME-WAIT, from /proc/net/sockstat."""
    try:
        with open("/proc/net/sockstat") as stats:
            for line in stats:
                if line.startswith("TCP:"):
                    fields = line.split()
                    return int(fields[fields.index("tw") + 1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def ephemeral_ports() -> int:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return high - low + 1
    except (OSError, ValueError):
        return 28232


def time_wait_limit() -> int | None:
    """net.ipv4.tcp_max_tw_buckets: with that many in TIME-WAIT, closing sockets skip it."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_max_tw_buckets").read_text())
    except (OSError, ValueError):
        return None


def time_wait_calm(sources: int) -> int:
    """TIME-WAIT sockets below which a cell starts at once: half the ephemeral ports of the
    clients' address pairs, one per source address (~14,000 for 127.0.0.1 alone, ~900,000 for
    64 sources: with the load spread, the wait is for runs with ``--sources 1``)."""
    return ephemeral_ports() * max(1, sources) // 2


def settle(limit: float, sources: int = 1) -> tuple[int | None, float]:
    """Before a cell: wait, ``limit`` seconds at most, for the TIME-WAIT sockets the cells before
    it left to fall below :func:`time_wait_calm`, so a cell at 60,000 sessions/s does not leave
    its neighbour short of ports. Returns the count it starts with and the seconds waited."""
    started = time.monotonic()
    calm = time_wait_calm(sources)
    count = time_wait_count()
    while count is not None and count > calm and time.monotonic() - started < limit:
        time.sleep(0.25)
        count = time_wait_count()
    return count, time.monotonic() - started


def backend_connections(port: int) -> tuple[int, int]:
    """(held, queued): ESTABLISHED TCP connections to ``port`` that its listener has accepted,
    and those complete but still waiting in its listen backlog.

    From ``ss -tnHe state established '( sport = :port )'``: the kernel filters (netlink), so it
    stays cheap (~5 ms) however many TIME-WAIT sockets a run leaves, where psutil.net_connections
    (reading /proc/net/tcp and every process's descriptors) took 130 ms a call here. A socket
    still in the backlog has no inode yet (``ino:0``), so each connection is counted once, as one
    or the other: the listener's Recv-Q, read at another instant than the connections, counted
    a connection accepted in between as both under fast churn. Without ss: /proc/net/tcp, where
    the same holds."""
    if Path(SS).exists():
        out = subprocess.run([SS, "-tnHe", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, timeout=10).stdout
        held = queued = 0
        for line in out.splitlines():
            if " ino:0 " in line:
                queued += 1
            elif line.strip():
                held += 1
        return held, queued
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

    def __init__(self, pids: list[int], backend: int | None = None,
                 on_rss: Callable[[int], None] | None = None) -> None:
        self.pids = pids
        self.backend = backend
        self.on_rss = on_rss  # called with each RSS sample
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
        rss = self.rss()
        self.peak_rss = max(self.peak_rss, rss)
        if self.on_rss is not None:
            self.on_rss(rss)
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


def start_system(system: str, sink: SmtpSink, stack: ExitStack, setup: Setup, clients: int,
                 tls: bool = False) -> Server | None:
    """Start ``system`` in front of ``sink`` for a load of ``clients`` connections at once; with
    ``tls``, offering STARTTLS with the run's certificate."""
    if system == "direct":
        return None
    pair = (setup.tls_cert, setup.tls_key) if tls else None
    if tls and (pair[0] is None or pair[1] is None):  # type: ignore[index]
        raise ValueError("a TLS scenario needs setup.tls_cert and setup.tls_key")
    if is_edgeproxy(system):
        settings = proxy_settings(clients) | dict(setup.builds[system].settings)
        if pair is not None:
            settings |= {"EDGEPROXY_TLS_CERT": str(pair[0]), "EDGEPROXY_TLS_KEY": str(pair[1])}
        return stack.enter_context(EdgeproxyServer(sink.address, workers=setup.workers, build=setup.builds[system],
                                                   settings=settings))
    if system == "haproxy":
        return stack.enter_context(HaproxyTcp(sink.address))
    if system == "postfix":
        return stack.enter_context(PostfixRelayPolicy(sink.address, tls=pair))  # type: ignore[arg-type]
    raise ValueError(f"unknown system {system!r}")


def tls_row(scenario: str, system: str) -> tuple[str, bool, str | None]:
    """What a row runs: (load generator scenario, TLS resumption, TLS mode for the report)."""
    if scenario not in TLS_ROWS:
        return scenario, False, None
    if system == "direct":
        return "deliver", False, "plaintext floor"  # the sink offers no STARTTLS
    kind, resumed = TLS_ROWS[scenario]
    if kind == loadgen.EHLO_ONLY:
        return kind, False, "plaintext"
    return kind, resumed, "resumed" if resumed else "full"


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
    """One row: ``scenario`` (a load scenario, or one of :data:`TLS_ROWS`) through ``system``."""
    kind, resumption, tls_mode = tls_row(scenario, system)
    with ExitStack() as stack:
        limit = setup.sink_limit(scenario)
        sink = stack.enter_context(SmtpSink(max_sessions=limit))
        server = start_system(system, sink, stack, setup, concurrency, tls=tls_mode is not None)
        target = server if server is not None else sink
        pids = target.pids()
        job = setup.job(target.host, target.port, kind, concurrency, tls_resumption=resumption)
        sink_cpu = Sampler(sink.pids()) if server is not None else None
        machine, own = machine_cpu(), harness_cpu()
        log_start = log_size(server)
        with Sampler(pids, backend=sink.port) as sampler:
            result = loadgen.run_load(job, setup.processes)
        machine, own = machine_cpu() - machine, harness_cpu() - own
        logged = log_size(server) - log_start if isinstance(server, EdgeproxyServer) else None
        sink_used = sink_cpu.cpu() - sink_cpu._cpu_start if sink_cpu is not None else 0.0
        time.sleep(0.3)  # the sink's last files
        sink_count, problems = check(system, result, sink)
    cpu = sampler.cpu_used
    # The machine's CPU that neither the system, its sink, the load generator nor this harness
    # used: other work sharing the cores (another test suite, say), which the figures also show.
    other = max(0.0, machine - cpu - sink_used - own)
    tls = None
    if tls_mode is not None:
        tls = {"mode": tls_mode, "handshakes": result.tls_handshakes, "offered": result.tls_offered,
               "resumed": result.tls_resumed, "versions": dict(result.tls_versions)}
        if tls_mode in ("full", "resumed") and result.tls_handshakes < result.sessions:
            problems.append(f"{result.sessions - result.tls_handshakes} sessions without a TLS handshake")
    return _measurement(scenario, system, concurrency, setup, result, cpu, sampler, sink_count, problems,
                        correct=not problems and result.failed == 0, settings=settings_of(server),
                        backend_limit=limit, tls=tls, other_cpu_s=other, log_bytes=logged,
                        **_backend_peaks(sampler))


def log_size(server: Server | None) -> int:
    """Octets in an edgeproxy system's log file (its stderr) so far; 0 for anything else."""
    if not isinstance(server, EdgeproxyServer):
        return 0
    try:
        return (server.root / "log").stat().st_size
    except OSError:
        return 0


def harness_cpu() -> float:
    """This process's CPU and its reaped children's: the load generators (joined), ss."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def machine_cpu() -> float:
    """CPU-seconds the whole machine has been busy (every core, not idle, waiting or stolen)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0) - getattr(times, "steal", 0.0) - \
        getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)


def _backend_peaks(sampler: Sampler) -> dict[str, int]:
    return {"peak_backend_connections": sampler.peak_backend, "peak_backend_queued": sampler.peak_queued,
            "peak_backend_established": sampler.peak_established}


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
    limit = setup.sink_limit("hostile")
    with ExitStack() as stack:
        sink = stack.enter_context(SmtpSink(max_sessions=limit))
        server = start_system(system, sink, stack, setup, concurrency + setup.hostile_clients)
        target = server if server is not None else sink
        job = setup.job(target.host, target.port, "hostile", concurrency)
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
        stats.pop("bytes_per_client", None)
        _close_times(stats)
    details = {"clients": counts, "max_bytes_per_client": setup.hostile_max_bytes,
               "backend_limit": limit, "rss_start_mb": rss_start / 2**20, "kinds": kinds}
    # Correct: the sink holds exactly what was acknowledged. Failed normal sessions are what the
    # scenario measures, reported by reason, not a fault of the harness.
    return _measurement("hostile", system, concurrency, setup, result, cpu, sampler, sink_count, problems,
                        correct=not problems, settings=settings_of(server), backend_limit=limit,
                        hostile=details, **_backend_peaks(sampler))


def _close_times(stats: dict[str, object]) -> None:
    times: list[float] = stats.pop("close_after_s")  # type: ignore[assignment]
    stats["close_after_s"] = ({"min": min(times), "median": statistics.median(times), "max": max(times)}
                              if times else None)


def measure_held_input(system: str, setup: Setup) -> Measurement:
    """``deliver`` by ``setup.held_deliver_clients`` clients through an edgeproxy system, alone and
    then beside ``setup.held_clients`` held-input clients (EHLO, MAIL, a RCPT the backend answers
    only after ``held_rcpt_delay``, then NOOP lines written without reading). The row is the deliver
    clients beside the held ones; ``held_input`` adds the RSS and what the held clients sent."""
    concurrency = setup.held_deliver_clients
    delay = setup.held_rcpt_delay if setup.held_rcpt_delay is not None else setup.duration + 30
    guard: dict[str, float | None] = {"hit_mb": None}
    with ExitStack() as stack:
        sink = stack.enter_context(SlowSink(delay, max_sessions=setup.backend_limit))
        server = start_system(system, sink, stack, setup, concurrency + setup.held_clients)
        assert server is not None
        job = setup.job(server.host, server.port, "held-input", concurrency)
        unloaded = loadgen.run_load(job, setup.processes)
        clients = hostile.HostileProcess(server.host, server.port, {hostile.HELD: setup.held_clients},
                                         setup.held_max_bytes, setup.message_size, setup.session_timeout,
                                         limit=setup.duration + setup.session_timeout + 120)

        def watch(rss: int) -> None:  # the writers stop before the machine runs out of memory
            if rss > setup.held_rss_guard and guard["hit_mb"] is None:
                guard["hit_mb"] = rss / 2**20
                clients.stop.set()

        with Sampler(server.pids(), backend=sink.port, on_rss=watch) as sampler:
            rss_start = sampler.peak_rss
            cpu_start = sampler.cpu()  # what the held clients cost, from their first byte, is in
            try:
                clients.start()
                result = loadgen.run_load(job, setup.processes)
                cpu = sampler.cpu() - cpu_start
            finally:
                kinds = clients.finish()
        time.sleep(0.3)  # the sink's last files
        both = loadgen.Result()
        both.merge(unloaded)
        both.merge(result)
        sink_count, problems = check(system, both, sink)
        # The backend goes first: a proxy that stopped reading a held client does not see it
        # leave, and its drain would wait for that transaction; the backend's loss ends it.
        sink.stop()
    stats: dict[str, object] = kinds.get(hostile.HELD) or {}
    if not stats:
        problems.append("the held-input clients' process reported nothing")
    else:
        stats.pop("tokens", None)
        _close_times(stats)
    sent: list[int] = stats.pop("bytes_per_client", []) or []  # type: ignore[assignment]
    rate_unloaded = unloaded.delivered / (unloaded.elapsed or setup.duration)
    rate_loaded = result.delivered / (result.elapsed or setup.duration)
    details = {
        "clients": setup.held_clients, "deliver_clients": concurrency, "rcpt_delay_s": delay,
        "max_bytes_per_client": setup.held_max_bytes, "rss_start_mb": rss_start / 2**20,
        "rss_guard_mb": setup.held_rss_guard / 2**20, "rss_guard_hit_mb": guard["hit_mb"],
        "sent_median_mb": statistics.median(sent) / 2**20 if sent else 0.0,
        "sent_max_mb": max(sent) / 2**20 if sent else 0.0, "sent_total_mb": sum(sent) / 2**20,
        "unloaded_messages_per_s": rate_unloaded, "unloaded_failed": unloaded.failed,
        "unloaded_failures": dict(unloaded.errors), "loaded_fraction": rate_loaded / rate_unloaded
        if rate_unloaded else 0.0, "kind": stats,
    }
    # Failed normal sessions are the finding, by reason; correct means the sink holds exactly
    # the acknowledged messages.
    return _measurement("held-input", system, concurrency, setup, result, cpu, sampler, sink_count, problems,
                        correct=not problems, settings=settings_of(server), backend_limit=setup.backend_limit,
                        held_input=details, **_backend_peaks(sampler))


def measure_under_load(kind: str, count: int, concurrency: int, system: str, setup: Setup) -> dict[str, object]:
    """``deliver`` through an edgeproxy system alone, then beside ``count`` idle or trickling clients."""
    with ExitStack() as stack:
        sink = stack.enter_context(SmtpSink(max_sessions=setup.backend_limit))
        proxy = start_system(system, sink, stack, setup, concurrency + count)
        assert proxy is not None
        job = dataclasses.replace(setup.job(proxy.host, proxy.port, "deliver", concurrency), sessions=0)
        sampler = stack.enter_context(Sampler(proxy.pids(), backend=sink.port))
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
        "settings": settings_of(proxy), "backend_limit": setup.backend_limit, **_backend_peaks(sampler),
    }


def progress(text: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{text}")
        sys.stderr.flush()
    else:
        print(text, file=sys.stderr, flush=True)

