"""Patch a transformers causal LM so its training loss never materialises the ``[B, T, V]`` logits.

``patch_causal_lm(model)`` replaces the forward of the causal LM inside ``model`` (the model itself, or
the base model of a PEFT wrapper, which calls it) by one that, when ``labels`` are passed:

1. runs the model's own forward with ``labels=None`` while the LM head is swapped for a stand-in that
   records the hidden states it receives and returns an empty ``[..., 0]`` tensor (so all model-specific
   code around the head still runs, but nothing of size ``V`` is allocated);
2. computes the loss from those hidden states and the LM head's weight (and bias) with
   :func:`grpo_mel.functions.linear_cross_entropy`: chunked, float32 upcast, recompute in backward;
3. returns the model's own output class (``CausalLMOutputWithPast`` ...) with ``loss`` set and
   ``logits=None``.

The loss is transformers' ``ForCausalLMLoss``: labels are shifted (``labels[..., 1:]``, the last
position ignored; a pre-shifted ``shift_labels`` kwarg is used as is), ``ignore_index`` (default -100)
positions are skipped (as in transformers, a loss is computed only when ``labels`` are passed), and the reduction is ``sum / num_items_in_batch`` when the Trainer passes
``num_items_in_batch`` (gradient accumulation), else the mean over non-ignored labels. Only rows with a
label are projected (prompt / padding rows cost nothing in the head).

Precision: the hidden states are cast to the LM head weight's dtype, and the chunked function runs under the
caller's autocast: under ``torch.autocast`` its GEMMs run in the autocast dtype, as the unpatched ``lm_head``'s
would, and its backward replays that autocast state for the recompute (:class:`grpo_mel.MemoryEfficientLinear`).
The cross-entropy itself is float32 in every case.

Models whose config has ``final_logit_softcapping`` (Gemma 2) or a logit scale (``_model.logit_transform``) get the same
transform inside the chunks. Without ``labels`` (generation, evaluation of logits), when TRL calls with
``fused_lm_head=...``, or when the head is not a plain floating-point ``nn.Linear`` (e.g. a LoRA-wrapped
``lm_head``), the original forward runs unchanged.

Works with PEFT (LoRA/QLoRA: patch before or after ``get_peft_model``; the base model is patched),
bitsandbytes 4-bit models (their ``lm_head`` stays a regular ``nn.Linear``) and tied embeddings (the
gradient flows to the shared weight through autograd).

Example::

    from grpo_mel import patch_causal_lm, unpatch_causal_lm
    patch_causal_lm(model, chunk_size=1024)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)   # out.logits is None
    out.loss.backward()
    unpatch_causal_lm(model)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from typing import Any

import torch
import torch.nn.functional as F
import transformers  # noqa: F401 - the `trl` extra (grpo_mel.__init__ names it when missing)
from torch import nn

from ..fused import linear_cross_entropy
from ._model import SavedForward, forward_replaced, logit_transform, unwrap_peft
from ._options import Options

__all__ = ["patch_causal_lm", "unpatch_causal_lm", "is_causal_lm_patched", "causal_lm_loss"]

_STATE_ATTR = "_grpo_mel_causal_lm"


@dataclasses.dataclass
class _PatchState:
    options: Options
    previous_forward: SavedForward  # the instance attribute ``forward`` before patching, if any
    wrapper: Any = None
    active: bool = True


# --------------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------------

def causal_lm_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    memory_budget: float | None = None,
    compile: bool | None = None,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on ``hidden_states·weightᵀ + bias`` without the full logits.

    ``hidden_states`` ``[B, T, H]`` (or ``[T, H]``), ``labels`` ``[B, T]`` (shifted here) or
    ``shift_labels`` (already shifted). Returns a float32 scalar: ``Σ CE / num_items_in_batch`` when
    given, else the mean over non-ignored positions (NaN when there are none, like ``F.cross_entropy``).
    Autocast / dtype handling as described in the module docstring; ``compile`` as
    :func:`grpo_mel.chunked_linear`'s.
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("pass labels or shift_labels")
        labels = labels.to(hidden_states.device)
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden_states.device)
    if tuple(shift_labels.shape) != tuple(hidden_states.shape[:-1]):
        raise ValueError(
            f"labels of shape {tuple(shift_labels.shape)} do not match the hidden states "
            f"{tuple(hidden_states.shape)} the LM head received (logits_to_keep must be 0 with labels)"
        )

    # under autocast the chunked function's GEMMs run in the autocast dtype, as the unpatched ``lm_head``'s would,
    # and its backward replays the autocast state: only X has to match the weight's dtype
    hidden_states = hidden_states.to(weight.dtype)
    if bias is not None and bias.dtype != weight.dtype:
        bias = bias.to(weight.dtype)

    # project only the rows that have a label
    mask = shift_labels != ignore_index
    X = hidden_states[mask]
    y = shift_labels[mask]
    total = linear_cross_entropy(X, weight, y, bias=bias, reduction="sum", ignore_index=ignore_index,
                                 chunk_size=chunk_size, memory_budget=memory_budget, softcap=softcap,
                                 logit_scale=logit_scale, compile=compile)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / mask.sum()


# --------------------------------------------------------------------------------------------------
# patching
# --------------------------------------------------------------------------------------------------

def _causal_lm(model: nn.Module) -> nn.Module:
    model = unwrap_peft(model)
    if not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"{type(model).__name__} is not a transformers causal LM (no get_output_embeddings())")
    return model


def _plain_head(lm_head) -> bool:
    return (
        isinstance(lm_head, nn.Linear)
        and not any(True for _ in lm_head.children())
        and isinstance(lm_head.weight, torch.Tensor)
        and lm_head.weight.is_floating_point()
        and type(lm_head.weight) in (torch.Tensor, nn.Parameter)
    )


class _CaptureHead:
    """Records the hidden states the LM head receives; its stand-in forward returns an empty ``[..., 0]`` tensor."""

    def __init__(self):
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        self.hidden = hidden_states
        return hidden_states.new_empty(*hidden_states.shape[:-1], 0)


def patch_causal_lm(model: nn.Module, options: Options | None = None, **kwargs) -> nn.Module:
    """Compute ``model``'s training loss through the chunked LM head (see the module docstring).

    Args:
        model: a transformers ``*ForCausalLM`` (bitsandbytes-quantized or not) or a PEFT model wrapping one.
        options: an :class:`~grpo_mel.integrations.Options` (None: the defaults); ``override_fused_head`` has no
            use here (a call with TRL's ``fused_lm_head`` always runs the model's own forward) and must stay None.
        **kwargs: the options as keywords, on top of ``options``: ``chunk_size`` (rows per chunk of the LM head;
            None plans it from ``memory_budget``), ``memory_budget`` (bytes for one chunk's working set, see
            :mod:`grpo_mel.planning`), ``compile`` (the cross-entropy chunk through ``torch.compile``; see
            :class:`~grpo_mel.integrations.Options`).

    Returns ``model`` (patched in place). Patching again updates the chunking settings.
    """
    options = Options.of(options, **kwargs)
    if options.override_fused_head is not None:
        raise ValueError(f"patch_causal_lm has no use for override_fused_head (a call with TRL's fused_lm_head "
                         f"runs the model's own forward), got {options.override_fused_head!r}")
    target = _causal_lm(model)
    state: _PatchState | None = target.__dict__.get(_STATE_ATTR)
    if state is not None and state.wrapper is not None:
        state.options, state.active = options, True
        return model

    state = _PatchState(options, SavedForward(target))
    original = target.forward  # bound: the class forward, or whatever wrapper was installed on the instance
    cls_forward = type(target).forward
    sig = inspect.signature(cls_forward)

    @functools.wraps(cls_forward)  # keep the signature: generate() validates model kwargs against it
    def forward(self, *args, **kwargs):
        if args:
            # positional arguments after input_ids (labels is 6th in most models): bind them by name
            try:
                bound = sig.bind_partial(self, *args, **kwargs)
                kwargs = {k: v for k, v in bound.arguments.items() if k != "self"}
                var_kw = [p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD]
                if var_kw and var_kw[0] in kwargs:
                    kwargs.update(kwargs.pop(var_kw[0]))
                args = ()
            except TypeError:
                return original(*args, **kwargs)
        # like the models' own forwards: a loss only when labels are passed (shift_labels, if also passed,
        # are then used instead of shifting labels)
        if not state.active or kwargs.get("labels") is None or "fused_lm_head" in kwargs:
            return original(*args, **kwargs)
        lm_head = self.get_output_embeddings()
        if not _plain_head(lm_head):
            return original(*args, **kwargs)

        kwargs = dict(kwargs)
        labels = kwargs.pop("labels", None)
        shift_labels = kwargs.pop("shift_labels", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        ignore_index = kwargs.pop("ignore_index", -100)
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)

        cap = _CaptureHead()
        with forward_replaced(lm_head, cap.forward):
            out = original(**kwargs)  # labels=None: the model computes no loss, the head returns [..., 0]
        if cap.hidden is None:
            raise RuntimeError(f"{type(self).__name__}.forward did not call its LM head; cannot patch its loss")
        softcap, logit_scale = logit_transform(self.config)
        loss = causal_lm_loss(
            cap.hidden, lm_head.weight, labels, bias=lm_head.bias, num_items_in_batch=num_items_in_batch,
            ignore_index=ignore_index, shift_labels=shift_labels, softcap=softcap, logit_scale=logit_scale,
            chunk_size=state.options.chunk_size, memory_budget=state.options.memory_budget,
            compile=state.options.compile,
        )
        aux = getattr(out, "aux_loss", None)
        if aux is not None and getattr(self, "router_aux_loss_coef", None) is not None:
            loss = loss + self.router_aux_loss_coef * aux.to(loss.device)
        out = _with_loss(out, loss)
        if not return_dict:
            return out.to_tuple()
        return out

    state.wrapper = types.MethodType(forward, target)
    target.forward = state.wrapper
    setattr(target, _STATE_ATTR, state)
    return model


def _with_loss(out, loss):
    if dataclasses.is_dataclass(out):
        values = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        values.update(loss=loss, logits=None)
        return type(out)(**values)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast(loss=loss, logits=None)


def unpatch_causal_lm(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_causal_lm` (a no-op on an unpatched model). Returns ``model``.

    If something wrapped the patched forward afterwards (e.g. a trainer), that wrapper is kept and the
    patch is only deactivated: the wrapped forward then runs the original loss.
    """
    target = _causal_lm(model)
    state: _PatchState | None = target.__dict__.get(_STATE_ATTR)
    if state is None:
        return model
    state.active = False
    if target.__dict__.get("forward") is state.wrapper:
        state.previous_forward.restore()
        delattr(target, _STATE_ATTR)
    return model


def is_causal_lm_patched(model: nn.Module) -> bool:
    """Whether ``model``'s loss currently goes through the chunked head."""
    state = _causal_lm(model).__dict__.get(_STATE_ATTR)
    return bool(state is not None and state.active)
