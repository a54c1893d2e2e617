"""An example plugin (docs/extending.md): a new objective kind, ``long_tail``, with its own
signal, in one module. Name it in ``run.plugins = ["long_tail_plugin"]`` (this directory on
PYTHONPATH) and use it in ``morec.objectives``:

    {name = "tail_lift", kind = "long_tail", group_column = "align_group", weight = 0.2}

Signal ``heldout_rank``: per group of the column, the mean full-ranking position of the
validation users' held-out items (1 = top). The sign vector pushes sampling probability
toward the group served worst (largest mean rank) and away from the one served best; the
static_uniform / mgda_uniform baselines reweight uniform rows toward the inverse of each group's train share.

Its test metric ``tail_hit@K`` (Hit@K of the users whose held-out item lies in the less
popular half of the popularity bands) is evaluated, written to metrics.json and shown in
``morec run``'s table wherever the kind is registered.
"""

from __future__ import annotations

import numpy as np

from morec_dist.coordinator.objectives import ObjectiveKind, SignalRequest, register_objective_kind
from morec_dist.eval.metrics import TEST_METRICS, MetricInputs, TestMetric, hit_at_k
from morec_dist.eval.signal_kinds import SIGNALS, RowSignal

SIGNALS.register("heldout_rank", RowSignal(lambda batch, request: batch.ranks().double()))


def tail_hit(inputs: MetricInputs, k: int) -> float:
    """Hit@k over the users whose held-out item is in the less popular half of the
    popularity bands (align_group: band 1 is the most popular); NaN without such users."""
    tail = inputs.heldout["align_group"] > inputs.q_star.size // 2
    return float(hit_at_k(inputs.ranks[tail], k).mean()) if tail.any() else float("nan")


TEST_METRICS.register("tail_hit", TestMetric(tail_hit, "tail-Hit"))


class LongTailKind(ObjectiveKind):
    name = "long_tail"
    defaults = {"init": "train_share"}
    test_metrics = ("tail_hit",)

    def initial(self, column, stats, options, where):
        if options["init"] == "uniform":
            g = stats.num_groups[column]
            return np.full(g, 1.0 / g)
        return stats.train_share(column)

    def signal_request(self, name, column, num_groups, options):
        return SignalRequest(name, "heldout_rank", column, num_groups)

    def sign(self, objective, signal):
        s = np.zeros(objective.num_groups)
        if np.isnan(signal).all():
            return s
        s[int(np.nanargmax(signal))] = 1.0  # served worst: sample it more
        best = int(np.nanargmin(signal))
        if s[best] == 0:
            s[best] = -1.0
        return s

    def baseline_target(self, column, stats, options, where):
        counts = np.asarray(stats.train_counts[column], dtype=np.float64)
        return np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)


register_objective_kind(LongTailKind())
