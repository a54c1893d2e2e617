"""The Pareto study resumes run by run: which run directories it reuses, resumes or clears."""

from __future__ import annotations

import json

from benchmarks.pareto import clear_stale_run, finished_run

ARGS = ["finetune", "--method", "morec", "run.seed=0"]


def _run_dir(tmp_path, marker: dict | None, metrics: bool = True):
    out = tmp_path / "morec-reference"
    (out / "checkpoints" / "step-551").mkdir(parents=True)
    if marker is not None:
        (out / "study_run.json").write_text(json.dumps(marker))
    if metrics:
        (out / "metrics.json").write_text("{}")
    return out


def test_a_finished_run_with_the_same_arguments_is_reused(tmp_path):
    out = _run_dir(tmp_path, {"args": ARGS, "wall_s": 123.5})
    assert finished_run(out, ARGS) == 123.5
    clear_stale_run(out, ARGS)
    assert (out / "checkpoints" / "step-551").exists()


def test_a_run_killed_half_way_is_resumed_not_cleared(tmp_path):
    out = _run_dir(tmp_path, {"args": ARGS}, metrics=False)  # started, never finished
    assert finished_run(out, ARGS) is None
    clear_stale_run(out, ARGS)
    assert (out / "checkpoints" / "step-551").exists()  # the CLI resumes from it


def test_a_directory_of_other_arguments_is_cleared(tmp_path):
    other = [*ARGS[:-1], "run.seed=1"]
    out = _run_dir(tmp_path, {"args": other, "wall_s": 99.0})
    assert finished_run(out, ARGS) is None
    clear_stale_run(out, ARGS)
    assert not out.exists()


def test_a_directory_without_a_marker_is_cleared(tmp_path):
    out = _run_dir(tmp_path, None)
    assert finished_run(out, ARGS) is None
    clear_stale_run(out, ARGS)
    assert not out.exists()
    clear_stale_run(out, ARGS)  # nothing there: nothing to do
