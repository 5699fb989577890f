"""One optimizer step of GRPOTrainer under one engine, for tests/distributed/test_engines.py.

Run as ``accelerate launch --config_file <engine>.yaml _engine_worker.py WORK_DIR ENGINE CASES`` (2 processes).
For each case of the JSON list CASES (``{"name", "tied", "head_unit", "frozen_head", "patched", "compile"}``;
``compile``: the patch's option, grpo_mel's chunk through ``torch.compile``) it builds a
GRPOTrainer on the saved tiny Llama (its LM head frozen for ``frozen_head``, as under LoRA), hands rank r the
rows [4r, 4r+4) of the batch the parent generated (every engine sees the same numbers), and runs ``train()`` for
one SGD step: the engine wraps the model and the optimizer, the trainer clips (logging the grad norm) and steps.
When training begins it asserts the engine, the world size and the wrap it got; after the step, that grpo_mel's
chunked head ran exactly when the case is patched (and its frozen-head path exactly when that applies).
Rank 0 writes the full parameters after the step and the logged grad norm to WORK_DIR/<engine>-<name>.pt, or the
error a case raised (the parent decides whether that error was expected).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
import warnings

import torch

import grpo_mel
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "examples"))  # the local reward task and its tokenizer (examples/arithmetic_task.py)
import arithmetic_task as task  # noqa: E402

# SGD moves p by lr*grad. A large lr makes the movement dwarf the fp32 rounding of p itself, so p after the step
# carries the gradient to fp32 precision and a comparison relative to the movement can be tight.
LR = 1000.0
CHUNK = 7
WORLD = 2
HEAD_UNIT_WRAP = "LlamaDecoderLayer,Linear"  # every nn.Linear its own unit: the LM head among them
DEFAULT_WRAP = "LlamaDecoderLayer"


def _force_fsdp_on_cpu():
    """accelerate turns FSDP on only for GPU-like backends: under ``use_cpu`` it silently runs DDP (its state.py).

    Switch the accelerator state to FSDP once the trainer has created it, as accelerate itself would on a GPU
    (the worker then asserts it got FSDP). FSDP1 also needs the device without an index (``cpu``, not ``cpu:0``).
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import Trainer

    original = Trainer.create_accelerator_and_postprocess

    def create_accelerator_and_postprocess(self):
        original(self)
        plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment
        # AcceleratorState() copies PartialState's fields on every call: switch both
        for shared in (PartialState._shared_state, AcceleratorState._shared_state):
            shared["distributed_type"] = DistributedType.FSDP
            if plugin.fsdp_version == 1:
                shared["device"] = torch.device("cpu")
        AcceleratorState._shared_state["fsdp_plugin"] = plugin
        self.is_fsdp_enabled = True

    Trainer.create_accelerator_and_postprocess = create_accelerator_and_postprocess


def _skip_deepspeed_shm_op():
    """DeepSpeed's CPU backend compiles a shared-memory op (ninja/g++, 1 - 4 min cold) used only by
    ``inference_all_reduce`` (tensor-parallel inference), never by ZeRO training: don't build it."""
    backend = importlib.import_module("deepspeed.comm.torch")  # not ``deepspeed.comm.torch``: that name is torch

    backend.build_shm_op = lambda: None


def _count_chunked_head_calls() -> list:
    """Calls of grpo_mel's chunked head from the patched trainer, counted: a patched case must run it (not fall back
    to TRL's method), an unpatched one never."""
    import grpo_mel.integrations._logps as _logps

    calls, original = [], _logps.chunked_linear

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    _logps.chunked_linear = counted
    return calls


def _count_frozen_head_backwards() -> list:
    """Backwards through the frozen-head path (the forward's dZ·W times the upstream gradient), counted: a frozen
    head's patched case must take it (not recompute), any other case never."""
    from grpo_mel._grads_ahead import GradsAhead

    calls, original = [], GradsAhead.backward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    GradsAhead.backward = counted
    return calls


def _fsdp2_unit_modules(module) -> set:
    """The modules whose parameters share ``module``'s FSDP2 unit (its parameter group)."""
    group = module._get_fsdp_state()._fsdp_param_group  # private: torch has no public view of a unit's members
    return {p._module_info.module for p in group.fsdp_params}


def _check_engine(trainer, engine: str, case: dict) -> None:
    """Assert the engine, world size and wrap this case runs under (else the test would test something else)."""
    from accelerate.utils import DistributedType

    acc, wrapped = trainer.accelerator, trainer.model_wrapped
    assert acc.num_processes == WORLD and torch.distributed.get_world_size() == WORLD, acc.num_processes
    head = acc.unwrap_model(wrapped).lm_head
    if engine == "ddp":
        assert acc.distributed_type == DistributedType.MULTI_CPU, acc.distributed_type
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel), type(wrapped)
    elif engine == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        assert acc.distributed_type == DistributedType.FSDP and acc.is_fsdp2, acc.distributed_type
        assert isinstance(wrapped, FSDPModule), type(wrapped)
        own_unit = _fsdp2_unit_modules(head) == {head}
        assert own_unit == case["head_unit"], (case, _fsdp2_unit_modules(head))
    elif engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        assert acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2, acc.distributed_type
        assert isinstance(wrapped, FSDP), type(wrapped)
        # FSDP1 replaces a module it wraps by an FSDP instance; the root unit holds the head otherwise
        assert isinstance(wrapped.module.lm_head, FSDP) == case["head_unit"], type(wrapped.module.lm_head)
    elif engine in ("zero2", "zero3"):
        from deepspeed import DeepSpeedEngine

        stage = int(engine[-1])
        assert acc.distributed_type == DistributedType.DEEPSPEED, acc.distributed_type
        assert isinstance(wrapped, DeepSpeedEngine) and wrapped.zero_optimization_stage() == stage
        assert hasattr(head.weight, "ds_id") == (stage == 3)  # ZeRO-3 partitions the parameters themselves
    else:
        raise ValueError(engine)


def _trainer(work_dir: str, engine: str, case: dict):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=os.path.join(work_dir, "out"), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, learning_rate=LR, optim="sgd", lr_scheduler_type="constant",
        max_grad_norm=1e9,  # the norm is computed and logged, the gradient never clipped
        report_to="none", use_cpu=True, save_strategy="no", seed=0, beta=0.0, bf16=False, loss_type="grpo",
        max_steps=1, disable_dropout=True, logging_steps=1,
    )
    model = os.path.join(work_dir, "model-tied" if case["tied"] else "model-untied")
    if case["frozen_head"]:  # the head of a LoRA policy: grpo_mel's forward then differentiates f, nothing recomputed
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model)
        model.lm_head.weight.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[task.format_reward], args=args, train_dataset=Dataset.from_list(task.arithmetic_prompts(8)),
            processing_class=task.tiny_tokenizer(1024),
        )

    class CheckEngine(TrainerCallback):
        def on_train_begin(self, *a, **k):  # the engine has wrapped the model and the optimizer by now
            _check_engine(trainer, engine, case)
            case["checked"] = True

    trainer.add_callback(CheckEngine())
    return trainer


def _full_parameters(trainer) -> dict:
    """Every parameter, unsharded."""
    if trainer.is_deepspeed_enabled:  # ZeRO-3 gathers (stage3_gather_16bit_weights_on_model_save), ZeRO-2 copies
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    else:  # not accelerate's FSDP1 path: its CPU offload frees the CPU-resident flat parameter under it (SIGSEGV)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(trainer.model_wrapped, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in state.items()}


def main(work_dir: str, engine: str, cases: list[dict]) -> None:
    torch.set_num_threads(1)
    if engine.startswith("fsdp"):
        _force_fsdp_on_cpu()
    if engine.startswith("zero"):
        _skip_deepspeed_shm_op()
    head_calls, frozen_backwards = _count_chunked_head_calls(), _count_frozen_head_backwards()
    rank = int(os.environ["RANK"])
    inputs = torch.load(os.path.join(work_dir, "inputs.pt"))
    rows = slice(rank * 4, (rank + 1) * 4)
    half = {k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in inputs.items()}
    for case in cases:
        os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = HEAD_UNIT_WRAP if case["head_unit"] else DEFAULT_WRAP
        if case["patched"]:
            grpo_mel.patch_grpo(chunk_size=CHUNK, compile=case.get("compile"))
        else:
            grpo_mel.unpatch_grpo()
        out = {}
        try:
            trainer = _trainer(work_dir, engine, case)
            trainer._prepare_inputs = lambda generation_batch: half  # the parent's batch, not a new generation
            before, frozen_before = len(head_calls), len(frozen_backwards)
            trainer.train()
            assert (len(head_calls) > before) == case["patched"], f"chunked head ran {len(head_calls) - before}x"
            took = len(frozen_backwards) - frozen_before
            # FSDP1 hands the module views of its flat parameter, which requires grad as a whole: the frozen head
            # looks trainable to autograd there, so the general path runs (dW formed, and dropped by FSDP1)
            frozen_path = case["patched"] and case["frozen_head"] and engine != "fsdp1"
            assert (took > 0) == frozen_path, f"frozen-head backward ran {took}x"
            if case.get("compile"):  # the chunk's f compiled (no eager fall-back), in this process
                import grpo_mel._compiled as compiled

                assert compiled._COMPILED and not compiled._FAILED, (list(compiled._COMPILED), compiled._FAILED)
            out["grad_norm"] = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
            out["params"] = _full_parameters(trainer)
        except Exception as e:  # noqa: BLE001 - reported to the parent, which checks it
            out["error"] = f"{type(e).__name__}: {e}"
            out["traceback"] = traceback.format_exc()
        out["checked"] = case.get("checked", False)
        if rank == 0:
            torch.save(out, os.path.join(work_dir, f"{engine}-{case['name']}.pt"))
        torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
