"""The chunked LM head under torch.distributed on CPU (gloo, 2 processes): DDP and FSDP2.

Each rank takes half of a global batch; after backward, the synchronised gradients must equal the
gradients of one process on the whole batch (loss normalised by the global token count, so the
average DDP takes over ranks is exact). dW is returned through autograd, so DDP's reducer and
FSDP2's reduce-scatter see it like any other gradient; a side-effect ``.grad`` write would be missed.
"""

from __future__ import annotations

import os
import tempfile

import pytest
from _spawn import spawn
import torch
import torch.distributed as dist
from torch import nn

from grpo_mel import linear_cross_entropy

WORLD = 2
N_PER_RANK, SEQ, H, V = 3, 11, 16, 97  # V and SEQ uneven on purpose (chunk 5 leaves a short last chunk)


class TinyLM(nn.Module):
    """Embedding → one MLP block → LM head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.block = nn.Sequential(nn.Linear(H, H), nn.Tanh())
        self.lm_head = nn.Linear(H, V, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, ids, labels, total_tokens):
        hidden = self.block(self.embed(ids))
        # sum over this rank's tokens / global token count: averaging over ranks (DDP) * WORLD = global mean
        loss = linear_cross_entropy(hidden, self.lm_head.weight, labels, reduction="sum", chunk_size=5)
        return loss / total_tokens


def _data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (WORLD * N_PER_RANK, SEQ), generator=g)
    labels = torch.randint(0, V, (WORLD * N_PER_RANK, SEQ), generator=g)
    labels[0, :4] = -100  # ignored labels on rank 0 only: the global count handles the imbalance
    return ids, labels


def _reference_grads():
    torch.manual_seed(0)
    model = TinyLM()
    ids, labels = _data()
    total = (labels != -100).sum()
    model(ids, labels, total).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _worker(rank, port, mode, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = TinyLM()
        ids, labels = _data()
        total = (labels != -100).sum()
        sl = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
            wrapped(ids[sl], labels[sl], total).mul(WORLD).backward()
            grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        else:
            from torch.distributed.fsdp import fully_shard

            fully_shard(model)
            model(ids[sl], labels[sl], total).mul(WORLD).backward()
            grads = {k: p.grad.full_tensor().clone() for k, p in model.named_parameters()}
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        # let both ranks finish their collectives before teardown: destroying the gloo group while FSDP2 still
        # has work in flight aborted a worker once ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()



def _run(mode):
    with tempfile.TemporaryDirectory() as d:
        spawn(_worker, (mode, d), WORLD)
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_grads_equal_single_process(mode):
    if mode == "fsdp2":
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            pytest.skip("this torch has no FSDP2 fully_shard")
    ref = _reference_grads()
    per_rank = _run(mode)
    for grads in per_rank:
        assert set(grads) == set(ref)
        for k in ref:
            torch.testing.assert_close(grads[k], ref[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{mode} {k}: {m}")
    # and the gradient is not trivially zero (the test could not pass with a missing dW)
    assert ref["embed.weight"].abs().sum() > 0
