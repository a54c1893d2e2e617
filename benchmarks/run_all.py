"""``make bench``: every benchmark, then ``benchmarks/REPORT.md``.

    python -m benchmarks.run_all                 # full modes (about an hour on 2 cores), results in benchmarks/results/
    python -m benchmarks.run_all --quick         # every quick mode, results and REPORT.md in benchmarks/results/quick/
    python -m benchmarks.run_all --only overhead quality
    python -m benchmarks.run_all --report-only   # regenerate the report from the JSON files

Each benchmark runs as its own process (``python -m benchmarks.<name> --out ...``), so one
failure is recorded (``run_all.json``, and the report's status table) without stopping
the others. Sensitivity reuses the model quality pretrained when that run succeeded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, bench_env, note, read_json, results_dir, run_logged, write_json

ORDER = ("overhead", "reader", "coordinator_scale", "embedding_scale", "quality", "sensitivity", "pareto")


def command_for(name: str, quick: bool, out_dir: Path, seed: int, note_text: str, ok: dict[str, bool]) -> list[str]:
    args = [sys.executable, "-m", f"benchmarks.{name}", "--out", str(out_dir / f"{name}.json"), "--seed", str(seed)]
    if quick:
        args.append("--quick")
    if name != "reader":  # the reader benchmark has no --note
        args += ["--note", note_text]
    if name == "reader":
        args += ["--cache", str(REPO / ".data" / "bench")]
    if name == "sensitivity" and ok.get("quality"):
        pretrained = REPO / "runs" / "bench" / ("quality-quick" if quick else "quality") / "pretrain"
        if (pretrained / "metrics.json").exists():
            args += [
                "--from",
                str(pretrained / "checkpoints" / "best"),
                "--pretrain-metrics",
                str(pretrained / "metrics.json"),
            ]
            if quick:
                from benchmarks.quality import quick_dataset

                args += ["--data", str(quick_dataset(seed))]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=ORDER, default=None)
    parser.add_argument("--skip", nargs="+", choices=ORDER, default=[])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default=None, help="recorded with every result (e.g. 'shared machine: provisional')")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    out_dir = results_dir(args.quick)
    report_path = out_dir / "REPORT.md" if args.quick else REPO / "benchmarks" / "REPORT.md"
    from benchmarks.report import generate

    if args.report_only:
        generate(out_dir, report_path)
        print(f"wrote {report_path}")
        return 0
    note_text = note(args.note)
    names = [n for n in ORDER if (args.only is None or n in args.only) and n not in args.skip]
    started = time.perf_counter()
    status: dict[str, Any] = {}
    ok: dict[str, bool] = {}
    for name in names:
        command = command_for(name, args.quick, out_dir, args.seed, note_text, ok)
        print(f"==> {name}: {' '.join(command[1:])}", flush=True)
        t = time.perf_counter()
        try:
            run_logged(command, log=out_dir / "logs" / f"{name}.log", env=bench_env())
            status[name] = {"status": "ok", "seconds": round(time.perf_counter() - t, 1)}
            ok[name] = True
        except Exception as exc:  # recorded and reported; the other benchmarks still run
            status[name] = {
                "status": "failed",
                "seconds": round(time.perf_counter() - t, 1),
                "error": str(exc).splitlines()[0],
            }
            ok[name] = False
        print(f"    {name}: {status[name]['status']} in {status[name]['seconds']} s", flush=True)
    previous = out_dir / "run_all.json"
    if args.only and previous.exists():  # a partial rerun keeps the other benchmarks' status
        status = {**read_json(previous).get("benchmarks", {}), **status}
    write_json(
        out_dir / "run_all.json",
        {
            "command": "python -m benchmarks.run_all"
            + (" --quick" if args.quick else "")
            + (f" --only {' '.join(args.only)}" if args.only else ""),
            "benchmarks": status,
            "seconds": round(time.perf_counter() - started, 1),
            "note": note_text,
        },
    )
    generate(out_dir, report_path)
    print(f"wrote {report_path}")
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
