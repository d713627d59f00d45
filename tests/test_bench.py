"""The load-test harness on a short run: it must count correctly and write every output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_tool


def test_quick_bench_run_counts_correctly_and_writes_its_report(tmp_path: Path) -> None:
    require_tool("smtp-sink")
    require_tool("postfix")
    output = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenario", "relay-storm,mixed,idle-hold",
         "--references", "direct,postfix", "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((output / "results.json").read_text())
    runs = {(run["scenario"], run["system"]): run for run in data["runs"]}
    assert set(runs) == {(s, system) for s in ("relay-storm", "mixed") for system in ("edgeproxy", "direct", "postfix")}
    for run in runs.values():
        assert run["correct"], run
        assert run["sessions"] > 0 and run["sut_cpu_s"] >= 0
    # The systems with a relay policy refused every relay attempt; the bare sink took them.
    for system in ("edgeproxy", "postfix"):
        assert runs[("relay-storm", system)]["refused"] == runs[("relay-storm", system)]["sessions"]
        assert runs[("mixed", system)]["delivered"] == runs[("mixed", system)]["sink_messages"] > 0
    assert runs[("relay-storm", "direct")]["refused"] == 0
    [held] = data["under_load"]
    assert held["scenario"] == "idle-hold" and held["clients"] == 200 and not held["problems"]
    assert {ratio["reference"] for ratio in data["ratios"]} == {"direct", "postfix"}
    assert (output / "report.md").read_text().startswith("# edgeproxy benchmark")
    assert (output / "relay-storm.png").stat().st_size > 1000
