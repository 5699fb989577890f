"""Gradient parity of the patched GRPOTrainer against unpatched TRL, on one trainer and the same inputs.

For each configuration: generate (same seed) unpatched and patched -> identical completion ids, the old-policy and
reference log-probs and advantages match; then ``compute_loss`` + backward on the same prepared inputs -> the loss
and every trainable parameter's gradient match at fp32 tolerance (rtol 1e-5, atol 1e-6). chunk_size=7 so the
1024-way vocabulary head runs over several chunks with an uneven (first) one.
"""

from __future__ import annotations

import pytest
import torch

import grpo_mel
from grpo_mel.integrations import _logps, _trl_compat

from .conftest import CHUNK, build_trainer, check_parity, make_model, make_trainer

pytestmark = pytest.mark.trl

CASES = {
    "untied-grpo-beta0": dict(),
    "tied-drgrpo-beta-T07-iter2": dict(tied=True, beta=0.04, temperature=0.7, loss_type="dr_grpo", num_iterations=2),
    # a random model's entropies all sit ~1e-4 below log(V): sharpen the head so the entropy quantile mask is not
    # decided by 1e-6 rounding differences (ties), which would make any two correct implementations disagree
    "untied-dapo-topentropy": dict(loss_type="dapo", top_entropy_quantile=0.5, temperature=1.3, head_scale=40.0),
    "untied-bnpo-beta": dict(loss_type="bnpo", beta=0.04),
    "gemma2-softcap-T07-beta": dict(kind="gemma2", temperature=0.7, beta=0.04),
    "lora-beta-iter2": dict(lora=True, beta=0.04, num_iterations=2, temperature=0.9),
    "entropy-bonus": dict(entropy_coef=0.05, temperature=0.8),
    "cast-lm-head-fp32-tied": dict(tied=True, cast_lm_head_to_fp32=True, beta=0.04),
    # prompts of 4, 6 and 8 tokens in one batch: TRL left-pads them, so the rows that predict completion tokens sit
    # behind padding of different widths (every other case has equal-length prompts)
    "ragged-prompts-beta-iter2": dict(ragged_prompts=True, beta=0.04, num_iterations=2, temperature=0.9),
}


def _method(trainer):
    f = _trl_compat.detect()
    return f, getattr(trainer, f.method_name)


@pytest.mark.parametrize("case", list(CASES))
def test_grpo_gradient_parity(tmp_path, case):
    trainer = build_trainer(tmp_path, CASES[case])
    inputs = check_parity(trainer, n_prompts=3 if CASES[case].get("ragged_prompts") else 2)
    if CASES[case].get("ragged_prompts"):  # the case is only worth its name if the prompts were padded
        lengths = inputs["prompt_mask"].sum(1)
        assert lengths.min() < lengths.max(), lengths
    # the method's own outputs, entropies included, on the same inputs
    f, _ = _method(trainer)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    K = inputs["completion_ids"].size(1)
    kw = {} if f.returns == "tensor" else {"compute_entropy": True}
    with torch.no_grad():
        want = getattr(trainer, f.method_name)(trainer.model, ids, am, K, **kw)
        with grpo_mel.grpo_patched(chunk_size=CHUNK):
            got = getattr(trainer, f.method_name)(trainer.model, ids, am, K, **kw)
    if f.returns == "tensor":
        want, got = (want,), (got,)
    assert type(want) is type(got) and len(want) == len(got)
    for a, b in zip(want, got):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape
            # the sharpened head (head_scale=40) has logits in the hundreds: fp32 logsumexp rounding is ~1e-5 there
            torch.testing.assert_close(b.float(), a.float(), rtol=1e-5, atol=1e-5)


def test_qlora_4bit_parity(tmp_path):
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = tmp_path / "fp"
    make_model().save_pretrained(path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
    import transformers
    from packaging.version import Version

    # transformers < 4.56 names it torch_dtype (and would silently default a 4-bit model to float16)
    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, **{dtype_kw: torch.float32})
    except Exception as e:  # pragma: no cover - bitsandbytes without CPU 4-bit
        pytest.skip(f"4-bit loading unavailable on this CPU stack: {e}")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert model.lm_head.weight.dtype == torch.float32
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = make_trainer(tmp_path, model=model, peft_config=cfg, beta=0.04, temperature=0.7)
    # bitsandbytes' CPU 4-bit path rounds an intermediate to bf16: with 1 torch thread, the ~1e-7 difference in
    # the head's chunked summation order flipped one bf16 ulp in 2 of 128 LoRA-gradient elements (3e-5 absolute,
    # 4e-4 relative L2, every other gradient bit-identical). The loss and log-probs are still compared tightly.
    check_parity(trainer, grad_tol=dict(rtol=1e-2, atol=1e-4))


def test_parity_fails_when_the_patch_is_wrong(tmp_path, monkeypatch):
    """Sanity: the parity check catches a wrong temperature (so it is not vacuous)."""
    trainer = build_trainer(tmp_path, dict(temperature=0.7, beta=0.04))
    monkeypatch.setattr(trainer, "temperature", 0.7)
    real = _logps._score

    def wrong_temperature(tr, flavour, call, *a):
        tr.temperature = 0.71
        try:
            return real(tr, flavour, call, *a)
        finally:
            tr.temperature = 0.7

    monkeypatch.setattr(_logps, "_score", wrong_temperature)
    with pytest.raises(AssertionError):
        check_parity(trainer)
