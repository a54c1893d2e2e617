"""Checkpointing: a reader restored from ``state_dict`` continues the exact same batch stream.

Each case compares, bit for bit, the batches of an uninterrupted reader with those of a
reader that was stopped mid-epoch, checkpointed, and resumed in a fresh object (prefetch
threads included), in uniform and MoRec mode, across a probabilities change and an epoch
boundary.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from morec_dist.data.batch import Batch
from morec_dist.data.reader import Reader
from tests import reader_data

OBJECTIVES = [("fairness", "fair_group"), ("revenue", "rev_group")]
P_NEW = {"fairness": [0.05, 0.05, 0.1, 0.1, 0.2, 0.2, 0.3, 0.0], "revenue": [0.7, 0.1, 0.1, 0.1]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return reader_data.build(tmp_path_factory.mktemp("resume") / "ds")


def _reader(data_dir: Path, morec: bool) -> Reader:
    return Reader(
        data_dir,
        batch_size=700,  # 17623 rows over 2 ranks: 13 batches per epoch, windows span several
        num_negatives=4,
        negative_alpha=0.75,
        seed=21,
        rank=1,
        world_size=2,
        objectives=OBJECTIVES if morec else (),
        prefetch_batches=3,
        window_row_groups=2,
        in_memory_rows=600,  # big groups stream windows of row groups, small ones are held
    )


def _assert_same(a: Batch, b: Batch) -> None:
    assert a.version == b.version
    for name in ("user_ids", "item_ids", "block_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for kjt_a, kjt_b in ((a.user_kjt, b.user_kjt), (a.item_kjt, b.item_kjt)):
        assert kjt_a.keys() == kjt_b.keys()
        assert torch.equal(kjt_a.values(), kjt_b.values()) and torch.equal(kjt_a.lengths(), kjt_b.lengths())


def _run(reader: Reader, steps: int, change_at: int | None, start: int = 0) -> list[Batch]:
    """``steps`` batches across epochs; P_NEW (version 1) is set before global step ``change_at``."""
    out: list[Batch] = []
    it = iter(reader)
    while len(out) < steps:
        if change_at is not None and start + len(out) == change_at:
            reader.set_probabilities(1, P_NEW)
        try:
            out.append(next(it))
        except StopIteration:
            it = iter(reader)
    it.close()
    return out


@pytest.mark.parametrize(
    "morec, stop_at, change_at",
    [
        (False, 5, None),  # uniform, mid-epoch
        (False, 11, None),  # uniform, resume runs across the epoch boundary
        (True, 6, 3),  # MoRec: probabilities changed before the checkpoint
        (True, 4, 9),  # MoRec: changed after the resume
        (True, 12, None),  # MoRec: across the epoch boundary
    ],
)
def test_resumed_reader_continues_the_same_stream(data_dir, morec, stop_at, change_at):
    total = 20
    with _reader(data_dir, morec) as reference:
        assert reference.num_batches == 13
        expected = _run(reference, total, change_at)
    with _reader(data_dir, morec) as first:
        head = _run(first, stop_at, change_at)
        state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    with _reader(data_dir, morec) as resumed:
        resumed.load_state_dict(copy.deepcopy(state))
        tail = _run(resumed, total - stop_at, change_at, start=stop_at)
    assert len(head) + len(tail) == total
    for a, b in zip(expected, head + tail, strict=True):
        _assert_same(a, b)
    if morec and change_at is not None:
        assert [b.version for b in expected] == [0] * change_at + [1] * (total - change_at)


def test_state_at_end_of_epoch_points_to_next_epoch(data_dir):
    with _reader(data_dir, False) as reader:
        batches = list(reader)
        assert len(batches) == 13 and reader.epoch == 1
        assert (reader.state_dict()["epoch"], reader.state_dict()["step"]) == (1, 0)


def test_state_from_another_rank_is_refused(data_dir):
    with _reader(data_dir, True) as reader:
        state = reader.state_dict()
    state["rank"] = 0
    with _reader(data_dir, True) as other, pytest.raises(ValueError, match="rank = 0 but this reader has 1"):
        other.load_state_dict(state)


def test_set_epoch_keeps_a_resumed_position_and_starts_other_epochs(data_dir):
    with _reader(data_dir, False) as reference:
        epoch0 = _run(reference, 13, None)
        reference.set_epoch(3)
        epoch3_first = next(iter(reference))
    with _reader(data_dir, False) as first:
        _run(first, 4, None)
        state = first.state_dict()
    with _reader(data_dir, False) as resumed:
        resumed.load_state_dict(state)
        resumed.set_epoch(0)  # what a trainer loop does after loading: must not rewind
        rest = list(resumed)
        assert len(rest) == 9
        for a, b in zip(epoch0[4:], rest, strict=True):
            _assert_same(a, b)
        resumed.set_epoch(1)  # already positioned at epoch 1 by the finished pass
        assert resumed.step == 0 and resumed.epoch == 1
        resumed.set_epoch(3)
        _assert_same(next(iter(resumed)), epoch3_first)


def test_stopping_right_after_the_last_batch_rolls_over_to_the_next_epoch(data_dir):
    with _reader(data_dir, False) as reader:
        it = iter(reader)
        for _ in range(13):
            next(it)  # the generator is left suspended after the epoch's last batch
        reader.set_epoch(1)
        assert len(list(reader)) == 13 and reader.epoch == 2
