"""The config loader's and the ``morec`` command line's own errors: each is one line naming
the key, file, override or flag at fault, with exit status 2, and nothing starts.

The loader is called directly (its ConfigError message is what the CLI prints) and through
``morec train`` in-process: ``train`` loads the config before it looks at the dataset or
starts torchrun, so these never need data or ranks. One case goes through a real
``python -m morec_dist.cli`` process, so the exit status is the one a shell sees.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from morec_dist.cli import main
from morec_dist.config import ConfigError, load_config
from tests.conftest import REPO


def write(tmp_path: Path, text: str | bytes, name: str = "job.toml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def refused(capsys, argv: list[str], *fragments: str) -> str:
    """``morec <argv>`` in-process: exit 2 (returned, or argparse's SystemExit) and one
    stderr line holding every fragment."""
    try:
        code: object = main(argv)
    except SystemExit as exc:  # argparse ends the process on a bad command line
        code = exc.code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1, err
    assert not captured.out.strip(), captured.out  # no usage text or half a job on stdout
    for fragment in fragments:
        assert fragment in err, err
    return err


def loader_refuses(path: Path | None, overrides: list[str], *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ------------------------------------------------------------------- config files


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("[run]\nseed = 1\nbogus = 2\n", ["run: unknown key(s) ['bogus']", "'seed'"]),
        ("[nosuch]\nx = 1\n", ["unknown section(s) ['nosuch']", "'run'"]),
        ("[morec.pid]\nkp = 0.1\nkq = 0.2\n", ["morec.pid: unknown key(s) ['kq']"]),
        ("[run\nseed = 1\n", ["not valid TOML", "line 1"]),
        ('[run]\nseed = "seven"\n', ["run.seed: expected an integer, got 'seven'"]),
        ("[run]\nseed = 1.5\n", ["run.seed: expected an integer, got 1.5"]),
        ("[run]\nresume = 1\n", ["run.resume: expected bool, got 1"]),
        ("[train]\nepochs = true\n", ["train.epochs: expected an integer, got True"]),
        ('[optim]\ndense_lr = "fast"\n', ["optim.dense_lr: expected a number, got 'fast'"]),
        ("[eval]\nks = 10\n", ["eval.ks: expected a list, got 10"]),
        ('[eval]\nks = [10, "x"]\n', ["eval.ks[1]: expected an integer, got 'x'"]),
        ("run = 3\n", ["run: expected a table, got 3"]),
        ("[train]\nepochs = 0\n", ["train.epochs: expected >= 1, got 0"]),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_file_and_the_key(tmp_path, capsys, text, fragments):
    path = write(tmp_path, text)
    loader_refuses(path, [], str(path), *fragments)
    refused(capsys, ["train", "--config", str(path)], "morec train: error:", str(path), *fragments)


def test_a_missing_config_file_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.toml"
    loader_refuses(missing, [], f"{missing}: config file not found")
    refused(capsys, ["train", "--config", str(missing)], f"{missing}: config file not found")


def test_a_directory_or_binary_file_as_config_is_named_not_a_traceback(tmp_path, capsys):
    refused(capsys, ["train", "--config", str(tmp_path)], f"{tmp_path}: cannot read the config file")
    binary = write(tmp_path, b"\xff\xfe\x00junk", "binary.toml")
    refused(capsys, ["train", "--config", str(binary)], f"{binary}: not valid TOML", "not UTF-8")


# ---------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("run.seed", ["override 'run.seed': expected section.key=value"]),
        ("=3", ["override '=3'", "empty part"]),
        ("run..seed=1", ["override 'run..seed=1'", "empty part"]),
        ("run.=1", ["override 'run.=1'", "empty part"]),
        ("nosuch.key=1", ["override 'nosuch.key=1'", "unknown section(s) ['nosuch']"]),
        ("run.bogus=1", ["override 'run.bogus=1'", "run: unknown key(s) ['bogus']"]),
        ("run.seed=abc", ["override 'run.seed=abc'", "run.seed: expected an integer, got 'abc'"]),
        ("run.seed.x=1", ["override 'run.seed.x=1'", "run.seed: expected an integer"]),
        ("run=1", ["override 'run=1'", "run: expected a table, got 1"]),
        ("morec.pid.kp=[1", ["override 'morec.pid.kp=[1'", "morec.pid.kp: expected a number, got '[1'"]),
    ],
)
def test_a_malformed_override_is_named(tmp_path, capsys, override, fragments):
    loader_refuses(None, [override], *fragments)
    refused(capsys, ["train", override], *fragments)


def test_a_bad_override_names_the_override_not_the_config_file(tmp_path):
    """The value came from the command line: blaming the (valid) file would send the user
    to the wrong place."""
    path = write(tmp_path, "[run]\nseed = 1\n")
    message = loader_refuses(path, ["run.seed=abc"], "override 'run.seed=abc'", "run.seed")
    assert str(path) not in message


def test_a_range_error_from_an_override_names_the_key(tmp_path):
    """Ranges are checked on the merged config (they may involve several keys), so the key
    is named; the file is named too when there is one."""
    loader_refuses(None, ["train.epochs=0"], "train.epochs: expected >= 1, got 0")
    path = write(tmp_path, "[run]\nseed = 1\n")
    loader_refuses(path, ["morec.pid.beta_min=2.0", "morec.pid.beta_max=1.0"], str(path), "beta_min (2.0)")


def test_valid_overrides_still_merge_over_the_file(tmp_path):
    """The per-override check must not refuse what the loader accepts: nested keys,
    inline tables, lists, bare words as strings."""
    path = write(tmp_path, "[run]\nseed = 1\n[model]\nembedding_dim = 8\n")
    config = load_config(
        path,
        [
            "run.seed=5",
            "model.name=two_tower",
            'model.sharding={user_id="row_wise"}',
            "model.sharding.item_id=column_wise",
            "eval.ks=[5, 10]",
            'morec.objectives=[{name="r", kind="revenue", group_column="rev_group", weight=1.0}]',
        ],
    )
    assert config.run.seed == 5 and config.model.embedding_dim == 8 and config.model.name == "two_tower"
    assert config.model.sharding == {"user_id": "row_wise", "item_id": "column_wise"}
    assert config.eval.ks == [5, 10] and config.morec.objectives[0].weight == 1.0


# ---------------------------------------------------------------------- the argv


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["frobnicate"], ["morec: error:", "invalid choice: 'frobnicate'"]),
        ([], ["morec: error:", "COMMAND"]),
        (["train", "--bogus"], ["unrecognized arguments: --bogus"]),
        (["train", "--nproc", "abc"], ["morec train: error: argument --nproc", "'abc'"]),
        (["train", "--nproc", "0"], ["morec train: error: argument --nproc: expected an integer >= 1, got 0"]),
        (["train", "--nproc", "-2"], ["argument --nproc: expected an integer >= 1, got -2"]),
        (["train", "--nproc"], ["argument --nproc: expected one argument"]),
        (["finetune", "--from", "x", "--max-restarts", "-1"], ["argument --max-restarts: expected an integer >= 0"]),
        (["finetune", "--from", "x", "--method", "magic"], ["argument --method: invalid choice: 'magic'"]),
        (["finetune"], ["morec finetune: error:", "--from"]),
        (["prepare", "nowhere", "--out", "x"], ["morec prepare: error:", "invalid choice: 'nowhere'"]),
        (["prepare", "synthetic", "--users", "x"], ["morec prepare synthetic: error: argument --users"]),
        (["coordinator", "frob"], ["morec coordinator: error:", "invalid choice: 'frob'"]),
    ],
)
def test_a_hostile_argv_is_one_line_naming_the_subcommand_or_flag(capsys, argv, fragments):
    refused(capsys, argv, *fragments)


def test_nproc_is_refused_before_the_config_or_the_dataset_is_read(tmp_path, capsys):
    """A bad --nproc is a parse error: even with a missing config file it is what is named."""
    refused(capsys, ["train", "--nproc", "0", "--config", str(tmp_path / "nope.toml")], "--nproc")


def test_the_real_process_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "morec_dist.cli", "train", "--nproc", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "morec train: error: argument --nproc: expected an integer >= 1, got 0 (see `morec train --help`)"
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["finetune", "--from", "ckpt", "train.epochs=2", "--resume-changed"],
        ["finetune", "--from", "ckpt", "--resume-changed"],
        ["finetune", "train.epochs=2", "--from", "ckpt"],
    ],
)
def test_an_added_override_parses_again_wherever_the_users_flags_are(argv):
    """The local Ray address reaches the ranks as an override added to the command line; the
    ranks parse that line again, so it must stay one run of positionals with the user's."""
    from morec_dist.cli import build_parser, with_override

    args = build_parser().parse_args(argv)
    args.argv = argv
    again = build_parser().parse_args(with_override(args, 'coordinator.ray_address="127.0.0.1:1"'))
    assert again.overrides == [*args.overrides, 'coordinator.ray_address="127.0.0.1:1"']
    assert again.resume_changed == args.resume_changed and again.from_checkpoint == "ckpt"
