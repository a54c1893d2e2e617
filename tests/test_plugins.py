"""Plugins and registry names at the edge: run.plugins is imported before names are checked,
a missing module is one line naming run.plugins (exit 2), every registry name a config picks
is checked against that registry, and a plugin's kind reaches the baselines' row weights."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from morec_dist.config import ConfigError, load_config
from morec_dist.plugins import load_plugins, prepare, validate_names
from tests.conftest import REPO

PLUGINS_DIR = str(REPO / "tests" / "plugins")
LONG_TAIL = '[{name="tail_lift", kind="long_tail", group_column="align_group", weight=1.0}]'


@pytest.fixture
def plugins_on_path():
    sys.path.insert(0, PLUGINS_DIR)
    yield
    sys.path.remove(PLUGINS_DIR)


def test_missing_plugin_module_is_a_config_error_naming_run_plugins():
    with pytest.raises(ConfigError, match=r"run.plugins\[1\]: cannot import plugin module 'no_such_plugin_xyz'"):
        load_plugins(["json", "no_such_plugin_xyz"])
    with pytest.raises(ConfigError, match=r"run.plugins\[0\]: expected an importable module name"):
        load_config(None, ['run.plugins=[" "]'])


def test_cli_exits_2_with_one_line_on_a_missing_plugin(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "morec_dist.cli", "train", f'run.out_dir="{tmp_path}"', 'run.plugins=["nope_plugin"]'],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "run.plugins[0]: cannot import plugin module 'nope_plugin'" in lines[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.name=mlp", r"model.name: unknown model 'mlp'; expected one of \['mf', 'two_tower'"),
        ("model.loss=hinge", r"model.loss: unknown loss 'hinge'; expected one of \['bpr'"),
        ("model.default_sharding=diagonal", r"model.default_sharding: unknown sharding type 'diagonal'"),
        ('model.sharding={t_item_id="x"}', r"model.sharding.t_item_id: unknown sharding type 'x'"),
        ("optim.embedding_optimizer=lamb", r"optim.embedding_optimizer: unknown embedding optimizer 'lamb'"),
        ("optim.dense_optimizer=lion", r"optim.dense_optimizer: unknown dense optimizer 'lion'"),
        (
            'morec.objectives=[{name="t", kind="no_such_kind", group_column="align_group", weight=1.0}]',
            r"morec.objectives\[0\] \(t\).kind: unknown objective kind 'no_such_kind'; expected one of \['revenue'",
        ),
    ],
)
def test_every_registry_name_is_checked_with_its_field_and_choices(override, message):
    config = load_config(None, [override])  # config.py checks types and ranges, not names
    with pytest.raises(ConfigError, match=message):
        validate_names(config)


def test_accuracy_is_not_a_configurable_kind():
    config = load_config(
        None, ['morec.objectives=[{name="acc", kind="accuracy", group_column="rev_group", weight=1.0}]']
    )
    with pytest.raises(
        ConfigError, match=r"\(acc\).kind: 'accuracy' is implicit \(block 0\); expected one of \['revenue'"
    ):
        validate_names(config)


def test_a_plugin_kind_is_valid_once_run_plugins_imported_it(plugins_on_path):
    from morec_dist.coordinator.objectives import configurable_kinds

    config = prepare(load_config(None, ['run.plugins=["long_tail_plugin"]', f"morec.objectives={LONG_TAIL}"]))
    assert "long_tail" in configurable_kinds()
    assert config.morec.objectives[0].kind == "long_tail"


def test_a_plugin_model_carries_its_feature_set():
    from morec_dist.model.registry import MODELS, feature_set_for, register_model

    def build(features, config, options, device):
        raise AssertionError("not built here")

    if "test_side_model" not in MODELS:
        register_model("test_side_model", build, "side")
    assert feature_set_for("test_side_model") == "side" and feature_set_for("mf") == "ids"
    assert feature_set_for("two_tower") == "side"
    validate_names(load_config(None, ["model.name=test_side_model"]))
    with pytest.raises(ValueError, match="feature_set 'dense' is not one of"):
        register_model("test_bad_model", build, "dense")


def test_baseline_row_weights_come_from_the_plugin_kind(plugins_on_path, small_synthetic):
    from morec_dist.config import ObjectiveConfig
    from morec_dist.data.dataset import PreparedDataset
    from morec_dist.train.strategies import objective_row_weights

    load_plugins(["long_tail_plugin"])
    dataset = PreparedDataset.open(small_synthetic)
    tail, fair = objective_row_weights(
        dataset,
        [
            ObjectiveConfig("tail", "long_tail", "align_group", 1.0),
            ObjectiveConfig("fair", "fairness", "align_group", 1.0),
        ],
    )
    groups = dataset.item_column("align_group")[1:]
    counts = dataset.train_counts("align_group").astype(float)
    # long_tail's baseline target is ~ 1 / count: weight(item) = target / share ~ 1 / count**2
    expected = (1 / counts**2)[groups - 1]
    np.testing.assert_allclose(tail[1:] / tail[1:].max(), expected / expected.max(), rtol=1e-12)
    # fairness (default target: uniform over non-empty groups): weight ~ 1 / count
    np.testing.assert_allclose(fair[1:] / fair[1:].max(), (1 / counts)[groups - 1] / (1 / counts)[groups - 1].max())


def test_revenue_baseline_target_is_each_groups_mean_item_price(small_synthetic):
    from morec_dist.config import ObjectiveConfig
    from morec_dist.data.dataset import PreparedDataset
    from morec_dist.train.strategies import objective_row_weights

    dataset = PreparedDataset.open(small_synthetic)
    (weights,) = objective_row_weights(dataset, [ObjectiveConfig("revenue", "revenue", "rev_group", 1.0)])
    groups, price = dataset.item_column("rev_group")[1:], dataset.item_column("price")[1:]
    g = len(dataset.train_counts("rev_group"))
    mean_price = np.bincount(groups - 1, weights=price, minlength=g) / np.bincount(groups - 1, minlength=g)
    share = dataset.train_counts("rev_group") / dataset.train_counts("rev_group").sum()
    expected = (mean_price / mean_price.sum() / share)[groups - 1]
    np.testing.assert_allclose(weights[1:], expected, rtol=1e-9)


def test_a_plugin_kinds_test_metric_is_evaluated_and_tabled(plugins_on_path, small_synthetic):
    """A kind names its test metrics in its registry entry: the jobs' evaluation computes a
    plugin kind's (here through the most-popular scorer, the same protocol as a model's),
    and the results table shows the configured kinds' metrics, the plugin's included."""
    from morec_dist.data.dataset import PreparedDataset
    from morec_dist.eval.evaluator import evaluate_most_popular
    from morec_dist.eval.metrics import hit_at_k
    from morec_dist.train.pipeline import table_metrics
    from morec_dist.train.runner import evaluated_metrics

    load_plugins(["long_tail_plugin"])
    names = evaluated_metrics()
    assert names[:2] == ["hit", "ndcg"] and "tail_hit" in names and "pop_kl" in names
    result = evaluate_most_popular(small_synthetic, "test", [5, 10], metrics=names)
    dataset = PreparedDataset.open(small_synthetic)
    bands = dataset.item_column("align_group")[
        dataset.read_split("test", ["user_id", "item_id"]).sort_by("user_id")["item_id"].to_numpy()
    ]
    tail = bands > dataset.num_groups("align_group") // 2
    assert 0 < tail.sum() < tail.size  # both halves hold users: the metric is not a plain Hit
    for k in (5, 10):
        assert result.metrics[f"tail_hit@{k}"] == hit_at_k(result.ranks[tail], k).mean()
    assert result.metrics["tail_hit@10"] != result.metrics["hit@10"]
    assert table_metrics(10, ["revenue", "long_tail"]) == ("hit@10", "ndcg@10", "r_hit@10", "r_ndcg@10", "tail_hit@10")
    with pytest.raises(ConfigError, match=r"\(tail\): kind 'long_tail' test_metrics: unknown test metric 'gone'"):
        from morec_dist.coordinator.objectives import OBJECTIVE_KINDS

        kind = OBJECTIVE_KINDS.get("long_tail")
        kind.test_metrics = ("gone",)  # an instance attribute: the class keeps its own
        try:
            validate_names(
                load_config(
                    None, ['morec.objectives=[{name="tail", kind="long_tail", group_column="align_group", weight=1.0}]']
                )
            )
        finally:
            del kind.test_metrics
