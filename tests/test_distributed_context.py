"""The distributed context: the process-group backend chosen per device (the CUDA choice is the
mixed gloo + NCCL group, since the job reduces CPU tensors beside CUDA ones), and the host
collectives in a single process."""

from __future__ import annotations

import pytest
import torch

from morec_dist.distributed import DistContext, all_reduce_sum, any_rank, backend_for


def test_a_cuda_rank_gets_one_group_for_cpu_and_cuda_tensors():
    assert backend_for("cuda") == "cpu:gloo,cuda:nccl"
    assert backend_for("cpu") == "gloo"
    with pytest.raises(ValueError, match="no process-group backend for device type 'mps'"):
        backend_for("mps")


def test_a_single_process_context_reduces_locally():
    ctx = DistContext.single()
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.pg, ctx.distributed) == (0, 1, "gloo", None, False)
    assert ctx.device == torch.device("cpu")
    assert all_reduce_sum([1.5, 2.0], ctx) == [1.5, 2.0]
    assert any_rank(True, ctx) is True and any_rank(False, ctx) is False
