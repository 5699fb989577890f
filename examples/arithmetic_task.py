"""A reward task made locally: arithmetic prompts, two reward functions, and a small BPE tokenizer trained on
the same kind of text. Used by the examples and the tests; nothing is downloaded.

The reward functions have TRL's signature (``completions`` plus the dataset's columns as keyword arguments), so
TRL's CLI can load them by name with this directory on ``PYTHONPATH``: ``--reward_funcs
arithmetic_task.format_reward``.
"""

from __future__ import annotations

import random


def arithmetic_prompts(n: int, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """``n`` rows ``{"prompt": "12+7=", "answer": "19"}`` from a seeded generator."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice("+-")
        rows.append({"prompt": f"{a}{op}{b}=", "answer": str(a + b if op == "+" else a - b)})
    return rows


def arithmetic_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's first whitespace-separated token is the right answer, else 0.0."""
    out = []
    for c, a in zip(completions, answer):
        text = c if isinstance(c, str) else c[-1]["content"]
        words = text.strip().split()
        out.append(1.0 if words and words[0] == a else 0.0)
    return out


def format_reward(completions, **kwargs) -> list[float]:
    """A graded reward that varies even for random models: the share of digit/sign characters (0..1)."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[-1]["content"]
        text = text.strip()
        out.append(sum(ch.isdigit() or ch in "+-= " for ch in text) / max(len(text), 1))
    return out


def _corpus(n_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "sum", "of", "and", "is", "answer", "minus", "plus", "equals", "number", "question"]
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        # random letter strings give BPE enough distinct merges to reach vocabularies of a few thousand
        junk = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 6))) for _ in range(4)]
        lines.append(f"{a}+{b}={a + b} {a}-{b}={a - b} " + " ".join(rng.choices(words, k=6) + junk))
    return lines


def tiny_tokenizer(vocab_size: int = 1024, seed: int = 0):
    """A ``PreTrainedTokenizerFast`` (BPE, byte-level) trained on generated text, with bos/eos/pad tokens.

    ``len(tok)`` is at most ``vocab_size`` (BPE may learn fewer merges than asked on a small corpus);
    build models with ``vocab_size=len(tok)`` or larger.
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
