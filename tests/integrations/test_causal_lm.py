"""patch_causal_lm: loss and gradients equal to the unpatched model's (transformers' ForCausalLMLoss on the
full logits), for tied / untied heads, ignored labels, num_items_in_batch, LoRA, 4-bit QLoRA, autocast,
softcapping; generation unchanged; unpatch restores the model."""

from __future__ import annotations

import inspect

import pytest
import torch

import grpo_mel
from grpo_mel.integrations import causal_lm
from grpo_mel.integrations.causal_lm import causal_lm_loss, is_causal_lm_patched, unpatch_causal_lm
from grpo_mel.testing import tiny_gemma2, tiny_llama

from .conftest import count_calls

V = 301  # not a multiple of anything


def _batch(vocab=V, b=3, t=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a "prompt"
    labels[2, -3:] = -100  # padding
    labels[1, 5] = -100  # a hole
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _loss_grads(model, params, **inputs):
    out = model(**inputs)
    return out, torch.autograd.grad(out.loss, params)


def _assert_grads(got, ref):
    assert len(got) == len(ref) and len(ref) > 0
    for a, b in zip(got, ref):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_loss_and_grads_match_unpatched(tied, chunk_size):
    model = tiny_llama(vocab_size=V, tie_word_embeddings=tied)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = _batch()
    ref, ref_g = _loss_grads(model, params, **batch)
    assert ref.logits is not None

    grpo_mel.patch_causal_lm(model, chunk_size=chunk_size)
    assert is_causal_lm_patched(model)
    out, g = _loss_grads(model, params, **batch)
    assert out.logits is None
    assert type(out) is type(ref)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    _assert_grads(g, ref_g)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_wrong_head_would_be_caught():
    """The comparison above can fail: a perturbed LM head changes loss and gradients beyond tolerance."""
    model = tiny_llama(vocab_size=V)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = _batch()
    ref, ref_g = _loss_grads(model, params, **batch)
    grpo_mel.patch_causal_lm(model, chunk_size=4)
    with torch.no_grad():
        model.lm_head.weight[7] += 1e-3
    out, g = _loss_grads(model, params, **batch)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-7)
        _assert_grads(g, ref_g)


def test_num_items_in_batch_and_shift_labels():
    model = tiny_llama(vocab_size=V)
    batch = _batch()
    n = torch.tensor(17)  # the batch has 23 non-ignored shifted labels
    ref = model(**batch, num_items_in_batch=n).loss
    shifted = torch.roll(batch["labels"], 1, dims=1)  # pre-shifted labels (as under context parallelism)
    ref_shift = model(**batch, shift_labels=shifted).loss
    grpo_mel.patch_causal_lm(model, chunk_size=5)
    got = model(**batch, num_items_in_batch=n).loss
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # sum / num_items, not a mean: differs from the plain mean
    assert abs(float(got.detach()) - float(model(**batch).loss.detach())) > 1e-3
    got_shift = model(**batch, shift_labels=shifted).loss
    torch.testing.assert_close(got_shift, ref_shift, rtol=1e-6, atol=1e-6)
    assert abs(float(got_shift.detach()) - float(got.detach())) > 1e-3  # shift_labels were used, not labels


def test_all_labels_ignored_is_nan_like_transformers():
    model = tiny_llama(vocab_size=V)
    ids = torch.randint(0, V, (2, 6))
    labels = torch.full_like(ids, -100)
    ref = model(input_ids=ids, labels=labels).loss
    grpo_mel.patch_causal_lm(model)
    got = model(input_ids=ids, labels=labels).loss
    assert torch.isnan(ref) and torch.isnan(got)


def test_generation_and_no_label_forward_unchanged():
    model = tiny_llama(vocab_size=V)
    ids = torch.randint(3, V, (2, 5))
    ref_logits = model(input_ids=ids).logits
    ref_gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    sig = inspect.signature(model.forward)
    grpo_mel.patch_causal_lm(model, chunk_size=3)
    assert inspect.signature(model.forward) == sig  # generate() validates kwargs against it
    torch.testing.assert_close(model(input_ids=ids).logits, ref_logits)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), ref_gen)


def test_positional_labels_return_dict_false_and_unpatch():
    model = tiny_llama(vocab_size=V)
    batch = _batch()
    ref = model(**batch).loss
    grpo_mel.patch_causal_lm(model, chunk_size=4)
    assert "forward" in model.__dict__
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    torch.testing.assert_close(model(ids, mask, None, None, None, labels).loss, ref)
    tup = model(**batch, return_dict=False)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], ref)
    # patching twice only updates the settings
    grpo_mel.patch_causal_lm(model, chunk_size=2)
    torch.testing.assert_close(model(**batch).loss, ref)
    unpatch_causal_lm(model)
    assert "forward" not in model.__dict__ and not is_causal_lm_patched(model)
    out = model(**batch)
    assert out.logits is not None
    unpatch_causal_lm(model)  # no-op


def test_under_trl_fused_head_wrapper():
    """TRL >= 1.15 trainers wrap model.forward with add_fused_lm_head: calls without fused_lm_head reach us."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    if not hasattr(trl_utils, "add_fused_lm_head"):
        pytest.skip("this TRL has no add_fused_lm_head")
    model = tiny_llama(vocab_size=V)
    batch = _batch()
    ref = model(**batch).loss
    grpo_mel.patch_causal_lm(model, chunk_size=4)
    trl_utils.add_fused_lm_head(model)
    with count_calls(causal_lm, "causal_lm_loss") as chunked:
        out = model(**batch)
        assert chunked["n"] == 1 and out.logits is None
        torch.testing.assert_close(out.loss, ref)
        fused = model(**batch, fused_lm_head=True)  # TRL's own path still works
        assert chunked["n"] == 1 and fused.log_probs is not None
    unpatch_causal_lm(model)  # wrapped by TRL: deactivated, TRL's wrapper kept
    assert not is_causal_lm_patched(model)
    assert model(**batch).logits is not None


def test_lora_wrapped_model():
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    model = tiny_llama(vocab_size=V, tie_word_embeddings=True)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                          task_type=peft.TaskType.CAUSAL_LM)
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # non-zero B so that A gets gradients too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora" in n for n, p in model.named_parameters() if p.requires_grad)
    batch = _batch()
    ref, ref_g = _loss_grads(model, params, **batch)
    grpo_mel.patch_causal_lm(model, chunk_size=4)
    assert is_causal_lm_patched(model) and "forward" in model.get_base_model().__dict__
    out, g = _loss_grads(model, params, **batch)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    _assert_grads(g, ref_g)
    unpatch_causal_lm(model)
    assert "forward" not in model.get_base_model().__dict__


def test_qlora_4bit_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(vocab_size=V, tie_word_embeddings=False).save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q, device_map={"": "cpu"})
    except RuntimeError as e:  # transformers < 4.52 (TRL 0.16.1's pin) refuses bitsandbytes 4-bit on the CPU
        pytest.skip(f"4-bit loading unavailable on this CPU stack: {str(e)[:120]}")
    assert type(model.lm_head) is torch.nn.Linear
    assert "4bit" in type(model.model.layers[0].self_attn.q_proj).__name__
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"],
                          lora_dropout=0.0, task_type=peft.TaskType.CAUSAL_LM)
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = _batch()
    ref, ref_g = _loss_grads(model, params, **batch)
    grpo_mel.patch_causal_lm(model, chunk_size=4)
    out, g = _loss_grads(model, params, **batch)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    if model.lm_head.weight.dtype == torch.float32:
        _assert_grads(g, ref_g)
    else:  # transformers 4.53 / 4.57 load the head in fp16: its frozen head's gradients are formed in the forward,
        # as accurate as autograd's in fp16, not its roundings (tests/core/test_parity.py); TRL's bf16 tolerance
        for a, b in zip(g, ref_g):
            assert float((a - b).norm() / b.norm().clamp_min(1e-12)) < 3e-3


def test_autocast_bf16_cpu():
    """Under autocast the head runs in the autocast dtype like the unpatched lm_head: bf16-level agreement."""
    model = tiny_llama(vocab_size=V)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(**batch).loss
    ref_g = torch.autograd.grad(ref, params)
    grpo_mel.patch_causal_lm(model, chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch).loss
    g = torch.autograd.grad(out, params)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    for a, b in zip(g, ref_g):
        assert a.dtype == b.dtype
        rel = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)
        assert rel < 5e-2


def test_autocast_runs_the_head_in_bf16_forward_and_recompute():
    """causal_lm casts nothing by hand under autocast: the chunked function's GEMMs run in the autocast dtype, in
    the forward and in the backward's recompute (the core replays the autocast state), and the weight's gradient
    comes back float32, like the weight."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HeadGemms(TorchDispatchMode):  # dispatch-level: it sees the backward's recompute too
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.split(".")[0] in ("mm", "addmm") and out.shape[-1] == V:  # [c, V] logits
                self.dtypes.append(out.dtype)
            return out

    model = tiny_llama(vocab_size=V)
    grpo_mel.patch_causal_lm(model, chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16), HeadGemms() as fwd:
        loss = model(**_batch()).loss
    with HeadGemms() as bwd:
        (g,) = torch.autograd.grad(loss, [model.lm_head.weight])
    assert fwd.dtypes and set(fwd.dtypes) == {torch.bfloat16}
    assert bwd.dtypes and set(bwd.dtypes) == {torch.bfloat16}  # recomputed chunks: bf16 again, outside autocast
    assert loss.dtype == torch.float32 and g.dtype == torch.float32


def test_bf16_model_hidden_cast_to_head_dtype():
    model = tiny_llama(vocab_size=V, dtype=torch.bfloat16)
    batch = _batch()
    ref = model(**batch).loss
    grpo_mel.patch_causal_lm(model, chunk_size=4)
    out = model(**batch).loss
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_softcapped_model_gemma2():
    model = tiny_gemma2(vocab_size=V, final_logit_softcapping=5.0)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = _batch()
    ref, ref_g = _loss_grads(model, params, **batch)
    grpo_mel.patch_causal_lm(model, chunk_size=4)
    out, g = _loss_grads(model, params, **batch)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    _assert_grads(g, ref_g)


def test_causal_lm_loss_function_directly():
    torch.manual_seed(0)
    h = torch.randn(2, 7, 16, requires_grad=True)
    w = torch.randn(V, 16, requires_grad=True)
    labels = torch.randint(0, V, (2, 7))
    labels[0, 2] = -100
    logits = h @ w.t()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1),
                                            ignore_index=-100)
    got = causal_lm_loss(h, w, labels, chunk_size=3)
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError):
        causal_lm_loss(h[:, :3], w, labels)
    bad = labels.clone()
    bad[1, 4] = V  # one past the vocabulary: named, with or without a softcap (one code path for both)
    for softcap in (None, 30.0):
        with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\) or ignore_index=-100; found {V}"):
            causal_lm_loss(h, w, bad, softcap=softcap)


def test_options_object_and_override_fused_head():
    """patch_causal_lm takes the trainer patches' Options (or its fields as keywords); override_fused_head has no
    use here and is refused, naming the option and the value."""
    from grpo_mel.integrations import Options

    model = tiny_llama(vocab_size=V)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = _batch()
    ref, ref_g = _loss_grads(model, params, **batch)
    with count_calls(causal_lm, "linear_cross_entropy") as spy:
        grpo_mel.patch_causal_lm(model, Options(chunk_size=4))
        out, g = _loss_grads(model, params, **batch)
    assert spy["n"] == 1 and out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    _assert_grads(g, ref_g)
    unpatch_causal_lm(model)
    with pytest.raises(ValueError, match=r"patch_causal_lm has no use for override_fused_head .*got True"):
        grpo_mel.patch_causal_lm(model, override_fused_head=True)
    with pytest.raises(TypeError, match=r"override_fused_head must be True, False or None .*got 'false'"):
        grpo_mel.patch_causal_lm(model, Options(chunk_size=4), override_fused_head="false")
    with pytest.raises(TypeError, match=r"unknown option chunk"):
        grpo_mel.patch_causal_lm(model, chunk=4)
    assert not is_causal_lm_patched(model)


def test_rejects_non_causal_lm():
    with pytest.raises(TypeError):
        grpo_mel.patch_causal_lm(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError):
        grpo_mel.patch_causal_lm(tiny_llama(vocab_size=V), chunk_size=0)


@pytest.mark.parametrize("compile_chunk", [None, False, True])
def test_compile_option_reaches_the_chunked_loss(monkeypatch, compile_chunk):
    """``patch_causal_lm(compile=...)`` hands the option to the chunked cross-entropy (the call is spied on and run
    eagerly here: compiling it is tested in tests/core/test_compiled.py)."""
    seen, real = [], causal_lm.linear_cross_entropy

    def spy(*a, compile=None, **k):
        seen.append(compile)
        return real(*a, compile=False, **k)

    monkeypatch.setattr(causal_lm, "linear_cross_entropy", spy)
    model = tiny_llama(vocab_size=V)
    ref = model(**_batch()).loss
    grpo_mel.patch_causal_lm(model, chunk_size=4, compile=compile_chunk)
    torch.testing.assert_close(model(**_batch()).loss, ref, rtol=1e-6, atol=1e-6)
    assert seen == [compile_chunk]
    unpatch_causal_lm(model)
