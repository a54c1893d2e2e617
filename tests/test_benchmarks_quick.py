"""The cheap benchmark path end to end: the coordinator-scale quick mode against a real Ray
actor (as its own process, as ``make bench`` runs it), and the report generated from the
JSON it wrote. The torchrun-heavy benchmarks are exercised by ``run_all --quick``, not here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.coordinator_scale import digest, make_spec, rank_vectors, signals
from benchmarks.report import generate

# real Ray, gloo processes and the benchmark CLI: minutes, not for test-fast
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
RANKS = (8, 64)
STALENESS = (1, 2)


@pytest.fixture(scope="module")
def coordinator_run(tmp_path_factory) -> tuple[Path, dict]:
    results = tmp_path_factory.mktemp("results")
    out = results / "coordinator_scale.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.coordinator_scale",
            "--quick",
            "--out",
            str(out),
            "--seed",
            "3",
            "--ranks",
            *map(str, RANKS),
            "--staleness",
            *map(str, STALENESS),
            "--note",
            "test run",
            "--steps",
            "30",
            "--gloo-procs",
            "2",
            "--per-rank-calls",
            "240",
        ],
        cwd=REPO,
        check=True,
        timeout=240,
        capture_output=True,
        text=True,
    )
    return results, json.loads(out.read_text())


def closed_loop_betas(ranks: int, staleness: int, sampler_every: int, steps: int) -> list[float]:
    """The coordinator protocol run here, step by step, on a Ray-free core: step t uses the
    decision for t (made from the reports through t - staleness - 1), then every rank
    reports that step's synthetic losses at the beta it used, and the sampler's signals go in
    after every ``sampler_every``-th step. Returns the trace's betas, one per step."""
    from morec_dist.coordinator.core import CoordinatorCore

    spec = make_spec(ranks, staleness, sampler_every)
    core = CoordinatorCore(spec)
    blocks = spec.objectives.num_blocks
    for t in range(steps):
        beta = core.decision(t).beta
        vectors = rank_vectors(ranks, t, beta, blocks)
        for rank in range(ranks):
            core.report(rank, t, vectors[rank, :blocks].tolist(), vectors[rank, blocks:].astype(int).tolist())
        if sampler_every and (t + 1) % sampler_every == 0:
            core.submit_signals(t, signals(spec, t))
    betas = [record.beta for record in core.trace]
    assert len(betas) == steps
    return betas


@pytest.mark.timeout(300)
def test_coordinator_scale_quick_measures_every_point(coordinator_run):
    results, result = coordinator_run
    assert result["benchmark"] == "coordinator_scale" and result["mode"] == "quick" and result["seed"] == 3
    assert result["note"] == "test run"
    for key in ("cpu", "cores", "load_average", "load_average_end", "git_commit"):
        assert key in result["machine"]
    for key in ("torch", "torchrec", "ray", "pyarrow"):
        assert key in result["versions"]
    runs = {(r["protocol"], r["ranks"], r["staleness"]): r for r in result["runs"]}
    assert set(runs) == {(p, n, s) for p in ("global", "per_rank") for n in RANKS for s in STALENESS}
    for (protocol, ranks, _staleness), r in runs.items():
        for key in ("steps_per_s", "baseline_steps_per_s", "wait_fraction", "actor_calls_per_step"):
            assert key in r
        assert 0 < r["steps_per_s"] and 0 < r["baseline_steps_per_s"] and 0.0 <= r["wait_fraction"] <= 1.0
        # the global protocol makes one actor call per step; the per-rank one, one per rank
        assert r["actor_calls_per_step"] == (1 if protocol == "global" else ranks)
    # the Ray actor's beta trace of every point, against this test's own closed loop of the
    # protocol on a Ray-free core (not the benchmark's flag about its own replay): the same
    # betas, so both protocols also agree with each other
    sampler_every = result["config"]["sampler_every"]
    for (protocol, ranks, staleness), r in runs.items():
        want = closed_loop_betas(ranks, staleness, sampler_every, r["steps"])
        assert r["beta_digest"] == digest(want), (protocol, ranks, staleness)
        assert len(set(want)) > 1  # beta moves: a trace frozen at its start could not match by chance
    assert result["gloo"]["procs"]["2"]["median_ms"] > 0
    assert (results / "coordinator_scale.png").stat().st_size > 10_000


@pytest.mark.timeout(300)
def test_report_renders_the_results_it_finds(coordinator_run, tmp_path):
    results, result = coordinator_run
    out = tmp_path / "REPORT.md"
    text = generate(results, out)
    assert out.read_text() == text
    assert "## 3. Coordinator at scale" in text
    r = result["runs"][0]
    row = next(
        line
        for line in text.splitlines()
        if line.startswith(f"| {r['protocol']} | {r['ranks']} | {r['staleness']} | {r['steps']} |")
    )
    assert f"{r['wait_fraction'] * 100:.1f}%" in row
    assert "coordinator_scale.png" in text and "test run" in text
    # benchmarks that did not run are reported as missing, never invented
    for missing in ("overhead", "reader", "embedding_scale", "quality", "sensitivity"):
        assert f"*(no {missing}.json in {results})*" in text
    assert "<summary>coordinator_scale.json" in text


def test_results_md_block_is_replaced_and_the_rest_kept(tmp_path):
    """The Pareto study's block of docs/results.md is regenerated from the study's JSON; the
    hand-written text around it stays, a second run replaces (not appends) the block."""
    import shutil

    from benchmarks.report import STUDY_BEGIN, STUDY_END, update_results_md

    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(REPO / "benchmarks" / "results" / "pareto_quick.json", results / "pareto_quick.json")
    md = tmp_path / "results.md"
    md.write_text("# Results\n\nhand-written\n")
    first = update_results_md(results, md)
    assert first.startswith("# Results\n\nhand-written\n") and first.count(STUDY_BEGIN) == 1
    assert "## The Pareto study" in first and "| morec |" in first
    md.write_text(first.replace(STUDY_END, STUDY_END + "\n\nafter the block\n"))
    second = update_results_md(results, md)
    assert second.count(STUDY_BEGIN) == 1 and second.count(STUDY_END) == 1
    assert second.rstrip().endswith("after the block") and "hand-written" in second


def test_appendix_lists_every_result_file_and_leaves_per_run_records_in_the_json(tmp_path):
    """A result file no section renders (e.g. checkpoint_stall.json) still reaches the appendix;
    a study's per-run records stay in its JSON, and the appendix says so."""
    from benchmarks.report import load_results

    results = tmp_path / "results"
    results.mkdir()
    (results / "checkpoint_stall.json").write_text(json.dumps({"cases": [{"ratio": 0.0871}]}))
    (results / "study.json").write_text(json.dumps({"seconds": 12.5, "per_seed": [{"hit": 0.25}] * 50}))
    found = load_results(results)
    assert set(found) == {"checkpoint_stall", "study"}
    text = generate(results, tmp_path / "REPORT.md")
    appendix = text[text.index("## Appendix: every number") :]
    assert "<summary>checkpoint_stall.json (1 numbers)</summary>" in appendix
    assert "| cases[0].ratio | 0.0871 |" in appendix
    assert "<summary>study.json (1 numbers)</summary>" in appendix and "| seconds | 12.5 |" in appendix
    assert "Per-run records omitted here (in the JSON): per_seed." in appendix and "per_seed[" not in appendix
