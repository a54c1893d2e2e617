"""The global coordinator protocol with real torchrun ranks (gloo) and a real Ray actor.

Losses are reduced over torch.distributed; rank 0 is the actor's only per-step client;
decisions are broadcast. Checked against an fsum of every rank's reports, a Ray-free
``CoordinatorCore`` replay and the per-rank protocol's run of the same synthetic losses.
One in-process loopback Ray head for the module (as in test_coordinator_ray.py).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from morec_dist.config import ConfigError, load_config
from morec_dist.coordinator.actor import ACTOR_MAX_CONCURRENCY, get_or_create
from morec_dist.coordinator.core import CoordinatorCore
from morec_dist.coordinator.service import start_local_ray
from tests.procs import run_job
from tests.test_coordinator_ray import RANKS, RANKS_SCRIPT, spec_for

REPO = Path(__file__).resolve().parent.parent
GLOBAL_SCRIPT = REPO / "tests" / "dist_scripts" / "coordinator_global_ranks.py"
NAMESPACE = "morec-test-global"


@pytest.fixture(scope="module")
def ray_address():
    address = start_local_ray(80, num_cpus=2, namespace=NAMESPACE)
    import ray

    yield address
    ray.shutdown()


def _torchrun(script: Path, nproc: int, env_extra: dict[str, str], out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MOREC_TEST_NAMESPACE": NAMESPACE,
        "MOREC_TEST_OUT": str(out),
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
        **env_extra,
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    proc = run_job(cmd, 240, env=env, cwd=REPO)  # on failure or timeout, the ranks end too
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def _env(
    address: str, actor: str, steps: int, staleness: int, every: int, seed: int = 1, **extra: str
) -> dict[str, str]:
    return {
        "MOREC_TEST_RAY_ADDRESS": address,
        "MOREC_TEST_ACTOR": actor,
        "MOREC_TEST_STEPS": str(steps),
        "MOREC_TEST_STALENESS": str(staleness),
        "MOREC_TEST_EVERY": str(every),
        "MOREC_TEST_JITTER_SEED": str(seed),
        **extra,
    }


def _replay(world: int, staleness: int, every: int, used: list[dict], steps: int) -> CoordinatorCore:
    """Every rank's reports into a Ray-free core of ``world`` reporters (the per-rank view)."""
    core = CoordinatorCore(spec_for(world_size=world, staleness=staleness, every=every))
    for t in range(steps):
        for rank in reversed(range(world)):
            core.report(rank, t, *RANKS.synthetic_report(rank, t, used[t]["beta"]))
        if (t + 1) % every == 0:
            core.submit_signals(t, RANKS.synthetic_signals(t))
    return core


def test_a_per_rank_configuration_that_would_hang_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"1024 ranks and staleness 2: up to 3072 report calls would wait .* "
        r"Use coordinator.protocol = \"global\"",
    ):
        load_config(None, ['coordinator.protocol="per_rank"', "run.nproc=1024"])
    load_config(None, ['coordinator.protocol="per_rank"', "run.nproc=64"])  # fits: allowed as the baseline
    load_config(None, ["run.nproc=1024"])  # the global protocol has no such bound
    with pytest.raises(ConfigError, match="coordinator.protocol: 'ring' is not one of"):
        load_config(None, ['coordinator.protocol="ring"'])


@pytest.mark.slow
def test_status_and_set_preferences_never_queue_behind_waiting_step_calls(ray_address):
    import ray

    actor = get_or_create("coord-control", NAMESPACE)
    ray.get(actor.configure.remote(spec_for(world_size=2, staleness=2, every=1000), None, "control"))
    # rank 1 never reports: every one of rank 0's report calls waits in the actor, until
    # all of the step group's slots are taken
    held = [actor.report.remote(0, t, *RANKS.synthetic_report(0, t, 0.2)) for t in range(ACTOR_MAX_CONCURRENCY + 20)]
    started = time.perf_counter()
    status = ray.get(actor.status.remote(), timeout=60)
    change = ray.get(actor.set_preferences.remote({"fairness": 0.5}, None, None, "test"), timeout=60)
    seconds = time.perf_counter() - started
    assert status["aggregated_through"] == -1 and change["effective_step"] == -1 + 2 + 1
    assert not ray.wait(held, timeout=0)[0]  # the step calls are still waiting
    with pytest.raises(ray.exceptions.GetTimeoutError):  # and a step-group call does queue: the slots are full
        ray.get(actor.decisions.remote(0, 1), timeout=3)
    ray.kill(actor)
    print(f"\nstatus + set_preferences with {len(held)} step calls waiting: {seconds:.2f} s")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_global_sums_are_exact_one_actor_call_per_step_and_beta_matches_replay_and_per_rank(
    ray_address, tmp_path, nproc
):
    import ray

    steps, staleness, every = 12 if nproc == 2 else 8, 2, 4
    name = f"coord-global-{nproc}"
    actor = get_or_create(name, NAMESPACE)
    ray.get(actor.configure.remote(spec_for(world_size=1, staleness=staleness, every=every), None, name))
    ranks = _torchrun(GLOBAL_SCRIPT, nproc, _env(ray_address, name, steps, staleness, every), tmp_path / "global")
    trace, status = ray.get(actor.trace.remote()), ray.get(actor.status.remote())
    ray.kill(actor)
    used = ranks[0]["decisions"]
    assert all(r["decisions"] == used for r in ranks[1:])  # every rank got rank 0's decisions
    # exactly one actor report per step (a one-reporter core refuses a second one), from rank 0 only
    assert status["world_size"] == 1 and status["aggregated_through"] == steps - 1 and not status["pending"]
    assert ranks[0]["stats"]["reports"] == steps and ranks[0]["stats"]["actor_calls"] == steps
    assert all(r["stats"]["actor_calls"] == 0 for r in ranks[1:])
    for t in range(steps):
        per_rank = [RANKS.synthetic_report(r, t, used[t]["beta"]) for r in range(nproc)]
        for b in range(4):
            assert trace["losses"][t][b] == math.fsum(p[0][b] for p in per_rank) / sum(p[1][b] for p in per_rank)
    replay = _replay(nproc, staleness, every, used, steps)
    assert trace == replay.trace_dict()
    for t in range(steps):
        d = replay.decision(t)
        assert (d.beta, d.weights, d.p_version, d.probabilities) == tuple(
            used[t][k] for k in ("beta", "weights", "p_version", "probabilities")
        )
    assert len(set(trace["beta"])) > 4 and used[-1]["p_version"] >= 1  # beta moved, p changed: not vacuous
    if nproc == 2:  # the per-rank protocol on the same losses gives the same betas
        name = "coord-per-rank-2"
        actor = get_or_create(name, NAMESPACE)
        ray.get(actor.configure.remote(spec_for(world_size=2, staleness=staleness, every=every), None, name))
        per_rank_runs = _torchrun(
            RANKS_SCRIPT, 2, _env(ray_address, name, steps, staleness, every), tmp_path / "per_rank"
        )
        per_rank_trace = ray.get(actor.trace.remote())
        ray.kill(actor)
        assert [d["beta"] for d in per_rank_runs[0]["decisions"]] == [d["beta"] for d in used]
        assert per_rank_trace == trace


@pytest.mark.slow
def test_slow_rank_makes_the_others_wait_only_at_the_staleness_bound_and_live_preferences_apply_at_their_step(
    ray_address, tmp_path
):
    import ray

    steps, staleness, slow_ms = 40, 2, 40
    name = "coord-global-slow"
    spec = spec_for(world_size=1, staleness=staleness, every=1000)
    actor = get_or_create(name, NAMESPACE)
    ray.get(actor.configure.remote(spec, None, name))
    change: dict = {}

    def set_preferences_live() -> None:
        """While the ranks run: as `morec coordinator set-preferences --at-step T` does."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = ray.get(actor.status.remote())
            if status.get("aggregated_through", -1) >= 5:
                at = status["aggregated_through"] + staleness + 8
                started = time.perf_counter()
                change.update(ray.get(actor.set_preferences.remote({"fairness": 0.9}, None, at, "test")))
                change["seconds"] = time.perf_counter() - started
                change["status"] = ray.get(actor.status.remote())
                return
            time.sleep(0.02)

    live = threading.Thread(target=set_preferences_live)
    live.start()
    ranks = _torchrun(
        GLOBAL_SCRIPT,
        2,
        _env(ray_address, name, steps, staleness, 0, MOREC_TEST_SLOW_RANK="1", MOREC_TEST_SLOW_MS=str(slow_ms)),
        tmp_path,
    )
    live.join()
    ray.kill(actor)
    fast, slow = ranks[0]["times"], ranks[1]["times"]
    # the fast rank never starts step t before the slow one's report of step t - s: that
    # report is sent after the slow rank's slow_ms sleep, which began at slow[t - s][0], and
    # the fast rank stamps its start only once its decision for t is out. A lower bound the
    # protocol guarantees on any load (a descheduled process only sleeps longer), unlike the
    # slow rank's end stamp, taken after its report left, by an arbitrary margin ...
    for t in range(staleness, steps):
        assert fast[t][0] >= slow[t - staleness][0] + slow_ms / 1000, t
    # ... and is not held back further: it runs ahead of the slow one most of the time. Robust
    # to load rather than guaranteed: the slow rank sleeps slow_ms (40 ms) in every step and the
    # fast one only waits for decisions, so to fall behind in half the steps it would have to
    # be descheduled for over 40 ms in half of them (the count is printed with -s)
    ahead = sum(fast[t][0] < slow[t - 1][1] for t in range(staleness, steps))
    assert ahead >= (steps - staleness) // 2, ahead
    assert ranks[0]["stats"]["waits"] >= (steps - staleness) // 2  # it did wait, for the slow rank
    # the live change: effective exactly at its step on every rank, while steps ran
    at = change["effective_step"]
    assert change["status"]["aggregated_through"] < steps - 1 and at < steps
    for r in ranks:
        weights = [d["weights"]["fairness"] for d in r["decisions"]]
        assert weights == [0.2] * at + [0.9] * (steps - at)
    print(
        f"\nslow rank: fast rank waited {ranks[0]['stats']['waits']} times "
        f"({ranks[0]['stats']['wait_seconds']:.2f} s), "
        f"ahead {ahead}/{steps - staleness} steps; set_preferences took {1000 * change['seconds']:.1f} ms, effective "
        f"at {at}"
    )


def test_global_sums_do_not_depend_on_rank_order():
    import itertools

    import torch

    from morec_dist.coordinator.collective import global_sums

    # values where float addition order matters: a naive sum gives 0.0 or 2.0 by order
    rows = [[1e16, 3.0, 7, 1], [1.0, 0.1, 5, 2], [-1e16, 0.2, 9, 3], [1.0, 0.3, 2, 4]]
    results = {
        json.dumps(global_sums([torch.tensor(r, dtype=torch.float64) for r in perm], 2))
        for perm in itertools.permutations(rows)
    }
    assert results == {json.dumps(([2.0, math.fsum([3.0, 0.1, 0.2, 0.3])], [23, 10]))}
    assert sum(r[0] for r in rows) != 2.0  # the naive rank-order sum is wrong here
