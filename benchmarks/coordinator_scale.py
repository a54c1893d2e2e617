"""Coordinator at scale: the real Ray actor against 8, 64 and 256 simulated ranks.

    python -m benchmarks.coordinator_scale --quick --out FILE.json   # well under a minute
    python -m benchmarks.coordinator_scale --out FILE.json           # more steps per point

Each simulated rank is an asyncio task in this process that follows the rank side of the
bounded-staleness protocol exactly (``morec_dist.coordinator.client``): take the decision
of step t (local if the reply requested s steps earlier has arrived, otherwise wait),
"compute" for a jittered step time, then send ``report(rank, t, loss sums, row counts)``,
whose reply is ``decision(t + s)``. Rank 0 also submits sampler signals when an update is
due. The actor is the project's ``CoordinatorActor`` on a local Ray head (one process per
actor, as in production); the ranks only differ from real ones in not training.

Per (ranks N, staleness s) point it records:
- ``report_rtt_ms`` p50 / p99: from sending a report to its reply (``decision(t + s)``)
  being available at the rank; this includes waiting for the slowest rank's step t;
- ``rpc_rtt_ms`` p50 / p99: a trivial actor call made during the run, the actor's bare
  round trip under that load;
- ``steps_per_s``: global steps aggregated (PID updates) per second, and ``reports_per_s``;
- ``wait_fraction``: the fraction of decisions (of steps >= s; the first s come from the
  start-up fetch) a rank needed before they had arrived (the staleness the protocol
  *needed*: with enough s it tends to 0), ``wait_ms`` mean / p99;
- ``decisions_consistent``: every rank received the same beta and p version for each step.

A point that does not complete within ``--point-timeout`` is recorded with
``completed: false`` (and the actor replaced): the actor serves at most
``max_concurrency`` calls at once, and a report waits inside the actor until its reply
``decision(t + s)`` exists, so up to ranks x s report calls can be waiting together.

s = 0 is the synchronous protocol of the core: the decision of step t needs step t's own
global loss, so a rank reports first and then waits for that decision (a trainer can only
use it by delaying its backward pass until the global loss is known; the training config
therefore requires s >= 1, and s = 0 is measured here as the synchronous baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.common import Recorder, default_out, note, percentile, bench_parser

RANKS = (8, 64, 256)
STALENESS = (0, 1, 2, 4)
ROWS_PER_BLOCK = 512
NUM_GROUPS = {"rev_group": 5, "fair_group": 18, "align_group": 5}
# what morec_dist.coordinator.actor.get_or_create gives the actor: calls that may wait at once
ACTOR_MAX_CONCURRENCY = 1000


def make_spec(world_size: int, staleness: int, sampler_every: int) -> Any:
    """The reference objectives (revenue, fairness, alignment) over synthetic group statistics."""
    from morec_dist.config import load_config
    from morec_dist.coordinator.core import build_spec
    from morec_dist.coordinator.sampler import GroupStats

    config = load_config(None)
    rng = np.random.default_rng(0)
    counts = {col: rng.integers(1_000, 100_000, size=g).astype(np.float64) for col, g in NUM_GROUPS.items()}
    stats = GroupStats(
        num_groups=dict(NUM_GROUPS),
        train_counts=counts,
        mean_prices={"rev_group": np.linspace(1.0, 5.0, NUM_GROUPS["rev_group"])},
    )
    spec = build_spec(config, stats, world_size=world_size, target_loss=0.25, steps_per_epoch=max(sampler_every, 1))
    # the core's own bound (s >= 0): a job's config asks for s >= 1, but s = 0 is the
    # synchronous baseline the sweep compares against
    return dataclasses.replace(spec, staleness=staleness, sampler_every=sampler_every)


@dataclasses.dataclass
class RankLog:
    report_rtt: list[float] = dataclasses.field(default_factory=list)
    waits: list[float] = dataclasses.field(default_factory=list)  # seconds waited, per decision that was not there yet
    decisions: int = 0
    seen: dict[int, tuple[float, int]] = dataclasses.field(default_factory=dict)  # step -> (beta, p_version)


def _signals(spec: Any, rng: np.random.Generator) -> dict[str, list[float]]:
    return {r.objective: rng.random(r.num_groups).tolist() for r in spec.objectives.signal_requests()}


async def _reply(ref: Any, sent: float, log: RankLog) -> Any:
    decision = await ref
    log.report_rtt.append(time.perf_counter() - sent)
    return decision


async def simulated_rank(actor: Any, spec: Any, rank: int, steps: int, step_ms: float, seed: int, log: RankLog) -> None:
    s = spec.staleness
    blocks = spec.objectives.num_blocks
    rng = np.random.default_rng([seed, rank])
    signal_rng = np.random.default_rng([seed, 10_000])
    pending: dict[int, asyncio.Task] = {}
    if s > 0:
        for d in await actor.decisions.remote(0, s):
            pending[d.step] = asyncio.get_running_loop().create_future()
            pending[d.step].set_result(d)
    for t in range(steps):
        if s > 0:
            # the first s decisions come from the start-up fetch, not from the protocol
            decision = await _take(pending.pop(t), log, counted=t >= s)
        await asyncio.sleep(step_ms / 1000 * rng.lognormal(0.0, 0.5))
        sums = (ROWS_PER_BLOCK * (0.25 + 0.05 * rng.standard_normal(blocks))).tolist()
        sent = time.perf_counter()
        task = asyncio.ensure_future(_reply(actor.report.remote(rank, t, sums, [ROWS_PER_BLOCK] * blocks), sent, log))
        if s == 0:
            decision = await _take(task, log)  # synchronous: the decision of t needs t's global loss
        else:
            pending[t + s] = task
        log.seen[t] = (decision.beta, decision.p_version)
        if rank == 0 and spec.sampler_every and (t + 1) % spec.sampler_every == 0:
            await actor.submit_signals.remote(t, _signals(spec, signal_rng))
    for task in pending.values():
        await task


async def _take(future: Any, log: RankLog, counted: bool = True) -> Any:
    log.decisions += counted
    if future.done():
        return future.result()
    started = time.perf_counter()
    decision = await future
    if counted:
        log.waits.append(time.perf_counter() - started)
    return decision


async def _probe(actor: Any, stop: asyncio.Event, rtts: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await actor.configured.remote()
        rtts.append(time.perf_counter() - started)
        await asyncio.sleep(0.005)


async def run_point(actor: Any, ranks: int, staleness: int, steps: int, step_ms: float, sampler_every: int, seed: int, timeout_s: float) -> dict[str, Any]:
    spec = make_spec(ranks, staleness, sampler_every)
    await actor.configure.remote(spec, None, f"bench-{uuid.uuid4().hex}")
    logs = [RankLog() for _ in range(ranks)]
    stop, rpc = asyncio.Event(), []
    probe = asyncio.ensure_future(_probe(actor, stop, rpc))
    started = time.perf_counter()
    try:
        await asyncio.wait_for(
            asyncio.gather(*(simulated_rank(actor, spec, r, steps, step_ms, seed, logs[r]) for r in range(ranks))), timeout_s
        )
    except asyncio.TimeoutError:
        stop.set()
        probe.cancel()
        done = min((max(log.seen, default=-1) for log in logs), default=-1)
        # the actor is left with calls that never return: the caller replaces it
        return {
            "ranks": ranks, "staleness": staleness, "steps": steps, "completed": False,
            "error": f"no completion within {timeout_s:.0f} s; every rank had passed step {done}",
            "calls_in_flight_bound": ranks * max(staleness, 1),
        }
    wall = time.perf_counter() - started
    stop.set()
    await probe
    status = await actor.status.remote()
    rtts = [x for log in logs for x in log.report_rtt]
    waits = [x for log in logs for x in log.waits]
    decisions = sum(log.decisions for log in logs)
    consistent = all(logs[0].seen == log.seen for log in logs[1:])
    return {
        "ranks": ranks,
        "staleness": staleness,
        "steps": steps,
        "completed": True,
        "calls_in_flight_bound": ranks * max(staleness, 1),
        "aggregated_through": status["aggregated_through"],
        "wall_s": round(wall, 3),
        "steps_per_s": steps / wall,
        "reports_per_s": steps * ranks / wall,
        "report_rtt_ms_p50": 1000 * percentile(rtts, 50),
        "report_rtt_ms_p99": 1000 * percentile(rtts, 99),
        "rpc_rtt_ms_p50": 1000 * percentile(rpc, 50),
        "rpc_rtt_ms_p99": 1000 * percentile(rpc, 99),
        "rpc_probes": len(rpc),
        "wait_fraction": len(waits) / max(decisions, 1),
        "wait_ms_mean": 1000 * float(np.mean(waits)) if waits else 0.0,
        "wait_ms_p99": 1000 * percentile(waits, 99) if waits else 0.0,
        "decisions_consistent": consistent,
        "sampler_versions": status["p_version"],
    }


def steps_for(ranks: int, call_budget: int, min_steps: int, max_steps: int) -> int:
    return int(min(max_steps, max(min_steps, call_budget // ranks)))


async def run_all_points(new_actor: Callable[[], Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    points = []
    actor = new_actor()
    for ranks in args.ranks:
        steps = steps_for(ranks, args.call_budget, args.min_steps, args.max_steps)
        for staleness in args.staleness:
            point = await run_point(actor, ranks, staleness, steps, args.step_ms, args.sampler_every, args.seed, args.point_timeout)
            points.append(point)
            if not point["completed"]:
                print(f"ranks {ranks:>4} s={staleness}: did not complete: {point['error']}", flush=True)
                actor = new_actor()
                continue
            print(
                f"ranks {ranks:>4} s={staleness}: {point['steps_per_s']:8.1f} steps/s, report rtt p50 {point['report_rtt_ms_p50']:7.2f} ms"
                f" p99 {point['report_rtt_ms_p99']:7.2f} ms, rpc p50 {point['rpc_rtt_ms_p50']:.2f} ms, waited {100 * point['wait_fraction']:5.1f}%",
                flush=True,
            )
    return points


def staleness_needed(points: list[dict[str, Any]], threshold: float) -> dict[str, int | None]:
    """Per rank count, the smallest s whose wait fraction is at most ``threshold``."""
    out: dict[str, int | None] = {}
    for ranks in sorted({p["ranks"] for p in points}):
        ok = [p["staleness"] for p in points if p["ranks"] == ranks and p["completed"] and p["wait_fraction"] <= threshold]
        out[str(ranks)] = min(ok) if ok else None
    return out


def plot(points: list[dict[str, Any]], path: Path) -> None:
    from benchmarks.common import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for s in sorted({p["staleness"] for p in points}):
        rows = sorted((p for p in points if p["staleness"] == s and p["completed"]), key=lambda p: p["ranks"])
        x = [p["ranks"] for p in rows]
        axes[0].plot(x, [p["steps_per_s"] for p in rows], marker="o", label=f"s={s}")
        axes[1].plot(x, [p["report_rtt_ms_p99"] for p in rows], marker="o", label=f"s={s}")
        axes[2].plot(x, [100 * p["wait_fraction"] for p in rows], marker="o", label=f"s={s}")
    axes[0].set_yscale("log")
    for ax, title in zip(axes, ("aggregated steps/s", "report round trip p99 (ms)", "decisions that waited (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("simulated ranks")
        ax.set_title(title)
        ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(__doc__)
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--staleness", type=int, nargs="+", default=list(STALENESS))
    parser.add_argument("--step-ms", type=float, default=None, help="mean simulated step time per rank (lognormal jitter, sigma 0.5)")
    parser.add_argument("--sampler-every", type=int, default=None, help="steps between sampler updates (rank 0 submits signals)")
    parser.add_argument("--point-timeout", type=float, default=None, help="seconds a point may take before it is recorded as not completed")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.point_timeout = args.point_timeout or (30.0 if args.quick else 120.0)
    args.call_budget = 512 if args.quick else 12_000
    args.min_steps = 10 if args.quick else 24
    args.max_steps = 40 if args.quick else 400
    # full: about the MoRec step this machine measures (overhead benchmark: ~55 ms)
    args.step_ms = args.step_ms if args.step_ms is not None else (5.0 if args.quick else 50.0)
    args.sampler_every = args.sampler_every if args.sampler_every is not None else (10 if args.quick else 50)
    out = args.out or default_out("coordinator_scale", args.quick)
    config = {k: getattr(args, k) for k in ("ranks", "staleness", "step_ms", "sampler_every", "call_budget", "min_steps", "max_steps", "point_timeout")}
    recorder = Recorder("coordinator_scale", mode="quick" if args.quick else "full", seed=args.seed, config=config, note_text=note(args.note))

    from morec_dist.coordinator.service import start_local_ray

    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    start_local_ray(128, namespace=namespace)  # before anything imports ray: loopback only
    import ray

    from morec_dist.coordinator.actor import get_or_create

    actors = []

    def new_actor() -> Any:
        """A fresh actor; one that a point left wedged is killed first."""
        for stale in actors:
            ray.kill(stale, no_restart=True)
        actors[:] = [get_or_create(f"coordinator-scale-{uuid.uuid4().hex[:6]}", namespace)]
        return actors[0]

    try:
        points = asyncio.run(run_all_points(new_actor, args))
    finally:
        ray.shutdown()
    recorder.update({
        "points": points,
        "staleness_needed_wait_le_1pct": staleness_needed(points, 0.01),
        "staleness_needed_wait_le_10pct": staleness_needed(points, 0.10),
        "decisions_consistent": all(p["decisions_consistent"] for p in points if p["completed"]),
        "incomplete_points": [{k: p[k] for k in ("ranks", "staleness", "error", "calls_in_flight_bound")} for p in points if not p["completed"]],
        "actor_max_concurrency": ACTOR_MAX_CONCURRENCY,
    })
    result = recorder.write(out)
    if not args.no_plot:
        plot(points, out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
