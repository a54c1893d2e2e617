"""The results table of `morec run`: the relative change against the pretrained model per
metric, and "n/a" where it is undefined (a metric that is 0 before) instead of +nan%."""

from __future__ import annotations

from morec_dist.train.pipeline import results_table, table_metrics


def test_change_is_na_when_the_metric_was_zero_before():
    columns = table_metrics(10)
    before = dict.fromkeys(columns, 0.5) | {columns[4]: 0.0, columns[5]: 0.0}
    after = dict.fromkeys(columns, 0.6) | {columns[4]: 0.0, columns[5]: 0.25}
    row = results_table({"pretrain": before, "morec": after}).splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert cells[0] == "0.6000 (+20.0%)"
    assert cells[4] == "0.0000 (n/a)" and cells[5] == "0.2500 (n/a)"
    assert "nan" not in row
