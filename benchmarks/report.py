"""Generates ``benchmarks/REPORT.md`` from the JSON files of a benchmark run.

    python -m benchmarks.report                                   # benchmarks/results -> benchmarks/REPORT.md
    python -m benchmarks.report --results DIR --out FILE.md
    python -m benchmarks.report --results-md docs/results.md     # also the Pareto study's block there

Nothing in the report is typed by hand: every figure comes from a result file
(``overhead.json``, ``reader.json``, ``coordinator_scale.json``, ``embedding_scale.json``,
``quality.json``, ``sensitivity.json``, ``pareto23.json``, and ``run_all.json`` for the run's
status), and an appendix lists every number of every file in the results folder (a study's
per-run records excepted: they stay in its JSON). A missing file is reported as missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, RESULTS
from benchmarks.quality import METRICS

BENCHMARKS = ("overhead", "reader", "coordinator_scale", "embedding_scale", "quality", "sensitivity", "pareto")


def load_results(results: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for name in (*BENCHMARKS, "run_all"):
        path = results / f"{name}.json"
        if path.exists():
            found[name] = json.loads(path.read_text())
    # python -m benchmarks.authors_setup (not part of make bench: 45 min), and its variants
    for authors in sorted(results.glob("ml1m_unirec*.json")):
        found[authors.stem] = json.loads(authors.read_text())
    quick = results / "pareto_quick.json"  # the committed smoke run, until the full study has run
    if "pareto" not in found and quick.exists():
        found["pareto"] = json.loads(quick.read_text())
    for name in ("pareto23.json", "pareto23_quick.json"):  # issue 23's study (benchmarks/pareto_report.py)
        if "pareto23" not in found and (results / name).exists():
            found["pareto23"] = json.loads((results / name).read_text())
    shown = {f"{name}.json" for name in found} | {"pareto_quick.json", "pareto23.json", "pareto23_quick.json"}
    for other in sorted(results.glob("*.json")):  # the rest (checkpoint_stall, export, ...): appendix only
        if other.name not in shown:
            found[other.stem] = json.loads(other.read_text())
    return found


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 0.01 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def pct(value: float, signed: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:+.1f}%" if signed else f"{100 * value:.1f}%"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _staleness(value: Any) -> str:
    return "none of those tested" if value is None else f"s={value}"


def image(results: Path, out: Path, name: str, alt: str) -> str:
    path = results / name
    if not path.exists():
        return f"*(figure {name} missing)*"
    return f"![{alt}]({os.path.relpath(path, out.parent)})"


# ------------------------------------------------------------------ sections


def section_provenance(found: dict[str, dict[str, Any]]) -> str:
    lines = ["## Machine, versions, seeds", ""]
    rows = []
    for name in BENCHMARKS:
        r = found.get(name)
        if r is None:
            continue
        m = r.get("machine", {})
        load = m.get("load_average")
        rows.append(
            [
                name,
                r.get("mode", ""),
                str(r.get("seed", "")),
                m.get("cpu", ""),
                str(m.get("cores", "")),
                fmt(m.get("memory_gib")) if "memory_gib" in m else "",
                m.get("git_commit", ""),
                " / ".join(fmt(x, 2) for x in load) if load else "",
                " / ".join(fmt(x, 2) for x in m.get("load_average_end", [])),
                fmt(r.get("seconds")),
            ]
        )
    lines.append(
        table(
            [
                "benchmark",
                "mode",
                "seed",
                "cpu",
                "cores",
                "memory GiB",
                "commit",
                "load avg at start (1/5/15 min)",
                "at end",
                "seconds",
            ],
            rows,
        )
    )
    versions = next((r["versions"] for r in found.values() if "versions" in r), None)
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + "."]
    notes = sorted({r.get("note", "") for r in found.values() if r.get("note")})
    if notes:
        lines += ["", "Notes recorded with the results: " + "; ".join(notes) + "."]
    return "\n".join(lines)


def section_headline(found: dict[str, dict[str, Any]]) -> str:
    lines = ["## Headline", ""]
    o = found.get("overhead")
    if o:
        lines.append(
            f"- **MoRec overhead**: MoRec trains at {fmt(o['morec_rows_per_s'])} rows/s against "
            f"{fmt(o['plain_rows_per_s'])} rows/s for plain "
            f"TorchRec training of the same model and rows per step: **ratio {o['ratio']:.3f}** (target >= 0.97; "
            "median of per-round ratios "
            f"{o.get('ratio_median_of_rounds', float('nan')):.3f}); ranks were blocked on the coordinator "
            f"{pct(o['coordinator_wait_fraction'], False)} of the time."
        )
    r = found.get("reader")
    if r:
        lines.append(
            f"- **Reader**: exact weighted sampling at {fmt(r['weighted_rows_per_s'])} rows/s against a raw Parquet "
            "scan at "
            f"{fmt(r['raw_rows_per_s'])} rows/s (**ratio {fmt(r['ratio'])}**); smallest chi-square p-value "
            f"{fmt(r['chi2_pvalue_min'])}; "
            f"peak RSS {fmt(r['rss_mb_small'])} MB -> {fmt(r['rss_mb_large'])} MB (x{r['rss_growth']:.2f}) from "
            f"{fmt(r['rows'][0])} to {fmt(r['rows'][-1])} rows."
        )
    c = found.get("coordinator_scale")
    if c and "runs" in c:
        g = [r for r in c["runs"] if r["protocol"] == "global"]
        largest = max(r["ranks"] for r in g)
        at = [r for r in g if r["ranks"] == largest]
        lines.append(
            f"- **Coordinator** (global protocol): at {largest} ranks "
            + ", ".join(
                f"s={r['staleness']}: {fmt(r['steps_per_s'])} steps/s = {fmt(r['ratio'])} x no coordinator, "
                f"{pct(r['wait_fraction'], False)} of decisions waited"
                for r in at
            )
            + f"; {fmt(max(r['actor_calls_per_step'] for r in g))} actor call per step at every N; "
            + "global over per-rank steps/s: "
            + ", ".join(f"{k}: {fmt(v)}x" for k, v in c["targets"]["global_over_per_rank_steps_per_s"].items())
            + "."
        )
    e = found.get("embedding_scale")
    if e:
        rows = e["summary"]["by_size_gb"]
        sizes = sorted(rows, key=float)
        lines.append(
            f"- **Embedding scale** (the product's trainer, born sharded, row-wise, 2 ranks): {sizes[0]} -> "
            f"{sizes[-1]} GiB of tables, max peak RSS per rank {fmt(max(rows[s]['peak_rss_gb'][-1] for s in sizes), 2)}"
            f" GiB, peak within target at every size: {all(rows[s]['peak_within_target'] for s in sizes)}, step "
            f"time per row max/min {fmt(e['summary']['step_per_row_spread'], 3)}."
        )
    q = found.get("quality")
    if q:
        ref = next((row for row in q["rows"] if row["method"] == "morec"), None)
        if ref:
            lines.append(
                f"- **Quality** ({ref['name']}): hit@10 {pct(ref['relative']['hit@10'])}, R-Hit@10 "
                f"{pct(ref['relative']['r_hit@10'])}, "
                f"min-Hit@10 {pct(ref['relative']['min_hit@10'])}, Pop-KL@10 {pct(ref['relative']['pop_kl@10'])} "
                "against the pretrained model; "
                f"mean objective gain {pct(ref['mean_gain'])}."
            )
    return "\n".join(lines)


def section_overhead(o: dict[str, Any], results: Path, out: Path) -> str:
    cfg = o["config"]
    lines = [
        "## 1. Overhead of MoRec",
        "",
        f"Plain: uniform reader, {cfg['batch_size_per_block'] * (len(cfg['objectives']) + 1)} rows per rank per "
        "step, accuracy-only loss. "
        f"MoRec: {len(cfg['objectives']) + 1} blocks of {cfg['batch_size_per_block']} (accuracy + "
        f"{', '.join(cfg['objectives'])}), coordinator on Ray, staleness {cfg['staleness']}. "
        f"Same sharded model, {cfg['nproc']} torchrun ranks, data: {cfg['data_kind']} ({cfg['data']}); "
        f"{cfg['rounds']} alternating rounds of {cfg['window_steps']} steps after {cfg['warmup_steps']} "
        "warm-up steps each.",
        "",
        table(
            ["figure", "value"],
            [
                ["plain rows/s", o["plain_rows_per_s"]],
                ["MoRec rows/s", o["morec_rows_per_s"]],
                ["ratio (MoRec / plain)", o["ratio"]],
                ["median of per-round ratios", o.get("ratio_median_of_rounds")],
                ["per-round ratios", ", ".join(fmt(x) for x in o.get("ratio_per_round", []))],
                ["coordinator wait fraction", o["coordinator_wait_fraction"]],
                [
                    "coordinator protocol / actor calls per step",
                    f"{o.get('protocol', 'per_rank')} / {fmt(o.get('actor_calls_per_step', 'n/a'))}",
                ],
                [
                    "reader wait fraction (plain / MoRec)",
                    f"{fmt(o['reader_wait_fraction']['plain'])} / {fmt(o['reader_wait_fraction']['morec'])}",
                ],
                ["MoRec step (ms)", o["morec_step_ms"]],
                ["one sampler-signal pass (s)", o["sampler_signal_s"]],
                ["sampler update cadence (steps)", o.get("sampler_update_every_steps", "n/a")],
                ["its amortised share of a step", o.get("sampler_amortised_fraction", "n/a")],
                ["ratio including sampler updates", o.get("ratio_with_sampler_updates", "n/a")],
            ],
        ),
    ]
    return "\n".join(lines)


def section_reader(r: dict[str, Any]) -> str:
    keys = [
        "weighted_rows_per_s",
        "raw_rows_per_s",
        "ratio",
        "ratio_large_over_small",
        "chi2_pvalue_min",
        "chi2_draws",
        "rss_mb_small",
        "rss_mb_large",
        "rss_growth",
    ]
    rows = [[k, r[k]] for k in keys if k in r]
    for size, ratio in (r.get("ratio_by_rows") or {}).items():
        rows.append([f"weighted / raw ratio ({int(size):,} rows)", ratio])
    for size, speed in (r.get("speed_by_rows") or {}).items():
        rows.append(
            [
                f"weighted / raw rows/s ({int(size):,} rows)",
                f"{speed['weighted_rows_per_s']:,.0f} / {speed['raw_rows_per_s']:,.0f}",
            ]
        )
        if "raw_rows_per_s_pre_buffer" in speed:
            rows.append(
                [
                    f"raw scan rows/s, pre-buffered / synchronous reads ({int(size):,} rows)",
                    f"{speed['raw_rows_per_s_pre_buffer']:,.0f} / {speed['raw_rows_per_s_no_pre_buffer']:,.0f}",
                ]
            )
    for size, rate in (r.get("morec_batch_rows_per_s") or {}).items():
        rows.append([f"MoRec batches rows/s, one rank of 2 ({int(size):,} rows)", rate])
    for size, rss in (r.get("rss_mb_by_rows") or {}).items():
        rows.append([f"peak RSS MB ({int(size):,} rows)", rss])
    for size, disk in (r.get("disk_bytes") or {}).items():
        rows.append([f"dataset on disk, GB ({int(size):,} rows)", round(disk / 1e9, 2)])
    if r.get("cgroup"):
        rows.append(["under a memory cgroup of 1/4 the data size", json.dumps(r["cgroup"], sort_keys=True)[:300]])
    return "\n".join(
        [
            "## 2. Reader",
            "",
            f"Datasets: {', '.join(f'{x:,}' for x in r.get('rows', []))} rows (synthetic).",
            "",
            table(["figure", "value"], rows),
        ]
    )


def section_coordinator(c: dict[str, Any], results: Path, out: Path) -> str:
    cfg = c["config"]
    if "runs" not in c:
        return (
            "## 3. Coordinator at scale\n\n"
            "*(coordinator_scale.json has no `runs`: written by an older version; rerun the benchmark)*"
        )
    rows = []
    for r in c["runs"]:
        if r.get("steps_per_s") is None:
            why = r.get("refused") or r.get("error") or "not run"
            rows.append(
                [
                    r["protocol"],
                    r["ranks"],
                    r["staleness"],
                    r.get("steps", 0),
                    "",
                    fmt(r["baseline_steps_per_s"]),
                    "",
                    "",
                    fmt(r["actor_calls_per_step"]),
                    f"refused: {why}",
                ]
            )
            continue
        rows.append(
            [
                r["protocol"],
                r["ranks"],
                r["staleness"],
                r["steps"],
                r["steps_per_s"],
                r["baseline_steps_per_s"],
                r["ratio"],
                pct(r["wait_fraction"], False),
                r["actor_calls_per_step"],
                r.get("beta_trace_matches_core_replay"),
            ]
        )
    fit = c["gloo"]["fit"]
    measured = ", ".join(
        f"{p} processes {fmt(m['median_ms'])} "
        f"ms{' (more processes than cores: not fitted)' if m.get('oversubscribed') else ''}"
        for p, m in c["gloo"]["procs"].items()
    )
    t = c["targets"]
    return "\n".join(
        [
            "## 3. Coordinator at scale",
            "",
            f"Synchronous steps of {fmt(cfg['step_ms'])} ms x lognormal (sigma {fmt(cfg['jitter'])}), the same draws "
            "for every protocol and for the no-coordinator baseline "
            f"(measured right before each point); sampler update every {cfg['sampler_every']} steps; the real Ray "
            "actor. Global protocol: one process emulates the N ranks; "
            "rank 0's thread sums the N vectors (fsum) and makes one actor call per step. Reduction (gather to rank "
            "0 + decision broadcast) measured with real gloo processes "
            f"({measured}) and modelled for larger N as {fmt(fit['a_ms'])} + {fmt(fit['b_ms_per_log2_rank'])} x "
            f"log2(N) ms ({c['gloo'].get('law', '')}). "
            "Per-rank protocol: N asyncio ranks calling the actor every step; refused where N x (s + 1) exceeds the "
            "actor's 1,000 slots (the job would hang).",
            "",
            table(
                [
                    "protocol",
                    "ranks",
                    "s",
                    "steps",
                    "steps/s",
                    "no-coordinator steps/s",
                    "ratio",
                    "decisions that waited",
                    "actor calls / step",
                    "beta = core replay",
                ],
                rows,
            ),
            "",
            f"Targets: ratio >= 0.98 at s=2: {t['global_ratio_ge_0.98_at_s2']} (lowest ratio by s: "
            f"{', '.join(f's={k}: {fmt(v)}' for k, v in t['global_ratio_min_by_s'].items())}); "
            f"one actor call per step: {t['global_one_actor_call_per_step']}; <= 1% waits at s=2: "
            f"{t['global_wait_le_1pct_at_s2']}; >= 10x per-rank at 256 ranks: {t['ge_10x_per_rank_at_256']}; "
            f"beta traces equal to a core replay: {t['beta_matches_core_replay']}; identical across protocols: "
            + ", ".join(f"{k}: {v}" for k, v in c["beta_traces_identical_across_protocols"].items())
            + ".",
            "",
            image(results, out, "coordinator_scale.png", "coordinator scale"),
        ]
    )


def by_pass(summary: dict[str, Any]) -> str:
    """The spread of each pass on its own (``embedding_scale`` times every size twice)."""
    spreads = summary.get("step_per_row_spread_by_pass") or []
    if len(spreads) < 2:
        return ""
    return "; ascending pass alone " + fmt(spreads[0], 3) + ", descending pass alone " + fmt(spreads[1], 3)


def section_embedding(e: dict[str, Any], results: Path, out: Path) -> str:
    rows = []
    for size, s in sorted(e["summary"]["by_size_gb"].items(), key=lambda kv: float(kv[0])):
        rows.append(
            [size, " / ".join(fmt(x, 2) for x in s["held_gb"]), " / ".join(fmt(x, 2) for x in s["peak_rss_gb"]),
             " / ".join(fmt(x, 2) for x in s["allowed_gb"]), s["peak_within_target"], s["step_ms_per_1k_rows"],
             s["setup_s"], s["resume_exact"]]
        )  # fmt: skip
    cgroup = e.get("cgroup_point")
    cgroup_line = "The cgroup point did not run."
    if cgroup:
        cgroup_line = (
            f"{e['config']['cgroup_point']['size_gb']} GiB of tables on 2 ranks, each in a memory cgroup of "
            f"{e['config']['cgroup_point']['limit_gb_per_rank']} GiB: completed {cgroup['completed']}, resume exact "
            f"{cgroup.get('resume_exact')}, cgroups {json.dumps(cgroup.get('cgroups'))}."
        )
    c = e["config"]
    return "\n".join(
        [
            "## 4. Embedding scale",
            "",
            f"The product's trainer (``Trainer`` as ``morec train`` builds it: born sharded, {c['sharding']}, "
            f"{c['optimizer']}) on synthetic MF tables of dim {c['dim']}, {c['rows_per_rank_step']} rows per rank per "
            f"step, {c['negatives']} negatives, {c['nproc']} ranks; a step checkpoint and a resume in fresh ranks.",
            "",
            table(
                [
                    "tables GiB (all)",
                    "held GiB per rank (shards + optimizer)",
                    "peak RSS GiB per rank",
                    "target GiB per rank",
                    "within",
                    "step ms per 1k rows",
                    "set-up s",
                    "resume exact",
                ],
                rows,
            ),  # fmt: skip
            "",
            f"Step time per row, max / min over sizes: {fmt(e['summary']['step_per_row_spread'], 3)} (target <= 1.2)"
            + by_pass(e["summary"])
            + ".",
            "",
            cgroup_line,
            "",
            image(results, out, "embedding_scale.png", "embedding scale"),
        ]
    )


def section_quality(q: dict[str, Any], results: Path, out: Path) -> str:
    cfg = q["config"]
    rows = []
    for row in q["rows"]:
        extra = ""
        if row["method"] == "morec":
            extra = f"w={row['weights']}, l_hat={fmt(row['target_loss'], 4)}"
        elif row["method"] == "static":
            extra = f"w={row['weights']}"
        rows.append(
            [row["name"], extra, pct(row.get("mean_gain", float("nan"))) if row["method"] not in ("pretrain",) else ""]
        )
    return "\n".join(
        [
            f"## 5. Quality on {Path(cfg['data']).name} (test split)",
            "",
            f"Config {Path(cfg['config_file']).name}, pretrained l_hat = {fmt(q['target_loss_pretrained'], 4)} (best "
            f"epoch {q['pretrain'].get('best_epoch')}); "
            f"fine-tune overrides {cfg['finetune_overrides']}. Relative changes against the pretrained model.",
            "",
            q["table_markdown"],
            "",
            table(["model", "setting", "mean gain (revenue, fairness, alignment)"], rows),
            "",
            image(results, out, "quality_pareto.png", "Pareto fronts"),
            "",
            image(results, out, "quality_pid_trace.png", "PID traces"),
        ]
    )


def section_sensitivity(s: dict[str, Any], results: Path, out: Path) -> str:
    rows = [
        [
            p["kp"],
            p["ki"],
            pct(p["accuracy_change"]),
            pct(p["gains"]["revenue"]),
            pct(p["gains"]["fairness"]),
            pct(p["gains"]["alignment"]),
            pct(p["mean_gain"]),
            p["beta_mean"],
            p["beta_final"],
            p["final_loss_minus_target"],
        ]
        for p in s["points"]
    ]
    return "\n".join(
        [
            "## 6. PID sensitivity",
            "",
            f"MoRec from the same pretrained model (l_hat {fmt(s['target_loss'], 4)}), reference preferences, "
            f"fine-tune overrides {s['config']['finetune_overrides']}.",
            "",
            table(
                [
                    "Kp",
                    "Ki",
                    "hit@10 change",
                    "revenue gain",
                    "fairness gain",
                    "alignment gain",
                    "mean gain",
                    "beta mean",
                    "beta final",
                    "final loss - l_hat",
                ],
                rows,
            ),
            "",
            image(results, out, "sensitivity.png", "sensitivity"),
        ]
    )


def section_status(run: dict[str, Any]) -> str:
    rows = [
        [name, info["status"], info.get("seconds"), info.get("error", "")[:200]]
        for name, info in run.get("benchmarks", {}).items()
    ]
    total = sum(float(info.get("seconds") or 0) for info in run.get("benchmarks", {}).values())
    return "\n".join(
        [
            "## Run status",
            "",
            f"Last command `{run.get('command', '')}`; the benchmarks below took {fmt(total)} s in all.",
            "",
            table(["benchmark", "status", "seconds", "error"], rows),
        ]
    )


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        if len(value) > 12:
            return [(prefix, f"[{len(value)} values; first {fmt(value[0])}, last {fmt(value[-1])}]")]
        return [(prefix, "[" + ", ".join(fmt(v) for v in value) + "]")]
    if isinstance(value, list):
        out = []
        for i, v in enumerate(value):
            out += flatten(v, f"{prefix}[{i}]")
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(prefix, fmt(value, 6))]
    return []


# Per-run records of a study (every job's traces and per-seed rows): their summaries are in the
# sections above and the records in the JSON; flattened, one study alone was 9,500 lines.
PER_RUN_KEYS = ("lengths", "per_seed")


def appendix(found: dict[str, dict[str, Any]]) -> str:
    lines = ["## Appendix: every number", ""]
    skip = ("config", "raw", "table_markdown", *PER_RUN_KEYS)
    for name, result in found.items():
        values = flatten({k: v for k, v in result.items() if k not in skip})
        omitted = [k for k in PER_RUN_KEYS if k in result]
        lines += [
            f"<details><summary>{name}.json ({len(values)} numbers)</summary>",
            "",
            *([f"Per-run records omitted here (in the JSON): {', '.join(omitted)}.", ""] if omitted else []),
            "| key | value |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v} |" for k, v in values]
        lines += ["", "</details>", ""]
    return "\n".join(lines)


def budget_table(p: dict[str, Any]) -> list[str]:
    """Hypervolume per method with the reference's Hit moved down by each budget (the study's
    ``HIT_BUDGETS``): the volume each method gains within that loss of Hit@10."""
    methods = p["config"]["methods"]
    budgets = list(p["methods"][methods[0]].get("hypervolume_by_hit_budget", {}))
    if not budgets:
        return []

    def cell(c: dict[str, Any]) -> str:
        lo, hi = c["interval"]
        return f"{fmt(c['hypervolume'], 3)} [{fmt(lo, 3)}, {fmt(hi, 3)}]"

    rows = []
    for method in methods:
        cells = p["methods"][method]["hypervolume_by_hit_budget"]
        rows.append([method, *(cell(cells[b]) for b in budgets)])
    return [
        "With the reference point's Hit@10 lowered by a budget (other coordinates the pretrained model's): "
        "hypervolume [95% bootstrap interval over seeds]. Budget 0 is the table above.",
        "",
        table(["method", *[f"Hit budget {float(b):.0%}" for b in budgets]], rows),
        "",
    ]


def section_pareto(p: dict[str, Any], results: Path, out: Path) -> str:
    if p.get("design") == "issue23":  # python -m benchmarks.pareto now writes issue 23's study
        from benchmarks.pareto_report import render

        return render(p, results, out)
    cfg = p["config"]
    names = {"hit": "Hit", "r_hit": "R-Hit", "min_hit": "min-Hit", "-pop_kl": "-Pop-KL"}
    objectives = ", ".join(names.get(o, o) for o in p["objectives"])
    rows = []
    for method in cfg["methods"]:
        m = p["methods"][method]
        lo, hi = m["hypervolume_interval"]
        rows.append(
            [
                method,
                fmt(m["hypervolume"], 3),
                f"[{fmt(lo, 3)}, {fmt(hi, 3)}]",
                ", ".join(m["front"]),
                len(m["settings"]),
            ]
        )
    metrics = list(METRICS)
    cells = [
        [f"{r['method']} {r['setting']}", *[pct(r["relative"][k]) for k in metrics], r["seeds"]] for r in p["table"]
    ]
    est = p.get("full_study_estimate", {})
    hours = est.get("seconds")
    seconds = p["run_seconds"]
    lines = [
        "## 7. Pareto study: MoRec against the paper's baselines",
        "",
    ]
    if p["mode"] == "quick":
        lines += [
            f"**Quick mode** (`python -m benchmarks.pareto --quick`): a smoke run of the pipeline on "
            f"{Path(cfg['data']).name}, {len(cfg['settings'])} setting, seeds {cfg['seeds']}, overrides "
            f"{cfg['finetune_overrides']}; its numbers say nothing about MovieLens-1M. The full study has not run.",
            "",
        ]
    elif len(cfg["seeds"]) < len(cfg.get("study_seeds", cfg["seeds"])):
        lines += [
            f"**Partial study**: seeds {cfg['seeds']} of {cfg['study_seeds']} have run "
            f"(`python -m benchmarks.pareto --seeds ...`: the finished runs, reused); the intervals need every seed.",
            "",
        ]
    lines += [
        f"Config {Path(cfg['config_file']).name}, {cfg['nproc']} rank(s) per job (the real CLI: `morec train` once per "
        f"seed, `morec finetune --method M` per run), settings {[s['name'] for s in cfg['settings']]}, seeds "
        f"{cfg['seeds']}. Objectives ({objectives}); reference point = the pretrained model (mean over seeds) "
        f"{[round(x, 4) for x in p['reference']]}. Hypervolume of each method's seed-mean points, 95% bootstrap "
        "interval over seeds. A baseline run that reads none of the setting fields that differ is shared "
        "(static / pareto_mtl / epo ignore l_hat, mgda also w).",
        "",
        table(["method", "hypervolume", "interval", "front", "distinct runs"], rows),
        "",
        *budget_table(p),
        "Relative change against the pretrained model (test, seed means):",
        "",
        table(["run", *metrics, "seeds"], cells),
        "",
        f"Run time: {fmt(seconds.get('runs_total', seconds['study']), 3)} s in all; "
        f"mean fine-tune job {fmt(seconds['finetune_mean'], 3)} s, "
        f"of which {fmt(seconds.get('setup_mean', float('nan')), 3)} s outside the job (imports, dataset check, "
        f"torchrun, Ray), pretraining {fmt(seconds['pretrain_mean'], 3)} s (shared machine).",
        "",
        f"Estimated full study: {est.get('finetune_runs')} fine-tunes of {est.get('finetune_epochs')} epochs + "
        f"{est.get('pretrain_runs')} pretrainings = "
        + (f"{fmt(hours / 3600, 3)} h" if hours else "n/a")
        + f" ({est.get('basis', '')}).",
        "",
        image(results, out, Path(p.get("figures", ["pareto.png"])[0]).name, "Pareto projections"),
    ]
    return "\n".join(lines)


def section_authors_setup(runs: dict[str, dict[str, Any]]) -> str:
    """The authors' setup (``ml1m_unirec.json``) and its variants (``ml1m_unirec_*.json``)."""
    metrics = list(METRICS)
    rows, notes = [], []
    for name, a in runs.items():
        pre, ft = a["pretrain"], a["finetune"]
        label = name if not a.get("overrides") else f"{name} ({' '.join(a['overrides'])})"
        rows.append(
            [
                f"{label}: pretrained",
                *[fmt(a["pretrained"][k], 4) for k in metrics],
                f"{round(pre['epoch_seconds_sum']):,} s",
            ]
        )
        rows.append(
            [
                f"{label}: MoRec, {ft['epochs']} epochs",
                *[f"{fmt(a['morec'][k], 4)} ({pct(a['relative'][k])})" for k in metrics],
                f"{round(ft['wall_s']):,} s",
            ]
        )
        notes.append(
            f"{name}: pretraining {pre['epochs']} epochs (best valid epoch {pre['best_epoch']}, l_hat "
            f"{fmt(pre['l_hat'], 4)}); final beta {fmt(ft['final_beta'])} after {ft['sampler_updates']} sampler "
            "updates."
        )
    return "\n".join(
        [
            "## 7b. The authors' setup (`configs/ml1m_unirec.toml`, `python -m benchmarks.authors_setup`)",
            "",
            " ".join(notes) + " Test split; docs/results.md says why every metric falls.",
            "",
            table(["run", *metrics, "run time"], rows),
        ]
    )


SECTIONS: dict[str, Callable[..., str]] = {
    "pareto": section_pareto,
    "overhead": section_overhead,
    "coordinator_scale": section_coordinator,
    "embedding_scale": section_embedding,
    "quality": section_quality,
    "sensitivity": section_sensitivity,
}


def generate(results: Path, out: Path) -> str:
    found = load_results(results)
    parts = [
        "# Benchmark report",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python -m benchmarks.report` from "
        f"`{_shown(results)}/*.json`. "
        "Every ratio compares two measurements of the same run on the same machine.",
        "",
        section_headline(found),
        "",
        section_provenance(found),
        "",
    ]
    if "run_all" in found:
        parts += [section_status(found["run_all"]), ""]
    for name in BENCHMARKS:
        if name not in found:
            parts += [f"## {name}", "", f"*(no {name}.json in {results})*", ""]
            continue
        if name == "reader":
            parts += [section_reader(found[name]), ""]
            continue
        try:
            parts += [SECTIONS[name](found[name], results, out), ""]
        except (KeyError, TypeError, ValueError) as exc:
            parts += [f"## {name}", "", f"*(could not render {name}.json: {type(exc).__name__}: {exc})*", ""]
    if "pareto23" in found:
        from benchmarks.pareto_report import render

        parts += [render(found["pareto23"], results, out), ""]
    authors = {name: r for name, r in found.items() if name.startswith("ml1m_unirec")}
    if authors:
        parts += [section_authors_setup(authors), ""]
    parts.append(appendix(found))
    text = "\n".join(parts) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


STUDY_BEGIN = "<!-- generated by python -m benchmarks.report --results-md: the Pareto study -->"
STUDY_END = "<!-- end of the generated Pareto study -->"
STUDY23_BEGIN = "<!-- generated by python -m benchmarks.report --results-md: the Pareto study of issue 23 -->"
STUDY23_END = "<!-- end of the generated Pareto study of issue 23 -->"


def replace_block(text: str, begin: str, end: str, section: str) -> str:
    """``text`` with the block between ``begin`` and ``end`` replaced by ``section`` (appended
    with its markers when the page has none)."""
    block = f"{begin}\n{section}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def update_results_md(results: Path, md: Path) -> str:
    """Replace the Pareto study's block of ``md`` (docs/results.md) with the section rendered
    from ``results``' pareto.json (or the quick one), between the two markers; text outside
    them is kept, and a page without them gets the block appended. Written atomically."""
    found = load_results(results)
    if "pareto" not in found:
        raise FileNotFoundError(f"no pareto.json or pareto_quick.json in {results}")
    section = section_pareto(found["pareto"], results, md).replace("## 7. Pareto study", "## The Pareto study", 1)
    text = replace_block(md.read_text() if md.exists() else "", STUDY_BEGIN, STUDY_END, section)
    if "pareto23" in found:  # issue 23's study, its own block
        from benchmarks.pareto_report import render

        section = render(found["pareto23"], results, md, title="### The study's figures (generated)")
        text = replace_block(text, STUDY23_BEGIN, STUDY23_END, section)
    tmp = md.with_name(f".{md.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, md)
    return text


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "REPORT.md")
    parser.add_argument(
        "--results-md", type=Path, default=None, help="also regenerate the Pareto study's block of this page"
    )
    args = parser.parse_args(argv)
    generate(args.results, args.out)
    print(f"wrote {args.out}")
    if args.results_md:
        update_results_md(args.results, args.results_md)
        print(f"updated {args.results_md}")
    return args.out


if __name__ == "__main__":
    main()
