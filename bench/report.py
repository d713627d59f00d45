"""Terminal table, JSON, Markdown and PNG plots of a benchmark run, with ratios and targets."""

from __future__ import annotations

import json
from pathlib import Path

from bench.runner import Measurement

COLUMNS = [
    ("scenario", "scenario", "{}"), ("system", "system", "{}"), ("concurrency", "conc", "{}"),
    ("sessions_per_s", "sess/s", "{:,.0f}"), ("messages_per_s", "msg/s", "{:,.0f}"),
    ("p50_ms", "p50 ms", "{:.2f}"), ("p99_ms", "p99 ms", "{:.2f}"), ("sut_cpu_s", "SUT cpu s", "{:.2f}"),
    ("sessions_per_cpu_s", "sess/cpu-s", "{:,.0f}"), ("messages_per_cpu_s", "msg/cpu-s", "{:,.0f}"),
    ("peak_rss_mb", "RSS MB", "{:.1f}"), ("loadgen_cpu_s", "loadgen cpu s", "{:.2f}"), ("correct", "correct", "{}"),
]


def table(rows: list[Measurement]) -> str:
    header = [title for _, title, _ in COLUMNS]
    body = [[fmt.format(getattr(row, name)) for name, _, fmt in COLUMNS] for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *body, strict=False)]
    lines = [" | ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
             for line in [header, *body]]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def _find(rows: list[Measurement], scenario: str, system: str, concurrency: int) -> Measurement | None:
    return next((r for r in rows if (r.scenario, r.system, r.concurrency) == (scenario, system, concurrency)), None)


def ratios(rows: list[Measurement]) -> list[dict[str, object]]:
    """edgeproxy against every reference of the same scenario and concurrency."""
    out = []
    for row in rows:
        if row.system != "edgeproxy":
            continue
        for reference in ("direct", "haproxy", "postfix"):
            other = _find(rows, row.scenario, reference, row.concurrency)
            if other is None:
                continue
            out.append({
                "scenario": row.scenario, "concurrency": row.concurrency, "reference": reference,
                "throughput_ratio": row.sessions_per_s / other.sessions_per_s if other.sessions_per_s else None,
                "per_cpu_ratio": (row.sessions_per_cpu_s / other.sessions_per_cpu_s
                                  if other.sessions_per_cpu_s else None),
                "p99_difference_ms": row.p99_ms - other.p99_ms,
            })
    return out


def targets(rows: list[Measurement], held: list[dict[str, object]]) -> list[tuple[str, str, str]]:
    """(target, measured, pass/miss) for each target whose scenarios ran."""
    out = []
    for concurrency in sorted({r.concurrency for r in rows}):
        proxy, postfix = _find(rows, "relay-storm", "edgeproxy", concurrency), _find(rows, "relay-storm", "postfix",
                                                                                     concurrency)
        if proxy and postfix and postfix.sessions_per_cpu_s:
            ratio = proxy.sessions_per_cpu_s / postfix.sessions_per_cpu_s
            out.append((f"relay-storm c={concurrency}: refused/CPU-s ≥ 2× Postfix",
                        f"{proxy.sessions_per_cpu_s:,.0f} vs {postfix.sessions_per_cpu_s:,.0f} ({ratio:.2f}×)",
                        "pass" if ratio >= 2 else "miss"))
        proxy, haproxy = _find(rows, "deliver", "edgeproxy", concurrency), _find(rows, "deliver", "haproxy",
                                                                                 concurrency)
        if proxy and haproxy and haproxy.messages_per_cpu_s:
            cpu_ratio = proxy.messages_per_cpu_s / haproxy.messages_per_cpu_s
            wall_ratio = proxy.messages_per_s / haproxy.messages_per_s if haproxy.messages_per_s else 0
            out.append((f"deliver c={concurrency}: msg/CPU-s ≥ HAProxy's",
                        f"{proxy.messages_per_cpu_s:,.0f} vs {haproxy.messages_per_cpu_s:,.0f} ({cpu_ratio:.2f}×)",
                        "pass" if cpu_ratio >= 1 else "miss"))
            out.append((f"deliver c={concurrency}: wall msg/s ≥ HAProxy's",
                        f"{proxy.messages_per_s:,.0f} vs {haproxy.messages_per_s:,.0f} ({wall_ratio:.2f}×)",
                        "pass" if wall_ratio >= 1 else "miss"))
    proxy, direct = _find(rows, "deliver", "edgeproxy", 10), _find(rows, "deliver", "direct", 10)
    if proxy and direct:
        difference = proxy.p99_ms - direct.p99_ms
        out.append(("deliver c=10: p99 within 2 ms of direct", f"+{difference:.2f} ms",
                    "pass" if difference <= 2 else "miss"))
    for hold in held:
        if hold["scenario"] == "idle-hold":
            per = float(hold["rss_per_connection_kb"])  # type: ignore[arg-type]
            fraction = float(hold["loaded_fraction"])  # type: ignore[arg-type]
            out.append((f"idle-hold {hold['clients']:,} idle: ≤ 10 KB RSS each", f"{per:.1f} KB",
                        "pass" if per <= 10 else "miss"))
            out.append(("idle-hold: deliver ≥ 50% of unloaded", f"{fraction:.0%}",
                        "pass" if fraction >= 0.5 else "miss"))
    return out


def write(directory: Path, rows: list[Measurement], held: list[dict[str, object]], command: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    data = {"command": command, "runs": [r.as_dict() for r in rows], "under_load": held,
            "ratios": ratios(rows), "targets": targets(rows, held)}
    (directory / "results.json").write_text(json.dumps(data, indent=2))
    lines = [f"# edgeproxy benchmark\n\nCommand: `{command}`\n", "## Runs\n", "```", table(rows), "```\n"]
    if data["ratios"]:
        lines += ["## edgeproxy relative to the references\n",
                  "| scenario | conc | reference | throughput | per CPU-second | p99 difference |",
                  "|---|---|---|---|---|---|"]
        for ratio in data["ratios"]:
            lines.append(f"| {ratio['scenario']} | {ratio['concurrency']} | {ratio['reference']} | "
                         f"{_times(ratio['throughput_ratio'])} | {_times(ratio['per_cpu_ratio'])} | "
                         f"{ratio['p99_difference_ms']:+.2f} ms |")
    if held:
        lines += ["\n## Under load\n", "| scenario | clients | RSS/conn KB | deliver unloaded | loaded | fraction | "
                  "p99 unloaded → loaded |", "|---|---|---|---|---|---|---|"]
        for hold in held:
            lines.append(f"| {hold['scenario']} | {hold['clients']} | {hold['rss_per_connection_kb']:.1f} | "
                         f"{hold['unloaded_messages_per_s']:,.0f}/s | {hold['loaded_messages_per_s']:,.0f}/s | "
                         f"{hold['loaded_fraction']:.0%} | "
                         f"{hold['unloaded_p99_ms']:.1f} → {hold['loaded_p99_ms']:.1f} ms |")
    if data["targets"]:
        lines += ["\n## Targets\n", "| target | measured | |", "|---|---|---|"]
        lines += [f"| {name} | {value} | {verdict} |" for name, value, verdict in data["targets"]]
    problems = [f"- {r.scenario}/{r.system}/c={r.concurrency}: {r.problems}" for r in rows if r.problems]
    lines += ["\n## Correctness\n", *(problems or ["Every run: the sink holds exactly the acknowledged messages; "
                                                   "no relay attempt reached it."])]
    (directory / "report.md").write_text("\n".join(lines) + "\n")
    plot(directory, rows)


def _times(value: object) -> str:
    return f"{value:.2f}×" if isinstance(value, float) else "n/a"


def plot(directory: Path, rows: list[Measurement]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for scenario in sorted({r.scenario for r in rows}):
        figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for system in sorted({r.system for r in rows if r.scenario == scenario}):
            runs = sorted((r for r in rows if r.scenario == scenario and r.system == system),
                          key=lambda r: r.concurrency)
            x = [r.concurrency for r in runs]
            axes[0].plot(x, [r.sessions_per_s for r in runs], marker="o", label=system)
            axes[1].plot(x, [r.sessions_per_cpu_s for r in runs], marker="o", label=system)
            axes[2].plot(x, [r.p99_ms for r in runs], marker="o", label=system)
        for axis, title in zip(axes, ("sessions/s (wall clock)", "sessions per SUT CPU-second", "p99 latency (ms)"),
                               strict=True):
            axis.set_title(f"{scenario}: {title}")
            axis.set_xlabel("concurrency")
            axis.set_xscale("log")
            axis.grid(True, alpha=0.3)
            axis.legend()
        figure.tight_layout()
        figure.savefig(directory / f"{scenario}.png", dpi=90)
        plt.close(figure)
