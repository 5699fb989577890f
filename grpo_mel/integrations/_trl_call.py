"""A call of TRL's log-prob method, as the patch sees it before computing anything: its arguments named as TRL's
signature names them (:func:`bind_call`), and the model it targets resolved down to the causal LM's backbone and
LM head (:func:`resolve_target`). Either says why, in words, where the chunked head cannot compute the call; the
replacement (:mod:`grpo_mel.integrations._logps`) then runs TRL's own method with a one-time warning."""

from __future__ import annotations

import dataclasses
import inspect

import torch

from ._model import head_module, is_peft, unwrap_peft
from ._trl_compat import TRLFlavour

_MM_KWARGS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids", "pixel_position_ids",
)

# the arguments grpo_mel computes with; any other argument must be at its default (or the call goes to TRL)
_UNDERSTOOD = frozenset(("self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size",
                         "compute_entropy", "compute_aux_loss", *_MM_KWARGS))


def bind_call(flavour: TRLFlavour, trainer, args: tuple, kwargs: dict) -> tuple[dict | None, str | None]:
    """Name the call's arguments as TRL's method does: ``inspect.signature(method).bind``, then (TRL 1.14) bind
    that again to the method its ``*args, **kwargs`` are forwarded to. Returns ``(arguments, None)``, or
    ``(None, why)`` where the call does not bind or carries an argument grpo_mel does not handle."""
    method = f"{type(trainer).__name__}.{flavour.method_name}"
    first, *forwarded = flavour.signatures
    try:
        bound = first.bind(trainer, *args, **kwargs)
        for sig in forwarded:
            bound = sig.bind(*bound.args, **bound.kwargs)
    except TypeError as e:
        return None, f"the call does not bind to TRL's {method} ({e})"
    bound.apply_defaults()
    params = bound.signature.parameters
    odd = []
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            odd += [f"{len(value)} unnamed positional"] if value else []
        elif kind is inspect.Parameter.VAR_KEYWORD:
            odd += sorted(value)
        elif name not in _UNDERSTOOD and value is not params[name].default:
            odd.append(name)
        # a default left at its value is a call without it: nothing to handle
    if odd:
        return None, f"{method} got arguments grpo_mel does not handle ({', '.join(odd)})"
    return {"batch_size": None, "compute_entropy": False, "compute_aux_loss": False, **bound.arguments}, None


@dataclasses.dataclass(frozen=True)
class Target:
    """The model of one call, resolved once: what the trainer passed, its engine-free module, the causal LM
    (under any PEFT wrapper), that LM's backbone and its LM head module (as the engine left it)."""

    model: torch.nn.Module
    unwrapped: torch.nn.Module
    lm: torch.nn.Module
    backbone: torch.nn.Module
    head: torch.nn.Module


def _unwrap(trainer, model):
    acc = getattr(trainer, "accelerator", None)
    return model if acc is None else acc.unwrap_model(model)


def resolve_target(trainer, call: dict) -> tuple[Target | None, str | None]:
    """``(target, None)``, or ``(None, why)`` where the chunked head cannot compute this call."""
    if any(call.get(k) is not None for k in _MM_KWARGS):
        return None, "vision-language / multimodal inputs (pixel_values etc.) are not handled by the chunked LM head"
    model = call["model"]
    unwrapped = _unwrap(trainer, model)
    if is_peft(unwrapped):
        cfg = getattr(unwrapped, "active_peft_config", None)
        if cfg is not None and getattr(cfg, "is_prompt_learning", False):
            return None, "prompt-learning PEFT (virtual tokens) is not handled by the chunked LM head"
    lm = unwrap_peft(unwrapped)
    config = getattr(lm, "config", None)
    if config is None or not hasattr(lm, "get_output_embeddings"):
        return None, f"{type(lm).__name__} is not a transformers causal LM"
    if hasattr(config, "get_text_config") and config.get_text_config() is not config:
        return None, f"{type(lm).__name__} is a vision-language model"
    head = lm.get_output_embeddings()
    inner = head_module(head) if head is not None else None
    if inner is None or not isinstance(getattr(inner, "weight", None), torch.Tensor):
        return None, f"{type(lm).__name__} has no plain LM head weight"
    if type(inner).__module__.startswith("peft"):
        return None, "the LM head carries a PEFT adapter (e.g. LoRA on lm_head or modules_to_save)"
    if getattr(inner.weight, "quant_state", None) is not None or not inner.weight.is_floating_point():
        return None, "the LM head weight is quantized"
    hooks = _output_hooks(inner)
    if hooks:
        return None, (f"the LM head has forward hook(s) {', '.join(hooks)} that expect its logits (the chunked head "
                      "returns per-token log-probs and never forms them)")
    prefix = getattr(lm, "base_model_prefix", "")
    backbone = getattr(lm, prefix, None) if prefix else None
    if backbone is None or backbone is lm:
        return None, f"{type(lm).__name__} exposes no backbone (base_model_prefix={prefix!r})"
    return Target(model, unwrapped, lm, backbone, head), None


_ENGINE_HOOK_MODULES = ("torch.distributed", "deepspeed", "accelerate")


def _output_hooks(module) -> list[str]:
    """Forward (output) hooks on ``module`` other than the engines' own (FSDP2, DeepSpeed, accelerate), which only
    reshard/release parameters and register backward hooks on whatever the call returns."""
    names = []
    for hook in list(module._forward_hooks.values()):
        fn = getattr(hook, "func", hook)  # functools.partial
        if not getattr(fn, "__module__", "").startswith(_ENGINE_HOOK_MODULES):
            names.append(getattr(fn, "__qualname__", repr(fn)))
    return names
