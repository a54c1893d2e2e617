"""The one typed configuration of a job, and its validation.

A job is described by a ``Config`` built from a TOML file plus ``section.key=value``
overrides. It is parsed and validated once, here, at the edge: every later component
receives typed dataclasses it can trust. Errors name the file, the key and what was
expected.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, mistyped or out of range."""


@dataclass
class RunConfig:
    seed: int = 0
    out_dir: str = "runs/default"
    nproc: int = 2  # local ranks started by `morec run` / `train` / `finetune`
    # what `morec run` fine-tunes from the pretrained model, each compared in its table
    methods: list[str] = field(default_factory=lambda: ["morec"])
    resume: bool = (
        True  # `morec train` / `finetune` continue from the latest complete checkpoint in <out_dir>/checkpoints
    )
    # --resume-changed: resume a checkpoint written under other trajectory keys (train/fingerprint.py),
    # recording both configurations; otherwise such a resume is refused
    resume_changed: bool = False
    max_restarts: int = (
        0  # torchrun --max-restarts: a failed rank restarts the group, which resumes from the last checkpoint
    )
    # importable modules that register models, losses, objective kinds, ... (docs/extending.md);
    # imported in the launcher, in every rank and in every subprocess before names are checked
    plugins: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    path: str = ".data/movielens-1m"
    batch_size: int = 512  # rows per block (a MoRec batch has K+1 blocks)
    num_negatives: int = 10
    negative_alpha: float = 1.0  # negatives drawn with probability ~ popularity ** alpha
    # negatives avoid the user's train + valid history (the authors' setup), not only the row's positive
    negatives_exclude_history: bool = False
    # the splits that history is made of: the authors' train + valid, or ["train"], which keeps
    # the held-out valid item a possible negative like the test item (docs/results.md)
    negatives_history_splits: list[str] = field(default_factory=lambda: ["train", "valid"])
    prefetch_batches: int = 4


@dataclass
class ModelConfig:
    name: str = "mf"  # registry key (model.registry.MODELS): mf, two_tower, or a plugin's
    loss: str = "bpr"  # registry key (model.loss.LOSSES): the per-row training loss
    embedding_dim: int = 64
    # Sharding type per embedding table ("table_wise", "row_wise", "column_wise",
    # "table_row_wise", "table_column_wise", "data_parallel"), or "auto": TorchRec's planner
    # picks type and kernel within the memory budgets below; tables not named in `sharding`
    # use default_sharding.
    default_sharding: str = "auto"
    sharding: dict[str, str] = field(default_factory=dict)
    # Per-rank memory budgets the planner places tables within, in GiB; 0 = this machine's
    # (host: physical memory / local ranks; device: the GPU's memory).
    host_memory_gb: float = 0.0
    device_memory_gb: float = 0.0
    init_std: float = 0.1  # embedding tables start as normal(0, init_std)
    # Back the CPU tables and their optimizer state with 2 MB pages once sharded
    # (model/huge_pages.py: fewer TLB misses at random rows of multi-GB tables)
    huge_pages: bool = True
    # Declared side features (manifest "features") the model embeds besides the ids; unset =
    # the model's default (mf: none, two_tower: every declared user / item feature).
    user_features: list[str] | None = None
    item_features: list[str] | None = None
    # The model's own options ([model.options]): typed, defaulted and checked by the model's
    # ModelSpec (model/spec.py) at the edge, so a plugin model adds options without this file.
    options: dict[str, Any] = field(default_factory=dict)
    # Legacy spelling of two_tower's options.tower_dims (configs and checkpoints written before
    # models declared their options; every such config recorded it); None = not given.
    tower_dims: list[int] | None = None


@dataclass
class OptimConfig:
    embedding_optimizer: str = "rowwise_adagrad"  # sgd, adagrad, rowwise_adagrad
    embedding_lr: float = 0.05
    embedding_weight_decay: float = 0.0
    dense_optimizer: str = "adam"  # adam, sgd, adagrad
    dense_lr: float = 1e-3


@dataclass
class TrainConfig:
    epochs: int = 20
    max_steps: int = 0  # 0 = no limit
    early_stopping_patience: int = 3
    log_every: int = 100
    # how steps run (train/pipelined.py): "sparse_dist" = TorchRec's TrainPipelineSparseDist (the
    # next batches' input distribution and copies overlap this step's compute), "none" = one step
    # at a time, "auto" = sparse_dist on CUDA, none on CPU; a strategy that cannot stay exact
    # under it runs the plain loop (one line says why)
    pipeline: str = "auto"


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [10])
    batch_users: int = 1024


@dataclass
class ObjectiveConfig:
    name: str = ""
    kind: str = ""  # registry key: revenue, fairness, alignment, or a user-registered kind
    group_column: str = ""
    weight: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)


def _reference_objectives() -> list[ObjectiveConfig]:
    return [
        ObjectiveConfig("revenue", "revenue", "rev_group", 0.6),
        ObjectiveConfig("fairness", "fairness", "fair_group", 0.2),
        ObjectiveConfig("alignment", "alignment", "align_group", 0.2),
    ]


@dataclass
class PIDConfig:
    kp: float = 0.05
    ki: float = 0.001
    kd: float = 0.0
    beta_min: float = 0.1
    beta_max: float = 1.5
    target_loss: float = 0.0  # l_hat; 0 = take the pretrained model's final training loss
    # "freeze": integrate only while beta_{t-1} is inside its bounds (MOREC.md); "unwind": also
    # when that moves it back in
    anti_windup: str = "freeze"
    # which law sets beta (coordinator/laws.py CONTROL_LAWS): "budget" holds held-out accuracy
    # within morec.accuracy_budget (morec.control); "paper" is MOREC.md's PID on the training
    # loss with the fields above, kept for reproducing the paper
    law: str = "budget"


@dataclass
class ControlConfig:
    """The budget law (morec.pid.law = "budget", coordinator/budget.py): held-out Hit@K of a
    control slice of validation users, measured every ``every_steps``, smoothed, and held at
    (1 - morec.accuracy_budget) x the pretrained model's by a PI on the logit of the accuracy
    share beta / (beta + lam * sum w). Gains are dimensionless; tuned by a step response on
    MovieLens-1M (benchmarks/tune_budget.py, docs/coordinator.md)."""

    # tuned on MovieLens-1M by benchmarks/tune_budget.py (step response, SIMC, noise-bounded)
    kp: float = 45.0  # logit change per unit change of the relative error
    ki: float = 1.0  # logit change per measurement per unit relative error
    every_steps: int = 20  # steps between held-out measurements (the controller's tempo)
    control_fraction: float = 0.5  # share of validation users in the control slice (seeded hash)
    k: int = 0  # the K of Hit@K; 0 = eval.ks[0]
    ema: float = 0.5  # weight of the newest measurement in the smoothed value (1 = no smoothing)
    share_min: float = 0.2  # the accuracy share's range (anti-windup clamp of its logit)
    share_max: float = 0.95
    # the share before the first measurement: from the accuracy side (fine-tuning's first
    # hundred steps cost held-out Hit at any share; the controller then gives room)
    share_start: float = 0.8
    # the budget broken by far: held-out Hit below the pretrained by more than safety_factor x budget
    # -> full accuracy share and the sampler paused until it is back at the set point
    safety_factor: float = 2.0


@dataclass
class SamplerConfig:
    alpha: float = 0.05  # sign-gradient step
    update_every_steps: int = 0  # 0 = once per epoch
    # one p update from the pretrained model's validation signals before the first step (the authors' tempo)
    update_at_start: bool = False
    # the signals' seeded sample of validation users (the same users at every update); 0 = all
    validation_users: int = 0


@dataclass
class MorecConfig:
    lam: float = 0.2
    # held-out Hit@K may end at most this far (relative) below the pretrained model's (the budget law)
    accuracy_budget: float = 0.02
    objectives: list[ObjectiveConfig] = field(default_factory=_reference_objectives)
    pid: PIDConfig = field(default_factory=PIDConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    epochs: int = 5
    # fine-tuning step size of the embedding tables; 0 = optim.embedding_lr (pretraining's)
    embedding_lr: float = 0.0


@dataclass
class CoordinatorConfig:
    ray_address: str = ""  # "" = start a local Ray for this job
    name: str = "morec-coordinator"
    namespace: str = "morec"
    detached: bool = False
    staleness: int = 2  # beta / p used at step t come from steps <= t - staleness
    object_store_mb: int = 256
    # "global": losses reduced over torch.distributed, rank 0 the actor's only per-step client;
    # "per_rank": every rank calls the actor every step (the benchmark baseline only)
    protocol: str = "global"
    trace_window: int = 10_000  # newest aggregated steps the actor keeps in its trace (0 = all)


@dataclass
class MetricsConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    base_port: int = 9400  # rank r exports on base_port + 1 + local rank; coordinator on base_port


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also every N steps (0 = only at the end of each epoch; always on SIGTERM)
    keep_last: int = 2  # step checkpoints kept under <out_dir>/checkpoints (older ones are deleted)
    reshard: bool = True  # resume a checkpoint written by another world size (exact only for the same one)
    # where step, best and final checkpoints go: "" = <run.out_dir>/checkpoints; a local path or a
    # filesystem URI (s3://bucket/prefix?endpoint_override=...; credentials from the environment)
    dir: str = ""
    async_save: bool = False  # step checkpoints written in the background while training goes on


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    morec: MorecConfig = field(default_factory=MorecConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats only."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return _build(tp, value, where)
    if origin in (types.UnionType, typing.Union):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        kind = f"{where}: unknown key(s)" if where else "unknown section(s)"  # top level: no empty "where"
        raise ConfigError(f"{kind} {unknown}; expected some of {sorted(known)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(part.strip() for part in path):  # `=3`, `run..seed=1`, `run.=1`
        raise ConfigError(f"override {text!r}: expected section.key=value, the key has an empty part")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string: `model.name=mf`
    return path, value


def _check_override(text: str, path: list[str], value: Any) -> None:
    """Type-check one override on its own, so an unknown key or a wrong type names the
    override that brought it rather than the config file it is merged into."""
    alone: dict[str, Any] = {}
    _merge(alone, path, value)
    try:
        _build(Config, alone, "")
    except ConfigError as exc:
        raise ConfigError(f"override {text!r}: {exc}") from None


def _merge(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a table")
    tree[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or the defaults), apply overrides, validate, and return a Config."""
    tree = _read_toml(Path(path)) if path is not None else {}
    for text in overrides or []:
        key, value = _parse_override(text)
        _check_override(text, key, value)
        _merge(tree, key, value)
    try:
        config = _build(Config, tree, "")
        validate(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None
    return config


def _read_toml(path: Path) -> dict[str, Any]:
    """The file's table, or one ConfigError naming the file (missing, a directory,
    unreadable, not UTF-8, not TOML)."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: the file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def parse_table(cls: type, values: dict[str, Any], where: str) -> Any:
    """A dataclass ``cls`` from a config table, checked like every section (unknown keys and
    mistyped values raise a ConfigError naming ``where``.key); for tables a part declares
    itself, such as a model's options (model/spec.py)."""
    return _build(cls, values, where)


def config_from_dict(tree: dict[str, Any]) -> Config:
    config = _build(Config, tree, "")
    validate(config)
    return config


# ------------------------------------------------------------------------- validation


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


COORDINATOR_PROTOCOLS = ("global", "per_rank")
# train.pipeline: how the epoch loop runs its steps (train/pipelined.py)
TRAIN_PIPELINES = ("auto", "sparse_dist", "none")
# calls the coordinator actor serves at once (morec_dist.coordinator.actor.ACTOR_MAX_CONCURRENCY)
ACTOR_STEP_SLOTS = 1000


def check_per_rank_fits(world_size: int, staleness: int) -> None:
    """The per_rank protocol hangs when the report calls that wait inside the actor (up to
    ranks x (staleness + 1)) exceed its slots: the first step is then never aggregated."""
    waiting = world_size * (staleness + 1)
    _require(
        waiting <= ACTOR_STEP_SLOTS,
        f'coordinator.protocol = "per_rank" with {world_size} ranks and staleness {staleness}: '
        f"up to {waiting} report calls would wait in the actor, which serves {ACTOR_STEP_SLOTS}; "
        'the job would hang. Use coordinator.protocol = "global"',
    )


def validate(c: Config) -> None:
    """Range and consistency checks that types alone cannot express: the only place that
    checks them (the coordinator, its clients and the objective resolver trust them)."""
    _require(c.run.nproc >= 1, f"run.nproc: expected >= 1, got {c.run.nproc}")
    # run.methods names entries of the method registry (morec_dist.train.methods), which this
    # bottom layer cannot import: `morec run` checks them (check_methods) before its first stage
    _require(c.data.batch_size >= 1, f"data.batch_size: expected >= 1, got {c.data.batch_size}")
    _require(c.data.num_negatives >= 1, f"data.num_negatives: expected >= 1, got {c.data.num_negatives}")
    _require(c.data.negative_alpha >= 0, f"data.negative_alpha: expected >= 0, got {c.data.negative_alpha}")
    splits = c.data.negatives_history_splits
    _require(
        bool(splits) and len(set(splits)) == len(splits) and set(splits) <= {"train", "valid"},
        f"data.negatives_history_splits: expected distinct splits among 'train', 'valid', got {splits}",
    )
    _require(c.model.embedding_dim >= 1, f"model.embedding_dim: expected >= 1, got {c.model.embedding_dim}")
    _require(c.model.init_std > 0, f"model.init_std: expected > 0, got {c.model.init_std}")
    for budget in ("host_memory_gb", "device_memory_gb"):
        value = getattr(c.model, budget)
        _require(value >= 0, f"model.{budget}: expected >= 0 GiB (0 = the machine's), got {value}")
    # names of registered parts (model, loss, sharding types, optimizers, objective kinds) and
    # the model's options (model.options, its ModelSpec's) are checked by
    # morec_dist.plugins.validate_names, after run.plugins are imported
    for i, module in enumerate(c.run.plugins):
        _require(bool(module.strip()), f"run.plugins[{i}]: expected an importable module name, got {module!r}")
    _require(c.optim.embedding_lr > 0, f"optim.embedding_lr: expected > 0, got {c.optim.embedding_lr}")
    _require(c.optim.dense_lr > 0, f"optim.dense_lr: expected > 0, got {c.optim.dense_lr}")
    _require(c.train.epochs >= 1, f"train.epochs: expected >= 1, got {c.train.epochs}")
    _require(c.train.max_steps >= 0, f"train.max_steps: expected >= 0, got {c.train.max_steps}")
    _require(
        c.train.pipeline in TRAIN_PIPELINES,
        f"train.pipeline: {c.train.pipeline!r} is not one of {TRAIN_PIPELINES}",
    )
    _require(
        bool(c.eval.ks) and all(k >= 1 for k in c.eval.ks), f"eval.ks: expected positive integers, got {c.eval.ks}"
    )
    _require(c.eval.batch_users >= 1, f"eval.batch_users: expected >= 1, got {c.eval.batch_users}")
    _validate_morec(c.morec)
    # s = 0 would make step t's beta depend on step t's own report, which is sent after the
    # step's loss is formed: the trainer needs at least one step of slack.
    _require(c.coordinator.staleness >= 1, f"coordinator.staleness: expected >= 1, got {c.coordinator.staleness}")
    _require(
        c.coordinator.protocol in COORDINATOR_PROTOCOLS,
        f"coordinator.protocol: {c.coordinator.protocol!r} is not one of {COORDINATOR_PROTOCOLS}",
    )
    _require(
        c.coordinator.trace_window >= 0,
        f"coordinator.trace_window: expected >= 0 (0 = keep all), got {c.coordinator.trace_window}",
    )
    if c.coordinator.protocol == "per_rank":
        check_per_rank_fits(c.run.nproc, c.coordinator.staleness)
    _require(1 <= c.metrics.base_port <= 65535 - 64, f"metrics.base_port: expected 1..65471, got {c.metrics.base_port}")
    _require(c.run.max_restarts >= 0, f"run.max_restarts: expected >= 0, got {c.run.max_restarts}")
    _require(
        c.checkpoint.every_steps >= 0,
        f"checkpoint.every_steps: expected >= 0 (0 = end of each epoch), got {c.checkpoint.every_steps}",
    )
    _require(c.checkpoint.keep_last >= 1, f"checkpoint.keep_last: expected >= 1, got {c.checkpoint.keep_last}")


def _validate_control(m: MorecConfig) -> None:
    c = m.control
    _require(
        0 < m.accuracy_budget < 1,
        f"morec.accuracy_budget: expected a relative budget in (0, 1) (0.02 = 2% below the pretrained), "
        f"got {m.accuracy_budget}",
    )
    for gain in ("kp", "ki"):
        _require(getattr(c, gain) >= 0, f"morec.control.{gain}: gains must be >= 0, got {getattr(c, gain)}")
    _require(c.every_steps >= 1, f"morec.control.every_steps: expected >= 1, got {c.every_steps}")
    _require(
        0 < c.control_fraction < 1,
        f"morec.control.control_fraction: expected in (0, 1) (the rest: the selection slice), got {c.control_fraction}",
    )
    _require(c.k >= 0, f"morec.control.k: expected >= 0 (0 = eval.ks[0]), got {c.k}")
    _require(0 < c.ema <= 1, f"morec.control.ema: expected in (0, 1], got {c.ema}")
    _require(
        0 < c.share_min <= c.share_start <= c.share_max < 1,
        "morec.control: need 0 < share_min <= share_start <= share_max < 1, got "
        f"{c.share_min}, {c.share_start}, {c.share_max}",
    )
    _require(c.safety_factor > 1, f"morec.control.safety_factor: expected > 1, got {c.safety_factor}")
    every = m.sampler.update_every_steps
    if m.pid.law == "budget" and every:
        # the sampler moves the plant the controller holds: it must be slower than the loop
        _require(
            every >= c.every_steps,
            f"morec.sampler.update_every_steps ({every}) must be >= morec.control.every_steps ({c.every_steps}): "
            "the sampler's tempo is slower than the budget controller's (docs/coordinator.md)",
        )


def _validate_morec(m: MorecConfig) -> None:
    pid = m.pid
    for gain in ("kp", "ki", "kd"):
        value = getattr(pid, gain)
        _require(value >= 0, f"morec.pid.{gain}: gains must be >= 0, got {value}")
    _require(pid.beta_min >= 0, f"morec.pid.beta_min: expected >= 0, got {pid.beta_min}")
    _require(
        pid.beta_min <= pid.beta_max,
        f"morec.pid: beta_min ({pid.beta_min}) must not exceed beta_max ({pid.beta_max})",
    )
    _require(pid.target_loss >= 0, f"morec.pid.target_loss: expected >= 0, got {pid.target_loss}")
    _require(
        pid.anti_windup in ("freeze", "unwind"),
        f"morec.pid.anti_windup: {pid.anti_windup!r} is not one of ('freeze', 'unwind')",
    )
    _require(m.lam > 0, f"morec.lam: expected > 0, got {m.lam}")
    # the law's name is checked against CONTROL_LAWS at the CLI edge (plugins.validate_names)
    _validate_control(m)
    _require(m.sampler.alpha > 0, f"morec.sampler.alpha: expected > 0, got {m.sampler.alpha}")
    _require(
        m.sampler.validation_users >= 0,
        f"morec.sampler.validation_users: expected >= 0 (0 = all validation users), got {m.sampler.validation_users}",
    )
    _require(m.epochs >= 1, f"morec.epochs: expected >= 1, got {m.epochs}")
    _require(m.embedding_lr >= 0, f"morec.embedding_lr: expected >= 0, got {m.embedding_lr}")
    names = [o.name for o in m.objectives]
    _require(len(set(names)) == len(names), f"morec.objectives: duplicate names in {names}")
    for i, o in enumerate(m.objectives):
        where = f"morec.objectives[{i}] ({o.name or 'unnamed'})"
        _require(bool(o.name), f"{where}.name: required")
        _require(bool(o.kind), f"{where}.kind: required")
        _require(bool(o.group_column), f"{where}.group_column: required")
        _require(o.weight >= 0, f"{where}.weight: weights must be >= 0, got {o.weight}")
    if m.objectives:
        _require(
            sum(o.weight for o in m.objectives) > 0,
            "morec.objectives: weights sum to 0; at least one objective needs a positive weight",
        )
