"""The design of the Pareto study of issue 23, declared before any of its runs: methods, their
knobs, budgets, seeds and fine-tuning lengths. Pure data and checks (no torch, no runs).

- ``STUDY``: eight methods, each with the same number of knob values (``check_equal_knobs``).
  A knob is the one config key the method's trade-off turns on, with values fixed here in
  advance; what the study compares is each method's *operating point* for a budget, chosen
  among its knob values on the selection slice of validation users (``pareto_endpoints``).
  - ``morec_budget``: MoRec with the budget law (``morec.pid.law = "budget"``); knob: its set
    point ``morec.accuracy_budget``.
  - ``morec_paper``: MoRec with the paper's PID law; knob: lambda (with the paper's gains
    beta sits near beta_min + Kp/2 for the whole run, so lambda sets the trade).
  - ``static``, ``pareto_mtl``, ``epo``: the paper's baselines on MoRec's sampled blocks;
    knob: lambda (their preference is (1, lambda w), ``train/methods.py``).
  - ``mgda``: reads neither w nor lambda; knob: the fine-tuning step size.
  - ``continuation`` (control): accuracy-only fine-tuning for the same steps, on uniform
    batches (``static_uniform`` with lambda 1e-9: the objectives' weights are 1e-9 x w, so the
    loss is the accuracy loss to float32 precision; lambda must be > 0); knob: the step size.
  - ``interpolation`` (control): no training; the weights (1 - alpha) x pretrained +
    alpha x ``morec_paper`` at the paper's lambda 0.2, same seed and length; knob: alpha.
- ``BUDGETS``: relative Hit@10 losses 1%, 2%, 5% (the issue's), the primary endpoint's.
- ``SEEDS``: 10..14, none used before (issue 14's study and every tuning used 0, 1, 2).
- ``EPOCHS``: 2 and 10 fine-tuning epochs; a 10-epoch run continues the 2-epoch run's
  epoch-end checkpoint (``pareto.py``: ``morec.epochs`` only bounds the epoch loop).

The grids were set from issue 14's runs on seeds 0-2 (docs/results.md): lambda 0.2 costs
MoRec (paper's law) about 2% and ParetoMTL about 4.7% of Hit@10, while static and EPO at 0.2
gain Hit, so their grids reach further; MGDA at step 0.005 costs about 3.8%.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

BUDGETS = (0.01, 0.02, 0.05)
SEEDS = (10, 11, 12, 13, 14)
EPOCHS = (2, 10)
REFERENCE_METHOD = "static"  # paired differences are taken against it at each budget
CONTROLLER_METHOD = "morec_budget"
CONTINUATION_LAMBDA = 1e-9


@dataclass(frozen=True)
class StudyMethod:
    name: str
    cli_method: str | None  # ``morec finetune --method``; None: evaluation only (interpolation)
    knob: str  # the config key the values set ("alpha" for the interpolation)
    values: tuple[float, ...]
    fixed: tuple[str, ...] = ()  # overrides of every run of the method
    source: tuple[str, float] | None = None  # interpolation: the (method, knob value) it mixes in

    def overrides(self, value: float) -> list[str]:
        """The config overrides of the run at knob ``value`` (none for the interpolation)."""
        if self.cli_method is None:
            return []
        return [*self.fixed, f"{self.knob}={value!r}"]

    def label(self, value: float) -> str:
        return f"{self.name}-{self.knob.rsplit('.', 1)[-1]}{value:g}"


STUDY = (
    StudyMethod(
        "morec_budget", "morec", "morec.accuracy_budget", (0.01, 0.02, 0.03, 0.05), ('morec.pid.law="budget"',)
    ),
    StudyMethod("morec_paper", "morec", "morec.lam", (0.05, 0.1, 0.2, 0.4), ('morec.pid.law="paper"',)),
    StudyMethod("static", "static", "morec.lam", (0.2, 0.5, 1.0, 2.0)),
    StudyMethod("mgda", "mgda", "morec.embedding_lr", (0.00125, 0.0025, 0.005, 0.01)),
    StudyMethod("pareto_mtl", "pareto_mtl", "morec.lam", (0.05, 0.1, 0.2, 0.4)),
    StudyMethod("epo", "epo", "morec.lam", (0.2, 0.5, 1.0, 2.0)),
    StudyMethod(
        "continuation",
        "static_uniform",
        "morec.embedding_lr",
        (0.00125, 0.0025, 0.005, 0.01),
        (f"morec.lam={CONTINUATION_LAMBDA!r}",),
    ),
    StudyMethod("interpolation", None, "alpha", (0.25, 0.5, 0.75, 1.0), source=("morec_paper", 0.2)),
)


def by_name(methods: Iterable[StudyMethod] = STUDY) -> dict[str, StudyMethod]:
    return {m.name: m for m in methods}


def check_equal_knobs(methods: Iterable[StudyMethod]) -> int:
    """The common number of knob values (distinct, at least 2); ValueError naming the method otherwise."""
    methods = list(methods)
    if not methods:
        raise ValueError("the study has no methods")
    counts = {m.name: len(set(m.values)) for m in methods}
    for m in methods:
        if len(m.values) != counts[m.name]:
            raise ValueError(f"{m.name}: repeated knob values {m.values}")
    if len(set(counts.values())) != 1:
        raise ValueError(f"methods have different numbers of knob values: {counts}")
    n = next(iter(counts.values()))
    if n < 2:
        raise ValueError(f"every method needs at least 2 knob values, got {n}")
    return n


def check_sources(methods: Iterable[StudyMethod]) -> None:
    """An interpolation's source is a trained method of the study at one of its knob values."""
    table = by_name(methods)
    for m in table.values():
        if m.source is None:
            continue
        name, value = m.source
        src = table.get(name)
        if src is None or src.cli_method is None or value not in src.values:
            raise ValueError(f"{m.name}: source {m.source} is not a trained method's knob value in the study")


def quick_design(methods: Iterable[StudyMethod] = STUDY, knobs: int = 2) -> tuple[StudyMethod, ...]:
    """The same methods with ``knobs`` values each, evenly spread over the grid from its first
    to its last value: the quick mode's. An interpolation's source value is kept (it takes
    the place of the nearest pick)."""
    methods = list(methods)
    sources = {m.source[0]: m.source[1] for m in methods if m.source}
    out = []
    for m in methods:
        picks = sorted({round(i * (len(m.values) - 1) / max(knobs - 1, 1)) for i in range(knobs)})
        if m.name in sources:
            keep = m.values.index(sources[m.name])
            nearest = min(picks, key=lambda i: abs(i - keep))
            picks = sorted({*(i for i in picks if i != nearest), keep})
        out.append(StudyMethod(m.name, m.cli_method, m.knob, tuple(m.values[i] for i in picks), m.fixed, m.source))
    return tuple(out)
