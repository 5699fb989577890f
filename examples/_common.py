"""Shared helpers of the examples: models built locally, 4-bit loading, run comparison, plots.

Not a public API; the examples import it from their own directory.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import importlib.util
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

TINY = "tiny"
LLAMA_1B_RANDOM = "llama-1b-random"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quiet() -> None:
    """Less noise from transformers / datasets / warnings in the examples' output: only errors are shown.

    Besides the Python loggers: torch's profiler (``--cpu-measure torch``) has kineto print two ``USDT:`` lines per
    profiled step unless its log level is above them (read when the profiler first starts, so setting it here is in
    time); DeepSpeed, when installed (the ``dev`` extra), warns that it falls back to the CPU unless told so."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # kineto's levels run 0 (verbose) .. 5 (USDT): none of them
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed would pick, without its warning
    warnings.filterwarnings("ignore")
    for name in ("transformers", "datasets", "trl", "accelerate", "peft", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers
        import datasets

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.utils.logging.disable_progress_bar()
        datasets.utils.logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


def set_threads(n: int | None, model: str) -> None:
    """``--threads``: torch's intra-op CPU threads. None: 1 for the tiny default model on CPU (its matmuls are
    so small that one thread is fastest; on a busy 2-core machine two OpenMP threads were measured to wait
    ~30 ms per [16, 64] x [64, 2048] matmul at the thread barrier), torch's default otherwise."""
    if n is None and model == TINY and not torch.cuda.is_available():
        n = 1
    if n is not None:
        torch.set_num_threads(max(1, n))


def release_memory() -> None:
    """Free what a finished run left: Python garbage, the CUDA cache, and glibc's retained heap (so the
    next run's RSS does not start above where it would in a fresh process)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --------------------------------------------------------------------------------------------------
# argument types: a bad number is an argparse error naming the option and the value
# --------------------------------------------------------------------------------------------------

def int_at_least(lo: int):
    """An argparse ``type``: an integer >= ``lo``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}")
        return value

    return parse


def finite_float(lo: float | None = None, strict: bool = True):
    """An argparse ``type``: a finite float, above ``lo`` (``strict``) or at least ``lo``."""
    bound = "" if lo is None else f" {'>' if strict else '>='} {lo:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a finite number{bound}, got {text!r}") from None
        if not math.isfinite(value) or (lo is not None and (value <= lo if strict else value < lo)):
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text!r}")
        return value

    return parse


# --------------------------------------------------------------------------------------------------
# optional pieces, checked when the arguments are parsed (before any model is built)
# --------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def fail(parser, msg: str) -> NoReturn:
    """Stop before any work: one line on stderr, exit status 2 (argparse's status for bad arguments)."""
    parser.exit(2, f"{parser.prog}: error: {msg}\n")


def require_module(parser, what: str, module: str, extra: str) -> None:
    """``what`` (e.g. ``"--plot"``) needs ``module``: fail with the install command if it is not installed."""
    if importlib.util.find_spec(module) is None:
        fail(parser, f'{what} needs {module}, which is not installed: pip install "grpo_mel[{extra}]"')


def require_bf16(parser, what: str) -> None:
    """bfloat16 runs on the CPU (torch's CPU autocast) and on CUDA GPUs with bf16 support; transformers
    refuses ``bf16=True`` on a GPU without it (after the model is built), so refuse it here first."""
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        fail(parser, f"{what}: this GPU ({torch.cuda.get_device_name()}) has no bfloat16 support, which "
                     "transformers requires for bf16 training; run in float32")


def require_model(parser, name: str) -> None:
    """``--model``: a built-in name, a local model directory (with config.json) or a hub id (org/name)."""
    if name in (TINY, LLAMA_1B_RANDOM):
        return
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            fail(parser, f"--model {name}: the directory has no config.json (not a saved transformers model)")
        return
    if not _HUB_ID.fullmatch(name):
        fail(parser, f"--model {name}: no such directory (give a local model directory, a hub id such as "
                     f"org/name, '{TINY}' or '{LLAMA_1B_RANDOM}')")


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------

@dataclass
class ModelSource:
    """Where the model comes from; ``load()`` returns a fresh, identical copy every call."""

    name: str
    dtype: torch.dtype = torch.float32
    load_in_4bit: bool = False
    tiny_vocab: int = 2048
    tiny_hidden: int = 64
    tiny_layers: int = 2
    seed: int = 0
    tokenizer: Any = None
    description: str = ""
    short: str = ""  # a few words, for a plot title
    _pristine: Any = None
    _tmpdir: Any = None
    _path: str | None = None
    _fingerprint: Any = None

    def prepare(self) -> "ModelSource":
        from grpo_mel.testing import tiny_llama, tiny_tokenizer

        t0 = time.perf_counter()
        if self.name in (TINY, LLAMA_1B_RANDOM):
            # tokenizers cannot reach 128256 ids from a small local corpus: the tokenizer has a few
            # thousand ids and the model keeps its full vocabulary (that is where the LM-head memory is).
            # Ids the tokenizer does not know decode to nothing (checked in check_decode).
            self.tokenizer = tiny_tokenizer(min(self.tiny_vocab, 4096))
            model_vocab = max(self.tiny_vocab, len(self.tokenizer)) if self.name == TINY else 128256
            if self.name == TINY:
                model = tiny_llama(vocab_size=model_vocab, hidden_size=self.tiny_hidden,
                                   num_layers=self.tiny_layers, seed=self.seed, tokenizer=self.tokenizer)
                model = model.to(self.dtype)
                self.description = (f"tiny Llama (random, vocab {model_vocab}, hidden {self.tiny_hidden}, "
                                    f"{self.tiny_layers} layers)")
                self.short = f"tiny Llama, vocab {model_vocab}"
            else:
                # 1.2B parameters: not kept as a pristine copy; rebuilt from the seed by every load()
                model = self._build_1b(torch.device("cpu")) if self.load_in_4bit else None
                self.description = (f"Llama-3.2-1B architecture, random weights (vocab 128256, "
                                    f"tokenizer {len(self.tokenizer)} ids)")
                self.short = "Llama-3.2-1B architecture, random weights"
            check_decode(self.tokenizer, model_vocab)
            if self.load_in_4bit:
                self._tmpdir = tempfile.TemporaryDirectory(prefix="grpo_mel_example_")
                model.save_pretrained(self._tmpdir.name)
                self.tokenizer.save_pretrained(self._tmpdir.name)
                self._path = self._tmpdir.name
                del model
            else:
                self._pristine = model
        else:
            from transformers import AutoTokenizer

            self._path = self.name
            self.tokenizer = AutoTokenizer.from_pretrained(self.name)
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.description = f"{self.name} (pretrained weights)"
            self.short = os.path.basename(os.path.normpath(self.name))
        self.prepare_s = time.perf_counter() - t0
        return self

    def _build_1b(self, dev: torch.device):
        """The Llama-3.2-1B architecture with seeded random weights, built directly on ``dev`` in ``dtype``;
        every build is checked to give the same weights as the first one."""
        from transformers import LlamaForCausalLM

        from grpo_mel.testing import llama_1b_config

        config = llama_1b_config(tokenizer=self.tokenizer)
        torch.manual_seed(self.seed)
        with torch.device(dev), _default_dtype(self.dtype):
            model = LlamaForCausalLM(config)
        model = model.to(self.dtype)
        fp = tuple(float(p.detach().float().flatten()[:4096].sum()) for p in list(model.parameters())[:6])
        if self._fingerprint is None:
            self._fingerprint = fp
        elif fp != self._fingerprint:
            raise RuntimeError("llama-1b-random: rebuilding from the seed gave different weights")
        return model

    def load(self):
        """A fresh model (same weights every call), on :func:`device`."""
        dev = device()
        if self._pristine is not None:
            return copy.deepcopy(self._pristine).to(dev)
        if self.name == LLAMA_1B_RANDOM and not self.load_in_4bit:
            return self._build_1b(dev)
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = dict(dtype=self.dtype)
        if self.load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=self.dtype,
            )
            kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
        model = AutoModelForCausalLM.from_pretrained(self._path, **kwargs)
        if not self.load_in_4bit:
            model = model.to(dev)
        return model

    def cleanup(self) -> None:
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def check_decode(tokenizer, model_vocab: int) -> None:
    """Make sure ids the model can emit but the tokenizer does not know decode without an error."""
    probe = [len(tokenizer), model_vocab - 1, 5]
    try:
        tokenizer.decode(probe, skip_special_tokens=True)
        tokenizer.batch_decode([probe], skip_special_tokens=True)
    except Exception as e:  # pragma: no cover - depends on the tokenizers version
        raise RuntimeError(
            f"the tokenizer ({len(tokenizer)} ids) cannot decode ids up to the model's vocab {model_vocab}: {e}"
        ) from e


def add_lora(model, seed: int, r: int = 32, alpha: int = 64, qlora: bool = False):
    """The seed notebook's LoRA: r=32, alpha=64, the 7 projection modules, no dropout, no bias."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import set_seed

    set_seed(seed)  # identical adapter initialisation in every run
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=LORA_TARGETS, lora_dropout=0.0, bias="none",
                     task_type=TaskType.CAUSAL_LM)
    model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    model.enable_input_require_grads()
    return model


def warmup(src: "ModelSource", lora: bool, seed: int) -> None:
    """One untimed forward/backward, so one-time costs (bitsandbytes' CPU kernels are compiled on first
    use, lazy imports, allocator growth) are not charged to whichever run comes first."""
    model = src.load()
    if lora:
        model = add_lora(model, seed=seed)
    ids = torch.randint(0, len(src.tokenizer), (1, 16), device=device())
    with torch.autocast(device().type, dtype=src.dtype, enabled=src.dtype != torch.float32):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    del model, loss
    release_memory()


def drop_printer(trainer) -> None:
    """Remove the Trainer's log printer (the examples print their own tables)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


# --------------------------------------------------------------------------------------------------
# runs and their comparison
# --------------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    label: str
    losses: list[float] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)  # other per-step logged values
    peaks: list[float] = field(default_factory=list)  # GiB per optimizer step
    peak_key: str = ""
    runtime_s: float = 0.0
    callback: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_peak(self) -> float:
        return max(self.peaks) if self.peaks else float("nan")


def collect(label: str, trainer, callback, runtime_s: float, metric_keys=()) -> RunResult:
    hist = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    res = RunResult(label=label, runtime_s=runtime_s, callback=callback, peak_key=callback.key or "")
    res.losses = [float(h["loss"]) for h in hist]
    for k in metric_keys:
        vals = [float(h[k]) for h in hist if k in h]
        if vals:
            res.metrics[k] = vals
    res.peaks = list(callback.values)
    res.extra["log_history"] = [dict(h) for h in trainer.state.log_history]
    return res


def max_abs_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not a:
        return float("inf")
    return max(abs(x - y) for x, y in zip(a, b))


def print_curves(runs: list[RunResult], key: str = "loss", title: bool = True) -> None:
    """``key`` per step for each run side by side, and for two runs their |Δ|; ``title=False``: the caller printed
    the heading. Values that are all near 0 (GRPO's loss) print in scientific notation, not as ``-0.000000``."""
    series = [r.losses if key == "loss" else r.metrics.get(key, []) for r in runs]
    n = max((len(s) for s in series), default=0)
    w = max(14, *(len(r.label) for r in runs))
    small = all(abs(x) < 1e-3 for s in series for x in s)
    fmt = ".3e" if small else ".6f"
    if title:
        print(f"\n{key} per step")
    print(f"{'step':>5} " + " ".join(f"{r.label:>{w}}" for r in runs) + (f" {'|Δ|':>{w}}" if len(runs) == 2 else ""))
    for i in range(n):
        cells = [f"{s[i]:>{w}{fmt}}" if i < len(s) else f"{'-':>{w}}" for s in series]
        d = ""
        if len(runs) == 2 and i < len(series[0]) and i < len(series[1]):
            d = f" {abs(series[0][i] - series[1][i]):>{w}.2e}"
        print(f"{i + 1:>5} " + " ".join(cells) + d)


def peak_key(cpu_measure: str) -> str:
    """The PeakMemoryCallback key a run on this machine logs (its ``device=None``: CUDA when there is one)."""
    if device().type == "cuda":
        return "peak_vram_gb"
    return "peak_cpu_alloc_gb" if cpu_measure == "torch" else "peak_rss_gb"


#: what each PeakMemoryCallback key measures, in words
MEASURES = {
    "peak_vram_gb": "CUDA allocator peak, torch.cuda.max_memory_allocated",
    "peak_rss_gb": "process peak RSS",
    "peak_cpu_alloc_gb": "torch CPU allocator peak above the step's start, via torch.profiler",
}


def measure(key: str) -> str:
    """``"peak_cpu_alloc_gb: torch CPU allocator peak ..."``: the key and what it measures."""
    return f"{key}: {MEASURES[key]}" if key in MEASURES else (key or "peak")


def peak_table(runs: list[RunResult]) -> str:
    """The runs' peaks per optimizer step (GiB, from each run's PeakMemoryCallback) side by side, each run's
    maximum and, for two runs, the ratio of their maxima."""
    key = runs[0].peak_key or "peak"
    per_run = [{s["step"]: s[r.peak_key] for s in r.callback.steps} for r in runs]
    col = max(12, *(len(r.label) for r in runs))
    head = f"{'step':>6} " + " ".join(f"{r.label:>{col}}" for r in runs)
    lines = [f"peak memory per optimizer step, GiB ({measure(key)})", head, "-" * len(head)]
    for st in sorted({st for p in per_run for st in p}):
        lines.append(f"{st:>6} " + " ".join(f"{p[st]:>{col}.4f}" if st in p else f"{'-':>{col}}" for p in per_run))
    maxes = [max(p.values()) if p else None for p in per_run]
    lines.append(f"{'max':>6} " + " ".join(f"{m:>{col}.4f}" if m is not None else f"{'-':>{col}}" for m in maxes))
    if len(runs) == 2 and all(maxes):
        lines.append(f"{runs[1].label} / {runs[0].label} max peak: {maxes[1] / maxes[0]:.3f}")
    return "\n".join(lines)


def print_memory(runs: list[RunResult]) -> None:
    if runs:
        print()
        print(peak_table(runs))


def plot_peaks(runs: list[RunResult], path: str, title: str) -> str:
    """Each run's peak memory per optimizer step, on a y-axis from 0 (so allocator or RSS noise of a few MB does
    not look like a spike), labelled in words; the measure goes under the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        ax.plot(range(1, len(r.peaks) + 1), r.peaks, marker="o", label=f"{r.label} (max {r.max_peak:.3f} GiB)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("peak memory per step, GiB")
    top = max((r.max_peak for r in runs if r.peaks), default=1.0)
    ax.set_ylim(0, top * 1.3 if top > 0 else 1.0)  # headroom above the highest curve for the legend
    ax.xaxis.get_major_locator().set_params(integer=True)
    key = runs[0].peak_key if runs else ""
    ax.set_title(title, fontsize=11)
    fig.text(0.5, 0.01, measure(key), ha="center", fontsize=8, color="0.35")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", ncol=len(runs), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fmt_gib(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f} GiB"
