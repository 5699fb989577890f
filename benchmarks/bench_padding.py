"""Padding costs nothing: the LM head's time in a patched GRPO step with and without the skip of padded rows.

One GRPOTrainer (the installed TRL; on TRL >= 1.15 grpo_mel's head is forced with ``override_fused_head=True``)
on a tiny random Llama with the head at the reference shape (hidden 256, vocab 32000, fp32, head trained), one
prepared batch of ``--completions`` completions of ``--tokens`` positions whose lengths fall evenly from all
``--tokens`` down so that ``--padding`` of the positions are padding (TRL pads to the longest completion). A step is
``compute_loss`` + ``backward`` on that batch (the policy's log-probs and logged entropy, as TRL computes them).

Per step, "head" is the time inside ``grpo_mel.chunked_linear`` (the forward: chunks, f, the kept last chunk) plus
the time inside its autograd Function's backward (the recompute and the dX / dW GEMMs); "step" is the whole
``compute_loss`` + ``backward``. The two variants, "skip" (the patch as shipped: padded rows never reach the head)
and "all rows" (``_logps._real_rows`` forced to None: every position goes through the head, as before), alternate
within each run, the order flipping from run to run, after one warm-up step each; medians and min-max over
``--runs``. Run it on an idle machine::

    python benchmarks/bench_padding.py --padding 0.5 0 --runs 7 --md benchmarks/results/padding_cpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import grpo_mel  # noqa: E402
from grpo_mel import linear as _linear  # noqa: E402
from grpo_mel import testing as gt  # noqa: E402
from grpo_mel.integrations import _logps  # noqa: E402


class HeadClock:
    """Seconds spent in ``_logps.chunked_linear`` and in the chunked Function's backward while entered."""

    def __init__(self):
        self.seconds = 0.0

    @contextlib.contextmanager
    def running(self):
        real_call, real_backward = _logps.chunked_linear, _linear.ChunkedLinear.backward

        def call(*a, **k):
            t0 = time.perf_counter()
            try:
                return real_call(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0

        def backward(ctx, *grads):  # looked up on the class when autograd runs it
            t0 = time.perf_counter()
            try:
                return real_backward(ctx, *grads)
            finally:
                self.seconds += time.perf_counter() - t0

        _logps.chunked_linear, _linear.ChunkedLinear.backward = call, staticmethod(backward)
        try:
            yield self
        finally:
            _logps.chunked_linear, _linear.ChunkedLinear.backward = real_call, staticmethod(real_backward)


@contextlib.contextmanager
def every_row():
    """The patch without the padding skip: every completion position goes through the head."""
    real = _logps._real_rows
    _logps._real_rows = lambda *a, **k: None
    try:
        yield
    finally:
        _logps._real_rows = real


def build_trainer(args, out_dir):
    import trl
    from datasets import Dataset

    tok = gt.tiny_tokenizer(1024)
    model = gt.tiny_llama(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, tokenizer=tok)
    fields = {f for f in trl.GRPOConfig.__dataclass_fields__}
    kw = dict(output_dir=out_dir, per_device_train_batch_size=args.completions, num_generations=args.completions,
              max_completion_length=4, learning_rate=1e-4, report_to="none", use_cpu=True, save_strategy="no",
              beta=0.0, temperature=1.0, logging_steps=1, max_prompt_length=16, shuffle_dataset=False)
    config = trl.GRPOConfig(**{k: v for k, v in kw.items() if k in fields})
    prompts = Dataset.from_list([{"prompt": "12+34="} for _ in range(args.completions)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.GRPOTrainer(model=model, reward_funcs=[lambda completions, **_: [float(len(c)) for c in
                                                                                      completions]],
                                  args=config, train_dataset=prompts, processing_class=tok)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def ragged_inputs(trainer, args, padding: float):
    """A prepared batch: ``--completions`` completions of ``--tokens`` positions, lengths falling evenly from all of
    them to ``1 - 2 * padding`` of them (at least 1), so that ``padding`` of the positions are padding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inputs = trainer._generate_and_score_completions([dict(trainer.train_dataset[0])] * args.completions)
    B, K = args.completions, args.tokens
    g = torch.Generator().manual_seed(0)
    frac = 1 - 2 * padding * torch.arange(B) / max(B - 1, 1)
    lengths = (frac * K).round().long().clamp(1, K)
    mask = (torch.arange(K) < lengths[:, None]).to(inputs["completion_mask"].dtype)
    ids = torch.randint(5, 1000, (B, K), generator=g).masked_fill(mask == 0, trainer.processing_class.pad_token_id)
    inputs["completion_ids"], inputs["completion_mask"] = ids, mask
    inputs["advantages"] = torch.randn(B, generator=g)
    for k in ("old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps", "importance_sampling_ratio"):
        if isinstance(inputs.get(k), torch.Tensor) and inputs[k].dim() == 2:
            inputs[k] = None
    if "num_items_in_batch" in inputs:
        inputs["num_items_in_batch"] = mask.sum()
    return inputs


def step(trainer, inputs, clock: HeadClock) -> tuple[float, float]:
    model = trainer.model
    model.zero_grad(set_to_none=True)
    clock.seconds = 0.0
    t0 = time.perf_counter()
    with clock.running():
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
    return time.perf_counter() - t0, clock.seconds


def _stats(xs):
    return statistics.median(xs), min(xs), max(xs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--padding", type=float, nargs="+", default=[0.5], help="share(s) of padded positions, 0 - 0.5")
    p.add_argument("--completions", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256, help="completion positions per row (the longest completion)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=None, help="default: planned (grpo_mel's default budget)")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import tempfile

    import trl

    cmd = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    lines = [f"Command: `{cmd}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads), "
             f"torch {torch.__version__}, TRL {trl.__version__}, fp32, head trained; H={args.hidden}, V={args.vocab}, "
             f"{args.completions} completions x {args.tokens} positions, {args.runs} runs (medians, min-max)",
             "",
             "| padded share | variant | rows through the head | head s (median, min-max) | step s (median, min-max) "
             "| head vs all rows |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = build_trainer(args, out_dir)
        grpo_mel.patch_grpo(chunk_size=args.chunk_size, override_fused_head=True)
        clock = HeadClock()
        for padding in args.padding:
            inputs = ragged_inputs(trainer, args, padding)
            real = int(inputs["completion_mask"].sum())
            share = 1 - real / inputs["completion_mask"].numel()
            variants = {"skip": contextlib.nullcontext, "all rows": every_row}
            times = {v: ([], []) for v in variants}
            for name, ctx in variants.items():  # warm-up
                with ctx():
                    step(trainer, inputs, clock)
            for r in range(args.runs):
                order = list(variants) if r % 2 == 0 else list(variants)[::-1]
                for name in order:
                    with variants[name]():
                        total, head = step(trainer, inputs, clock)
                    times[name][0].append(head)
                    times[name][1].append(total)
            base = statistics.median(times["all rows"][0])
            for name in variants:
                head, total = _stats(times[name][0]), _stats(times[name][1])
                rows = real if name == "skip" and share > 0 else inputs["completion_mask"].numel()
                row = (f"| {share:.2f} | {name} | {rows} | {head[0]:.3f} ({head[1]:.3f}-{head[2]:.3f}) | "
                       f"{total[0]:.3f} ({total[1]:.3f}-{total[2]:.3f}) | {head[0] / base:.2f}x |")
                lines.append(row)
                print(row, flush=True)
        grpo_mel.unpatch_grpo()
    if args.md:
        os.makedirs(os.path.dirname(args.md) or ".", exist_ok=True)
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
