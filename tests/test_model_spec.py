"""A model is one spec (model/spec.py): its options parsed and checked at the edge with errors
naming the field, legacy configs and checkpoint configs still loading, its dense inputs reaching
the Batch, and evaluation asking its scorer: the pairwise path ranks exactly as the vector path
for a model that has both."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from morec_dist.config import ConfigError, ModelConfig, config_from_dict, load_config
from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.prepare.synthetic import generate
from morec_dist.distributed import DistContext
from morec_dist.eval import EvalOptions, evaluate, ranking
from morec_dist.model.init import META, materialize_unsharded
from morec_dist.model.registry import MODELS, build_model, feature_builder, register_model
from morec_dist.model.sharding import unwrap
from morec_dist.model.spec import PairwiseScorer, VectorScorer, as_recommender, attach_spec, spec_of
from morec_dist.plugins import load_plugins, validate_names
from tests.conftest import REPO
from tests.dist_scripts.integer_model import integer_mf

PLUGINS_DIR = str(REPO / "tests" / "plugins")
ONE = DistContext.single()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("spec") / "syn", users=60, items=90, rows=2000, seed=5)


@pytest.fixture
def dense_ranker():
    sys.path.insert(0, PLUGINS_DIR)
    try:
        load_plugins(["dense_ranker_plugin"])
    finally:
        sys.path.remove(PLUGINS_DIR)
    return MODELS.get("dense_ranker")  # conftest forgets the module and its entry after the test


# ------------------------------------------------------------------------ options


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.name=two_tower", "model.options={towers=[4]}"],
         r"model.options: unknown key\(s\) \['towers'\]; expected some of \['tower_dims'\] \(options of model 'two_"),
        (["model.name=two_tower", 'model.options={tower_dims=[8, "a"]}'],
         r"model.options.tower_dims\[1\]: expected an integer, got 'a'"),
        (["model.name=two_tower", "model.options={tower_dims=[8, 0]}"],
         r"model.options.tower_dims: expected positive layer widths, got \[8, 0\]"),
        (["model.name=two_tower", "model.tower_dims=[4]", "model.options={tower_dims=[8]}"],
         r"model.tower_dims and model.options.tower_dims are both set; keep model.options.tower_dims"),
        (["model.options={tower_dims=[8]}"], r"model.options: model 'mf' takes no options, got \['tower_dims'\]"),
    ],
)  # fmt: skip
def test_model_options_are_checked_at_the_edge_naming_the_field(overrides, message):
    config = load_config(None, overrides)  # config.py does not know a model's options
    with pytest.raises(ConfigError, match=message):
        validate_names(config)


def test_two_tower_options_from_the_options_table_the_legacy_key_and_the_default():
    spec = MODELS.get("two_tower")
    assert spec.parse_options(ModelConfig(name="two_tower", options={"tower_dims": [8, 5]})).tower_dims == [8, 5]
    assert spec.parse_options(ModelConfig(name="two_tower", tower_dims=[6])).tower_dims == [6]
    assert spec.parse_options(ModelConfig(name="two_tower")).tower_dims == [128, 64]
    tracked = load_config(REPO / "configs" / "ml1m_two_tower_features.toml")
    assert spec.parse_options(tracked.model).tower_dims == [128, 64]


def test_a_checkpoint_config_of_the_previous_release_still_loads():
    """Before models declared options every config recorded model.tower_dims (mf too)."""
    for name in ("mf", "two_tower"):
        recorded = load_config(None, [f"model.name={name}"]).to_dict()
        del recorded["model"]["options"]
        recorded["model"]["tower_dims"] = [128, 64]
        config = config_from_dict(recorded)
        validate_names(config)
        assert MODELS.get(name).parse_options(config.model) is not None


def test_a_plugin_models_options_with_its_own_check(dense_ranker):
    config = load_config(
        None, ["model.name=dense_ranker", 'model.options={hidden=[4], item_dense=["price", "popularity"]}']
    )
    validate_names(config)
    options = dense_ranker.parse_options(config.model)
    assert options.hidden == [4] and options.item_dense == ["price", "popularity"] and options.user_dense == ["age"]
    with pytest.raises(ConfigError, match=r"model.options.hidden: expected positive layer widths, got \[\]"):
        validate_names(load_config(None, ["model.name=dense_ranker", "model.options={hidden=[]}"]))


def test_register_model_refuses_a_bad_spec_naming_the_model():
    def build(features, config, options, device):
        raise AssertionError("not built")

    with pytest.raises(ValueError, match=r"model 'm1': options must be a dataclass type"):
        register_model("m1", build, options=dict)
    with pytest.raises(ValueError, match=r"model 'm2': scorer must be a VectorScorer or a PairwiseScorer"):
        register_model("m2", build, scorer=lambda m, b: b)
    with pytest.raises(ValueError, match=r"model 'm3': legacy_options \['hidden'\] are not fields of ModelConfig"):
        register_model("m3", build, legacy_options=("hidden",))
    with pytest.raises(ValueError, match=r"model 'm4': builder must take \(features, config, options, device\)"):
        register_model("m4", lambda features, config, device: None)  # the form before model options
    assert not {"m1", "m2", "m3", "m4"} & set(MODELS)


# ------------------------------------------------------------------ spec consumers


def test_built_models_carry_their_spec_and_consumers_ask_it(data_dir, dense_ranker):
    data = PreparedDataset.open(data_dir)
    mf_features = feature_builder(ModelConfig(), data.path, data.num_users, data.num_items)
    mf = build_model("mf", mf_features, ModelConfig(embedding_dim=4), META)
    assert spec_of(mf) is MODELS.get("mf") and unwrap(torch.nn.Sequential(mf)) is mf
    config = ModelConfig(name="dense_ranker", embedding_dim=4)
    features = feature_builder(config, data.path, data.num_users, data.num_items)
    assert [f.name for f in features.user_dense_features()] == ["age"]
    assert [f.name for f in features.item_dense_features()] == ["price"]
    ranker = build_model("dense_ranker", features, config, META)
    assert ranker.mlp[0].in_features == 3 * 4 + 2  # both sides' embeddings and product, 2 dense columns
    with pytest.raises(TypeError, match="scores pairs \\(PairwiseScorer\\); it has no vectors"):
        as_recommender(ranker)
    with pytest.raises(TypeError, match="no submodule carries a model spec"):
        unwrap(torch.nn.Linear(2, 2))


def test_pairwise_evaluation_equals_vector_evaluation(data_dir, monkeypatch):
    """Integer MF weights: exact scores on both paths, so every rank, tie and top-K list must
    agree. Small pair rounds (a partial last round) exercise the candidate loop."""
    data = PreparedDataset.open(data_dir)
    features = feature_builder(ModelConfig(), data.path, data.num_users, data.num_items)
    model = integer_mf(features)
    options = EvalOptions(batch_users=16)
    vector = evaluate(model, data, "test", [1, 5, 10], features, ONE, options)
    monkeypatch.setattr(ranking, "PAIRS_PER_CALL", 16 * 37)  # 91 columns: rounds of 37, 37, 17
    attach_spec(model, dataclasses.replace(spec_of(model), scorer=PairwiseScorer()))
    pairwise = evaluate(model, data, "test", [1, 5, 10], features, ONE, options)
    np.testing.assert_array_equal(pairwise.ranks, vector.ranks)
    assert pairwise.metrics == vector.metrics
    for k in (1, 5, 10):
        np.testing.assert_array_equal(pairwise.band_counts[k], vector.band_counts[k])
    assert len(set(vector.ranks.tolist())) > 3  # a model that ranks, not a constant


def test_a_pairwise_model_with_dense_features_evaluates_in_process(data_dir, dense_ranker):
    data = PreparedDataset.open(data_dir)
    config = ModelConfig(name="dense_ranker", embedding_dim=4)
    features = feature_builder(config, data.path, data.num_users, data.num_items)
    model = materialize_unsharded(build_model("dense_ranker", features, config, META), 3, 0.1, torch.device("cpu"))
    result = evaluate(model, data, "valid", [10], features, ONE, EvalOptions(batch_users=32))
    assert np.isfinite(list(result.metrics.values())).all() and len(result.ranks) == data.num_users
    # the dense inputs move the scores: another price column gives other ranks
    batch = features.batch(np.array([1, 2]), np.array([[3, 4, 5], [6, 7, 8]]))
    scores = model(batch)
    batch.item_dense = batch.item_dense * 10
    assert scores.shape == (2, 3) and not torch.equal(model(batch), scores)


def test_vector_scorer_reaches_dense_features_through_the_spec(data_dir):
    """A vector model whose item vectors read dense features: the evaluator hands the scorer
    each side's dense rows (the vector path of a dense model)."""
    data = PreparedDataset.open(data_dir)
    features = feature_builder(ModelConfig(), data.path, data.num_users, data.num_items)
    from morec_dist.data.features import FeatureBuilder

    dense = FeatureBuilder(data.path, data.num_users, data.num_items, item_dense=["price"])
    model = integer_mf(features)
    seen: list[torch.Tensor] = []

    def item(module, kjt, dense_rows):
        seen.append(dense_rows)
        return module.item_vectors(kjt)

    scorer = VectorScorer(item=item)
    ranking.model_scorer(model, dense, ONE, lambda: None, scorer)
    assert seen and seen[0].shape == (data.num_items + 1, 1) and seen[0].dtype == torch.float32
    price = data.item_column("price").astype(np.float32)
    np.testing.assert_array_equal(seen[0][1:, 0].numpy(), price[1:])


# ------------------------------------------------------------- 2 ranks, end to end


@pytest.mark.slow
def test_a_plugin_model_with_dense_features_trains_on_2_ranks_and_evaluates(tiny_data, tmp_path, dense_ranker):
    """docs/extending.md's example as a user runs it: one plugin module and config keys,
    `morec train` on 2 torchrun ranks for one epoch (born sharded, dense MLP under DDP), then
    the test split through the pairwise scorer over item ranges; the same checkpoint evaluated
    in this process on 1 rank ranks alike."""
    from morec_dist.train.checkpoint import load_checkpoint
    from tests.e2e_fixtures import CONFIG, morec, quoted

    out = tmp_path / "dense_ranker"
    path = os.pathsep.join([PLUGINS_DIR, *filter(None, [os.environ.get("PYTHONPATH")])])
    morec(
        "train", "--config", CONFIG, quoted("data.path", tiny_data), quoted("run.out_dir", out),
        'run.plugins=["dense_ranker_plugin"]', "model.name=dense_ranker", "model.options={hidden=[16]}",
        PYTHONPATH=path,
    )  # fmt: skip
    result = json.loads((out / "metrics.json").read_text())
    assert (
        result["world_size"] == 2
        and result["split"] == "test"
        and result["config"]["model"]["options"] == {"hidden": [16]}
    )
    assert result["hit@10"] > 0.2  # it learnt: a random ranking of ~300 items gives about 0.04
    best = Path(result["checkpoint"])
    shapes = {k: list(v.size) for k, v in FileSystemReader(str(best)).read_metadata().state_dict_metadata.items()}
    assert shapes["model.mlp.0.weight"] == [16, 3 * 16 + 2]  # the dense columns reached the model
    # 1 rank, in this process, from the same checkpoint: the 2-rank merge ranked alike
    data = PreparedDataset.open(tiny_data)
    config = config_from_dict(result["config"]).model
    features = feature_builder(config, data.path, data.num_users, data.num_items)
    model = materialize_unsharded(build_model("dense_ranker", features, config, META), 0, 0.1, torch.device("cpu"))
    state = {"model": model.state_dict()}
    load_checkpoint(best, state)
    model.load_state_dict(state["model"])
    alone = evaluate(model, data, "test", [10], features, ONE, EvalOptions(batch_users=256))
    for metric in ("hit@10", "ndcg@10"):
        assert abs(alone.metrics[metric] - result[metric]) <= 2 / len(alone.ranks), metric
