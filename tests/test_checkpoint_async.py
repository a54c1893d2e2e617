"""The asynchronous save of train/checkpoint.py in one process: the state is copied at the
call (later in-place updates are not in the checkpoint), also into staging buffers kept from
the previous save, and the checkpoint does not exist until rank 0 commits it (meta.json
last, then the rename), which its save thread does once DCP has written every shard."""

from __future__ import annotations

import torch

from morec_dist.train import checkpoint
from morec_dist.train.checkpoint import (
    META,
    StagingBuffers,
    dcp_load,
    latest_checkpoint,
    read_meta,
    start_checkpoint,
)


def _load(path) -> torch.Tensor:
    loaded = {"table": torch.zeros(3, 4), "step": torch.tensor(0)}
    dcp_load(loaded, path)
    return loaded["table"]


def test_async_save_copies_at_the_call_and_exists_only_once_committed(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    seen = []  # when DCP has written every shard: what of the checkpoint exists then
    dcp_save = checkpoint.dcp.save

    def save_then_look(*args, **kwargs):
        dcp_save(*args, **kwargs)
        seen.append((latest_checkpoint(root), (root / "step-7.tmp" / META).exists(), (root / "step-7").exists()))

    monkeypatch.setattr(checkpoint.dcp, "save", save_then_look)
    state = {"table": torch.arange(12.0).reshape(3, 4), "step": torch.tensor(7)}
    buffers = StagingBuffers()
    pending = start_checkpoint(root / "step-7", state, {"step": 7}, {"rank": 0}, buffers)
    state["table"].add_(100.0)  # training goes on while the save runs
    pending.commit()
    assert seen == [(None, False, False)]  # shards first, meta.json and the rename after them
    assert latest_checkpoint(root) == root / "step-7" and read_meta(root / "step-7") == {"step": 7}
    assert torch.equal(_load(root / "step-7"), torch.arange(12.0).reshape(3, 4))
    # the next save copies into the same buffers: the new values, the old checkpoint intact
    staged = buffers.state_dict_cache
    pending = start_checkpoint(root / "step-8", state, {"step": 8}, {"rank": 0}, buffers)
    state["table"].zero_()
    pending.commit()
    assert buffers.state_dict_cache is staged
    assert torch.equal(_load(root / "step-8"), torch.arange(12.0).reshape(3, 4) + 100.0)
    assert torch.equal(_load(root / "step-7"), torch.arange(12.0).reshape(3, 4))
