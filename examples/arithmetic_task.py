"""A reward task made locally: arithmetic prompts and two reward functions. Used by the examples and the tests;
nothing is downloaded. The small BPE tokenizer they train with is :func:`grpo_mel.testing.tiny_tokenizer`
(re-exported here for older imports).

The reward functions have TRL's signature (``completions`` plus the dataset's columns as keyword arguments), so
TRL's CLI can load them by name with this directory on ``PYTHONPATH``: ``--reward_funcs
arithmetic_task.format_reward``.
"""

from __future__ import annotations

import random

from grpo_mel.testing import tiny_tokenizer  # noqa: F401 - moved to the package; re-exported for older imports


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
