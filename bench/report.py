"""Terminal table, JSON, Markdown and PNG plots of a benchmark run, with ratios and targets."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.runner import BASELINE, Measurement, format_reasons

REFERENCES = ("direct", "haproxy", "postfix", BASELINE)


def _failures(row: Measurement) -> str:
    return f"{row.failed} ({format_reasons(row.failures)})" if row.failed else "0"


COLUMNS: list[tuple[str, Callable[[Measurement], str]]] = [
    ("scenario", lambda r: r.scenario), ("system", lambda r: r.system), ("conc", lambda r: str(r.concurrency)),
    ("sess/s", lambda r: f"{r.sessions_per_s:,.0f}"), ("msg/s", lambda r: f"{r.messages_per_s:,.0f}"),
    ("p50 ms", lambda r: f"{r.p50_ms:.2f}"), ("p99 ms", lambda r: f"{r.p99_ms:.2f}"),
    ("SUT cpu s", lambda r: f"{r.sut_cpu_s:.2f}"), ("sess/cpu-s", lambda r: f"{r.sessions_per_cpu_s:,.0f}"),
    ("msg/cpu-s", lambda r: f"{r.messages_per_cpu_s:,.0f}"), ("RSS MB", lambda r: f"{r.peak_rss_mb:.1f}"),
    ("loadgen cpu s", lambda r: f"{r.loadgen_cpu_s:.2f}"), ("correct", lambda r: str(r.correct)),
    ("failed (by reason)", _failures),
]


def table(rows: list[Measurement]) -> str:
    header = [title for title, _ in COLUMNS]
    body = [[cell(row) for _, cell in COLUMNS] for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *body, strict=False)]
    lines = [" | ".join(cell.rjust(width) if index < len(widths) - 1 else cell
                        for index, (cell, width) in enumerate(zip(line, widths, strict=True))).rstrip()
             for line in [header, *body]]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def _find(rows: list[Measurement], scenario: str, system: str, concurrency: int) -> Measurement | None:
    return next((r for r in rows if (r.scenario, r.system, r.concurrency) == (scenario, system, concurrency)), None)


def _ratio(mine: float, other: float) -> float | None:
    return mine / other if other else None


def ratios(rows: list[Measurement]) -> list[dict[str, object]]:
    """edgeproxy against every reference of the same scenario and concurrency, the baseline included."""
    out = []
    for row in rows:
        if row.system != "edgeproxy":
            continue
        for reference in REFERENCES:
            other = _find(rows, row.scenario, reference, row.concurrency)
            if other is None:
                continue
            out.append({
                "scenario": row.scenario, "concurrency": row.concurrency, "reference": reference,
                "throughput_ratio": _ratio(row.sessions_per_s, other.sessions_per_s),
                "per_cpu_ratio": _ratio(row.sessions_per_cpu_s, other.sessions_per_cpu_s),
                "messages_ratio": _ratio(row.messages_per_s, other.messages_per_s),
                "messages_per_cpu_ratio": _ratio(row.messages_per_cpu_s, other.messages_per_cpu_s),
                "rss_ratio": _ratio(row.peak_rss_mb, other.peak_rss_mb),
                "p99_difference_ms": row.p99_ms - other.p99_ms if row.sessions and other.sessions else None,
            })
    return out


def targets(rows: list[Measurement], held: list[dict[str, object]]) -> list[tuple[str, str, str]]:
    """(target, measured, pass/miss) for each target whose scenarios ran (edgeproxy, not its baseline)."""
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
        if hold["scenario"] == "idle-hold" and hold.get("system", "edgeproxy") == "edgeproxy":
            per = float(hold["rss_per_connection_kb"])  # type: ignore[arg-type]
            fraction = float(hold["loaded_fraction"])  # type: ignore[arg-type]
            out.append((f"idle-hold {hold['clients']:,} idle: ≤ 10 KB RSS each", f"{per:.1f} KB",
                        "pass" if per <= 10 else "miss"))
            out.append(("idle-hold: deliver ≥ 50% of unloaded", f"{fraction:.0%}",
                        "pass" if fraction >= 0.5 else "miss"))
    return out


# -- the hostile scenario ---------------------------------------------------------------------------


def _kind_text(kind: str, stats: dict[str, Any]) -> str:
    parts = [f"{stats['connected']}/{stats['clients']} connected"]
    if kind == "idle":
        parts.append(f"{stats['delivered']} delivered")
    else:
        unit = "NOOP" if kind == "never-read" else "RCPT"
        parts.append(f"{stats['bytes_written'] / 2**20:,.1f} MB written (~{stats['lines_written']:,} {unit})")
        if stats["capped"]:
            parts.append(f"{stats['capped']} at the byte cap")
    closed = stats["closed_by_server"]
    if closed:
        times = stats["close_after_s"]
        causes = ", ".join(f"{n}× {cause}" for cause, n in sorted(stats["close_causes"].items()))
        parts.append(f"{closed} closed by the server after {times['min']:.1f}–{times['max']:.1f} s "
                     f"(median {times['median']:.1f}; {causes})")
    else:
        parts.append("none closed by the server")
    parts.append(f"{stats['open_at_end']} open at the end")
    if stats["errors"]:
        parts.append(f"failed: {format_reasons(stats['errors'])}")
    return ", ".join(parts)


def _backend(row: Measurement) -> str:
    limit = (row.hostile or {}).get("backend_limit")
    return (f"held at most {row.peak_backend_connections} of {limit}, at most {row.peak_backend_queued} waiting in "
            f"its backlog, at most {row.peak_backend_established} ESTABLISHED at once")


def hostile_lines(row: Measurement) -> list[str]:
    """One run of the hostile scenario, in words: the normal clients' figures, then each kind's."""
    info: dict[str, Any] = row.hostile or {}
    cpu = f"{row.messages_per_cpu_s:,.0f} msg/cpu-s" if row.sut_cpu_s else "msg/cpu-s n/a"
    lines = [f"hostile via {row.system} at c={row.concurrency} beside {sum(info.get('clients', {}).values())} "
             f"hostile clients: {row.messages_per_s:,.0f} msg/s, {cpu}, {_failures(row)} failed; "
             f"peak RSS {row.peak_rss_mb:.1f} MB (from {info.get('rss_start_mb', 0):.1f}); backend: "
             f"{_backend(row)}"]
    for kind, stats in info.get("kinds", {}).items():
        lines.append(f"  {kind:10} {_kind_text(kind, stats)}")
    return lines


def _hostile_markdown(rows: list[Measurement]) -> list[str]:
    runs = [r for r in rows if r.hostile is not None]
    if not runs:
        return []
    lines = ["\n## Hostile\n",
             "Normal `deliver` clients beside hostile ones; the sink serves at most "
             f"{runs[0].hostile['backend_limit']} sessions at once.\n",  # type: ignore[index]
             "| system | conc | msg/s | msg/cpu-s | failed (by reason) | peak RSS MB (start) | "
             "backend connections at most: held / queued / both at once |", "|---|---|---|---|---|---|---|"]
    for row in runs:
        info: dict[str, Any] = row.hostile  # type: ignore[assignment]
        lines.append(f"| {row.system} | {row.concurrency} | {row.messages_per_s:,.0f} | "
                     f"{row.messages_per_cpu_s:,.0f} | {_failures(row)} | {row.peak_rss_mb:.1f} "
                     f"({info['rss_start_mb']:.1f}) | {row.peak_backend_connections} / {row.peak_backend_queued} / "
                     f"{row.peak_backend_established} |")
    lines += ["", "| system | conc | hostile kind | what happened |", "|---|---|---|---|"]
    for row in runs:
        for kind, stats in row.hostile["kinds"].items():  # type: ignore[index]
            lines.append(f"| {row.system} | {row.concurrency} | {kind} | {_kind_text(kind, stats)} |")
    return lines


# -- outputs -------------------------------------------------------------------------------------


def _systems_lines(systems: list[dict[str, object]]) -> list[str]:
    return [f"- `{s['system']}`: {s['source']}, imports `{s['imports']}` (checkout at {s['commit'] or '?'}, "
            f"fast path {s['fastpath']})" for s in systems]


def _settings_lines(rows: list[Measurement], held: list[dict[str, object]]) -> list[str]:
    seen: dict[tuple[str, str], str] = {}
    for row in rows:
        if row.settings:
            key = (row.system, json.dumps(row.settings, sort_keys=True))
            seen.setdefault(key, f"{row.scenario} c={row.concurrency}")
    for hold in held:
        if hold.get("settings"):
            seen.setdefault((str(hold["system"]), json.dumps(hold["settings"], sort_keys=True)), str(hold["scenario"]))
    return [f"- `{system}` ({where} ...): " + ", ".join(f"`{k}={v}`" for k, v in json.loads(settings).items())
            for (system, settings), where in seen.items()]


def problems(rows: list[Measurement], held: list[dict[str, object]]) -> list[str]:
    out = [f"{r.scenario}/{r.system}/c={r.concurrency}: {r.problems}" for r in rows if r.problems]
    out += [f"{h['scenario']}/{h.get('system', 'edgeproxy')}: {'; '.join(h['problems'])}"  # type: ignore[arg-type]
            for h in held if h["problems"]]
    return out


def terminal(rows: list[Measurement], held: list[dict[str, object]], systems: list[dict[str, object]]) -> str:
    lines = [table(rows)] if rows else []
    for row in rows:
        if row.hostile is not None:
            lines += ["", *hostile_lines(row)]
    for hold in held:
        lines.append(f"\n{hold['scenario']} via {hold.get('system', 'edgeproxy')}: {hold['clients']} clients, "
                     f"{hold['rss_per_connection_kb']:.1f} KB RSS each, deliver {hold['unloaded_messages_per_s']:,.0f}"
                     f" → {hold['loaded_messages_per_s']:,.0f} msg/s ({hold['loaded_fraction']:.0%})")
    baseline = [r for r in ratios(rows) if r["reference"] == BASELINE]
    if baseline:
        lines += ["", "edgeproxy / edgeproxy@baseline (same run):"]
        lines += [f"  {r['scenario']} c={r['concurrency']}: msg/s {_times(r['messages_ratio'])}, msg/cpu-s "
                  f"{_times(r['messages_per_cpu_ratio'])}, sess/cpu-s {_times(r['per_cpu_ratio'])}, peak RSS "
                  f"{_times(r['rss_ratio'])}, p99 {_ms(r['p99_difference_ms'])}" for r in baseline]
    found = problems(rows, held)
    if found:
        lines += ["", "problems:", *(f"  {line}" for line in found)]
    targets_found = targets(rows, held)
    if targets_found:
        lines.append("")
        lines += [f"{verdict.upper():5} {name}: {value}" for name, value, verdict in targets_found]
    return "\n".join(lines)


def write(directory: Path, rows: list[Measurement], held: list[dict[str, object]], command: str,
          systems: list[dict[str, object]] | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    systems = systems or []
    data = {"command": command, "systems": systems, "runs": [r.as_dict() for r in rows], "under_load": held,
            "ratios": ratios(rows), "targets": targets(rows, held), "problems": problems(rows, held)}
    (directory / "results.json").write_text(json.dumps(data, indent=2))
    lines = [f"# edgeproxy benchmark\n\nCommand: `{command}`\n"]
    if systems:
        lines += ["## Systems under test\n", *_systems_lines(systems), ""]
    settings = _settings_lines(rows, held)
    if settings:
        lines += ["Settings besides `EDGEPROXY_LISTEN`, `EDGEPROXY_BACKEND` (all others: the build's defaults):\n",
                  *settings, ""]
    lines += ["## Runs\n", "```", table(rows), "```\n"]
    if data["ratios"]:
        lines += ["## edgeproxy relative to the references\n",
                  "| scenario | conc | reference | throughput | per CPU-second | msg/s | msg per CPU-second | "
                  "peak RSS | p99 difference |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for ratio in data["ratios"]:
            lines.append(f"| {ratio['scenario']} | {ratio['concurrency']} | {ratio['reference']} | "
                         f"{_times(ratio['throughput_ratio'])} | {_times(ratio['per_cpu_ratio'])} | "
                         f"{_times(ratio['messages_ratio'])} | {_times(ratio['messages_per_cpu_ratio'])} | "
                         f"{_times(ratio['rss_ratio'])} | {_ms(ratio['p99_difference_ms'])} |")
    lines += _hostile_markdown(rows)
    if held:
        lines += ["\n## Under load\n", "| scenario | system | clients | RSS/conn KB | deliver unloaded | loaded | "
                  "fraction | p99 unloaded → loaded | failed (by reason) |", "|---|---|---|---|---|---|---|---|---|"]
        for hold in held:
            failures = hold.get("failures") or {}
            lines.append(f"| {hold['scenario']} | {hold.get('system', 'edgeproxy')} | {hold['clients']} | "
                         f"{hold['rss_per_connection_kb']:.1f} | "
                         f"{hold['unloaded_messages_per_s']:,.0f}/s | {hold['loaded_messages_per_s']:,.0f}/s | "
                         f"{hold['loaded_fraction']:.0%} | "
                         f"{hold['unloaded_p99_ms']:.1f} → {hold['loaded_p99_ms']:.1f} ms | "
                         f"{hold['failed']}{f' ({format_reasons(failures)})' if failures else ''} |")  # type: ignore[arg-type]
    if data["targets"]:
        lines += ["\n## Targets\n", "| target | measured | |", "|---|---|---|"]
        lines += [f"| {name} | {value} | {verdict} |" for name, value, verdict in data["targets"]]
    lines += ["\n## Correctness\n", *([f"- {line}" for line in data["problems"]] or [
        "Every run: the sink holds exactly the acknowledged messages; no relay attempt reached it; no session "
        "failed."])]
    (directory / "report.md").write_text("\n".join(lines) + "\n")
    plot(directory, rows)


def _times(value: object) -> str:
    return f"{value:.2f}×" if isinstance(value, float) else "n/a"


def _ms(value: object) -> str:
    return f"{value:+.2f} ms" if isinstance(value, float) else "n/a"


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
