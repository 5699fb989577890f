"""GRPO on an arithmetic reward task with TRL's GRPOTrainer and grpo_mel's memory-efficient LM head.

Prompts like ``"12+7="`` are generated in code (``arithmetic_task.py`` beside this file); two reward
functions score the completions: ``arithmetic_reward`` (1.0 if the first word of the completion is the
right answer) and ``format_reward`` (graded, the share of digit/sign characters, so it varies even for a
random model). The policy's per-token log-probs (and entropies) go through :func:`grpo_mel.patch_grpo`
(chunked LM head with recompute in backward, no ``[B, T, V]`` logits) unless ``--no-patch``;
:class:`grpo_mel.PeakMemoryCallback` logs each optimizer step's peak memory (``peak_vram_gb`` on CUDA,
``peak_rss_gb`` or ``peak_cpu_alloc_gb`` on CPU; see its docstring).

``--compare`` trains twice from identical weights with the same seed, unpatched (TRL as installed) then
patched, and prints both runs' curves (loss, grad norm, entropy, KL, reward, step time), the per-step peak memory
table and one verdict line: whether the patched run matches the unpatched one (max |Δ| of the loss, the grad norm
and the entropy, each against its tolerance: ``--tolerance``, ``--grad-norm-tolerance``, ``--entropy-tolerance``)
and the ratio of the peaks. Run as a script, it exits with status 1 when a tolerance is exceeded. ``--plot PATH``
writes the peak memory per step of the runs as a PNG. ``--compare``, ``--no-patch`` (unpatched only) and
``--no-compare`` (patched only, the default) select the runs; the last one given wins, so
``scripts/run_grpo.sh --no-patch`` (whose defaults include ``--compare``) runs unpatched only.

With ``--beta 0`` (TRL's default) and one optimisation pass per generation batch, GRPO's loss is
``-Σ Aᵢ·(πθ/πθ_old = 1)`` normalised: it is 0 (up to rounding) whenever the completions of a group have equal
lengths, as they mostly do for a random model that never emits EOS. Its *gradient* is not zero: compare the
``grad_norm`` curves, or pass ``--beta 0.04`` for a non-zero loss (the KL term to a reference model).

Commands (from the repository root)::

    # the main job: scripts/run_grpo.sh = this with --compare --cpu-measure torch --tiny-vocab 32000
    # --plot outputs/grpo_peak_memory.png, and its arguments after those (an explicit flag wins)
    bash scripts/run_grpo.sh

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


OVERRIDE = {"auto": None, "true": True, "false": False}  # --override-fused-head / --compile -> patch_grpo(...)


@contextlib.contextmanager
def _patch_ctx(args, patched: bool):
    """The patched run's block: :func:`grpo_mel.patch_grpo` with the flags' options (what it returns, when not None,
    printed: it says what was patched and which head runs), undone on leaving."""
    if not patched:
        yield None
        return
    try:
        from grpo_mel.integrations import trl_grpo
    except ImportError as e:
        raise SystemExit(f"grpo_mel's TRL GRPO patch is not available ({e}); run with --no-patch") from e
    summary = trl_grpo.patch_grpo(chunk_size=args.chunk_size, memory_budget=args.memory_budget,
                                  override_fused_head=OVERRIDE[args.override_fused_head],
                                  compile=OVERRIDE[args.compile])
    print(f"patched run: {summary}", flush=True)
    try:
        yield summary
    finally:
        trl_grpo.unpatch_grpo()


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


MAIN_JOB = ["--compare", "--cpu-measure", "torch", "--tiny-vocab", "32000", "--plot", "outputs/grpo_peak_memory.png"]
"""scripts/run_grpo.sh's defaults; the script's own arguments come after them, so an explicit flag wins."""

#: --compare's default tolerances on max |Δ| between the runs, by compute dtype: float32 (measured on the CPU: loss 0,
#: grad norm <= 6e-8, entropy <= 1.9e-6 at V=32000, docs/benchmarks.md) and bfloat16 (rounding of the half-precision
#: GEMMs; on a GPU the runs may also sample different completions, see docs/benchmarks.md)
TOLERANCES = {torch.float32: {"loss": 1e-5, "grad_norm": 1e-4, "entropy": 1e-4},
              torch.bfloat16: {"loss": 1e-3, "grad_norm": 5e-2, "entropy": 5e-2}}
VERDICT_KEYS = ("loss", "grad_norm", "entropy")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    pos_int, pos_float, nonneg_float = C.int_at_least(1), C.finite_float(0.0), C.finite_float(0.0, strict=False)
    p.add_argument("--model", default=C.TINY,
                   help=f"'{C.TINY}' (default: small random Llama, vocab 2048), '{C.LLAMA_1B_RANDOM}' (Llama-3.2-1B "
                        "architecture, random weights, vocab 128256), or a local path / hub id")
    p.add_argument("--finetune", default="lora", choices=["lora", "qlora", "full"],
                   help="lora (default), qlora (bitsandbytes 4-bit base + LoRA) or full")
    p.add_argument("--use-vllm", action="store_true",
                   help="generate with vLLM in this process (GRPOConfig(use_vllm=True, vllm_mode='colocate'); "
                        "needs vllm and a CUDA GPU)")
    p.set_defaults(runs="patched")
    p.add_argument("--compare", dest="runs", action="store_const", const="both",
                   help="run unpatched then patched on the same seed, and compare (the last of --compare / "
                        "--no-patch / --no-compare wins)")
    p.add_argument("--no-patch", dest="runs", action="store_const", const="unpatched", help="run TRL unpatched only")
    p.add_argument("--no-compare", dest="runs", action="store_const", const="patched",
                   help="run patched only (the default without scripts/run_grpo.sh)")
    p.add_argument("--steps", type=pos_int, default=10)
    p.add_argument("--num-generations", type=C.int_at_least(2), default=4,
                   help="completions per prompt (GRPO's group; >= 2)")
    p.add_argument("--prompts-per-step", type=pos_int, default=2, help="distinct prompts per optimizer step")
    p.add_argument("--max-completion-length", type=pos_int, default=32)
    p.add_argument("--temperature", type=pos_float, default=1.0)
    p.add_argument("--beta", type=nonneg_float, default=0.0,
                   help="KL coefficient (0: no reference model, TRL's default)")
    p.add_argument("--learning-rate", type=pos_float, default=1e-4)
    p.add_argument("--lora-r", type=pos_int, default=32)
    p.add_argument("--lora-alpha", type=pos_int, default=64)
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 weights and mixed precision (on the CPU too, via torch's CPU autocast)")
    p.add_argument("--chunk-size", type=pos_int, default=None, help="rows per LM-head chunk (default: planned)")
    p.add_argument("--memory-budget", type=pos_float, default=None,
                   help="bytes per chunk when --chunk-size is unset")
    p.add_argument("--compile", default="auto", choices=list(OVERRIDE),
                   help="patched run: f compiled per chunk (true), eager (false), or the device's default (auto)")
    p.add_argument("--override-fused-head", default="auto", choices=list(OVERRIDE),
                   help="TRL >= 1.15 (its own fused LM head): true routes the patched run through grpo_mel, false "
                        "keeps TRL's head, auto (default) decides per device (TRL's where it runs its Triton kernel, "
                        "i.e. CUDA; see patch_grpo)")
    p.add_argument("--cpu-measure", default="rss", choices=["rss", "torch"],
                   help="CPU peak memory: process peak RSS (rss) or torch allocator peak via torch.profiler (torch)")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of the peak memory per step")
    p.add_argument("--num-prompts", type=pos_int, default=256, help="rows of the generated dataset")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tiny-vocab", type=pos_int, default=2048)
    p.add_argument("--tiny-hidden", type=C.int_at_least(8), default=64,
                   help="hidden size of the tiny model (a multiple of 8: 4 heads of an even size)")
    p.add_argument("--tiny-layers", type=pos_int, default=2)
    p.add_argument("--threads", type=pos_int, default=None,
                   help="torch CPU threads (default: 1 for the tiny default model on CPU, else torch's default)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up forward/backward")
    p.add_argument("--tolerance", type=nonneg_float, default=None,
                   help="with --compare, the largest max |Δloss| that still matches (default: 1e-5 in float32, "
                        "1e-3 in bfloat16)")
    p.add_argument("--grad-norm-tolerance", type=nonneg_float, default=None,
                   help="the same for the grad norm (default: 1e-4 in float32, 5e-2 in bfloat16)")
    p.add_argument("--entropy-tolerance", type=nonneg_float, default=None,
                   help="the same for the mean entropy (default: 1e-4 in float32, 5e-2 in bfloat16)")
    p.add_argument("--output-dir", default=os.path.join("outputs", "grpo_reward_task"))
    args = p.parse_args(argv)
    if args.tiny_hidden % 8:
        p.error(f"argument --tiny-hidden: must be a multiple of 8 (4 attention heads of an even size), got "
                f"{args.tiny_hidden}")
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
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    given = {"loss": args.tolerance, "grad_norm": args.grad_norm_tolerance, "entropy": args.entropy_tolerance}
    args.tolerances = {k: TOLERANCES[dtype][k] if v is None else v for k, v in given.items()}
    return args


def verdict(runs: list[C.RunResult], tolerances: dict[str, float]) -> tuple[bool, str]:
    """``(matches, one line)``: patched against unpatched, max |Δ| of each of :data:`VERDICT_KEYS` the installed
    TRL logs against its tolerance, and the ratio of the peaks."""
    base, ours = runs
    parts, ok = [], True
    for key in VERDICT_KEYS:
        a = base.losses if key == "loss" else base.metrics.get(key)
        b = ours.losses if key == "loss" else ours.metrics.get(key)
        if not a and not b:
            parts.append(f"{key} not logged by this TRL")
            continue
        d = C.max_abs_diff(a or [], b or [])
        within = d <= tolerances[key]
        ok &= within
        parts.append(f"{key} {d:.1e} {'<=' if within else '>'} {_num(tolerances[key])}")
    head = "patched matches unpatched" if ok else "MISMATCH: patched differs from unpatched"
    line = f"verdict: {head} over {len(base.losses)} steps (max |Δ|: {', '.join(parts)})"
    if base.peaks and ours.peaks:
        line += f"; peak memory {ours.max_peak / base.max_peak:.3f}x unpatched ({ours.max_peak:.4f} vs " \
                f"{base.max_peak:.4f} GiB)"
    return ok, line


def main(argv=None) -> dict[str, Any]:
    """Run the example; returns its runs, and for ``--compare`` the diffs, ``ok`` and the verdict line. Run as a
    script, a verdict of no match is exit status 1."""
    args = parse_args(argv)
    C.quiet()
    C.set_threads(args.threads, args.model)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    src = C.ModelSource(args.model, dtype=dtype, load_in_4bit=args.finetune == "qlora", tiny_vocab=args.tiny_vocab,
                        tiny_hidden=args.tiny_hidden, tiny_layers=args.tiny_layers, seed=0).prepare()
    src.tokenizer.padding_side = "left"
    dataset = build_dataset(args.num_prompts, args.seed)
    modes = {"both": [False, True], "patched": [True], "unpatched": [False]}[args.runs]
    _print_what_runs(args, src, dtype, modes)
    if not args.no_warmup:
        C.warmup(src, lora=args.finetune != "full", seed=args.seed)

    runs = [run_once(src, args, patched=m, dataset=dataset) for m in modes]
    src.cleanup()

    zero = args.beta == 0 and all(abs(x) < 1e-4 for r in runs for x in r.losses)
    print("\nloss per step" + (" (~0 by construction: one pass per batch, so ratio 1 and each group's advantages "
                               "sum to 0; its gradient is not 0, see grad_norm)" if zero else ""))
    C.print_curves(runs, "loss", title=False)
    for k in ("grad_norm", "entropy", "kl"):  # reward and TRL's step_time: first/last and median in the summary
        if all(k in r.metrics for r in runs):
            C.print_curves(runs, k)
    C.print_memory(runs)
    result: dict[str, Any] = {"runs": runs, "model": src.description}
    print("\nsummary")
    for r in runs:
        line = f"  {r.label:>9}: peak {C.fmt_gib(r.max_peak)}, runtime {r.runtime_s:.1f} s"
        if "reward" in r.metrics:
            line += f", mean reward first/last step {r.metrics['reward'][0]:.3f}/{r.metrics['reward'][-1]:.3f}"
        print(line)
    if len(runs) == 2 and all("step_time" in r.metrics for r in runs):
        t0, t1 = (statistics.median(r.metrics["step_time"]) for r in runs)
        print(f"  patched / unpatched median step time: {t1 / t0:.3f} ({t0:.2f} s -> {t1:.2f} s)")
    if args.plot:
        path = C.plot_peaks(runs, args.plot, _plot_title(runs, src))
        print(f"  plot: {path}")
        result["plot"] = path
    if len(runs) == 2:
        for key in VERDICT_KEYS + ("kl", "reward"):
            a, b = (r.losses if key == "loss" else r.metrics.get(key) for r in runs)
            if a or b:
                result["max_abs_diff" if key == "loss" else f"max_abs_diff_{key}"] = C.max_abs_diff(a or [], b or [])
        result["ok"], result["verdict"] = verdict(runs, args.tolerances)
        print(result["verdict"], flush=True)
    return result


def _num(x: float) -> str:
    """A tolerance as given: ``1e-04`` (not ``0.0001``), ``0.0025``."""
    short = f"{x:.0e}"
    return short if float(short) == x else f"{x:g}"


def _print_what_runs(args, src: C.ModelSource, dtype: torch.dtype, modes: list[bool]) -> None:
    import trl

    tune = {"lora": f"LoRA r={args.lora_r}", "qlora": f"QLoRA (4-bit base) r={args.lora_r}", "full": "full"}
    what = {False: f"unpatched (TRL {trl.__version__}'s own log-probs)",
            True: "patched (grpo_mel.patch_grpo: chunked LM head)"}
    runs = ", then ".join(what[m] for m in modes) + (", same weights, seed and data" if len(modes) == 2 else "")
    key = C.peak_key(args.cpu_measure)
    print(f"GRPO reward task: {src.description}, {tune[args.finetune]}, {str(dtype).replace('torch.', '')} on "
          f"{C.device()}\n  {args.steps} steps x {args.prompts_per_step} prompts x {args.num_generations} generations "
          f"x {args.max_completion_length} tokens, beta {args.beta:g}, lr {args.learning_rate:g}, seed {args.seed}"
          f"\n  runs: {runs}\n  memory: {C.measure(key)}", flush=True)


def _plot_title(runs: list[C.RunResult], src: C.ModelSource) -> str:
    what = " vs ".join(r.label for r in runs)
    return f"GRPO peak memory per step, {what}\n{src.short}"


if __name__ == "__main__":
    sys.exit(0 if main().get("ok", True) else 1)
