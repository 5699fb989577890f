"""grpo_mel: memory-efficient LM-head math for GRPO (TRL) and beyond.

Math (no trainer imports): :class:`MemoryEfficientLinear`, :func:`chunked_linear`, the transformation
functions in :mod:`grpo_mel.functions`, chunk planning in :mod:`grpo_mel.planning`, peak-memory
measurement in :mod:`grpo_mel.memory`; these need torch alone. Integrations (imported lazily, they need the
``trl`` extra: ``pip install 'grpo_mel[trl]'``): :func:`patch_grpo` / :func:`unpatch_grpo` and friends in
:mod:`grpo_mel.integrations`.
"""

from .functions import (
    cross_entropy,
    kl_to_reference,
    mse_onehot,
    token_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
    z_loss,
)
from .fused import linear_cross_entropy, linear_token_logprobs
from .linear import chunked_linear, output_needs_grad
from .seed import MemoryEfficientLinear
from .memory import PeakMemory, peak_memory
from .planning import plan_chunk_size

__version__ = "0.1.0"

_LAZY = {
    "patch_grpo": "grpo_mel.integrations.trl_grpo",
    "unpatch_grpo": "grpo_mel.integrations.trl_grpo",
    "grpo_patched": "grpo_mel.integrations.trl_grpo",
    "patch_rloo": "grpo_mel.integrations.trl_rloo",
    "unpatch_rloo": "grpo_mel.integrations.trl_rloo",
    "rloo_patched": "grpo_mel.integrations.trl_rloo",
    "patch_trl": "grpo_mel.integrations",
    "unpatch_trl": "grpo_mel.integrations",
    "is_patched": "grpo_mel.integrations",
    "patch_causal_lm": "grpo_mel.integrations.causal_lm",
    "unpatch_causal_lm": "grpo_mel.integrations.causal_lm",
    "PeakMemoryCallback": "grpo_mel.integrations.callbacks",
}


_TRL_EXTRA = ("trl", "transformers", "peft", "accelerate", "datasets")


def __getattr__(name):
    if name in _LAZY:
        import importlib

        try:
            module = importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in _TRL_EXTRA:
                raise
            raise ModuleNotFoundError(f"grpo_mel.{name} needs {e.name}, which the core does not install: "
                                      "pip install 'grpo_mel[trl]'", name=e.name) from e
        return getattr(module, name)
    raise AttributeError(f"module 'grpo_mel' has no attribute {name!r}")


__all__ = [
    "MemoryEfficientLinear",
    "chunked_linear",
    "output_needs_grad",
    "plan_chunk_size",
    "PeakMemory",
    "peak_memory",
    "cross_entropy",
    "token_logprobs",
    "token_entropy",
    "token_logprobs_and_entropy",
    "mse_onehot",
    "kl_to_reference",
    "z_loss",
    "linear_cross_entropy",
    "linear_token_logprobs",
    *_LAZY,
]
