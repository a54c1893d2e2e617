"""Checkpoint items of bounded size (train/state_chunks.py): a ShardedTensor handed to DCP as
row-chunk views saves as one item per chunk, loads back in place through the views, and
stays interchangeable with whole-shard checkpoints in both directions (one process, a real
gloo group of one rank and real DCP files)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

from morec_dist.train.state_chunks import chunked, chunked_tensor, take_back

ROWS, DIM = 1000, 8  # 32 KB; chunks of 4 KB = 128 rows -> 8 chunks


def one_rank_group(tmp_path) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)


def sharded(values: torch.Tensor) -> ShardedTensor:
    meta = ShardMetadata([0, 0], list(values.shape), "rank:0/cpu")
    return ShardedTensor._init_from_local_shards([Shard(values, meta)], list(values.shape))


def test_chunks_are_views_with_global_offsets_and_load_in_place(tmp_path):
    one_rank_group(tmp_path)
    try:
        table = torch.arange(ROWS * DIM, dtype=torch.float32).reshape(ROWS, DIM)
        view = chunked_tensor(sharded(table), chunk_bytes=4096)
        shards = view.local_shards()
        assert [s.metadata.shard_offsets[0] for s in shards] == list(range(0, ROWS, 128))
        assert sum(s.tensor.shape[0] for s in shards) == ROWS
        assert all(s.tensor.data_ptr() == table[s.metadata.shard_offsets[0]].data_ptr() for s in shards)

        state = {"model": {"t": sharded(table)}, "optim": {"lr": 0.5, "groups": [{"eps": 1e-8}]}}
        dcp.save(chunked(state, chunk_bytes=4096), checkpoint_id=str(tmp_path / "chunked"))
        items = dcp.FileSystemReader(str(tmp_path / "chunked")).read_metadata().state_dict_metadata["model.t"]
        assert len(items.chunks) == 8  # one DCP item per chunk, not one per shard

        into = torch.zeros(ROWS, DIM)
        plain = {"model": {"t": sharded(into)}, "optim": {"lr": 0.0, "groups": [{"eps": 0.0}]}}
        loading = chunked(plain, chunk_bytes=4096)
        dcp.load(loading, checkpoint_id=str(tmp_path / "chunked"))
        assert torch.equal(into, table)  # through the views, into the tensor the plain dict holds
        merged = take_back(plain, loading)
        assert merged["optim"] == {"lr": 0.5, "groups": [{"eps": 1e-8}]}
        assert merged["model"]["t"] is plain["model"]["t"]

        # a whole-shard checkpoint (before chunking) loads into chunks, and chunks into a whole shard
        dcp.save({"t": sharded(table * 2)}, checkpoint_id=str(tmp_path / "whole"))
        again = torch.zeros(ROWS, DIM)
        dcp.load(chunked({"t": sharded(again)}, chunk_bytes=4096), checkpoint_id=str(tmp_path / "whole"))
        assert torch.equal(again, table * 2)
        whole = torch.zeros(ROWS, DIM)
        dcp.load({"model": {"t": sharded(whole)}}, checkpoint_id=str(tmp_path / "chunked"))
        assert torch.equal(whole, table)
    finally:
        dist.destroy_process_group()
