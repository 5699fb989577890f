"""Helpers for the TRL GRPOTrainer integration tests: tiny local models, a real GRPOTrainer, parity utilities.

Everything is built locally (grpo_mel.testing): a BPE tokenizer trained on generated text (V = 1024), tiny
Llama / Gemma2 models with random seeded weights, arithmetic prompts and the graded ``format_reward`` (varies
even for a random model, so advantages and the loss are non-zero).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import warnings

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

trl = pytest.importorskip("trl")

from packaging.version import Version  # noqa: E402

import grpo_mel  # noqa: E402
from grpo_mel import testing as gt  # noqa: E402
from grpo_mel.integrations import _logps, reset_warnings  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "examples"))  # the local reward task (examples/arithmetic_task.py)
import arithmetic_task as task  # noqa: E402

TRL_VERSION = Version(trl.__version__)
CHUNK = 7  # several chunks, an uneven last one, for every test below


@pytest.fixture(autouse=True)
def _unpatched_and_unwarned():
    """Every test starts and ends with no trainer patched and every once-only warning unsaid."""
    grpo_mel.unpatch_trl()
    reset_warnings()
    yield
    grpo_mel.unpatch_trl()
    reset_warnings()


@functools.lru_cache(None)
def tokenizer(vocab_size: int = 1024):
    return gt.tiny_tokenizer(vocab_size)


def dataset(n: int = 8, seed: int = 0, ragged: bool = False):
    """``n`` arithmetic prompts, each 4 tokens; ``ragged``: prompt i gets ``i % 3`` extra ``+1`` terms (4, 6 or 8
    tokens), so a batch of prompts is left-padded as TRL pads it."""
    from datasets import Dataset

    rows = task.arithmetic_prompts(n, seed=seed)
    if ragged:
        for i, r in enumerate(rows):
            extra = i % 3
            r["prompt"] = r["prompt"][:-1] + "+1" * extra + "="
            r["answer"] = str(int(r["answer"]) + extra)
    return Dataset.from_list(rows)


def grpo_config(tmp_path, trainer: str = "grpo", **overrides):
    """A small, CPU, fp32 GRPOConfig (``trainer="rloo"``: RLOOConfig). A base setting the installed TRL does not
    know is dropped; a test's own option (``overrides``) it does not know skips the test, naming it, unless it is
    at the value that means "off" (``required`` below)."""
    config_cls = getattr(trl, f"{trainer.upper()}Config")
    kw = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=10,
        max_prompt_length=16,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        bf16=False,
        fp16=False,
        beta=0.0,
        loss_type="grpo",
        temperature=1.0,
        num_iterations=1,
        gradient_accumulation_steps=1,
        max_steps=2,
        dataloader_num_workers=0,
        disable_dropout=True,
        log_completions=False,
        shuffle_dataset=False,
    )
    kw.update(overrides)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    # options whose "off" value may be dropped where the installed TRL lacks the field; any other value skips
    required = {
        "top_entropy_quantile": 1.0, "cast_lm_head_to_fp32": False, "entropy_coef": 0.0, "loss_type": "grpo",
    }
    for k in list(kw):
        if k not in fields:
            neutral = k in required and kw[k] == required[k]
            if (k in overrides or k in required) and not neutral:
                pytest.skip(f"TRL {trl.__version__} has no {config_cls.__name__}.{k}")
            kw.pop(k)
    return config_cls(**kw)


def make_model(kind: str = "llama", tied: bool = False, vocab_size: int = 1024, hidden: int = 64):
    tok = tokenizer()
    V = max(vocab_size, len(tok))
    if kind == "llama":
        return gt.tiny_llama(vocab_size=V, hidden_size=hidden, tie_word_embeddings=tied, tokenizer=tok)
    if kind == "gemma2":
        return gt.tiny_gemma2(vocab_size=V, hidden_size=hidden, tokenizer=tok)
    raise ValueError(kind)


def make_trainer(tmp_path, model=None, peft_config=None, n_prompts: int = 8, trainer: str = "grpo",
                 ragged_prompts: bool = False, **cfg):
    """A GRPOTrainer (``trainer="rloo"``: an RLOOTrainer) on a tiny model, the local task and its reward
    (``ragged_prompts``: see :func:`dataset`)."""
    trainer_cls = getattr(trl, f"{trainer.upper()}Trainer")
    if model is None:
        model = make_model()
    if not isinstance(model, str) and peft_config is None:  # TRL builds the reference from the path: hand it one
        path = os.path.join(str(tmp_path), "model")
        model.save_pretrained(path)
        model = path
    args = grpo_config(tmp_path, trainer, **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(
            model=model,
            reward_funcs=[task.format_reward],
            args=args,
            train_dataset=dataset(n_prompts, ragged=ragged_prompts),
            processing_class=tokenizer(),
            peft_config=peft_config,
        )
    trainer.model.train()
    # set by Trainer.train(); compute_loss reads it on recent TRL
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    return trainer


def generation_batch(trainer, n_prompts: int = 1):
    """Rows as the RepeatSampler hands them: each prompt repeated num_generations times."""
    G = trainer.num_generations if hasattr(trainer, "num_generations") else trainer.args.num_generations
    ds = trainer.train_dataset
    return [dict(ds[i]) for i in range(n_prompts) for _ in range(G)]


def generate(trainer, batch, seed: int = 1234):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer._generate_and_score_completions(batch)


def trainable(trainer):
    return {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}


def loss_and_grads(trainer, inputs):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in trainable(trainer).items()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_grads_close(g_ref, g_new, rtol=1e-5, atol=1e-6):
    assert g_ref.keys() == g_new.keys()
    n_nonzero = 0
    for k in g_ref:
        a, b = g_ref[k], g_new[k]
        assert (a is None) == (b is None), k
        if a is None:
            continue
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m, k=k: f"grad of {k}: {m}")
        n_nonzero += int(a.abs().max() > 0)
    assert n_nonzero > 0, "all gradients are zero: the test would not detect anything"


def inputs_equal_keys(a: dict, b: dict, keys):
    for k in keys:
        if k in a or k in b:
            va, vb = a.get(k), b.get(k)
            if isinstance(va, torch.Tensor):
                torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"inputs[{k!r}]: {m}")
            else:
                assert va == vb, k


@contextlib.contextmanager
def recorded_completions(trainer):
    """Yields a list that gets the ``completion_ids`` of every generation round the trainer runs in the block."""
    seen = []
    gen = trainer._generate_and_score_completions

    def recording(*a, **k):
        out = gen(*a, **k)
        seen.append(out["completion_ids"].clone())
        return out

    trainer._generate_and_score_completions = recording
    try:
        yield seen
    finally:
        del trainer._generate_and_score_completions


@contextlib.contextmanager
def count_calls(obj, name):
    """Count calls of ``obj.name`` (a module attribute), passing through."""
    orig = getattr(obj, name)
    box = {"n": 0}

    @functools.wraps(orig)
    def spy(*a, **k):
        box["n"] += 1
        return orig(*a, **k)

    setattr(obj, name, spy)
    try:
        yield box
    finally:
        setattr(obj, name, orig)


def build_trainer(tmp_path, case: dict):
    """:func:`make_trainer` for one parity case: ``kind`` ("llama" / "gemma2"), ``tied``, ``lora`` (a LoRA policy),
    ``head_scale`` (the head's weight multiplied by it) and GRPOConfig overrides."""
    cfg = dict(case)
    kind, tied, lora = cfg.pop("kind", "llama"), cfg.pop("tied", False), cfg.pop("lora", False)
    head_scale = cfg.pop("head_scale", None)
    model = make_model(kind, tied=tied)
    if head_scale is not None:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(head_scale)
    peft_config = None
    if lora:
        peft = pytest.importorskip("peft")
        peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return make_trainer(tmp_path, model=model, peft_config=peft_config, **cfg)


def check_parity(trainer, n_prompts=2, grad_tol=None, patched=None):
    """Unpatched vs patched (``patched``: the patch's context manager, default grpo_mel.grpo_patched) on the same
    trainer: same generations, old/ref log-probs, loss and every gradient."""
    batch = generation_batch(trainer, n_prompts)
    ref_inputs = generate(trainer, batch)
    ref_loss, ref_grads = loss_and_grads(trainer, ref_inputs)
    with (patched or grpo_mel.grpo_patched)(chunk_size=CHUNK), count_calls(_logps, "chunked_linear") as spy:
        new_inputs = generate(trainer, batch)
        n_gen = spy["n"]
        new_loss, new_grads = loss_and_grads(trainer, new_inputs)
        assert spy["n"] > n_gen, "the patched path did not run for the policy"
    # generation is untouched and seeded: identical completions
    assert torch.equal(ref_inputs["completion_ids"], new_inputs["completion_ids"])
    adv = ref_inputs["advantages"]
    assert adv.abs().max() > 0, "rewards did not vary: the loss would not test anything"
    torch.testing.assert_close(new_inputs["advantages"], adv)
    for k in ("old_per_token_logps", "ref_per_token_logps"):
        a, b = ref_inputs.get(k), new_inputs.get(k)
        assert (a is None) == (b is None), k
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-6, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(new_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(ref_grads, new_grads, **(grad_tol or {}))
    return ref_inputs


# a step whose logits dominate its peak: a 32000-way head on a hidden size of 64, 2 prompts x 128 completion tokens
MEM_V, MEM_H, MEM_PROMPTS, MEM_COMPLETION = 32000, 64, 2, 128


def memory_step_inputs(trainer):
    """A prepared GRPO/RLOO batch of ``MEM_PROMPTS`` prompts with random ``MEM_COMPLETION``-token completions."""
    inputs = generate(trainer, generation_batch(trainer, MEM_PROMPTS))
    B = inputs["completion_ids"].size(0)
    g = torch.Generator().manual_seed(0)
    inputs["completion_ids"] = torch.randint(5, 1000, (B, MEM_COMPLETION), generator=g)
    inputs["completion_mask"] = torch.ones(B, MEM_COMPLETION, dtype=inputs["completion_mask"].dtype)
    for k in ("old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps", "importance_sampling_ratio"):
        if isinstance(inputs.get(k), torch.Tensor) and inputs[k].dim() == 2:
            inputs[k] = None
    if "num_items_in_batch" in inputs:
        inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    return inputs


needs_trl = pytest.mark.trl
