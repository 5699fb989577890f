"""Patched GRPOTrainer (and RLOOTrainer, TRL >= 1.14) under DDP (accelerate, gloo, 2 CPU processes) = one process on
the global batch.

The parent builds a GRPOTrainer, generates one global batch (2 prompts x 4 completions, rewards that
vary) and computes the reference loss gradients on all 8 rows, patched and unpatched. Each of two
worker processes builds the same trainer under torch.distributed, wraps the model in DDP with the
trainer's accelerator, and computes the patched loss on its 4 rows. With loss_type="grpo" (a mean of
per-sequence means; RLOO's loss is a mean over sequences too) and equal halves, DDP's gradient average is the
global gradient, so every rank's
synchronised gradient must equal the reference. The patch must go through the DDP wrapper's forward
(forward redirection): calling the inner module directly would skip DDP's reducer set-up.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

import pytest
from _engine_worker import _count_chunked_head_calls
from _spawn import spawn
import torch

trl = pytest.importorskip("trl")

from packaging.version import Version  # noqa: E402

import grpo_mel  # noqa: E402
from grpo_mel import testing as gt  # noqa: E402
from grpo_mel.integrations import _trl_compat, trl_rloo  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "examples"))  # the local reward task and its tokenizer (examples/arithmetic_task.py)
import arithmetic_task as task  # noqa: E402

WORLD = 2
CHUNK = 7


#: kind -> (patch for the process, patched block for the parent)
PATCHES = {"grpo": (grpo_mel.patch_grpo, grpo_mel.grpo_patched), "rloo": (trl_rloo.patch_rloo, trl_rloo.rloo_patched)}


def _trainer(out_dir, model_path, kind="grpo"):
    from datasets import Dataset

    config_cls, trainer_cls = getattr(trl, f"{kind.upper()}Config"), getattr(trl, f"{kind.upper()}Trainer")
    kw = dict(loss_type="grpo") if kind == "grpo" else {}
    args = config_cls(
        output_dir=out_dir, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no", seed=0, beta=0.0, bf16=False,
        max_steps=1, disable_dropout=True, logging_steps=1, **kw,
    )
    tok = task.tiny_tokenizer(1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(
            model=model_path, reward_funcs=[task.format_reward], args=args,
            train_dataset=Dataset.from_list(task.arithmetic_prompts(8)), processing_class=tok,
        )
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, port, work_dir, kind, compile_chunk):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    PATCHES[kind][0](chunk_size=CHUNK, compile=compile_chunk)
    calls = _count_chunked_head_calls()  # on the function both patches compute with
    trainer = _trainer(os.path.join(work_dir, f"out{rank}"), os.path.join(work_dir, "model"), kind)
    assert type(trainer).__name__ == f"{kind.upper()}Trainer"
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == WORLD
    inputs = torch.load(os.path.join(work_dir, "inputs.pt"))
    half = {k: (v[rank * 4:(rank + 1) * 4] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 8 else v)
            for k, v in inputs.items()}
    model = trainer.accelerator.prepare_model(trainer.model)
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel), type(model)
    model.train()
    loss = trainer.compute_loss(model, half)
    trainer.accelerator.backward(loss)
    import grpo_mel._compiled as compiled

    torch.save({"loss": loss.detach(), "grads": _grads(model.module), "calls": len(calls),
                "compiled": sorted(f.__name__ for f in compiled._COMPILED), "failed": dict(compiled._FAILED)},
               os.path.join(work_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()



@pytest.mark.slow
@pytest.mark.parametrize("kind,compile_chunk", [("grpo", None), ("grpo", True), pytest.param(
    "rloo", None, marks=pytest.mark.skipif(Version(trl.__version__) < Version(_trl_compat.MIN_TRL_RLOO),
                                           reason="this TRL's RLOOTrainer is not patched"))],
    ids=["grpo", "grpo-compiled", "rloo"])
def test_patched_trainer_under_ddp_matches_single_process(kind, compile_chunk):
    """``compile_chunk``: the workers' patch compiles grpo_mel's chunk (the parent's reference stays eager)."""
    with tempfile.TemporaryDirectory() as d:
        tok = task.tiny_tokenizer(1024)
        gt.tiny_llama(vocab_size=1024, tokenizer=tok).save_pretrained(os.path.join(d, "model"))
        grpo_mel.unpatch_grpo()
        trl_rloo.unpatch_rloo()
        trainer = _trainer(os.path.join(d, "out"), os.path.join(d, "model"), kind)
        ds = trainer.train_dataset
        batch = [dict(ds[i]) for i in range(2) for _ in range(4)]
        torch.manual_seed(1234)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inputs = trainer._generate_and_score_completions(batch)
        assert inputs["advantages"].abs().sum() > 0, "rewards did not vary: the loss would be zero"
        torch.save(inputs, os.path.join(d, "inputs.pt"))

        trainer.model.train()
        ref_unpatched = trainer.compute_loss(trainer.model, inputs)
        ref_unpatched.backward()
        g_unpatched = _grads(trainer.model)
        trainer.model.zero_grad(set_to_none=True)
        with PATCHES[kind][1](chunk_size=CHUNK):
            ref = trainer.compute_loss(trainer.model, inputs)
            ref.backward()
        g_ref = _grads(trainer.model)
        for k in g_ref:  # patched single process = unpatched single process
            torch.testing.assert_close(g_ref[k], g_unpatched[k], rtol=1e-5, atol=1e-6)

        spawn(_worker, (d, kind, compile_chunk), WORLD)
        for rank in range(WORLD):
            got = torch.load(os.path.join(d, f"rank{rank}.pt"))
            assert got["calls"] > 0, f"rank {rank}: the patched head never ran under DDP"
            if compile_chunk:
                assert got["compiled"] and not got["failed"], (rank, got["compiled"], got["failed"])
            assert got["grads"].keys() == g_ref.keys()
            for k in g_ref:
                torch.testing.assert_close(
                    got["grads"][k], g_ref[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"rank {rank} {k}: {m}"
                )
        assert any(g.abs().max() > 0 for g in g_ref.values())
