"""The objective registry: what an objective is, how it starts and how it reads a signal.

Block 0 of every MoRec batch is **accuracy**: implicit, uniform data, no group column, no
signal; it is registered (kind ``accuracy``) so that listings are complete, but it cannot
be configured. Every auxiliary objective k >= 1 comes from one ``morec.objectives`` entry
(``ObjectiveConfig(name, kind, group_column, weight, options)``) and a registered kind
that knows three things:

- its **initial distribution** over the groups of its column;
- which **validation signal** it consumes (a ``SignalRequest``: the evaluator computes it
  data-parallel, reduces it and submits it to the coordinator as one vector over groups);
- how that signal becomes a **sign vector** s in {-1, 0, +1}^G;

and it names the **test metrics** that measure it (``test_metrics``: names on
``morec_dist.eval.metrics.TEST_METRICS``, headline first; accuracy: Hit and NDCG).

Built-in kinds (options in brackets, defaults first):

- ``revenue``: fixed p proportional to each group's mean item price; s = 0 always.
  [price_weighting = "band_mean" | "exact"]; "exact" sets p_g = S_g / S (train price sums)
  and ``row_weight_column = "price"``: the reader thins the group's stream by price / max
  price, so every training row is drawn with probability exactly price / S.
- ``worst_group`` (``fairness`` is the same kind with its reference name): least misery.
  Signal ``group_loss`` (mean training loss per group on validation rows), s = +1 on the
  ``worst`` worst groups, 0 elsewhere. [by = "loss" | "hit" (signal ``group_hit``, worst =
  lowest Hit@k), k = 10, worst = 1 (the paper's least misery; m > 1 lifts the m worst groups
  together, which does not bet the whole step on one group's noisy validation mean:
  docs/coordinator.md), init = "train_share" | "uniform"]. Groups with no validation rows are
  NaN in the signal and ignored.
- ``target_share`` (``alignment`` is the same kind): signal ``topk_histogram`` (how many
  top-k recommendations fall in each group); q_rec = histogram / sum;
  s_g = -1 where q_rec_g > q*_g, +1 where q_rec_g < q*_g, 0 where equal.
  [target = "train_share" | "uniform" | [list of G shares], k = 100, init as above]. For
  ``align_group`` the default target is exactly the manifest's q* (DATA.md defines q* as
  each band's share of train interactions).
- ``fixed``: p fixed, s = 0. [probabilities = "train_share" | "uniform" | [list]]

Any kind works on any group column, so a fifth objective is a config entry, e.g.
``{name = "genre_floor", kind = "worst_group", group_column = "align_group", weight = 0.1}``.
A new *kind* is a subclass of ``ObjectiveKind`` registered on ``OBJECTIVE_KINDS`` (the one
list of kind names: validation, dispatch and listings read it) from one module named in
``run.plugins``; it carries its initial distribution, its signal (a name registered on
``morec_dist.eval.signal_kinds.SIGNALS``), its sign rule, how a signal is checked and its
baseline target (what the static / MGDA baselines reweight uniform rows toward). The core
never names a kind. See docs/extending.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from morec_dist.coordinator.sampler import GroupStats, SamplerError, normalise
from morec_dist.registry import Registry

ACCURACY = "accuracy"

SIGNAL_GROUP_LOSS = "group_loss"
SIGNAL_GROUP_HIT = "group_hit"
SIGNAL_TOPK_HISTOGRAM = "topk_histogram"  # the built-in signals' names (eval.signal_kinds.SIGNALS lists them all)


class ObjectiveError(ValueError):
    """An objective entry is unknown, inconsistent with the data, or got a bad signal."""


@dataclass(frozen=True)
class SignalRequest:
    """What the evaluator must measure for one objective: a vector over ``num_groups``.

    - ``group_loss``: per group of ``group_column``, the mean training loss (the model's own
      per-row loss, same negatives scheme) over validation rows whose held-out item is in
      the group; NaN for a group with no rows.
    - ``group_hit``: the same grouping, mean Hit@k (full ranking, train items masked).
    - ``topk_histogram``: over all validation users, how many of their top-k recommended
      items (train items masked) fall in each group (counts, any scale).
    """

    objective: str
    kind: str
    group_column: str
    num_groups: int
    k: int = 0


@dataclass(frozen=True)
class Objective:
    """One auxiliary objective, resolved against the data: what the core and readers use."""

    name: str
    kind: str
    block: int  # block id in a MoRec batch (1..K)
    group_column: str
    num_groups: int
    weight: float
    alpha: float  # sign-gradient step of this objective
    options: Mapping[str, Any]
    initial_probabilities: tuple[float, ...]
    adaptive: bool
    signal: SignalRequest | None
    target: tuple[float, ...] | None = None  # target shares, for target_share kinds
    row_weight_column: str | None = None  # reader draws rows within a group ~ this column


class ObjectiveKind:
    """Base class of a registered kind. Subclasses set ``name`` and ``defaults``, and
    ``test_metrics``: the names (on ``morec_dist.eval.metrics.TEST_METRICS``) of the test
    metrics that measure this objective, headline first; evaluation, the results table and
    the study report them for every job whose objectives use the kind."""

    name: str = ""
    defaults: Mapping[str, Any] = {}
    adaptive: bool = True
    implicit: bool = False
    test_metrics: tuple[str, ...] = ()

    def resolve_options(self, options: Mapping[str, Any], where: str) -> dict[str, Any]:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ObjectiveError(
                f"{where}.options: unknown key(s) {unknown} for kind {self.name!r}; expected some of "
                f"{sorted(self.defaults)}"
            )
        return {**self.defaults, **options}

    def initial(self, column: str, stats: GroupStats, options: Mapping[str, Any], where: str) -> np.ndarray:
        raise NotImplementedError

    def signal_request(
        self, name: str, column: str, num_groups: int, options: Mapping[str, Any]
    ) -> SignalRequest | None:
        return None

    def target(self, column: str, stats: GroupStats, options: Mapping[str, Any], where: str) -> np.ndarray | None:
        return None

    def row_weight_column(self, options: Mapping[str, Any]) -> str | None:
        return None

    def sign(self, objective: Objective, signal: np.ndarray) -> np.ndarray:
        """The sign vector for one validated signal (length G)."""
        return np.zeros(objective.num_groups)

    def check_signal(self, objective: Objective, vector: np.ndarray, where: str) -> None:
        """Refuse a submitted signal this kind cannot read (default: no infinities; NaN = a
        group not measured)."""
        if np.any(np.isinf(vector)):
            raise ObjectiveError(f"{where}: expected finite values (NaN = group not measured), got {vector.tolist()}")

    def baseline_target(self, column: str, stats: GroupStats, options: Mapping[str, Any], where: str) -> np.ndarray:
        """The distribution over groups the static / MGDA baselines reweight uniform rows
        toward (any scale, normalised by the caller). Default: uniform over the groups that
        have training rows."""
        return (np.asarray(stats.train_counts[column]) > 0).astype(np.float64)


def _distribution_option(value: Any, column: str, stats: GroupStats, where: str) -> np.ndarray:
    g = stats.num_groups[column]
    if value == "train_share":
        return stats.train_share(column)
    if value == "uniform":
        return np.full(g, 1.0 / g)
    if isinstance(value, (list, tuple)):
        if len(value) != g:
            raise ObjectiveError(f"{where}: expected {g} values (one per group of {column}), got {len(value)}")
        try:
            return normalise(np.asarray(value, dtype=np.float64), where)
        except (SamplerError, ValueError, TypeError) as exc:
            raise ObjectiveError(f"{where}: {exc}") from None
    raise ObjectiveError(f"{where}: expected 'train_share', 'uniform' or a list of {g} shares, got {value!r}")


class AccuracyKind(ObjectiveKind):
    """Block 0: uniform rows, never configured, never updated."""

    name = ACCURACY
    adaptive = False
    implicit = True
    test_metrics = ("hit", "ndcg")


class FixedKind(ObjectiveKind):
    name = "fixed"
    defaults = {"probabilities": "train_share"}
    adaptive = False

    def initial(self, column, stats, options, where):
        return _distribution_option(options["probabilities"], column, stats, f"{where}.options.probabilities")


class RevenueKind(ObjectiveKind):
    name = "revenue"
    defaults = {"price_weighting": "band_mean"}
    adaptive = False
    test_metrics = ("r_hit", "r_ndcg")
    WEIGHTINGS = ("band_mean", "exact")

    def resolve_options(self, options, where):
        resolved = super().resolve_options(options, where)
        if resolved["price_weighting"] not in self.WEIGHTINGS:
            raise ObjectiveError(
                f"{where}.options.price_weighting: {resolved['price_weighting']!r} is not one of {self.WEIGHTINGS}"
            )
        return resolved

    def initial(self, column, stats, options, where):
        try:
            if options["price_weighting"] == "exact":
                return normalise(stats.train_price_sum(column), f"{where}: train price sums")
            return normalise(stats.item_mean_price(column), f"{where}: band mean prices")
        except SamplerError as exc:
            raise ObjectiveError(f"{where}: {exc}") from None

    def row_weight_column(self, options):
        return "price" if options["price_weighting"] == "exact" else None

    def baseline_target(self, column, stats, options, where):
        try:
            return stats.item_mean_price(column)  # proportional to each group's mean item price
        except SamplerError as exc:
            raise ObjectiveError(f"{where}: {exc}") from None


class WorstGroupKind(ObjectiveKind):
    """Least misery: push probability toward the group the model currently serves worst."""

    name = "worst_group"
    defaults = {"by": "loss", "k": 10, "worst": 1, "init": "train_share"}
    test_metrics = ("min_hit", "min_ndcg")  # over fair_group (DATA.md), whatever the column

    def __init__(self, name: str = "worst_group") -> None:
        self.name = name

    def resolve_options(self, options, where):
        resolved = super().resolve_options(options, where)
        if resolved["by"] not in ("loss", "hit"):
            raise ObjectiveError(f"{where}.options.by: expected 'loss' or 'hit', got {resolved['by']!r}")
        _positive_int(resolved["k"], f"{where}.options.k")
        _positive_int(resolved["worst"], f"{where}.options.worst")
        return resolved

    def initial(self, column, stats, options, where):
        return _distribution_option(options["init"], column, stats, f"{where}.options.init")

    def signal_request(self, name, column, num_groups, options):
        if options["by"] == "hit":
            return SignalRequest(name, SIGNAL_GROUP_HIT, column, num_groups, int(options["k"]))
        return SignalRequest(name, SIGNAL_GROUP_LOSS, column, num_groups)

    def sign(self, objective, signal):
        s = np.zeros(objective.num_groups)
        measured = np.flatnonzero(~np.isnan(signal))
        badness = signal[measured] if objective.options["by"] == "loss" else -signal[measured]
        # stable sort on -badness: the worst first, the lower index first on ties (deterministic)
        worst = measured[np.argsort(-badness, kind="stable")[: int(objective.options["worst"])]]
        s[worst] = 1.0
        return s


class TargetShareKind(ObjectiveKind):
    """Alignment: move the recommended group mix toward a target mix."""

    name = "target_share"
    defaults = {"target": "train_share", "k": 100, "init": "train_share"}
    test_metrics = ("pop_kl",)  # against q* over align_group (DATA.md), whatever the column

    def __init__(self, name: str = "target_share") -> None:
        self.name = name

    def resolve_options(self, options, where):
        resolved = super().resolve_options(options, where)
        _positive_int(resolved["k"], f"{where}.options.k")
        return resolved

    def initial(self, column, stats, options, where):
        return _distribution_option(options["init"], column, stats, f"{where}.options.init")

    def target(self, column, stats, options, where):
        return _distribution_option(options["target"], column, stats, f"{where}.options.target")

    def signal_request(self, name, column, num_groups, options):
        return SignalRequest(name, SIGNAL_TOPK_HISTOGRAM, column, num_groups, int(options["k"]))

    def check_signal(self, objective, vector, where):
        if not np.all(np.isfinite(vector)) or np.any(vector < 0):
            raise ObjectiveError(f"{where}: expected finite non-negative counts, got {vector.tolist()}")

    def sign(self, objective, signal):
        total = float(signal.sum())
        if total <= 0:
            return np.zeros(objective.num_groups)
        q_rec = signal / total
        q_star = np.asarray(objective.target, dtype=np.float64)
        return np.sign(q_star - q_rec)


def _positive_int(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ObjectiveError(f"{where}: expected a positive integer, got {value!r}")


OBJECTIVE_KINDS: Registry[ObjectiveKind] = Registry("objective kind", "morec.objectives[].kind")


def register_objective_kind(kind: ObjectiveKind, *, replace: bool = False) -> ObjectiveKind:
    """Register ``kind`` under ``kind.name`` (a plugin module calls this at import)."""
    if not kind.name:
        raise ObjectiveError(f"{type(kind).__name__}: a kind needs a non-empty name")
    return OBJECTIVE_KINDS.register(kind.name, kind, replace=replace)


for _kind in (
    AccuracyKind(),
    RevenueKind(),
    FixedKind(),
    WorstGroupKind("worst_group"),
    WorstGroupKind("fairness"),
    TargetShareKind("target_share"),
    TargetShareKind("alignment"),
):
    register_objective_kind(_kind)


def configurable_kinds() -> list[str]:
    """The kind names a ``morec.objectives`` entry may use (the implicit accuracy left out)."""
    return [name for name in OBJECTIVE_KINDS.names() if not OBJECTIVE_KINDS.get(name).implicit]


def kind_metrics(kinds: Sequence[str]) -> list[str]:
    """The test metrics that measure accuracy and the objectives of ``kinds``: accuracy's
    first, then each kind's in order, each name once. ``OBJECTIVE_KINDS.names()``: every
    registered kind's (what the jobs evaluate); a config's kinds: its results table."""
    names = [ACCURACY, *(k for k in kinds if k != ACCURACY)]
    return list(dict.fromkeys(m for kind in names for m in kind_of(kind, "kind_metrics").test_metrics))


def headline_metrics(kinds: Sequence[str]) -> list[str]:
    """One metric per objective, accuracy first: each kind's first test metric (a kind
    without test metrics has none); the study's objective vector and the progress lines."""
    names = [ACCURACY, *(k for k in kinds if k != ACCURACY)]
    firsts = (kind_of(kind, "headline_metrics").test_metrics[:1] for kind in names)
    return list(dict.fromkeys(m for first in firsts for m in first))


def kind_of(kind: str, where: str) -> ObjectiveKind:
    """The registered kind, or an ObjectiveError naming ``where`` and the configurable kinds."""
    if kind not in OBJECTIVE_KINDS:
        raise ObjectiveError(f"{where}.kind: unknown objective kind {kind!r}; expected one of {configurable_kinds()}")
    return OBJECTIVE_KINDS.get(kind)


@dataclass
class ObjectiveSet:
    """The auxiliary objectives of a job, in block order, with the kinds that read them."""

    objectives: list[Objective]
    # the kinds this set reads, pickled with it: the coordinator actor (another process) then
    # imports a plugin kind's module by its class, without a run.plugins of its own
    kinds: dict[str, ObjectiveKind] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """All block names, accuracy first: index = block id."""
        return [ACCURACY] + [o.name for o in self.objectives]

    @property
    def num_blocks(self) -> int:
        return 1 + len(self.objectives)

    def by_name(self, name: str) -> Objective:
        for o in self.objectives:
            if o.name == name:
                return o
        raise ObjectiveError(f"unknown objective {name!r}; have {[o.name for o in self.objectives]}")

    def weights(self) -> dict[str, float]:
        return {o.name: o.weight for o in self.objectives}

    def adaptive(self) -> list[Objective]:
        return [o for o in self.objectives if o.adaptive]

    def signal_requests(self) -> list[SignalRequest]:
        """What the evaluator must compute and submit at each sampler update."""
        return [o.signal for o in self.objectives if o.signal is not None]

    def initial_probabilities(self) -> dict[str, np.ndarray]:
        return {o.name: np.asarray(o.initial_probabilities) for o in self.objectives}

    def signs(self, signals: Mapping[str, Sequence[float]]) -> dict[str, np.ndarray]:
        """Validate the submitted signals and turn each into its sign vector."""
        expected = {o.name for o in self.adaptive()}
        missing = sorted(expected - set(signals))
        extra = sorted(set(signals) - expected)
        if missing or extra:
            raise ObjectiveError(
                f"signals: expected exactly the adaptive objectives {sorted(expected)}; missing {missing}, "
                f"unexpected {extra}"
            )
        signs: dict[str, np.ndarray] = {}
        for o in self.adaptive():
            kind = self.kinds[o.kind] if o.kind in self.kinds else kind_of(o.kind, f"objective {o.name!r}")
            vector = _check_signal(o, kind, signals[o.name])
            s = np.asarray(kind.sign(o, vector), dtype=np.float64)
            if s.shape != (o.num_groups,) or not np.all(np.isin(s, (-1.0, 0.0, 1.0))):
                raise ObjectiveError(
                    f"objective {o.name!r}: kind {o.kind!r} returned an invalid sign vector {s.tolist()}"
                )
            signs[o.name] = s
        return signs


def _check_signal(o: Objective, kind: ObjectiveKind, values: Sequence[float]) -> np.ndarray:
    assert o.signal is not None
    vector = np.asarray(values, dtype=np.float64)
    where = f"signal for objective {o.name!r} ({o.signal.kind} over {o.group_column})"
    if vector.shape != (o.num_groups,):
        raise ObjectiveError(f"{where}: expected {o.num_groups} values, got shape {vector.shape}")
    kind.check_signal(o, vector, where)
    return vector


def build_objectives(
    configs: Sequence[Any],
    stats: GroupStats,
    *,
    default_alpha: float,
) -> ObjectiveSet:
    """Resolve ``config.morec.objectives`` (validated by config.py: names unique, weights
    >= 0) against the data into an ``ObjectiveSet``.

    ``options.alpha`` of an entry overrides the sampler's step for that objective only.
    """
    objectives: list[Objective] = []
    kinds: dict[str, ObjectiveKind] = {}
    for i, cfg in enumerate(configs):
        where = f"morec.objectives[{i}] ({cfg.name or 'unnamed'})"
        if cfg.name == ACCURACY or cfg.kind == ACCURACY:
            raise ObjectiveError(f"{where}: accuracy is implicit (block 0, uniform data); do not list it")
        kind = kinds[cfg.kind] = kind_of(cfg.kind, where)
        if kind.implicit:
            raise ObjectiveError(f"{where}: kind {cfg.kind!r} is implicit and cannot be configured")
        if not (math.isfinite(cfg.weight) and cfg.weight >= 0):
            raise ObjectiveError(f"{where}.weight: expected a finite number >= 0, got {cfg.weight}")
        raw = dict(cfg.options)
        alpha = float(raw.pop("alpha", default_alpha))
        if not (math.isfinite(alpha) and alpha > 0):
            raise ObjectiveError(f"{where}.options.alpha: expected > 0, got {alpha}")
        options = kind.resolve_options(raw, where)
        try:
            g = stats.require_column(cfg.group_column, f"{where}.group_column")
        except SamplerError as exc:
            raise ObjectiveError(str(exc)) from None
        initial = np.asarray(kind.initial(cfg.group_column, stats, options, where), dtype=np.float64)
        if initial.shape != (g,):
            raise ObjectiveError(f"{where}: kind {cfg.kind!r} gave {initial.size} initial probabilities for {g} groups")
        target = kind.target(cfg.group_column, stats, options, where)
        objectives.append(
            Objective(
                name=cfg.name,
                kind=cfg.kind,
                block=len(objectives) + 1,
                group_column=cfg.group_column,
                num_groups=g,
                weight=float(cfg.weight),
                alpha=alpha,
                options=options,
                initial_probabilities=tuple(float(x) for x in initial),
                adaptive=kind.adaptive,
                signal=kind.signal_request(cfg.name, cfg.group_column, g, options) if kind.adaptive else None,
                target=None if target is None else tuple(float(x) for x in target),
                row_weight_column=kind.row_weight_column(options),
            )
        )
    return ObjectiveSet(objectives, kinds)
