"""A sharded LM-head weight (a DTensor, rows split over 2 gloo ranks) through the patch's gather.

``grpo_mel.integrations._logps._full`` is what the patched GRPO path applies to a head weight/bias that reaches it
as a DTensor no FSDP unit gathers (tensor parallel; FSDP unshards the head inside the ``lm_head`` call, see
test_engines.py): the all-gather (``full_tensor``) is differentiable, so the chunked head's dW flows back to each
rank's shard. Each rank's shard gradient must equal its rows of the unsharded reference.
"""

from __future__ import annotations

import os
import tempfile

import pytest
from _spawn import spawn
import torch
import torch.distributed as dist

from grpo_mel import linear_token_logprobs

WORLD, N, H, V = 2, 29, 12, 98  # V split 49 rows per rank; chunk 5 leaves an uneven last chunk


def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, H, generator=g)
    W = torch.randn(V, H, generator=g)
    b = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    adv = torch.randn(N, generator=g)
    return X, W, b, labels, adv


def _reference():
    X, W, b, labels, adv = _data()
    W.requires_grad_(True)
    b.requires_grad_(True)
    lp = torch.log_softmax((X @ W.t() + b) / 0.7, -1).gather(-1, labels[:, None]).squeeze(-1)
    (lp * adv).sum().backward()
    return W.grad, b.grad


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        from grpo_mel.integrations._logps import _full

        mesh = init_device_mesh("cpu", (WORLD,))
        X, W, b, labels, adv = _data()
        W_dt = torch.nn.Parameter(distribute_tensor(W, mesh, [Shard(0)]))
        b_dt = torch.nn.Parameter(distribute_tensor(b, mesh, [Shard(0)]))
        assert W_dt.to_local().shape[0] == V // WORLD
        w_full, b_full = _full(W_dt), _full(b_dt)
        assert type(w_full).__name__ != "DTensor" and w_full.shape == (V, H)
        lp = linear_token_logprobs(X, w_full, labels, bias=b_full, temperature=0.7, chunk_size=5)
        (lp * adv).sum().backward()
        torch.save({"dW": W_dt.grad.to_local().clone(), "db": b_dt.grad.to_local().clone(),
                    "is_dtensor": type(W_dt.grad).__name__}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        # let both ranks finish their collectives before teardown: destroying the gloo group while FSDP2 still
        # has work in flight aborted a worker once ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()



def test_sharded_head_gather_gives_each_rank_its_gradient_shard():
    try:
        from torch.distributed.tensor import distribute_tensor  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no DTensor")
    ref_dW, ref_db = _reference()
    with tempfile.TemporaryDirectory() as d:
        spawn(_worker, (d,), WORLD)
        got = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(WORLD)]
    rows = V // WORLD
    for r, g in enumerate(got):
        assert g["is_dtensor"] == "DTensor"
        torch.testing.assert_close(g["dW"], ref_dW[r * rows:(r + 1) * rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g["db"], ref_db[r * rows:(r + 1) * rows], rtol=1e-5, atol=1e-6)
    assert ref_dW.abs().sum() > 0
