"""What a causal LM's own forward does to the LM head's output, read from its config."""

from __future__ import annotations


def logit_transform(config) -> tuple[float | None, float]:
    """(final softcap, logit scale) from the text config, as the models' forwards and TRL 1.16's
    ``add_fused_lm_head`` apply them: Gemma 2 ``final_logit_softcapping``; Cohere ``logit_scale``; Muse Glimmer
    ``output_multiplier``; Falcon-H1 ``lm_head_multiplier``; Granite / MiniCPM3 divide by ``logits_scaling``,
    HyperCLOVA X multiplies by it."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        ls = text_config.logits_scaling
        scale = ls if getattr(text_config, "model_type", "") == "hyperclovax" else 1 / ls
    return softcap, 1.0 if scale is None else float(scale)
