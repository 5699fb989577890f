"""The seed notebook's experiment: does the training loss match with the LM head patched?

Llama (4-bit + LoRA r=32, alpha=64 on the 7 projection modules, as in the seed), TRL's SFTTrainer for 10
steps (batch size 1, gradient accumulation 2, warmup 1, seed 3407), on an OIG-style ``<human>/<bot>``
dataset built in code. It trains twice from identical weights and adapters, on the same data order:

* ``unpatched``: the model's own loss (transformers' ``ForCausalLMLoss`` on the full ``[B, T, V]`` logits);
* ``patched``: the same model with :func:`grpo_mel.patch_causal_lm`: the loss from the last hidden states
  and the LM head weight through the chunked linear cross-entropy, no logits.

and prints both loss curves, their largest difference and each run's peak memory per step
(:class:`grpo_mel.PeakMemoryCallback`: ``peak_vram_gb`` on CUDA, ``peak_rss_gb`` / ``peak_cpu_alloc_gb`` on CPU).

Note on TRL >= 1.15: its SFTTrainer computes the loss with TRL's own fused LM head (``add_fused_lm_head``),
bypassing the model's loss. To reproduce the seed's comparison (which ran the model's loss), this example
uses ``ModelLossSFTTrainer``, an SFTTrainer whose ``compute_loss`` is ``transformers.Trainer.compute_loss``
(``model(**inputs).loss``, with ``num_items_in_batch`` for gradient accumulation); everything else
(data processing, collator, optimizer, scheduler) is SFTTrainer's.

Commands (from the repository root)::

    # default: a tiny random Llama, 4-bit (bitsandbytes on CPU) + LoRA, fp32 compute, ~30 s on 2 CPU cores
    # (runs unpatched, then patched)
    python examples/sft_loss_match.py

    # the same without quantization (plain LoRA, fp32)
    python examples/sft_loss_match.py --no-4bit

    # the Llama-3.2-1B architecture with random weights (vocab 128256), GPU recommended
    python examples/sft_loss_match.py --model llama-1b-random

    # real weights (local path or hub id), as in the seed notebook, on a GPU
    python examples/sft_loss_match.py --model /path/to/Llama-3.2-1B-Instruct --dtype float16

    # exact tensor-level CPU memory (torch allocator via torch.profiler) instead of process RSS
    python examples/sft_loss_match.py --cpu-measure torch
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def build_dataset(n: int, seed: int):
    """OIG ``unified_chip2``-like rows: ``{"text": "<human>: question\\n<bot>: answer"}``, varied lengths."""
    from datasets import Dataset

    rng = random.Random(seed)
    names = ["Ada", "Ben", "Cleo", "Dan", "Eve", "Finn"]
    things = ["apples", "books", "coins", "shells", "stamps", "marbles"]
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 60), rng.randint(0, 60)
        who, what = rng.choice(names), rng.choice(things)
        if i % 3 == 0:
            q = f"What is {a} plus {b}?"
            ans = f"{a} plus {b} is {a + b}. The answer is {a + b}."
        elif i % 3 == 1:
            q = f"{who} has {a} {what} and gives away {min(a, b)}. How many are left?"
            ans = f"{who} starts with {a} {what}. {a} minus {min(a, b)} is {a - min(a, b)}, so {a - min(a, b)} are left."
        else:
            extra = " ".join(rng.choice(["Please", "explain", "briefly", "and", "show", "the", "steps"])
                             for _ in range(rng.randint(0, 8)))
            q = f"Compute {a} - {b}. {extra}".strip()
            ans = f"{a} - {b} = {a - b}."
        rows.append({"text": f"<human>: {q}\n<bot>: {ans}"})
    return Dataset.from_list(rows)


def _trainer_cls():
    from transformers import Trainer
    from trl import SFTTrainer

    class ModelLossSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss is the model's own ``model(**inputs).loss`` (see the module docstring)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {**inputs, "use_cache": False}
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return ModelLossSFTTrainer


def run_once(src: C.ModelSource, args, patched: bool, dataset) -> C.RunResult:
    from trl import SFTConfig

    import grpo_mel

    C.release_memory()
    model = src.load()
    if not args.full:
        model = C.add_lora(model, seed=args.seed, r=args.lora_r, alpha=args.lora_alpha)
    if patched:
        grpo_mel.patch_causal_lm(model, chunk_size=args.chunk_size, memory_budget=args.memory_budget)
    label = "patched" if patched else "unpatched"
    cb = grpo_mel.PeakMemoryCallback(cpu_measure=args.cpu_measure, label=label)
    dtype = src.dtype
    cfg = SFTConfig(
        output_dir=os.path.join(args.output_dir, label),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=args.grad_accum,
        warmup_steps=1,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        logging_steps=1,
        seed=args.seed,
        data_seed=args.seed,
        max_length=args.max_length,
        fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataset_num_proc=1,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = _trainer_cls()(
        model=model, args=cfg, train_dataset=dataset, processing_class=src.tokenizer, callbacks=[cb]
    )
    C.drop_printer(trainer)
    t0 = time.perf_counter()
    trainer.train()
    runtime = time.perf_counter() - t0
    res = C.collect(label, trainer, cb, runtime)
    if patched:
        grpo_mel.unpatch_causal_lm(model)
    del trainer, model
    C.release_memory()
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    pos_int, pos_float = C.int_at_least(1), C.finite_float(0.0)
    p.add_argument("--model", default=C.TINY,
                   help=f"'{C.TINY}' (default: small random Llama), '{C.LLAMA_1B_RANDOM}' (Llama-3.2-1B "
                        "architecture, random weights), or a local path / hub id of a causal LM")
    p.add_argument("--no-4bit", action="store_true", help="no bitsandbytes 4-bit quantization (plain LoRA)")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA (implies --no-4bit)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: bfloat16 on a GPU that supports it, else float32)")
    p.add_argument("--steps", type=pos_int, default=10)
    p.add_argument("--grad-accum", type=pos_int, default=2)
    p.add_argument("--max-length", type=pos_int, default=1024)
    p.add_argument("--learning-rate", type=pos_float, default=2e-4)
    p.add_argument("--lora-r", type=pos_int, default=32)
    p.add_argument("--lora-alpha", type=pos_int, default=64)
    p.add_argument("--num-rows", type=pos_int, default=256, help="rows of the generated dataset")
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--chunk-size", type=pos_int, default=None, help="rows per LM-head chunk (default: planned)")
    p.add_argument("--memory-budget", type=pos_float, default=None, help="bytes per chunk when --chunk-size is unset")
    p.add_argument("--cpu-measure", default="rss", choices=["rss", "torch"],
                   help="CPU peak memory: process peak RSS (rss) or torch allocator peak via torch.profiler (torch)")
    p.add_argument("--tiny-vocab", type=pos_int, default=2048, help="tokenizer (and tiny model) vocabulary")
    p.add_argument("--tiny-hidden", type=int, default=64)
    p.add_argument("--tiny-layers", type=pos_int, default=2)
    p.add_argument("--threads", type=pos_int, default=None,
                   help="torch CPU threads (default: 1 for the tiny default model on CPU, else torch's default)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed warm-up forward/backward (one-time kernel compilation would then be "
                        "charged to the first run's runtime)")
    p.add_argument("--tolerance", type=C.finite_float(0.0, strict=False), default=None,
                   help="exit with status 1 if max |Δloss| exceeds this (default: report only)")
    p.add_argument("--output-dir", default=os.path.join("outputs", "sft_loss_match"))
    args = p.parse_args(argv)
    if args.full:
        args.no_4bit = True
    # what the flags need, checked now rather than after the first run
    C.require_model(p, args.model)
    if not args.no_4bit:
        C.require_module(p, "4-bit loading (the default; --no-4bit turns it off)", "bitsandbytes", "bnb")
    if args.dtype == "bfloat16":
        C.require_bf16(p, "--dtype bfloat16")
    return args


def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    C.quiet()
    C.set_threads(args.threads, args.model)
    dtype = _dtype(args.dtype)
    src = C.ModelSource(args.model, dtype=dtype, load_in_4bit=not args.no_4bit, tiny_vocab=args.tiny_vocab,
                        tiny_hidden=args.tiny_hidden, tiny_layers=args.tiny_layers, seed=0).prepare()
    src.tokenizer.padding_side = "right"
    dataset = build_dataset(args.num_rows, args.seed)
    mode = "full fine-tuning" if args.full else ("4-bit + LoRA" if not args.no_4bit else "LoRA")
    print(f"model: {src.description}; {mode}; dtype {dtype}; device {C.device()}; "
          f"{args.steps} steps, batch 1 x grad accum {args.grad_accum}; seed {args.seed}")

    if not args.no_warmup:
        C.warmup(src, lora=not args.full, seed=args.seed)
    runs = [run_once(src, args, patched=False, dataset=dataset), run_once(src, args, patched=True, dataset=dataset)]
    src.cleanup()

    base, ours = runs
    C.print_curves(runs, "loss")
    d = C.max_abs_diff(base.losses, ours.losses)
    C.print_memory(runs)
    print("\nsummary")
    print(f"  max |Δloss| over {len(base.losses)} steps: {d:.3e}")
    for r in runs:
        print(f"  {r.label:>9}: peak {r.peak_key} {C.fmt_gib(r.max_peak)}, runtime {r.runtime_s:.1f} s")
    result = {"runs": runs, "max_abs_diff": d, "model": src.description}
    if args.tolerance is not None and not d <= args.tolerance:
        print(f"FAIL: max |Δloss| {d:.3e} > {args.tolerance}")
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
