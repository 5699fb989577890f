"""GRPO on an arithmetic reward task with TRL's GRPOTrainer and grpo_mel's memory-efficient LM head.

Prompts like ``"12+7="`` are generated in code (``arithmetic_task.py`` beside this file); two reward
functions score the completions: ``arithmetic_reward`` (1.0 if the first word of the completion is the
right answer) and ``format_reward`` (graded, the share of digit/sign characters, so it varies even for a
random model). The policy's per-token log-probs (and entropies) go through :func:`grpo_mel.patch_grpo`
(chunked LM head with recompute in backward, no ``[B, T, V]`` logits) unless ``--no-patch``;
:class:`grpo_mel.PeakMemoryCallback` logs each optimizer step's peak memory (``peak_vram_gb`` on CUDA,
``peak_rss_gb`` or ``peak_cpu_alloc_gb`` on CPU; see its docstring).

``--compare`` trains twice from identical weights with the same seed, unpatched (TRL as installed) then
patched, and prints both loss curves (and grad norm / entropy / KL / reward), the largest |Δloss|, and the
per-step peak memory table; ``--plot PATH`` writes the peak memory per step of both runs as a PNG.

With ``--beta 0`` (TRL's default) and one optimisation pass per generation batch, GRPO's loss is
``-Σ Aᵢ·(πθ/πθ_old = 1)`` normalised: it is 0 (up to rounding) whenever the completions of a group have equal
lengths, as they mostly do for a random model that never emits EOS. Its *gradient* is not zero: compare the
``grad_norm`` curves, or pass ``--beta 0.04`` for a non-zero loss (the KL term to a reference model).

Commands (from the repository root)::

    # default: a small random Llama (vocab 2048) + LoRA, patched, 10 steps, ~20 s on 2 CPU cores
    python examples/grpo_reward_task.py

    # unpatched vs patched on the same seed, with a plot
    python examples/grpo_reward_task.py --compare --plot outputs/grpo_peak_memory.png

    # exact tensor-level CPU memory (torch allocator via torch.profiler; slower)
    python examples/grpo_reward_task.py --compare --cpu-measure torch

    # QLoRA (bitsandbytes 4-bit base + LoRA) or full fine-tuning
    python examples/grpo_reward_task.py --finetune qlora
    python examples/grpo_reward_task.py --finetune full --no-patch

    # GPU: the Llama-3.2-1B architecture with random weights (vocab 128256), 8 generations x 512 tokens;
    # --override-fused-head true: the patched run goes through grpo_mel (TRL's Triton head stays by default on CUDA)
    python examples/grpo_reward_task.py --model llama-1b-random --finetune lora --bf16 \\
        --num-generations 8 --max-completion-length 512 --steps 5 --compare --override-fused-head true \\
        --plot outputs/grpo_1b.png

    # real weights (local path or hub id) and vLLM generation (pip install "grpo_mel[vllm]"; a CUDA GPU)
    python examples/grpo_reward_task.py --model meta-llama/Llama-3.2-1B-Instruct --bf16 --use-vllm
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

METRIC_KEYS = ("grad_norm", "entropy", "reward", "rewards/arithmetic_reward/mean", "rewards/format_reward/mean",
               "completions/mean_length", "kl", "step_time")


def build_dataset(n: int, seed: int):
    from datasets import Dataset

    from arithmetic_task import arithmetic_prompts

    return Dataset.from_list(arithmetic_prompts(n, seed=seed))


def reward_functions():
    from arithmetic_task import arithmetic_reward, format_reward

    return [arithmetic_reward, format_reward]


OVERRIDE = {"auto": None, "true": True, "false": False}  # --override-fused-head -> patch_grpo(override_fused_head=)


def _patch_ctx(args, patched: bool):
    if not patched:
        return contextlib.nullcontext()
    try:
        from grpo_mel.integrations.trl_grpo import grpo_patched
    except ImportError as e:
        raise SystemExit(f"grpo_mel's TRL GRPO patch is not available ({e}); run with --no-patch") from e
    return grpo_patched(chunk_size=args.chunk_size, memory_budget=args.memory_budget,
                        override_fused_head=OVERRIDE[args.override_fused_head])


def run_once(src: C.ModelSource, args, patched: bool, dataset) -> C.RunResult:
    from trl import GRPOConfig, GRPOTrainer

    import grpo_mel

    C.release_memory()
    model = src.load()
    if args.finetune in ("lora", "qlora"):
        model = C.add_lora(model, seed=args.seed, r=args.lora_r, alpha=args.lora_alpha)
    label = "patched" if patched else "unpatched"
    cb = grpo_mel.PeakMemoryCallback(cpu_measure=args.cpu_measure, label=label)
    cfg = GRPOConfig(
        output_dir=os.path.join(args.output_dir, label),
        max_steps=args.steps,
        per_device_train_batch_size=args.num_generations * args.prompts_per_step,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        beta=args.beta,
        learning_rate=args.learning_rate,
        logging_steps=1,
        seed=args.seed,
        data_seed=args.seed,
        bf16=args.bf16,
        use_vllm=args.use_vllm,
        vllm_mode="colocate",  # vLLM inside this process (TRL's default on some versions is an external server)
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        log_completions=False,
    )
    with _patch_ctx(args, patched):
        trainer = GRPOTrainer(model=model, reward_funcs=reward_functions(), args=cfg, train_dataset=dataset,
                              processing_class=src.tokenizer, callbacks=[cb])
        C.drop_printer(trainer)
        t0 = time.perf_counter()
        trainer.train()
        runtime = time.perf_counter() - t0
    res = C.collect(label, trainer, cb, runtime, metric_keys=METRIC_KEYS)
    del trainer, model
    C.release_memory()
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=C.TINY,
                   help=f"'{C.TINY}' (default: small random Llama, vocab 2048), '{C.LLAMA_1B_RANDOM}' (Llama-3.2-1B "
                        "architecture, random weights, vocab 128256), or a local path / hub id")
    p.add_argument("--finetune", default="lora", choices=["lora", "qlora", "full"],
                   help="lora (default), qlora (bitsandbytes 4-bit base + LoRA) or full")
    p.add_argument("--use-vllm", action="store_true",
                   help="generate with vLLM in this process (GRPOConfig(use_vllm=True, vllm_mode='colocate'); "
                        "needs vllm and a CUDA GPU)")
    p.add_argument("--compare", action="store_true", help="run unpatched then patched on the same seed")
    p.add_argument("--no-patch", action="store_true", help="run TRL unpatched only")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--prompts-per-step", type=int, default=2, help="distinct prompts per optimizer step")
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0: no reference model, TRL's default)")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--lora-alpha", type=int, default=64)
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 weights and mixed precision (on the CPU too, via torch's CPU autocast)")
    p.add_argument("--chunk-size", type=int, default=None, help="rows per LM-head chunk (default: planned)")
    p.add_argument("--memory-budget", type=float, default=None, help="bytes per chunk when --chunk-size is unset")
    p.add_argument("--override-fused-head", default="auto", choices=list(OVERRIDE),
                   help="TRL >= 1.15 (its own fused LM head): true routes the patched run through grpo_mel, false "
                        "keeps TRL's head, auto (default) decides per device (TRL's where it runs its Triton kernel, "
                        "i.e. CUDA; see patch_grpo)")
    p.add_argument("--cpu-measure", default="rss", choices=["rss", "torch"],
                   help="CPU peak memory: process peak RSS (rss) or torch allocator peak via torch.profiler (torch)")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of the peak memory per step")
    p.add_argument("--num-prompts", type=int, default=256, help="rows of the generated dataset")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tiny-vocab", type=int, default=2048)
    p.add_argument("--tiny-hidden", type=int, default=64)
    p.add_argument("--tiny-layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the tiny default model on CPU, else torch's default)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up forward/backward")
    p.add_argument("--tolerance", type=float, default=None,
                   help="with --compare, exit with status 1 if max |Δloss| exceeds this")
    p.add_argument("--output-dir", default=os.path.join("outputs", "grpo_reward_task"))
    args = p.parse_args(argv)
    if args.compare and args.no_patch:
        p.error("--compare already runs unpatched and patched; drop --no-patch")
    # what the flags need, checked now rather than after minutes of training
    C.require_model(p, args.model)
    if args.plot:
        C.require_module(p, "--plot", "matplotlib", "plot")
    if args.finetune == "qlora":
        C.require_module(p, "--finetune qlora", "bitsandbytes", "bnb")
    if args.use_vllm:
        C.require_module(p, "--use-vllm", "vllm", "vllm")
        if not torch.cuda.is_available():
            C.fail(p, "--use-vllm: vLLM generation (colocated with training) needs a CUDA GPU, and none is visible; "
                      "run without --use-vllm to generate with transformers")
    if args.bf16:
        C.require_bf16(p, "--bf16")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    C.quiet()
    C.set_threads(args.threads, args.model)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    src = C.ModelSource(args.model, dtype=dtype, load_in_4bit=args.finetune == "qlora", tiny_vocab=args.tiny_vocab,
                        tiny_hidden=args.tiny_hidden, tiny_layers=args.tiny_layers, seed=0).prepare()
    src.tokenizer.padding_side = "left"
    dataset = build_dataset(args.num_prompts, args.seed)
    print(f"model: {src.description}; finetune {args.finetune}; dtype {dtype}; device {C.device()}; "
          f"{args.steps} steps x {args.prompts_per_step} prompts x {args.num_generations} generations "
          f"x {args.max_completion_length} tokens; seed {args.seed}")
    if not args.no_warmup:
        C.warmup(src, lora=args.finetune != "full", seed=args.seed)

    modes = [False, True] if args.compare else [not args.no_patch]
    runs = [run_once(src, args, patched=m, dataset=dataset) for m in modes]
    src.cleanup()

    C.print_curves(runs, "loss")
    for k in ("grad_norm", "entropy", "kl", "reward", "step_time"):  # step_time: TRL's, seconds (TRL >= 1.x)
        if all(k in r.metrics for r in runs):
            C.print_curves(runs, k)
    C.print_memory(runs)
    result: dict[str, Any] = {"runs": runs, "model": src.description}
    print("\nsummary")
    if len(runs) == 2:
        d = C.max_abs_diff(runs[0].losses, runs[1].losses)
        result["max_abs_diff"] = d
        print(f"  max |Δloss| over {len(runs[0].losses)} steps: {d:.3e}")
        for k in ("grad_norm", "entropy", "kl", "reward"):
            if all(k in r.metrics for r in runs):
                dk = C.max_abs_diff(runs[0].metrics[k], runs[1].metrics[k])
                result[f"max_abs_diff_{k}"] = dk
                print(f"  max |Δ{k}|: {dk:.3e}")
    for r in runs:
        line = f"  {r.label:>9}: peak {r.peak_key} {C.fmt_gib(r.max_peak)}, runtime {r.runtime_s:.1f} s"
        if "reward" in r.metrics:
            line += f", mean reward first/last step {r.metrics['reward'][0]:.3f}/{r.metrics['reward'][-1]:.3f}"
        print(line)
    if len(runs) == 2 and all("step_time" in r.metrics for r in runs):
        t0, t1 = (statistics.median(r.metrics["step_time"]) for r in runs)
        print(f"  patched / unpatched median step time: {t1 / t0:.3f} ({t0:.1f} s -> {t1:.1f} s)")
    if len(runs) == 2 and runs[0].peaks and runs[1].peaks:
        print(f"  patched / unpatched max peak: {runs[1].max_peak / runs[0].max_peak:.3f}")
    if args.plot:
        path = C.plot_peaks(runs, args.plot, f"GRPO peak memory per step - {src.description}")
        print(f"  plot: {path}")
        result["plot"] = path
    if args.tolerance is not None and "max_abs_diff" in result and not result["max_abs_diff"] <= args.tolerance:
        print(f"FAIL: max |Δloss| {result['max_abs_diff']:.3e} > {args.tolerance}")
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
