"""Tune the budget law's gains by a step response on the validation data (never on test).

The plant is "accuracy share of the loss -> held-out Hit@K of the control slice". It is
identified open loop: two fine-tunings from the same pretrained model and seed with the
controller's gains at 0 (``morec.control.kp = ki = 0``, no smoothing), the share held at
``--low`` and at ``--high`` (``morec.control.share_start``). Both runs drift the same way
from the pretrained model except for the share, so the difference of their control-slice Hit
(relative to the pretrained model's), per measurement interval n, divided by the logit step
du = logit(high) - logit(low), is the unit step response g(n) with the common drift removed.

g is fitted by a first-order-plus-dead-time model g(n) = K (1 - exp(-(n - L) / T)) (least
squares over a grid of L and T; T much longer than the window is the integrating limit),
and the PI gains follow Skogestad's SIMC rules (J. Process Control 13, 2003),

    Kc = T / (K (tau_c + theta)),   Ti = min(T, 4 (tau_c + theta))
    kp = Kc,  ki = Kc / Ti          (velocity form, per measurement interval)

with theta the effective delay (the dead time, half an interval for the sample-and-hold, and
the lag the EMA adds). The closed-loop time constant tau_c is SIMC's tight choice theta,
raised until the measurement noise moves u by at most --u-noise (logit units, standard
deviation) through the proportional term: kp * sigma_e <= u_noise, where sigma_e is the noise
of one run's smoothed relative error, estimated from the fit's residuals (the residual of g
times du / sqrt(2) for one run, times sqrt(ema / (2 - ema)) for the EMA). On a noisy plant the
noise bound, not the delay, sets the gains.

The fitted model, the noise of g (residual standard deviation) and the gains go to
``benchmarks/results/tune_budget.json`` with a plot beside it. Run (about 3 minutes on 2
cores for MovieLens-1M, from ``make run``'s pretrained model):

    python -m benchmarks.tune_budget --config configs/quickstart.toml \\
        --from runs/quickstart/pretrain/checkpoints/best
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Recorder, bench_parser, default_out, morec_cli, pyplot, read_json, save_figure

REPO = Path(__file__).resolve().parents[1]


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def run_open_loop(config: str, checkpoint: str, share: float, out: Path, args: Any) -> dict[str, Any]:
    """One fine-tuning with the share held at ``share``; its metrics.json."""
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        "morec.pid.law=budget",
        "morec.control.kp=0.0",
        "morec.control.ki=0.0",
        "morec.control.ema=1.0",
        f"morec.control.share_start={share}",
        f"morec.control.share_min={min(share, 0.2)}",
        f"morec.control.share_max={max(share, 0.95)}",
        # the safety rule would move the share: out of reach in an open-loop test
        "morec.accuracy_budget=0.45",
        "morec.control.safety_factor=2.2",
        f"morec.control.every_steps={args.every}",
        f"morec.epochs={args.epochs}",
        f"run.seed={args.seed}",
        f'run.out_dir="{out}"',
        "run.resume=false",
    ]
    if args.max_steps:
        overrides.append(f"train.max_steps={args.max_steps}")
    morec_cli(
        ["finetune", "--config", config, "--from", checkpoint, "--method", "morec", *overrides],
        log=out.with_suffix(".log"),
    )
    return read_json(out / "metrics.json")


def control_series(metrics: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, float]:
    """(steps, measured Hit, reference Hit) of a run's control trace."""
    trace = metrics["coordinator"]["trace"]["control"]
    steps = np.array([r["step"] for r in trace], dtype=np.int64)
    hits = np.array([r["measured"] for r in trace], dtype=np.float64)
    return steps, hits, float(metrics["budget"]["control_reference"])


def fit_fopdt(g: np.ndarray) -> dict[str, float]:
    """Least-squares K, T, L (in measurement intervals) of g(n) = K (1 - exp(-(n - L)/T)), n = 1.."""
    n = np.arange(1, g.size + 1, dtype=np.float64)
    best: dict[str, float] = {"sse": math.inf}
    for dead in np.arange(0.0, 6.0, 0.5):
        for tau in np.geomspace(0.3, 2000.0, 160):
            shape = np.where(n > dead, 1.0 - np.exp(-(n - dead) / tau), 0.0)
            denom = float(shape @ shape)
            if denom == 0.0:
                continue
            gain = float(shape @ g) / denom
            sse = float(((g - gain * shape) ** 2).sum())
            if sse < best["sse"]:
                best = {"K": gain, "T": float(tau), "L": float(dead), "sse": sse}
    best["residual_std"] = math.sqrt(best["sse"] / max(g.size - 3, 1))
    return best


def simc_gains(model: dict[str, float], du: float, ema: float, u_noise: float) -> dict[str, float]:
    """SIMC PI for the fitted model, tau_c raised from theta until kp * sigma_e <= u_noise."""
    theta = model["L"] + 0.5 + (1.0 - ema) / ema
    sigma_e = model["residual_std"] * du / math.sqrt(2.0) * math.sqrt(ema / (2.0 - ema))
    tight = model["T"] / (model["K"] * 2.0 * theta)  # tau_c = theta
    kc = min(tight, u_noise / sigma_e)
    tau_c = model["T"] / (model["K"] * kc) - theta
    ti = min(model["T"], 4.0 * (tau_c + theta))
    return {
        "theta": theta,
        "sigma_e": sigma_e,
        "Kc_tight": tight,
        "tau_c": tau_c,
        "Kc": kc,
        "Ti": ti,
        "kp": kc,
        "ki": kc / ti,
    }


def plot(path: Path, n: np.ndarray, g: np.ndarray, model: dict[str, float]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(n, g, "o", ms=3, label="measured: d(Hit / Hit_pretrained) / d logit(share)")
    shape = np.where(n > model["L"], 1.0 - np.exp(-(n - model["L"]) / model["T"]), 0.0)
    ax.plot(n, model["K"] * shape, "-", label=f"FOPDT K={model['K']:.4f} T={model['T']:.1f} L={model['L']:.1f}")
    ax.set_xlabel("measurement interval n")
    ax.set_ylabel("unit step response")
    ax.set_title("Budget law: open-loop step response on the control slice")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__ or "")
    parser.add_argument("--config", default="configs/quickstart.toml")
    parser.add_argument("--from", dest="checkpoint", default="runs/quickstart/pretrain/checkpoints/best")
    parser.add_argument("--low", type=float, default=0.3, help="accuracy share of the first run")
    parser.add_argument("--high", type=float, default=0.8, help="accuracy share of the second run")
    parser.add_argument("--every", type=int, default=20, help="morec.control.every_steps of the test")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("--ema", type=float, default=0.5, help="the smoothing the tuned controller will use")
    parser.add_argument("--u-noise", type=float, default=0.25, help="std of u the measurement noise may cause")
    parser.add_argument("--refit", type=Path, default=None, help="refit the series of an earlier result JSON")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "tune_budget")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_steps = args.max_steps or 200
    out = args.out or default_out("tune_budget", args.quick)
    recorder = Recorder("tune_budget", mode="quick" if args.quick else "full", seed=args.seed, config=vars(args))
    if args.refit is not None:  # the runs' series from an earlier result; only the fit and the rule again
        earlier = read_json(args.refit)
        steps, low, high = (np.asarray(earlier[k]) for k in ("steps", "hit_low", "hit_high"))
        reference = float(earlier["reference_hit"])
        args.low, args.high = earlier["config"]["low"], earlier["config"]["high"]
    else:
        runs = {}
        for name, share in (("low", args.low), ("high", args.high)):
            runs[name] = run_open_loop(args.config, args.checkpoint, share, args.work / name, args)
        steps, low, reference = control_series(runs["low"])
        steps_high, high, reference_high = control_series(runs["high"])
        if not np.array_equal(steps, steps_high) or reference != reference_high:
            raise RuntimeError("the two open-loop runs measured at different steps or from different references")
    du = logit(args.high) - logit(args.low)
    g = (high - low) / reference / du
    model = fit_fopdt(g)
    gains = simc_gains(model, du, args.ema, args.u_noise)
    n = np.arange(1, g.size + 1, dtype=np.float64)
    plot(out.with_suffix(".png"), n, g, model)
    recorder.update(
        {
            "method": "open-loop step response (two runs, shares low/high), FOPDT least squares, SIMC PI with "
            "tau_c bounded below by the measurement noise",
            "reference_hit": reference,
            "du": du,
            "steps": steps.tolist(),
            "hit_low": low.tolist(),
            "hit_high": high.tolist(),
            "unit_step_response": g.tolist(),
            "model": model,
            "gains": gains,
            "config_lines": [f"kp = {gains['kp']:.3g}", f"ki = {gains['ki']:.3g}", f"ema = {args.ema}"],
            "final_relative_hit": {"low": float(low[-1] / reference), "high": float(high[-1] / reference)},
        }
    )
    result = recorder.write(out)
    print(
        f"K={model['K']:.4f} T={model['T']:.1f} L={model['L']:.1f} (intervals of {args.every} steps), "
        f"noise {model['residual_std']:.4f}; SIMC kp={gains['kp']:.3g} ki={gains['ki']:.3g}; wrote {out}",
        file=sys.stderr,
    )
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main())
