"""Small transformers models built locally, for tests, examples and benchmarks (needs the ``trl`` extra's
transformers; nothing in grpo_mel's core imports it).

Nothing here downloads anything: models are built from configs with random weights (seeded), and
:func:`tiny_tokenizer` trains a small byte-level BPE tokenizer on generated text, so a first GRPO run needs no
network::

    from grpo_mel.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()                                  # len(tok) <= 1024
    model = tiny_llama(vocab_size=len(tok), tokenizer=tok)  # bos / eos / pad ids from the tokenizer
    save_tiny_llama("model")                                # or both saved as a local model directory

``llama_1b_config()`` is the Llama-3.2-1B architecture (for memory measurements without the real weights). The
reward task the tests and examples train on is ``examples/arithmetic_task.py``.
"""

from __future__ import annotations

import torch

__all__ = [
    "tiny_tokenizer",
    "save_tiny_llama",
    "tiny_llama",
    "tiny_gemma2",
    "tiny_qwen2",
    "tiny_qwen3",
    "tiny_granite",
    "tiny_cohere",
    "tiny_mixtral",
    "tiny_qwen2_moe",
    "tiny_qwen3_moe",
    "llama_1b_config",
]


def tiny_tokenizer(vocab_size: int = 1024, seed: int = 0):
    """A ``PreTrainedTokenizerFast`` (byte-level BPE) trained on generated text (sums, differences, words and random
    letter strings), with ``<pad>`` / ``<s>`` / ``</s>`` / ``<unk>`` tokens, left padding and a minimal chat template.

    ``len(tok)`` is at most ``vocab_size`` (BPE may learn fewer merges than asked on a small corpus); build models
    with ``vocab_size=len(tok)`` or larger. Deterministic for a given ``vocab_size`` and ``seed``; a few seconds.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(4000, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.padding_side = "left"
    # A minimal chat template, for code paths that format conversations.
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return fast


def _corpus(n_lines: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    words = ["the", "sum", "of", "and", "is", "answer", "minus", "plus", "equals", "number", "question"]
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        # random letter strings give BPE enough distinct merges to reach vocabularies of a few thousand
        junk = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 6))) for _ in range(4)]
        lines.append(f"{a}+{b}={a + b} {a}-{b}={a - b} " + " ".join(rng.choices(words, k=6) + junk))
    return lines


def save_tiny_llama(path: str, vocab_size: int = 1024, seed: int = 0) -> str:
    """:func:`tiny_llama` and its :func:`tiny_tokenizer` saved to ``path`` (``save_pretrained``): a local model
    directory that ``from_pretrained(path)``, ``trl grpo --model_name_or_path path`` and ``grpo-mel`` load offline.
    Returns ``path``."""
    tok = tiny_tokenizer(vocab_size, seed=seed)
    tiny_llama(vocab_size=len(tok), seed=seed, tokenizer=tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_llama(
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer=None,
):
    """A ``LlamaForCausalLM`` with random (seeded) weights. Token ids come from ``tokenizer`` if given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**_dense_kw(vocab_size, hidden_size, num_layers, tie_word_embeddings, tokenizer))
    return _build(LlamaForCausalLM, config, seed, dtype)


def tiny_gemma2(vocab_size: int = 1024, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                dtype: torch.dtype = torch.float32, tokenizer=None, final_logit_softcapping: float = 5.0):
    """A ``Gemma2ForCausalLM`` (tied embeddings, ``final_logit_softcapping``) with random weights."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(head_dim=16, final_logit_softcapping=final_logit_softcapping, attn_implementation="eager",
                          **_dense_kw(vocab_size, hidden_size, num_layers, True, tokenizer))
    return _build(Gemma2ForCausalLM, config, seed, dtype)


def _dense_kw(vocab_size, hidden_size, num_layers, tie_word_embeddings, tokenizer) -> dict:
    """The config fields the tiny decoder-only builders share (4 query / 2 key-value heads)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        **_token_ids(tokenizer),
    )


def tiny_qwen2(vocab_size: int = 1024, hidden_size: int = 64, num_layers: int = 2, tie_word_embeddings: bool = True,
               seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer=None):
    """A ``Qwen2ForCausalLM`` (q/k/v biases; tied embeddings by default, as the small Qwen2.5 models)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**_dense_kw(vocab_size, hidden_size, num_layers, tie_word_embeddings, tokenizer))
    return _build(Qwen2ForCausalLM, config, seed, dtype)


def tiny_qwen3(vocab_size: int = 1024, hidden_size: int = 64, num_layers: int = 2, tie_word_embeddings: bool = True,
               seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer=None):
    """A ``Qwen3ForCausalLM`` (q/k RMSNorm; tied embeddings by default, as the small Qwen3 models)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(head_dim=hidden_size // 4,
                         **_dense_kw(vocab_size, hidden_size, num_layers, tie_word_embeddings, tokenizer))
    return _build(Qwen3ForCausalLM, config, seed, dtype)


def tiny_granite(vocab_size: int = 1024, hidden_size: int = 64, num_layers: int = 2, logits_scaling: float = 0.25,
                 tie_word_embeddings: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32,
                 tokenizer=None):
    """A ``GraniteForCausalLM``: its forward divides the logits by ``logits_scaling`` (here 4x sharper)."""
    from transformers import GraniteConfig, GraniteForCausalLM

    config = GraniteConfig(logits_scaling=logits_scaling, embedding_multiplier=2.0, residual_multiplier=0.5,
                           attention_multiplier=0.25,
                           **_dense_kw(vocab_size, hidden_size, num_layers, tie_word_embeddings, tokenizer))
    return _build(GraniteForCausalLM, config, seed, dtype)


def tiny_cohere(vocab_size: int = 1024, hidden_size: int = 64, num_layers: int = 2, logit_scale: float = 4.0,
                tie_word_embeddings: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer=None):
    """A ``CohereForCausalLM``: its forward multiplies the logits by ``logit_scale``; tied embeddings."""
    from transformers import CohereConfig, CohereForCausalLM

    config = CohereConfig(logit_scale=logit_scale,
                          **_dense_kw(vocab_size, hidden_size, num_layers, tie_word_embeddings, tokenizer))
    return _build(CohereForCausalLM, config, seed, dtype)


def _qwen_moe_kw(hidden_size, num_experts, top_k, router_aux_loss_coef, output_router_logits) -> dict:
    """The MoE fields of the Qwen MoE configs."""
    return dict(num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=hidden_size,
                decoder_sparse_step=1, output_router_logits=output_router_logits,
                router_aux_loss_coef=router_aux_loss_coef)


def tiny_mixtral(vocab_size: int = 1024, hidden_size: int = 64, num_layers: int = 2, num_experts: int = 4,
                 top_k: int = 2, router_aux_loss_coef: float = 0.1, output_router_logits: bool = False,
                 seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer=None):
    """A ``MixtralForCausalLM``: top-``top_k`` of ``num_experts`` experts in every layer.

    TRL >= 1.7 adds the load-balancing loss times ``router_aux_loss_coef`` to the GRPO loss (asking the forward for
    router logits itself). ``output_router_logits`` (also for the Qwen MoE builders) stays False for GRPOTrainer:
    with True, ``generate()`` fails in transformers' ``load_balancing_loss_func`` (4.x always, 5.x on padded
    batches; the cached step's router logits do not match the attention mask)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    # router_jitter_noise=0: no random router noise in train mode, so two forwards route alike
    config = MixtralConfig(num_local_experts=num_experts, num_experts_per_tok=top_k, router_jitter_noise=0.0,
                           output_router_logits=output_router_logits, router_aux_loss_coef=router_aux_loss_coef,
                           **_dense_kw(vocab_size, hidden_size, num_layers, False, tokenizer))
    return _build(MixtralForCausalLM, config, seed, dtype)


def tiny_qwen2_moe(vocab_size: int = 1024, hidden_size: int = 64, num_layers: int = 2, num_experts: int = 4,
                   top_k: int = 2, router_aux_loss_coef: float = 0.1, output_router_logits: bool = False,
                   seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer=None):
    """A ``Qwen2MoeForCausalLM``: routed experts (un-normalised top-k weights) plus the sigmoid-gated shared expert."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(shared_expert_intermediate_size=hidden_size * 2, norm_topk_prob=False,
                            **_qwen_moe_kw(hidden_size, num_experts, top_k, router_aux_loss_coef, output_router_logits),
                            **_dense_kw(vocab_size, hidden_size, num_layers, False, tokenizer))
    return _build(Qwen2MoeForCausalLM, config, seed, dtype)


def tiny_qwen3_moe(vocab_size: int = 1024, hidden_size: int = 64, num_layers: int = 2, num_experts: int = 4,
                   top_k: int = 2, router_aux_loss_coef: float = 0.1, output_router_logits: bool = False,
                   seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer=None):
    """A ``Qwen3MoeForCausalLM``: routed experts with normalised top-k weights, q/k RMSNorm."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(head_dim=hidden_size // 4, norm_topk_prob=True,
                            **_qwen_moe_kw(hidden_size, num_experts, top_k, router_aux_loss_coef, output_router_logits),
                            **_dense_kw(vocab_size, hidden_size, num_layers, False, tokenizer))
    return _build(Qwen3MoeForCausalLM, config, seed, dtype)


def llama_1b_config(tokenizer=None, vocab_size: int = 128256):
    """The Llama-3.2-1B architecture: hidden 2048, 16 layers, 32/8 heads, vocab 128256, tied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        **_token_ids(tokenizer),
    )


def _token_ids(tokenizer) -> dict:
    if tokenizer is None:
        return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _build(cls, config, seed, dtype):
    torch.manual_seed(seed)
    model = cls(config)
    return model.to(dtype)
