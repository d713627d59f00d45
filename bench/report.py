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
    ("backend held/q", lambda r: _backend_cell(r)),
    ("loadgen cpu s", lambda r: f"{r.loadgen_cpu_s:.2f}"),
    ("other cpu s", lambda r: f"{r.other_cpu_s:.2f}" if r.other_cpu_s is not None else ""),
    ("correct", lambda r: str(r.correct)),
    ("failed (by reason)", _failures),
]


def _backend_cell(row: Measurement) -> str:
    """Peak connections the sink held / waiting in its backlog (its limit, when one was set)."""
    if row.peak_backend_connections is None:
        return ""
    limit = f" ≤{row.backend_limit}" if row.backend_limit else ""
    return f"{row.peak_backend_connections}/{row.peak_backend_queued}{limit}"


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
    variants = sorted({row.system for row in rows if row.system.startswith("edgeproxy@")} - {BASELINE})
    for row in rows:
        if row.system != "edgeproxy":
            continue
        for reference in (*REFERENCES, *variants):
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


WARNING = "edgeproxy@warning"  # the automatic companion: edgeproxy logging warnings only
# (scenario, reference, at least): edgeproxy's figure per server CPU-second over the reference's.
# Besides these, edgeproxy (at its default log level, info) over edgeproxy@warning ≥ INFO_TARGET:
# the info lines cost at most 15%.
TARGET_RATIOS = (("relay-storm", "postfix", 3.0), ("relay-storm", "direct", 0.8), ("deliver", "haproxy", 1.0))
INFO_TARGET = 0.85


def _per_cpu(row: Measurement) -> tuple[str, float]:
    """The per-CPU-second figure a scenario is judged by: messages where each session delivers one."""
    if row.scenario in ("deliver", "pipelined"):
        return "msg/cpu-s", row.messages_per_cpu_s
    return "sess/cpu-s", row.sessions_per_cpu_s


def target_ratios(rows: list[Measurement]) -> list[dict[str, Any]]:
    """The ratios with a target, from this run's rows, per scenario and concurrency: edgeproxy
    over edgeproxy@warning (what the default log level costs), and over the references."""
    pairs = [(row, WARNING, INFO_TARGET) for row in rows if row.system == "edgeproxy"]
    for scenario, reference, target in TARGET_RATIOS:
        pairs += [(row, reference, target) for row in rows if (row.scenario, row.system) == (scenario, "edgeproxy")]
    out = []
    for row, reference, target in pairs:
        other = _find(rows, row.scenario, reference, row.concurrency)
        if other is None:
            continue
        unit, mine = _per_cpu(row)
        theirs = _per_cpu(other)[1]
        value = _ratio(mine, theirs)
        out.append({"scenario": row.scenario, "concurrency": row.concurrency, "reference": reference,
                    "unit": unit, "edgeproxy": mine, "other": theirs, "ratio": value, "target": target,
                    "met": value is not None and value >= target})
    return out


def _ratio_name(entry: dict[str, Any]) -> str:
    return ("edgeproxy (info) ÷ edgeproxy@warning" if entry["reference"] == WARNING
            else f"edgeproxy ÷ {entry['reference']}")


def _ratio_text(value: float | None) -> str:
    """Three decimals: at two, 0.848 would read as a 0.85 that misses ≥ 0.85."""
    return f"{value:.3f}×" if value is not None else "n/a"


def target_ratio_lines(entries: list[dict[str, Any]]) -> list[str]:
    return [f"{'PASS' if e['met'] else 'MISS':5} {e['scenario']} c={e['concurrency']}: {_ratio_name(e)}, "
            f"{e['unit']} {e['edgeproxy']:,.0f} / {e['other']:,.0f} = {_ratio_text(e['ratio'])} "
            f"(target ≥ {e['target']:g})" for e in entries]


def _target_ratios_markdown(entries: list[dict[str, Any]]) -> list[str]:
    if not entries:
        return []
    lines = ["\n## Target ratios\n",
             "Per CPU-second of the server under test (for `direct`, the sink's), from this run. edgeproxy runs at "
             "its default log level (info, a line a session, to a file); `edgeproxy@warning` logs warnings only.\n",
             "| scenario | conc | ratio | per CPU-second | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {e['scenario']} | {e['concurrency']} | {_ratio_name(e)} | {e['unit']} {e['edgeproxy']:,.0f} / "
              f"{e['other']:,.0f} | {_ratio_text(e['ratio'])} | ≥ {e['target']:g} | {'yes' if e['met'] else 'no'} |"
              for e in entries]
    return lines


def targets(rows: list[Measurement], held: list[dict[str, object]]) -> list[tuple[str, str, str]]:
    """(target, measured, pass/miss) for each target whose scenarios ran (edgeproxy, not its baseline);
    those that are a ratio per CPU-second are :func:`target_ratios`."""
    out = []
    for concurrency in sorted({r.concurrency for r in rows}):
        proxy, haproxy = _find(rows, "deliver", "edgeproxy", concurrency), _find(rows, "deliver", "haproxy",
                                                                                 concurrency)
        if proxy and haproxy and haproxy.messages_per_cpu_s:
            wall_ratio = proxy.messages_per_s / haproxy.messages_per_s if haproxy.messages_per_s else 0
            out.append((f"deliver c={concurrency}: wall msg/s ≥ HAProxy's",
                        f"{proxy.messages_per_s:,.0f} vs {haproxy.messages_per_s:,.0f} ({wall_ratio:.2f}×)",
                        "pass" if wall_ratio >= 1 else "miss"))
    proxy, direct = _find(rows, "deliver", "edgeproxy", 10), _find(rows, "deliver", "direct", 10)
    if proxy and direct:
        difference = proxy.p99_ms - direct.p99_ms
        out.append(("deliver c=10: p99 within 2 ms of direct", f"+{difference:.2f} ms",
                    "pass" if difference <= 2 else "miss"))
    for entry in tls_summary(rows):
        if entry["system"] == "edgeproxy" and entry["vs_postfix"] is not None:
            out.append((f"deliver-tls c={entry['concurrency']} ({entry['mode']} handshakes): TLS sessions/CPU-s "
                        f"≥ {TLS_TARGET}× Postfix's", f"{entry['sessions_per_cpu_s']:,.0f} vs "
                        f"{entry['sessions_per_cpu_s'] / entry['vs_postfix']:,.0f} ({entry['vs_postfix']:.2f}×)",
                        "pass" if entry["vs_postfix"] >= TLS_TARGET else "miss"))
    for row in rows:
        if row.held_input is not None and row.system == "edgeproxy":
            out.append((f"held-input {row.held_input['clients']} held clients: peak RSS < {HELD_RSS_TARGET_MB} MB",
                        f"{row.peak_rss_mb:.1f} MB", "pass" if row.peak_rss_mb < HELD_RSS_TARGET_MB else "miss"))
    for hold in held:
        if hold["scenario"] == "idle-hold" and hold.get("system", "edgeproxy") == "edgeproxy":
            per = float(hold["rss_per_connection_kb"])  # type: ignore[arg-type]
            fraction = float(hold["loaded_fraction"])  # type: ignore[arg-type]
            out.append((f"idle-hold {hold['clients']:,} idle: ≤ 10 KB RSS each", f"{per:.1f} KB",
                        "pass" if per <= 10 else "miss"))
            out.append(("idle-hold: deliver ≥ 50% of unloaded", f"{fraction:.0%}",
                        "pass" if fraction >= 0.5 else "miss"))
    return out


# -- the deliver-tls scenario -----------------------------------------------------------------------

TLS_TARGET = 1.5  # TLS sessions per CPU-second, relative to Postfix's


def _cpu_ms(row: Measurement | None) -> float | None:
    return row.sut_cpu_s / row.sessions * 1000 if row is not None and row.sessions and row.sut_cpu_s > 0 else None


def tls_summary(rows: list[Measurement]) -> list[dict[str, Any]]:
    """Per system, concurrency and mode (full handshakes, resumed): the deliver-tls figures and
    the share of CPU in the handshake, (handshake-only − ehlo-only) CPU per session over
    deliver-tls's; with the ratio to Postfix's TLS sessions per CPU-second."""
    out: list[dict[str, Any]] = []
    seen = [(r.system, r.concurrency) for r in rows if r.tls is not None and r.tls["mode"] in ("full", "resumed")]
    for system, concurrency in dict.fromkeys(seen):
        plain = _cpu_ms(_find(rows, "ehlo-only", system, concurrency))
        for mode, suffix in (("full", ""), ("resumed", "/resumed")):
            full = _find(rows, "deliver-tls" + suffix, system, concurrency)
            if full is None or full.tls is None:
                continue
            handshake = _cpu_ms(_find(rows, "tls-handshake-only" + suffix, system, concurrency))
            per_session = _cpu_ms(full)
            handshake_ms = handshake - plain if handshake is not None and plain is not None else None
            out.append({
                "system": system, "concurrency": concurrency, "mode": mode, "sessions": full.sessions,
                "failed": full.failed, "sessions_per_s": full.sessions_per_s,
                "sessions_per_cpu_s": full.sessions_per_cpu_s, "p50_ms": full.p50_ms, "p99_ms": full.p99_ms,
                "cpu_ms_per_session": per_session, "handshake_only_cpu_ms": handshake, "ehlo_only_cpu_ms": plain,
                "handshake_cpu_ms": handshake_ms,
                "handshake_share": handshake_ms / per_session if handshake_ms is not None and per_session else None,
                "handshakes": full.tls["handshakes"], "resumed": full.tls["resumed"],
                "versions": full.tls["versions"],
            })
    for entry in out:
        postfix = next((e for e in out if e["system"] == "postfix" and e["mode"] == entry["mode"]
                        and e["concurrency"] == entry["concurrency"]), None)
        entry["vs_postfix"] = (_ratio(entry["sessions_per_cpu_s"], postfix["sessions_per_cpu_s"])
                               if postfix is not None and entry["system"] != "postfix" else None)
    return out


def _floors(rows: list[Measurement]) -> list[Measurement]:
    return [r for r in rows if r.tls is not None and r.tls["mode"] == "plaintext floor"]


def _share(value: object) -> str:
    return f"{value:.0%}" if isinstance(value, float) else "n/a"


def _num(value: object, unit: str = "", digits: int = 2) -> str:
    return f"{value:.{digits}f}{unit}" if isinstance(value, float) else "n/a"


def tls_lines(rows: list[Measurement]) -> list[str]:
    summary = tls_summary(rows)
    if not summary:
        return []
    lines = ["deliver-tls (STARTTLS, then a message; TLS sessions per CPU-second of the system under test):"]
    for entry in summary:
        versus = f" ({_times(entry['vs_postfix'])} Postfix's)" if entry["vs_postfix"] is not None else ""
        lines.append(
            f"  c={entry['concurrency']} {entry['system']} {entry['mode']:7}: {entry['sessions_per_cpu_s']:,.0f} "
            f"sess/cpu-s{versus}, {entry['sessions_per_s']:,.0f} sess/s, p50 {entry['p50_ms']:.2f} ms, "
            f"p99 {entry['p99_ms']:.2f} ms; {_num(entry['cpu_ms_per_session'], ' ms', 3)} CPU a session, "
            f"{_num(entry['handshake_cpu_ms'], ' ms', 3)} in the handshake ({_share(entry['handshake_share'])}); "
            f"{entry['resumed']}/{entry['handshakes']} resumed")
    for row in _floors(rows):
        lines.append(f"  c={row.concurrency} direct plaintext floor: {row.messages_per_s:,.0f} msg/s, "
                     f"p50 {row.p50_ms:.2f} ms, p99 {row.p99_ms:.2f} ms")
    return lines


def _tls_markdown(rows: list[Measurement]) -> list[str]:
    summary = tls_summary(rows)
    if not summary:
        return []
    versions = sorted({name for entry in summary for name in entry["versions"]})
    lines = ["\n## deliver-tls\n",
             f"A STARTTLS handshake per session ({', '.join(versions) or 'none'}), then a message. *Handshake CPU* "
             "is the CPU a `tls-handshake-only` session (EHLO, STARTTLS, handshake, QUIT) costs beyond an `ehlo-only` "
             "one (EHLO, QUIT, plaintext); its share is of a whole `deliver-tls` session's. *Resumed*: handshakes "
             "the server resumed from the session offered.\n",
             "| conc | system | mode | TLS sess/s | TLS sess/cpu-s | vs Postfix's | p50 ms | p99 ms | "
             "CPU ms/session | handshake CPU ms | handshake share | resumed | failed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for entry in summary:
        lines.append(
            f"| {entry['concurrency']} | {entry['system']} | {entry['mode']} | {entry['sessions_per_s']:,.0f} | "
            f"{entry['sessions_per_cpu_s']:,.0f} | "
            f"{_times(entry['vs_postfix']) if entry['system'] != 'postfix' else '(itself)'} | {entry['p50_ms']:.2f} | "
            f"{entry['p99_ms']:.2f} | {_num(entry['cpu_ms_per_session'], '', 3)} | "
            f"{_num(entry['handshake_cpu_ms'], '', 3)} | {_share(entry['handshake_share'])} | "
            f"{entry['resumed']}/{entry['handshakes']} | {entry['failed']} |")
    for row in _floors(rows):
        lines.append(f"| {row.concurrency} | direct | plaintext floor | {row.sessions_per_s:,.0f} | "
                     f"{row.sessions_per_cpu_s:,.0f} (sink) | | {row.p50_ms:.2f} | {row.p99_ms:.2f} | "
                     f"{_num(_cpu_ms(row), '', 3)} (sink) | | | | {row.failed} |")
    return lines


# -- the held-input scenario ------------------------------------------------------------------------

HELD_RSS_TARGET_MB = 100  # the issue's: for 100 held clients


def held_input_lines(row: Measurement) -> list[str]:
    info: dict[str, Any] = row.held_input or {}
    stats: dict[str, Any] = info.get("kind") or {}
    growth = row.peak_rss_mb - info.get("rss_start_mb", 0.0)
    per_client = growth * 1024 / info["clients"] if info.get("clients") else 0.0
    guard = (f"; RSS guard hit at {info['rss_guard_hit_mb']:,.0f} MB: writers stopped"
             if info.get("rss_guard_hit_mb") else "")
    cpu = f"{row.messages_per_cpu_s:,.0f} msg/cpu-s" if row.sut_cpu_s else "msg/cpu-s n/a"
    lines = [
        f"held-input via {row.system}: {info.get('clients')} held clients (RCPT held "
        f"{info.get('rcpt_delay_s', 0):.0f} s) beside {row.concurrency} deliver clients",
        f"  peak RSS {row.peak_rss_mb:.1f} MB from {info.get('rss_start_mb', 0):.1f} MB at start "
        f"(+{growth:.1f} MB, {per_client:,.0f} KB per held client){guard}",
        f"  held clients sent: median {info.get('sent_median_mb', 0):.2f} MB, max {info.get('sent_max_mb', 0):.2f} MB "
        f"each (cap {info.get('max_bytes_per_client', 0) / 2**20:.0f} MB), {info.get('sent_total_mb', 0):,.1f} MB "
        f"in all; {_kind_text('held-input', stats) if stats else 'no report'}",
        f"  deliver beside them: {row.messages_per_s:,.0f} msg/s ({_share(info.get('loaded_fraction'))} of "
        f"{info.get('unloaded_messages_per_s', 0):,.0f} msg/s alone), {cpu}, p99 {row.p99_ms:.1f} ms, "
        f"{_failures(row)} failed; backend: held at most {row.peak_backend_connections}, "
        f"{row.peak_backend_queued} waiting in its backlog",
    ]
    return lines


def _held_markdown(rows: list[Measurement]) -> list[str]:
    runs = [r for r in rows if r.held_input is not None]
    if not runs:
        return []
    lines = ["\n## held-input\n",
             "Held clients: EHLO, MAIL, a RCPT whose reply the backend delays, then NOOP lines (~500 octets) "
             "written without reading. Beside them, normal `deliver` clients.\n",
             "| system | held clients | sent per client: median / max MB | peak RSS MB (start) | KB per held client | "
             "deliver msg/s beside (alone) | failed (by reason) | backend held / queued |",
             "|---|---|---|---|---|---|---|---|"]
    for row in runs:
        info: dict[str, Any] = row.held_input  # type: ignore[assignment]
        growth = row.peak_rss_mb - info["rss_start_mb"]
        guard = " (guard hit)" if info.get("rss_guard_hit_mb") else ""
        lines.append(f"| {row.system} | {info['clients']} | {info['sent_median_mb']:.2f} / {info['sent_max_mb']:.2f} | "
                     f"{row.peak_rss_mb:.1f}{guard} ({info['rss_start_mb']:.1f}) | "
                     f"{growth * 1024 / max(info['clients'], 1):,.0f} | {row.messages_per_s:,.0f} "
                     f"({info['unloaded_messages_per_s']:,.0f}) | {_failures(row)} | "
                     f"{row.peak_backend_connections} / {row.peak_backend_queued} |")
    lines += ["", *(f"- {row.system}: {_kind_text('held-input', row.held_input['kind'])}"  # type: ignore[index]
                    for row in runs if row.held_input and row.held_input.get("kind"))]
    return lines


# -- the hostile scenario ---------------------------------------------------------------------------


def _kind_text(kind: str, stats: dict[str, Any]) -> str:
    parts = [f"{stats['connected']}/{stats['clients']} connected"]
    if kind == "idle":
        parts.append(f"{stats['delivered']} delivered")
    else:
        unit = "NOOP" if kind in ("never-read", "held-input") else "RCPT"
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


def terminal(rows: list[Measurement], held: list[dict[str, object]], systems: list[dict[str, object]],
             notes: list[str] | None = None) -> str:
    lines = [table(rows)] if rows else []
    tls = tls_lines(rows)
    if tls:
        lines += ["", *tls]
    for row in rows:
        if row.hostile is not None:
            lines += ["", *hostile_lines(row)]
        if row.held_input is not None:
            lines += ["", *held_input_lines(row)]
    for hold in held:
        lines.append(f"\n{hold['scenario']} via {hold.get('system', 'edgeproxy')}: {hold['clients']} clients, "
                     f"{hold['rss_per_connection_kb']:.1f} KB RSS each, deliver {hold['unloaded_messages_per_s']:,.0f}"
                     f" → {hold['loaded_messages_per_s']:,.0f} msg/s ({hold['loaded_fraction']:.0%})")
    for other in sorted({str(r["reference"]) for r in ratios(rows) if str(r["reference"]).startswith("edgeproxy@")}):
        against = [r for r in ratios(rows) if r["reference"] == other]
        lines += ["", f"edgeproxy / {other} (same run):"]
        lines += [f"  {r['scenario']} c={r['concurrency']}: msg/s {_times(r['messages_ratio'])}, msg/cpu-s "
                  f"{_times(r['messages_per_cpu_ratio'])}, sess/cpu-s {_times(r['per_cpu_ratio'])}, peak RSS "
                  f"{_times(r['rss_ratio'])}, p99 {_ms(r['p99_difference_ms'])}" for r in against]
    found = problems(rows, held)
    if found:
        lines += ["", "problems:", *(f"  {line}" for line in found)]
    if notes:
        lines += ["", *(f"note: {note}" for note in notes)]
    targets_found = targets(rows, held)
    ratio_lines = target_ratio_lines(target_ratios(rows))
    if targets_found or ratio_lines:
        lines.append("")
        lines += ratio_lines
        lines += [f"{verdict.upper():5} {name}: {value}" for name, value, verdict in targets_found]
    return "\n".join(lines)


def write(directory: Path, rows: list[Measurement], held: list[dict[str, object]], command: str,
          systems: list[dict[str, object]] | None = None, notes: list[str] | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    systems = systems or []
    data = {"command": command, "systems": systems, "runs": [r.as_dict() for r in rows], "under_load": held,
            "ratios": ratios(rows), "target_ratios": target_ratios(rows), "targets": targets(rows, held),
            "problems": problems(rows, held),
            "tls": tls_summary(rows), "notes": notes or []}
    (directory / "results.json").write_text(json.dumps(data, indent=2))
    lines = [f"# edgeproxy benchmark\n\nCommand: `{command}`\n"]
    if systems:
        lines += ["## Systems under test\n", *_systems_lines(systems), ""]
    settings = _settings_lines(rows, held)
    if settings:
        lines += ["Settings besides `EDGEPROXY_LISTEN`, `EDGEPROXY_BACKEND` (all others: the build's defaults):\n",
                  *settings, ""]
    if notes:
        lines += [*(f"- {note}" for note in notes), ""]
    lines += ["## Runs\n", "```", table(rows), "```\n",
              "*backend held/q*: the most connections the sink held at once / the most waiting in its listen "
              "backlog (≤N: the sink's session limit).\n"]
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
    lines += _tls_markdown(rows)
    lines += _held_markdown(rows)
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
    lines += _target_ratios_markdown(data["target_ratios"])
    if data["targets"]:
        lines += ["\n## Other targets\n" if data["target_ratios"] else "\n## Targets\n",
                  "| target | measured | |", "|---|---|---|"]
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
        figure.savefig(directory / f"{scenario.replace('/', '-')}.png", dpi=90)
        plt.close(figure)
