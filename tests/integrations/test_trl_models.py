"""Gradient parity of the patched GRPOTrainer on more model families: Qwen2 / Qwen3 with tied embeddings, Granite
(logits divided by ``logits_scaling``) and Cohere (logits times ``logit_scale``), and the MoE models Mixtral,
Qwen2-MoE and Qwen3-MoE with their load-balancing loss (``router_aux_loss_coef > 0``; router logits requested by
TRL, and by the config).

Same check as test_trl_parity.py (same inputs, unpatched vs patched: loss and every gradient at rtol 1e-5 /
atol 1e-6), on left-padded prompts, plus what makes each family different: the head really is tied, the scale
really is not 1 (a patch that drops it fails), the aux loss really is part of TRL's loss (non-zero; TRL >= 1.7)
and the routers get gradient.
"""

from __future__ import annotations

import re

import pytest
import torch

import grpo_mel
from grpo_mel import testing as gt
from grpo_mel.integrations import _trl_compat

from .conftest import CHUNK, assert_grads_close, check_parity, loss_and_grads, make_trainer, tokenizer

pytestmark = pytest.mark.trl

DENSE = {"qwen2-tied": gt.tiny_qwen2, "qwen3-tied": gt.tiny_qwen3, "granite": gt.tiny_granite,
         "cohere": gt.tiny_cohere}
SCALED = {"granite": "logits_scaling", "cohere": "logit_scale"}  # the config field the forward applies
MOE = {"mixtral": gt.tiny_mixtral, "qwen2_moe": gt.tiny_qwen2_moe, "qwen3_moe": gt.tiny_qwen3_moe}
AUX_COEF = 0.1
ROUTER = re.compile(r"\.gate\.weight$|\.shared_expert_gate\.weight$")  # not gate_proj / gate_up_proj


def _model(builder, **kw):
    tok = tokenizer()
    try:
        return builder(vocab_size=max(1024, len(tok)), tokenizer=tok, **kw)
    except ImportError as e:  # the installed transformers lacks this model class
        import transformers

        pytest.skip(f"transformers {transformers.__version__} has no {builder.__name__} model class: {e}")


def _ragged_prompts(trainer):
    """Prompts of different token lengths, so the batch is left-padded: the attention mask has zeros that the
    log-probs and the aux loss must skip (the default arithmetic prompts all tokenize to 4 tokens)."""
    from datasets import Dataset

    rows = [{"prompt": "3+4=", "answer": "7"}, {"prompt": "the sum of 12 and 13 is 12+13=", "answer": "25"}]
    trainer.train_dataset = Dataset.from_list(rows)
    return trainer


def _has_aux_loss() -> bool:
    """TRL >= 1.7: the log-prob method takes compute_aux_loss and _compute_loss adds coef * aux to the loss."""
    return _trl_compat.detect().returns == "triple"


@pytest.mark.parametrize("family", list(DENSE))
def test_dense_family_parity(tmp_path, family):
    model = _model(DENSE[family])
    trainer = _ragged_prompts(make_trainer(tmp_path, model=model, beta=0.04, temperature=0.7))
    lm = trainer.model
    if family.endswith("-tied"):  # still tied after TRL loaded it from disk
        assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    if family in SCALED:  # 4x sharper logits: a patch that drops the scale fails
        assert abs(getattr(lm.config, SCALED[family]) - 1.0) > 0.5, "the scale would not be tested"
    inputs = check_parity(trainer)
    assert (inputs["prompt_mask"] == 0).any(), "no padding in the batch"


def _router_grads(grads: dict) -> dict:
    return {n: g for n, g in grads.items() if ROUTER.search(n)}


@pytest.mark.parametrize("family", list(MOE))
def test_moe_parity_with_aux_loss(tmp_path, family):
    # output_router_logits=False in the config while TRL generates: with True, the model's forward computes its aux
    # loss at every cached generate() step, where the gate logits cover the new tokens but the attention mask the
    # whole sequence -> RuntimeError in load_balancing_loss_func (transformers 4.53 / 4.57 always, 5.23 on a padded
    # batch; unpatched TRL alike). TRL >= 1.7 asks its scoring forward for router logits itself; the losses are
    # compared again below with the config flag on.
    model = _model(MOE[family], router_aux_loss_coef=AUX_COEF, output_router_logits=False)
    # beta > 0 and num_iterations=2: the reference and old-policy log-probs go through the MoE backbone too
    trainer = _ragged_prompts(make_trainer(tmp_path, model=model, beta=0.04, temperature=0.9, num_iterations=2))
    lm = trainer.model
    inputs = check_parity(trainer)
    assert (inputs["prompt_mask"] == 0).any(), "no padding: the aux loss's attention mask would not be tested"
    if _has_aux_loss():
        assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == AUX_COEF
    else:  # TRL < 1.7 reads only the logits: the aux loss is never part of its GRPO loss
        assert not getattr(trainer, "aux_loss_enabled", False)

    # the aux loss as the model's own forward computes it (the independent reference)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    model_aux = lm(input_ids=ids, attention_mask=am, output_router_logits=True).aux_loss.detach()
    assert model_aux > 0.5, "the load-balancing loss would not be tested"  # ~top_k for near-uniform routing

    def both_losses():
        ref = loss_and_grads(trainer, inputs)
        with grpo_mel.grpo_patched(chunk_size=CHUNK):
            return ref, loss_and_grads(trainer, inputs)

    with pytest.MonkeyPatch.context() as mp:
        # the config flag on: the model's forward returns its aux loss on every pin (TRL < 1.7 still leaves it out)
        mp.setattr(lm.config, "output_router_logits", True)
        (ref_loss, ref_grads), (new_loss, new_grads) = both_losses()
        if _has_aux_loss():  # the patched method's third output is the model's aux loss
            K = inputs["completion_ids"].size(1)
            with grpo_mel.grpo_patched(chunk_size=CHUNK):
                _, _, aux = trainer._get_per_token_logps_and_entropies(lm, ids, am, K, compute_aux_loss=True)
            torch.testing.assert_close(aux.detach(), model_aux, rtol=1e-5, atol=1e-6)
            mp.setattr(trainer, "aux_loss_enabled", False)
        else:
            mp.setattr(lm.config, "output_router_logits", False)
        (policy_loss, _), (new_policy_loss, _) = both_losses()
    # the loss is the policy loss + coef * aux (TRL >= 1.7) or the policy loss alone (TRL < 1.7), patched alike
    want_aux = AUX_COEF * model_aux if _has_aux_loss() else torch.zeros(())
    torch.testing.assert_close(ref_loss - policy_loss, want_aux, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new_loss - new_policy_loss, want_aux, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new_loss, ref_loss, rtol=1e-5, atol=1e-6)

    # every gradient matches with the config flag on too; every router (and Qwen2-MoE's shared-expert gate) has one
    assert_grads_close(ref_grads, new_grads)
    routers = _router_grads(ref_grads)
    assert len(routers) >= lm.config.num_hidden_layers, sorted(routers)
    for n, g in routers.items():
        assert g is not None and g.abs().max() > 0, f"router {n} has no gradient"
