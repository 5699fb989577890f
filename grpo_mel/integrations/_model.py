"""What the integrations need to know about a transformers causal LM: the model under a PEFT wrapper, its LM
head module, what its own forward does to the head's output (logit scale, final softcap), and how to put a module's
instance ``forward`` back as it was after replacing it."""

from __future__ import annotations

import contextlib

from torch import nn

_MISSING = object()


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional: without it nothing can be a PeftModel
        return False
    return isinstance(model, PeftModel)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model that owns the LM head: ``PeftModel -> LoraModel -> model``; anything else as is."""
    for _ in range(4):  # PeftModel, tuner, model: a few levels at most
        if callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
        elif type(model).__name__.endswith("Model") and hasattr(model, "model") and hasattr(model, "peft_config"):
            inner = model.model  # a bare peft tuner (LoraModel)
        else:
            return model
        if inner is model:
            return model
        model = inner
    return model


def head_module(head: nn.Module) -> nn.Module:
    """The module whose ``forward`` computes the head. FSDP1 (and activation checkpointing) wrap it in another
    module; FSDP2, DeepSpeed ZeRO-3 and DDP hook it in place or leave it alone."""
    while True:
        inner = getattr(head, "_fsdp_wrapped_module", None) or getattr(head, "_checkpoint_wrapped_module", None)
        if inner is None:
            return head
        head = inner


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


class SavedForward:
    """A module's instance attribute ``forward`` as it was (or its absence, so the class's forward shows again),
    to put back with :meth:`restore` after replacing it: the TRL patch's forward redirection, the causal-LM patch and
    its stand-in head all replace ``forward`` on the instance."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.saved = vars(module).get("forward", _MISSING)

    def restore(self) -> None:
        if self.saved is _MISSING:
            vars(self.module).pop("forward", None)
        else:
            self.module.forward = self.saved


@contextlib.contextmanager
def forward_replaced(module: nn.Module, forward):
    """``module.forward`` is ``forward`` for the block, then as it was."""
    saved = SavedForward(module)
    module.forward = forward
    try:
        yield
    finally:
        saved.restore()
