"""One measured run: a system under test in front of a fresh sink, a load, and the counts."""

from __future__ import annotations

import re
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import psutil

from bench import loadgen
from bench.servers import EdgeproxyServer, HaproxyTcp, PostfixRelayPolicy, Server, SmtpSink, process_tree

POLICY_SYSTEMS = ("edgeproxy", "postfix")
TOKEN = re.compile(rb"Subject: bench (\S+)")


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

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class Sampler:
    """Polls the system under test's CPU and RSS while the load runs."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak_rss = 0
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

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_rss = max(self.peak_rss, self.rss())

    def __enter__(self) -> Sampler:
        self.peak_rss = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.cpu_used = self.cpu() - self._cpu_start


def start_system(system: str, sink: SmtpSink, stack: ExitStack, workers: int, concurrency: int) -> Server | None:
    if system == "direct":
        return None
    if system == "edgeproxy":
        # Enough pooled backend connections for the offered concurrency, as an operator would set.
        pool = str(max(64, concurrency))
        return stack.enter_context(EdgeproxyServer(sink.address, workers=workers, backend_pool_size=pool))
    if system == "haproxy":
        return stack.enter_context(HaproxyTcp(sink.address))
    if system == "postfix":
        return stack.enter_context(PostfixRelayPolicy(sink.address))
    raise ValueError(f"unknown system {system!r}")


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
    if system in POLICY_SYSTEMS:
        if result.relayed:
            problems.append(f"{result.relayed} relay attempts accepted")
        if any(b"victim@elsewhere.test" in content for content in messages):
            problems.append("a refused relay reached the sink")
    return len(messages), problems


def measure(scenario: str, system: str, concurrency: int, duration: float, sessions: int, message_size: int,
            workers: int, processes: int) -> Measurement:
    with ExitStack() as stack:
        sink = stack.enter_context(SmtpSink())
        server = start_system(system, sink, stack, workers, concurrency)
        target = server if server is not None else sink
        pids = target.pids()
        job = loadgen.Job(target.host, target.port, scenario, concurrency, duration, sessions, message_size)
        with Sampler(pids) as sampler:
            result = loadgen.run_load(job, processes)
        time.sleep(0.3)  # the sink's last files
        sink_count, problems = check(system, result, sink)
    elapsed = result.elapsed or duration
    messages = result.delivered
    cpu = sampler.cpu_used
    return Measurement(
        scenario=scenario, system=system, concurrency=concurrency, sessions=result.sessions,
        sessions_per_s=result.sessions / elapsed, messages_per_s=messages / elapsed,
        p50_ms=percentile(result.latencies, 0.5), p90_ms=percentile(result.latencies, 0.9),
        p99_ms=percentile(result.latencies, 0.99), sut_cpu_s=cpu,
        sessions_per_cpu_s=result.sessions / cpu if cpu > 0 else 0.0,
        messages_per_cpu_s=messages / cpu if cpu > 0 else 0.0,
        peak_rss_mb=sampler.peak_rss / 2**20, loadgen_cpu_s=result.cpu, refused=result.refused,
        relayed=result.relayed, delivered=result.delivered, failed=result.failed, sink_messages=sink_count,
        correct=not problems and result.failed == 0, problems="; ".join(problems) + (
            f"; {result.failed} sessions failed {result.errors}" if result.failed else ""),
    )


def measure_under_load(kind: str, count: int, concurrency: int, duration: float, message_size: int,
                       workers: int, processes: int) -> dict[str, object]:
    """``deliver`` through edgeproxy alone, then beside ``count`` idle or trickling clients."""
    with ExitStack() as stack:
        sink = stack.enter_context(SmtpSink())
        proxy = stack.enter_context(EdgeproxyServer(sink.address, workers=workers))
        job = loadgen.Job(proxy.host, proxy.port, "deliver", concurrency, duration, 0, message_size)
        sampler = Sampler(proxy.pids())
        rss_before = sampler.rss()
        unloaded = loadgen.run_load(job, processes)
        holder, ready = loadgen.background(kind, proxy.host, proxy.port, count, duration * 2 + 30)
        ready.wait(120)  # type: ignore[attr-defined]
        time.sleep(1)
        rss_loaded = sampler.rss()
        loaded = loadgen.run_load(job, processes)
        holder.terminate()
        holder.join(10)
        time.sleep(0.3)
        both = loadgen.Result()
        both.merge(unloaded)
        both.merge(loaded)
        _, problems = check("edgeproxy", both, sink)
    rate = {name: r.delivered / (r.elapsed or duration) for name, r in (("unloaded", unloaded), ("loaded", loaded))}
    return {
        "scenario": f"{kind}-hold" if kind == "idle" else "slow-clients", "clients": count,
        "concurrency": concurrency, "rss_before_mb": rss_before / 2**20, "rss_loaded_mb": rss_loaded / 2**20,
        "rss_per_connection_kb": (rss_loaded - rss_before) / 1024 / max(count, 1),
        "unloaded_messages_per_s": rate["unloaded"], "loaded_messages_per_s": rate["loaded"],
        "loaded_fraction": rate["loaded"] / rate["unloaded"] if rate["unloaded"] else 0.0,
        "unloaded_p99_ms": percentile(unloaded.latencies, 0.99), "loaded_p99_ms": percentile(loaded.latencies, 0.99),
        "failed": unloaded.failed + loaded.failed, "problems": problems,
    }


def progress(text: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{text}")
        sys.stderr.flush()
    else:
        print(text, file=sys.stderr, flush=True)

