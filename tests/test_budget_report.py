"""``morec run``'s budget table and the controller's trace PNG (train/budget_report.py)."""

from __future__ import annotations

import pytest

from morec_dist.train.budget_report import budget_rows, budget_table, plot_control_trace


def record(before: float, after: float, budget: float = 0.02) -> dict:
    return {
        "law": "budget",
        "accuracy_budget": budget,
        "k": 10,
        "selection_before": before,
        "selection_after": after,
        "selection_change": (after - before) / before,
        "control_reference": 0.1,
    }


def test_the_table_states_the_budget_and_whether_it_held():
    rows = {
        "pretrain": {"hit@10": 0.070},
        "morec": {"hit@10": 0.0690, "budget": record(0.080, 0.0790)},  # -1.25% selection, -1.43% test
        "tight": {"hit@10": 0.0680, "budget": record(0.080, 0.0770)},  # -3.75% selection, -2.86% test
        "static": {"hit@10": 0.060},  # no budget record: not in the table
    }
    table = budget_rows(rows, k=10)
    assert [r["method"] for r in table] == ["morec", "tight"]
    assert (table[0]["held_selection"], table[0]["held_test"]) == (True, True)
    assert (table[1]["held_selection"], table[1]["held_test"]) == (False, False)
    assert table[1]["test_change"] == pytest.approx(-0.02 / 0.70)
    text = budget_table(table)
    assert "| morec | budget | 2.0% | 10 | 0.0800 -> 0.0790 (-1.25%) | -1.43% | yes | yes |" in text
    assert "| NO | NO |" in text
    assert budget_table([]) == ""


def test_the_trace_png_is_written_for_the_budget_law_only(tmp_path):
    control = [
        {"step": s, "measured": 0.1 - s * 1e-4, "smoothed": 0.1 - s * 8e-5, "setpoint": 0.098, "share": 0.5 + s / 400,
         "safety": s == 40}
        for s in range(9, 200, 10)
    ]  # fmt: skip
    metrics = {
        "budget": record(0.08, 0.079),
        "coordinator": {"trace": {"step": list(range(200)), "beta": [0.2] * 200, "control": control}},
    }
    path = plot_control_trace(metrics, tmp_path / "trace.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paper = {"coordinator": {"trace": {"step": [0], "beta": [0.1], "control": []}}}
    assert plot_control_trace(paper, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_the_run_writes_the_budget_section_and_a_trace_per_budget_method(tmp_path):
    from morec_dist.train.pipeline import budget_markdown, budget_section

    control = [{"step": 9, "measured": 0.1, "smoothed": 0.1, "setpoint": 0.098, "share": 0.5, "safety": False}]
    rows = {
        "pretrain": {"hit@10": 0.07},
        "morec": {
            "hit@10": 0.0695,
            "budget": record(0.08, 0.0795),
            "coordinator": {"trace": {"step": [9], "beta": [0.2], "control": control}},
        },
        "static": {"hit@10": 0.06, "coordinator": {"trace": {"step": [9], "beta": [0.1], "control": []}}},
    }
    budget, traces = budget_section(rows, 10, tmp_path)
    assert [r["method"] for r in budget] == ["morec"] and traces == [tmp_path / "budget_trace_morec.png"]
    text = budget_markdown(budget, traces)
    assert "| morec | budget | 2.0% |" in text and "![budget_trace_morec](budget_trace_morec.png)" in text
    assert budget_markdown([], []) == ""
