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


def test_a_run_directory_is_named_by_the_hash_of_its_arguments(tmp_path):
    from benchmarks.pareto import run_out

    a, args = run_out(tmp_path, 10, "static-lam0.5-e2", ["finetune", "run.seed=10"], ["--nproc", "2"])
    assert a.parent.name == "seed10" and a.name.startswith("static-lam0.5-e2-")
    assert args == ["finetune", "--nproc", "2", "run.seed=10", f'run.out_dir="{a}"']  # flags, then overrides
    assert run_out(tmp_path, 10, "static-lam0.5-e2", ["finetune", "run.seed=10"], ["--nproc", "2"])[0] == a
    assert run_out(tmp_path, 10, "static-lam0.5-e2", ["finetune", "run.seed=10"], ["--nproc", "1"])[0] != a


def test_the_fine_tuning_length_only_bounds_the_epoch_loop():
    """The study continues a 2-epoch run to 10 epochs instead of training 10 from the start.
    That is the same run only while nothing but the epoch loop reads the number of epochs
    (no schedule over the run's length): every read of ``.epochs`` in the package is one of
    these. A new one must keep the claim (or the study must stop continuing runs)."""
    import re
    from pathlib import Path

    import morec_dist

    allowed = {
        ("config.py", "c.train.epochs >= 1"),
        ("config.py", "m.epochs >= 1"),
        ("pretrain.py", "return config.train.epochs"),
        ("finetune.py", "return config.morec.epochs"),
        ("runner.py", "range(start_epoch, job.epochs(config))"),
    }
    root = Path(morec_dist.__file__).parent
    unexpected = []
    for path in root.rglob("*.py"):
        for line in path.read_text().splitlines():
            code = line.split("#", 1)[0]
            if not re.search(r"\.epochs\b", code) or '"""' in code or "help=" in code:
                continue
            if not any(name == path.name and fragment in code for name, fragment in allowed):
                unexpected.append(f"{path.relative_to(root)}: {code.strip()}")
    assert not unexpected, unexpected
