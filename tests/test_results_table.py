"""`morec run`'s helpers: the results table (the relative change against the pretrained model
per metric, and "n/a" where it is undefined, a metric that is 0 before, instead of +nan%),
and each stage's run.out_dir and checkpoint.dir (with checkpoint.dir set, every stage gets
its own directory below it, a URI keeping its query)."""

from __future__ import annotations

from morec_dist.config import Config
from morec_dist.data import storage
from morec_dist.train.pipeline import results_table, stage_overrides, table_metrics


def test_change_is_na_when_the_metric_was_zero_before():
    columns = table_metrics(10)
    before = dict.fromkeys(columns, 0.5) | {columns[4]: 0.0, columns[5]: 0.0}
    after = dict.fromkeys(columns, 0.6) | {columns[4]: 0.0, columns[5]: 0.25}
    row = results_table({"pretrain": before, "morec": after}).splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert cells[0] == "0.6000 (+20.0%)"
    assert cells[4] == "0.0000 (n/a)" and cells[5] == "0.2500 (n/a)"
    assert "nan" not in row


def test_each_stage_checkpoints_in_its_own_directory(tmp_path):
    config = Config()
    args, root = stage_overrides(config, tmp_path / "pretrain", "pretrain")
    assert args == [f'run.out_dir="{tmp_path / "pretrain"}"'] and root == tmp_path / "pretrain" / "checkpoints"
    config.checkpoint.dir = "s3://bucket/runs/r1?region=eu-west-1"
    args, root = stage_overrides(config, tmp_path / "morec", "morec")
    assert args[1] == 'checkpoint.dir="s3://bucket/runs/r1/morec?region=eu-west-1"'
    assert storage.uri_of(root / "best") == "s3://bucket/runs/r1/morec/best?region=eu-west-1"
