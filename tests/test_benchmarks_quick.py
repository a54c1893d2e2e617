"""The cheap benchmark path end to end: the coordinator-scale quick mode against a real Ray
actor (as its own process, as ``make bench`` runs it), and the report generated from the
JSON it wrote. The torchrun-heavy benchmarks are exercised by ``run_all --quick``, not here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.report import generate

REPO = Path(__file__).resolve().parent.parent
RANKS = (8, 64)
STALENESS = (0, 1, 4)


@pytest.fixture(scope="module")
def coordinator_run(tmp_path_factory) -> tuple[Path, dict]:
    results = tmp_path_factory.mktemp("results")
    out = results / "coordinator_scale.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.coordinator_scale", "--quick", "--out", str(out), "--seed", "3",
         "--ranks", *map(str, RANKS), "--staleness", *map(str, STALENESS), "--note", "test run"],
        cwd=REPO, check=True, timeout=120, capture_output=True, text=True,
    )
    return results, json.loads(out.read_text())


@pytest.mark.timeout(150)
def test_coordinator_scale_quick_measures_every_point(coordinator_run):
    results, result = coordinator_run
    assert result["benchmark"] == "coordinator_scale" and result["mode"] == "quick" and result["seed"] == 3
    assert result["note"] == "test run"
    for key in ("cpu", "cores", "load_average", "load_average_end", "git_commit"):
        assert key in result["machine"]
    for key in ("torch", "torchrec", "ray", "pyarrow"):
        assert key in result["versions"]
    points = {(p["ranks"], p["staleness"]): p for p in result["points"]}
    assert set(points) == {(n, s) for n in RANKS for s in STALENESS}
    for (ranks, s), p in points.items():
        # every step of every rank was aggregated, and all ranks got identical decisions
        assert p["completed"] is True
        assert p["aggregated_through"] == p["steps"] - 1
        assert p["decisions_consistent"] is True
        assert p["steps_per_s"] > 0 and p["reports_per_s"] == pytest.approx(p["steps_per_s"] * ranks)
        assert 0 < p["report_rtt_ms_p50"] <= p["report_rtt_ms_p99"]
        assert 0 < p["rpc_rtt_ms_p50"] <= p["rpc_rtt_ms_p99"]
        assert 0.0 <= p["wait_fraction"] <= 1.0
        # p_version counts the sampler updates rank 0 submitted: one per `sampler_every` steps
        assert p["sampler_versions"] == p["steps"] // result["config"]["sampler_every"]
    for ranks in RANKS:
        # s = 0 is synchronous: the decision of a step always needs that step's own reports
        assert points[(ranks, 0)]["wait_fraction"] == 1.0
    assert set(result["staleness_needed_wait_le_10pct"]) == {str(n) for n in RANKS}
    assert (results / "coordinator_scale.png").stat().st_size > 10_000


@pytest.mark.timeout(150)
def test_report_renders_the_results_it_finds(coordinator_run, tmp_path):
    results, result = coordinator_run
    out = tmp_path / "REPORT.md"
    text = generate(results, out)
    assert out.read_text() == text
    assert "## 3. Coordinator at scale" in text
    p = result["points"][0]
    row = next(line for line in text.splitlines() if line.startswith(f"| {p['ranks']} | {p['staleness']} | {p['steps']} |"))
    assert f"{p['wait_fraction'] * 100:.1f}%" in row
    assert "coordinator_scale.png" in text and "test run" in text
    # benchmarks that did not run are reported as missing, never invented
    for missing in ("overhead", "reader", "embedding_scale", "quality", "sensitivity"):
        assert f"*(no {missing}.json in {results})*" in text
    assert "<summary>coordinator_scale.json" in text
