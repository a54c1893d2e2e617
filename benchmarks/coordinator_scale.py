"""Coordinator at scale: the global protocol against the per-rank baseline, 8 to 1,024 ranks.

    python -m benchmarks.coordinator_scale --quick --out FILE.json   # under 3 minutes
    python -m benchmarks.coordinator_scale --out FILE.json           # more steps per point

Both protocols run against the project's real ``CoordinatorActor`` on a local Ray head.

- **The job's step**: synchronous data parallelism (every rank finishes a step together,
  the gradient all-reduce sees to that), so one step lasts ``--step-ms`` (20 ms) x a
  lognormal factor (sigma ``--jitter`` 0.25, mean 1), drawn once per step from the seed and
  identical for every protocol and for the baseline. Losses are synthetic per (rank, step)
  and depend on the beta the step used, so a beta that depended on timing would change
  every later number.
- **no coordinator** (``baseline_steps_per_s``): the same steps, nothing else; measured
  right before each point, under the same load.
- **global** (``coordinator.protocol = "global"``): one process emulates the N ranks' side.
  The main loop is the ranks' training loop (take decision(t), blocking only if it has not
  arrived; run the step). A background thread is rank 0's client thread of
  ``morec_dist.coordinator.collective``: it waits for the reduction of step t (modelled
  latency, below), sums the N ranks' vectors with the project's ``global_sums`` (fsum, the
  real rank-0 work at N), makes the one actor call per step through the real
  ``CoordinatorClient``, gets decision(t + s) and "broadcasts" it (modelled latency).
- **per_rank** (``coordinator.protocol = "per_rank"``, the old protocol, kept as this
  baseline): N asyncio tasks, each a rank calling ``actor.report`` every step (its reply is
  decision(t + s)), all following the same step times. A point where N x (s + 1) exceeds
  the actor's slots is refused, as the job config refuses it (it would hang).

**Reduction cost.** The real gloo collectives of the protocol (a gather of the per-rank
vector to rank 0, then a broadcast of the decision header) are timed with P real processes
for P in ``--gloo-procs`` (default 2, 4 quick; 2, 4, 8, 16 full). Larger N is modelled as
log2(N) hops (tree-shaped collectives): ``a + b log2(N)`` fitted to the points with
P <= the machine's cores, or, with one such point (this 2-core machine: P = 2), its
per-hop cost times log2(N). Points with more processes than cores are recorded
(``oversubscribed``) but not fitted: they time the CPU scheduler, not the collective.
Half of the modelled round is charged before rank 0 can sum step t, half before a
decision reaches the ranks. Measured points, fit and law are in the JSON (``gloo``).

Output: ``runs``, one per (protocol, ranks, s), with ``protocol``, ``ranks``,
``staleness``, ``steps_per_s``, ``baseline_steps_per_s``, ``ratio``, ``wait_fraction``
(decisions of steps >= s that were not there when the step began), ``actor_calls_per_step``
(per-step report calls; start-up and sampler-signal calls are counted in
``actor_calls_total``), ``beta_trace_matches_core_replay`` and, per point, the betas'
digest; ``beta_traces_identical_across_protocols`` compares the protocols at every N both ran.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.common import Recorder, bench_parser, default_out, note, percentile

if TYPE_CHECKING:  # imported where used, after the benchmark has set up its processes
    import asyncio

    from morec_dist.coordinator.core import CoordinatorSpec

RANKS = (8, 64, 256, 1024)
STALENESS = (1, 2)
NUM_GROUPS = {"rev_group": 5, "fair_group": 18, "align_group": 5}
ROWS_PER_BLOCK = 512


def make_spec(world_size: int, staleness: int, sampler_every: int) -> Any:
    """The reference objectives (revenue, fairness, alignment) over synthetic group statistics."""
    from morec_dist.config import load_config
    from morec_dist.coordinator.core import build_spec
    from morec_dist.coordinator.sampler import GroupStats

    # the paper's law on the replayed step losses, gains at which beta visibly moves
    config = load_config(None, ["morec.pid.law=paper", "morec.pid.kp=0.5", "morec.pid.ki=0.05"])
    rng = np.random.default_rng(0)
    counts = {col: rng.integers(1_000, 100_000, size=g).astype(np.float64) for col, g in NUM_GROUPS.items()}
    stats = GroupStats(
        num_groups=dict(NUM_GROUPS),
        train_counts=counts,
        mean_prices={"rev_group": np.linspace(1.0, 5.0, NUM_GROUPS["rev_group"])},
    )
    spec = build_spec(config, stats, world_size=world_size, target_loss=0.25, steps_per_epoch=max(sampler_every, 1))
    return dataclasses.replace(spec, staleness=staleness, sampler_every=sampler_every)


def rank_vectors(ranks: int, step: int, beta: float, blocks: int) -> np.ndarray:
    """[ranks, 2 * blocks]: per rank the loss sums then the row counts of step ``step``."""
    r = np.arange(ranks, dtype=np.float64)[:, None]
    b = np.arange(blocks, dtype=np.float64)[None, :]
    means = 0.2 + 0.03 * b + 0.05 * np.sin(r + step) / (step + 1) + 0.3 * beta
    counts = np.full((ranks, blocks), ROWS_PER_BLOCK, dtype=np.float64)
    return np.concatenate([means * counts, counts], axis=1)


def signals(spec: CoordinatorSpec, step: int) -> dict[str, list[float]]:
    rng = np.random.default_rng([step, 7])
    return {r.objective: rng.random(r.num_groups).tolist() for r in spec.objectives.signal_requests()}


def step_times(steps: int, step_ms: float, jitter: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 1])
    return step_ms / 1000 * rng.lognormal(-(jitter**2) / 2, jitter, size=steps)


def digest(betas: list[float]) -> str:
    return hashlib.sha256(np.asarray(betas, dtype=np.float64).tobytes()).hexdigest()[:16]


# ------------------------------------------------------------------ real gloo collectives


def _gloo_worker(rank: int, world: int, store_path: str, iters: int, blocks: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    vector = torch.zeros(2 * blocks, dtype=torch.float64)
    header = torch.zeros(6 + blocks - 1, dtype=torch.float64)
    buffers = [torch.empty_like(vector) for _ in range(world)] if rank == 0 else None
    times = []
    for i in range(iters + 5):
        dist.barrier()
        started = time.perf_counter()
        dist.gather(vector, buffers, dst=0)
        dist.broadcast(header, src=0)
        if i >= 5:
            times.append(time.perf_counter() - started)
    if rank == 0:
        Path(out).write_text(repr(times))
    dist.destroy_process_group()


def measure_gloo(procs: list[int], iters: int, blocks: int, cores: int) -> dict[str, Any]:
    """Median time of one gather-to-0 + broadcast round with P real gloo processes, and the
    model of larger N fitted to the points with P <= cores (more processes than cores
    measure the CPU scheduler, not the collective; they are kept, flagged, not fitted)."""
    import tempfile

    import torch.multiprocessing as mp

    measured = {}
    for p in procs:
        with tempfile.TemporaryDirectory(prefix="morec-gloo-") as tmp:
            out = os.path.join(tmp, "times")
            mp.start_processes(
                _gloo_worker,
                args=(p, os.path.join(tmp, "store"), iters, blocks, out),
                nprocs=p,
                start_method="spawn",
                join=True,
            )
            times = eval(Path(out).read_text())  # our own repr of a float list (trusted input)
        measured[p] = {
            "median_ms": 1000 * float(np.median(times)),
            "p90_ms": 1000 * percentile(times, 90),
            "oversubscribed": p > cores,
        }
        print(
            f"gloo gather + broadcast, {p:>2} processes: median {measured[p]['median_ms']:.3f} "
            f"ms{' (more processes than cores)' if p > cores else ''}",
            flush=True,
        )
    fitted = {p: m for p, m in measured.items() if not m["oversubscribed"]} or {min(measured): measured[min(measured)]}
    if len(fitted) >= 2:
        x = np.log2(np.array(list(fitted), dtype=np.float64))
        b, a = np.polyfit(x, np.array([m["median_ms"] for m in fitted.values()]), 1)
        law = "round_ms(N) = a + b * log2(N), least squares over the points with P <= cores"
    else:  # one point: both collectives as binomial trees, log2(N) hops at the measured per-hop cost
        p, m = next(iter(fitted.items()))
        a, b = 0.0, m["median_ms"] / math.log2(p)
        law = (
            f"round_ms(N) = round_ms({p}) / log2({p}) * log2(N): log2(N) hops at the measured cost per hop "
            f"({p} processes, the most this machine holds)"
        )
    return {
        "procs": {str(k): v for k, v in measured.items()},
        "cores": cores,
        "fitted_procs": sorted(fitted),
        "fit": {"a_ms": float(a), "b_ms_per_log2_rank": max(float(b), 0.0)},
        "law": law,
    }


def round_ms(gloo: dict[str, Any], ranks: int) -> float:
    fit = gloo["fit"]
    return max(fit["a_ms"] + fit["b_ms_per_log2_rank"] * math.log2(ranks), 0.0)


# ------------------------------------------------------------------------------ baseline


def run_baseline(durations: np.ndarray) -> float:
    started = time.perf_counter()
    for d in durations:
        time.sleep(d)
    return len(durations) / (time.perf_counter() - started)


# ------------------------------------------------------------------------- global protocol


def run_global(
    new_actor: Any, ranks: int, staleness: int, durations: np.ndarray, sampler_every: int, gloo: dict[str, Any]
) -> dict[str, Any]:
    import ray

    from morec_dist.coordinator.client import CoordinatorClient
    from morec_dist.coordinator.collective import global_sums

    spec = make_spec(1, staleness, sampler_every)
    blocks = spec.objectives.num_blocks
    actor = new_actor()
    ray.get(actor.configure.remote(spec, None, f"bench-{uuid.uuid4().hex}"))
    inner = CoordinatorClient(actor, rank=0, staleness=staleness)
    inner.start(0)
    half = round_ms(gloo, ranks) / 2000  # seconds: gather before the sum, broadcast after the decision
    steps = len(durations)
    cond = threading.Condition()
    arrived: dict[int, tuple[float, Any]] = {}  # step -> (time available on the ranks, decision)
    for t in range(staleness):
        arrived[t] = (0.0, inner.decision_for_step(t))
    work: queue.Queue = queue.Queue()
    calls = {"report": 0, "other": 1}  # the start-up fetch
    errors: list[BaseException] = []

    def rank0_thread() -> None:
        try:
            while True:
                item = work.get()
                if item is None:
                    return
                t, ended, beta = item
                time.sleep(max(0.0, ended + half - time.perf_counter()))  # the gather of step t
                sums, counts = global_sums(rank_vectors(ranks, t, beta, blocks), blocks)
                inner.report(t, sums, counts)
                calls["report"] += 1
                d = inner.decision_for_step(t + staleness)
                with cond:
                    arrived[d.step] = (time.perf_counter() + half, d)  # the broadcast
                    cond.notify_all()
        except BaseException as exc:  # any error: re-raised on the main thread
            errors.append(exc)
            with cond:
                cond.notify_all()

    thread = threading.Thread(target=rank0_thread, daemon=True)
    thread.start()
    betas, waits, waited = [], 0, []
    started = time.perf_counter()
    for t in range(steps):
        with cond:
            ready = t in arrived and arrived[t][0] <= time.perf_counter()
        if not ready:
            began = time.perf_counter()
            with cond:
                while t not in arrived and not errors:
                    cond.wait(1.0)
            if errors:
                raise errors[0]
            time.sleep(max(0.0, arrived[t][0] - time.perf_counter()))
            if t >= staleness:
                waits += 1
                waited.append(time.perf_counter() - began)
        with cond:
            decision = arrived.pop(t)[1]
        betas.append(decision.beta)
        time.sleep(durations[t])
        work.put((t, time.perf_counter(), decision.beta))
        if spec.sampler_every and (t + 1) % spec.sampler_every == 0:
            inner.submit_signals(t, signals(spec, t))  # rank 0's main thread, as in the trainer
            calls["other"] += 1
    wall = time.perf_counter() - started
    work.put(None)
    thread.join(timeout=120)
    inner.flush()
    trace = ray.get(actor.trace.remote())
    ray.kill(actor, no_restart=True)
    return {
        "steps_per_s": steps / wall,
        "wait_fraction": waits / max(steps - staleness, 1),
        "wait_ms_mean": 1000 * float(np.mean(waited)) if waited else 0.0,
        "actor_calls_per_step": calls["report"] / steps,
        "actor_calls_total": calls["report"] + calls["other"],
        "reduction_round_ms_modelled": round_ms(gloo, ranks),
        "betas": betas,
        "trace_betas": trace["beta"],
    }


# -------------------------------------------------------------------- per-rank protocol


async def _per_rank_rank(
    actor: Any,
    spec: CoordinatorSpec,
    ranks: int,
    rank: int,
    durations: np.ndarray,
    log: dict[str, Any],
    barrier: asyncio.Barrier,
) -> None:
    import asyncio

    s = spec.staleness
    blocks = spec.objectives.num_blocks
    pending: dict[int, Any] = {}
    loop = asyncio.get_running_loop()
    for d in await actor.decisions.remote(0, s):
        pending[d.step] = loop.create_future()
        pending[d.step].set_result(d)
    for t in range(len(durations)):
        future = pending.pop(t)
        if not future.done():
            began = time.perf_counter()
            await future
            if t >= s:
                log["waits"] += 1
                log["waited"].append(time.perf_counter() - began)
        decision = future.result()
        if rank == 0:
            log["betas"].append(decision.beta)
        await barrier.wait()  # synchronous data parallelism: every rank starts step t together
        await asyncio.sleep(durations[t])
        row = rank_vectors(ranks, t, decision.beta, blocks)[rank].tolist()
        pending[t + s] = asyncio.ensure_future(
            actor.report.remote(rank, t, row[:blocks], [int(c) for c in row[blocks:]])
        )
        log["calls"] += 1
        if rank == 0 and spec.sampler_every and (t + 1) % spec.sampler_every == 0:
            await actor.submit_signals.remote(t, signals(spec, t))
            log["other"] += 1
    for f in pending.values():
        await f


def run_per_rank(
    new_actor: Any, ranks: int, staleness: int, durations: np.ndarray, sampler_every: int, timeout_s: float
) -> dict[str, Any]:
    import asyncio

    import ray

    spec = make_spec(ranks, staleness, sampler_every)
    actor = new_actor()
    ray.get(actor.configure.remote(spec, None, f"bench-{uuid.uuid4().hex}"))
    log: dict[str, Any] = {"waits": 0, "waited": [], "calls": 0, "other": ranks, "betas": []}

    async def main() -> float:
        barrier = asyncio.Barrier(ranks)
        started = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(*(_per_rank_rank(actor, spec, ranks, r, durations, log, barrier) for r in range(ranks))),
            timeout_s,
        )
        return time.perf_counter() - started

    steps = len(durations)
    try:
        wall = asyncio.run(main())
    except TimeoutError:
        ray.kill(actor, no_restart=True)
        return {"completed": False, "error": f"no completion within {timeout_s:.0f} s"}
    trace = ray.get(actor.trace.remote())
    ray.kill(actor, no_restart=True)
    decisions = ranks * max(steps - staleness, 1)
    return {
        "steps_per_s": steps / wall,
        "wait_fraction": log["waits"] / decisions,
        "wait_ms_mean": 1000 * float(np.mean(log["waited"])) if log["waited"] else 0.0,
        "actor_calls_per_step": log["calls"] / steps,
        "actor_calls_total": log["calls"] + log["other"],
        "betas": log["betas"],
        "trace_betas": trace["beta"],
    }


def core_replay_betas(ranks: int, staleness: int, sampler_every: int, betas_used: list[float]) -> list[float]:
    """The PID trace of a Ray-free core fed every rank's report (the per-rank view)."""
    from morec_dist.coordinator.core import CoordinatorCore

    spec = make_spec(ranks, staleness, sampler_every)
    core = CoordinatorCore(spec)
    blocks = spec.objectives.num_blocks
    for t, beta in enumerate(betas_used):
        vectors = rank_vectors(ranks, t, beta, blocks)
        for rank in reversed(range(ranks)):
            core.report(rank, t, vectors[rank, :blocks].tolist(), vectors[rank, blocks:].astype(int).tolist())
        if sampler_every and (t + 1) % sampler_every == 0:
            core.submit_signals(t, signals(spec, t))
    return [r.beta for r in core.trace]


# ---------------------------------------------------------------------------------- main


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    from benchmarks.common import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for protocol in ("global", "per_rank"):
        for s in sorted({r["staleness"] for r in runs}):
            rows = sorted(
                (r for r in runs if r["protocol"] == protocol and r["staleness"] == s and r["steps_per_s"]),
                key=lambda r: r["ranks"],
            )
            x = [r["ranks"] for r in rows]
            style = "-" if protocol == "global" else "--"
            axes[0].plot(x, [r["steps_per_s"] for r in rows], style, marker="o", label=f"{protocol} s={s}")
            axes[1].plot(x, [r["ratio"] for r in rows], style, marker="o", label=f"{protocol} s={s}")
            axes[2].plot(x, [100 * r["wait_fraction"] for r in rows], style, marker="o", label=f"{protocol} s={s}")
    base = sorted(
        {
            (r["ranks"], r["baseline_steps_per_s"])
            for r in runs
            if r["protocol"] == "global" and r["staleness"] == min(x["staleness"] for x in runs)
        }
    )
    axes[0].plot([b[0] for b in base], [b[1] for b in base], ":", color="gray", label="no coordinator")
    axes[0].set_yscale("log")
    for ax, title in zip(
        axes, ("steps/s", "steps/s / no-coordinator steps/s", "decisions that waited (%)"), strict=True
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks")
        ax.set_title(title)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(__doc__)
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--staleness", type=int, nargs="+", default=list(STALENESS))
    parser.add_argument("--step-ms", type=float, default=20.0, help="mean step time (ms)")
    parser.add_argument("--jitter", type=float, default=0.25, help="sigma of the lognormal step-time factor")
    parser.add_argument("--steps", type=int, default=None, help="steps per point (global protocol and baseline)")
    parser.add_argument(
        "--sampler-every", type=int, default=50, help="steps between sampler updates (rank 0 submits signals)"
    )
    parser.add_argument(
        "--gloo-procs",
        type=int,
        nargs="+",
        default=None,
        help="real gloo process counts to time (2 .. what the machine holds)",
    )
    parser.add_argument(
        "--per-rank-calls", type=int, default=None, help="report calls per per-rank point (its steps = this / ranks)"
    )
    parser.add_argument("--point-timeout", type=float, default=120.0)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    steps = args.steps or (100 if args.quick else 500)
    per_rank_calls = args.per_rank_calls or (800 if args.quick else 6000)
    cores = os.cpu_count() or 2
    gloo_procs = args.gloo_procs or ([2, 4] if args.quick else [2, 4, 8, 16])
    out = args.out or default_out("coordinator_scale", args.quick)
    config = {
        "ranks": args.ranks,
        "staleness": args.staleness,
        "step_ms": args.step_ms,
        "jitter": args.jitter,
        "steps": steps,
        "sampler_every": args.sampler_every,
        "gloo_procs": gloo_procs,
        "per_rank_calls": per_rank_calls,
    }
    recorder = Recorder(
        "coordinator_scale",
        mode="quick" if args.quick else "full",
        seed=args.seed,
        config=config,
        note_text=note(args.note),
    )
    gloo = measure_gloo(gloo_procs, 100 if args.quick else 500, 4, cores)

    from morec_dist.config import ConfigError, check_per_rank_fits
    from morec_dist.coordinator.service import start_local_ray

    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    start_local_ray(128, namespace=namespace)
    import ray

    from morec_dist.coordinator.actor import get_or_create

    def new_actor() -> Any:
        return get_or_create(f"coordinator-scale-{uuid.uuid4().hex[:6]}", namespace)

    runs = []
    try:
        for ranks in args.ranks:
            for s in args.staleness:
                durations = step_times(steps, args.step_ms, args.jitter, args.seed)
                baseline = run_baseline(durations)
                g = run_global(new_actor, ranks, s, durations, args.sampler_every, gloo)
                replay = core_replay_betas(ranks, s, args.sampler_every, g["betas"])
                runs.append(_row("global", ranks, s, steps, baseline, g, replay))
                print(_line(runs[-1]), flush=True)
                pr_steps = int(min(steps, max(8 if args.quick else 12, per_rank_calls // ranks)))
                try:
                    check_per_rank_fits(ranks, s)
                except ConfigError as exc:
                    runs.append(
                        {
                            "protocol": "per_rank",
                            "ranks": ranks,
                            "staleness": s,
                            "steps": 0,
                            "steps_per_s": None,
                            "baseline_steps_per_s": baseline,
                            "ratio": None,
                            "wait_fraction": None,
                            "actor_calls_per_step": ranks,
                            "refused": str(exc),
                        }
                    )
                    print(f"per_rank  ranks {ranks:>4} s={s}: refused ({exc})", flush=True)
                    continue
                p = run_per_rank(new_actor, ranks, s, durations[:pr_steps], args.sampler_every, args.point_timeout)
                if p.get("completed") is False:
                    runs.append(
                        {
                            "protocol": "per_rank",
                            "ranks": ranks,
                            "staleness": s,
                            "steps": pr_steps,
                            "steps_per_s": None,
                            "baseline_steps_per_s": baseline,
                            "ratio": None,
                            "wait_fraction": None,
                            "actor_calls_per_step": ranks,
                            "error": p["error"],
                        }
                    )
                    continue
                replay = core_replay_betas(ranks, s, args.sampler_every, p["betas"])
                runs.append(_row("per_rank", ranks, s, pr_steps, baseline, p, replay))
                print(_line(runs[-1]), flush=True)
    finally:
        ray.shutdown()
    identical = {}
    for ranks in args.ranks:
        for s in args.staleness:
            g = next(r for r in runs if r["protocol"] == "global" and r["ranks"] == ranks and r["staleness"] == s)
            p = next(r for r in runs if r["protocol"] == "per_rank" and r["ranks"] == ranks and r["staleness"] == s)
            if p.get("betas"):
                n = len(p["betas"])
                identical[f"{ranks}/s={s}"] = g["betas"][:n] == p["betas"]
    targets = _targets(runs)
    for r in runs:
        r.pop("betas", None)
    recorder.update(
        {
            "runs": runs,
            "gloo": gloo,
            "beta_traces_identical_across_protocols": identical,
            "targets": targets,
            "actor_max_concurrency": 1000,
        }
    )
    result = recorder.write(out)
    if not args.no_plot:
        plot(runs, out.with_suffix(".png"))
    return result


def _row(
    protocol: str, ranks: int, s: int, steps: int, baseline: float, m: dict[str, Any], replay: list[float]
) -> dict[str, Any]:
    return {
        "protocol": protocol,
        "ranks": ranks,
        "staleness": s,
        "steps": steps,
        "steps_per_s": m["steps_per_s"],
        "baseline_steps_per_s": baseline,
        "ratio": m["steps_per_s"] / baseline,
        "wait_fraction": m["wait_fraction"],
        "wait_ms_mean": m["wait_ms_mean"],
        "actor_calls_per_step": m["actor_calls_per_step"],
        "actor_calls_total": m["actor_calls_total"],
        **(
            {"reduction_round_ms_modelled": m["reduction_round_ms_modelled"]}
            if "reduction_round_ms_modelled" in m
            else {}
        ),
        "beta_trace_matches_core_replay": m["trace_betas"] == replay
        and m["betas"][s:] == replay[: len(m["betas"]) - s],
        "beta_digest": digest(m["trace_betas"]),
        "betas": m["betas"],
    }


def _line(r: dict[str, Any]) -> str:
    return (
        f"{r['protocol']:<9} ranks {r['ranks']:>4} s={r['staleness']}: {r['steps_per_s']:7.1f} steps/s (no "
        f"coordinator {r['baseline_steps_per_s']:.1f}, "
        f"ratio {r['ratio']:.3f}), waited {100 * r['wait_fraction']:5.1f}%, actor calls/step "
        f"{r['actor_calls_per_step']:.0f}, replay match {r['beta_trace_matches_core_replay']}"
    )


def _targets(runs: list[dict[str, Any]]) -> dict[str, Any]:
    g = [r for r in runs if r["protocol"] == "global"]
    out: dict[str, Any] = {
        "global_ratio_ge_0.98_at_s2": all(r["ratio"] >= 0.98 for r in g if r["staleness"] == 2)
        if any(r["staleness"] == 2 for r in g)
        else None,
        "global_ratio_min_by_s": {
            str(s): min(r["ratio"] for r in g if r["staleness"] == s) for s in sorted({r["staleness"] for r in g})
        },
        "global_one_actor_call_per_step": all(r["actor_calls_per_step"] == 1 for r in g),
        "global_wait_le_1pct_at_s2": all(r["wait_fraction"] <= 0.01 for r in g if r["staleness"] == 2)
        if any(r["staleness"] == 2 for r in g)
        else None,
        "beta_matches_core_replay": all(r.get("beta_trace_matches_core_replay", True) for r in runs),
    }
    speedups = {}
    for r in g:
        p = next(
            (
                x
                for x in runs
                if x["protocol"] == "per_rank" and x["ranks"] == r["ranks"] and x["staleness"] == r["staleness"]
            ),
            None,
        )
        if p and p.get("steps_per_s"):
            speedups[f"{r['ranks']}/s={r['staleness']}"] = r["steps_per_s"] / p["steps_per_s"]
    out["global_over_per_rank_steps_per_s"] = speedups
    at256 = [v for k, v in speedups.items() if k.startswith("256/")]
    out["ge_10x_per_rank_at_256"] = all(v >= 10 for v in at256) if at256 else None
    return out


if __name__ == "__main__":
    main()
