"""The log-prob method that :func:`grpo_mel.patch_grpo` / :func:`grpo_mel.patch_rloo` install on TRL's trainer.

:func:`make_replacement` wraps TRL's method (``_get_per_token_logps`` on TRL 0.16 - 0.19,
``_get_per_token_logps_and_entropies`` from 0.20; see :mod:`grpo_mel.integrations._trl_compat`) in one that

1. runs the model's backbone (through any DDP/FSDP/DeepSpeed wrapper's forward, by forward redirection) to the
   last hidden states, without calling the LM head;
2. keeps the hidden states that predict the completion tokens (``hidden[:, -K-1:-1]`` vs ``input_ids[:, -K:]``),
   and of those only the real ones: padded positions (completion mask 0) never reach the head and come back 0,
   which changes no loss, gradient or logged metric of the installed TRL (:func:`_real_rows` says why, per release);
3. computes the log-probs (and entropies) of the completion tokens with :func:`grpo_mel.chunked_linear` and the
   LM head's weight (and bias), applying the model's logit scale / final softcapping and TRL's temperature. This
   runs inside a call of the ``lm_head`` module itself (its ``forward`` redirected), so the hooks an engine put on
   that module run as in the unpatched forward: FSDP1/FSDP2 gather and reduce-scatter the head even when it is its
   own unit, DeepSpeed ZeRO-3 fetches and releases it. Backbone and head run under the trainer's autocast.

Signature and return type are those of the installed TRL's method, so every call site (policy, old policy,
reference model, PEFT reference with adapters disabled, eval) goes through it. Inputs it does not handle
(vision-language inputs, prompt-learning PEFT, a PEFT adapter on ``lm_head``; found by
:mod:`grpo_mel.integrations._trl_call`) fall back to TRL's own method with a one-time warning. Which head a call on TRL >= 1.15 uses (TRL's fused one or grpo_mel's) is
:func:`choose_head`'s decision, the one the patch summary reports.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from typing import Callable

import torch
import trl  # noqa: F401 - the `trl` extra (grpo_mel.__init__ names it when missing)

from ..functions import token_logprobs, token_logprobs_and_entropy
from ..linear import chunked_linear
from ._model import SavedForward, head_module, logit_transform
from ._options import Options
from ._registry import first_time
from ._summary import HeadChoice
from ._trl_call import Target, bind_call, resolve_target
from ._trl_compat import TRLFlavour

__all__ = ["make_replacement", "choose_head"]

_LOG = logging.getLogger("grpo_mel")


def _warn_once(key: str, msg: str, stacklevel: int = 3) -> None:
    if first_time(key):
        warnings.warn(f"grpo_mel: {msg}; falling back to TRL's own log-prob method.", stacklevel=stacklevel)


def make_replacement(original: Callable, flavour: TRLFlavour, options: Options) -> Callable:
    """TRL's log-prob method ``original`` (described by ``flavour``) computed through the chunked head with
    ``options``; same signature, same return type."""
    if flavour.unsettled is not None:  # said once, at patch time (stacklevel: patch_grpo's caller)
        _warn_once(flavour.unsettled, flavour.unsettled, stacklevel=6)

    @functools.wraps(original)
    def _grpo_mel_per_token_logps(self, *args, **kwargs):
        if flavour.unsettled is not None:
            return original(self, *args, **kwargs)
        call, reason = bind_call(flavour, self, args, kwargs)
        target = None
        if reason is None:
            target, reason = resolve_target(self, call)
        if reason is not None:
            _warn_once(reason, reason)
            return original(self, *args, **kwargs)
        if flavour.fused_head and not _ours_on(call["input_ids"].device, flavour, options, _trained(target)):
            return original(self, *args, **kwargs)
        return _compute(self, call, target, flavour, options)

    return _grpo_mel_per_token_logps


#: Where the GPU suite measured grpo_mel's head ahead of TRL's Triton fused head (less time at no higher peak), by
#: (device type, "trained" | "frozen" head): the measurement, named in the log line. Empty: the one GPU run so far
#: (an H200, TRL 1.16) measured a trained head only, and behind TRL's (docs/benchmarks.md, "GPU results"); the GPU
#: suite's head-1 / head-1-frozen rows are what an entry here must come from.
MEASURED_AHEAD: dict[tuple[str, str], str] = {}


def choose_head(flavour: TRLFlavour, options: Options, device: torch.device | str,
                trained: bool | None = None) -> HeadChoice:
    """The head a call on ``device`` uses (before any per-call fallback, such as a vision-language input): on TRL
    >= 1.15, where TRL runs its Triton kernel, TRL's fused head unless :data:`MEASURED_AHEAD` has grpo_mel's ahead
    for this head (``trained``: W gets a gradient; None: not known yet, as at patch time) or
    ``options.override_fused_head`` says otherwise; grpo_mel's everywhere else."""
    device = torch.device(device)
    if flavour.unsettled is not None:
        return HeadChoice(device.type, False, flavour.unsettled)
    if not flavour.fused_head:
        return HeadChoice(device.type, True, f"TRL {flavour.version} would form the full logits")
    if options.override_fused_head is not None:
        return HeadChoice(device.type, options.override_fused_head,
                          f"override_fused_head={options.override_fused_head}")
    if _trl_runs_triton(device):
        kind = _head_kind(trained)
        measured = MEASURED_AHEAD.get((device.type, kind))
        if measured:
            return HeadChoice(device.type, True, f"grpo_mel's head measured ahead of TRL's for a {kind} head: {measured}")
        return HeadChoice(device.type, False, "TRL's fused head runs its Triton kernel there"
                          + (f" (grpo_mel's not measured ahead of it for a {kind} head)" if kind else ""))
    return HeadChoice(device.type, True, "TRL's fused head would take its torch fallback there")


def _ours_on(device: torch.device, flavour: TRLFlavour, options: Options, trained: bool) -> bool:
    """On TRL >= 1.15, whether this call goes through grpo_mel's head rather than TRL's fused one; the default
    choice is logged once per device and kind of head, naming why (an explicit ``override_fused_head`` needs no
    explanation)."""
    choice = choose_head(flavour, options, device, trained)
    if options.override_fused_head is None and first_time(f"fused-head:{device.type}:{trained}:{choice.ours}"):
        if choice.ours:
            _LOG.info("grpo_mel: replacing TRL's fused LM head on %s: %s (docs/benchmarks.md); "
                      "patch_grpo(override_fused_head=False) keeps TRL's.", device.type, choice.why)
        else:
            _LOG.warning("grpo_mel: keeping TRL's fused LM head on %s: %s (docs/benchmarks.md, \"GPU results\"); "
                         "patch_grpo(override_fused_head=True) routes through grpo_mel instead.", device.type,
                         choice.why)
    return choice.ours


def _head_kind(trained: bool | None) -> str | None:
    """The key of :data:`MEASURED_AHEAD` for a head that is trained (W or b gets a gradient) or not; None: unknown."""
    return None if trained is None else ("trained" if trained else "frozen")


def _trained(target) -> bool:
    """Whether the call's LM head gets a gradient (W or b requires grad), as the frozen-head strategy decides it."""
    return any(p.requires_grad for p in target.head.parameters(recurse=False))


def _trl_runs_triton(device: torch.device) -> bool:
    """Whether the installed TRL's fused head would run its Triton kernel on ``device``, by TRL's own check."""
    try:
        from trl.kernels.chunked_logprob import _use_triton
    except ImportError:  # a TRL that moved it: the same rule as TRL 1.15 - 1.16's
        import importlib.util

        return device.type in ("cuda", "xpu") and importlib.util.find_spec("triton") is not None
    return bool(_use_triton(device))


try:  # TRL's own (in the 0.19.1, 1.14.2 and 1.16.0 pins)
    from trl.models.utils import _ForwardRedirection as _TRLForwardRedirection
except ImportError:  # a TRL without it (the 0.16.1 pin): the same rerouting, written here
    _TRLForwardRedirection = None


def _redirect(wrapper, inner, method: Callable, *args, **kwargs):
    """Call ``method(*args)`` inside ``wrapper``'s forward (DDP/FSDP/DeepSpeed hooks run): TRL's forward redirection
    where the installed TRL has it. TRL's leaves ``inner.forward`` set as an instance attribute (and its redirect in
    place if the call raises), so the instance attribute is put back as it was afterwards either way."""
    saved = SavedForward(inner)
    try:
        if _TRLForwardRedirection is not None:
            return _TRLForwardRedirection()(wrapper, inner, method, *args, **kwargs)

        def redirected(*a, **k):
            saved.restore()
            return method(*a, **k)

        inner.forward = redirected
        return wrapper(*args, **kwargs)
    finally:
        saved.restore()


def _compute(trainer, call: dict, target: Target, flavour: TRLFlavour, options: Options):
    score = functools.partial(_score, trainer, flavour, call, target, options)
    if target.model is not target.unwrapped or getattr(trainer, "is_fsdp_enabled", False):
        outs = _redirect(target.model, target.unwrapped, score, call["input_ids"], call["attention_mask"])
    else:
        outs = score(call["input_ids"], call["attention_mask"])
    logps, entropies, aux = outs
    if flavour.returns == "tensor":
        return logps
    if flavour.returns == "pair":
        return logps, entropies
    return logps, entropies, aux


def _autocast_ctx(trainer, unwrapped, flavour: TRLFlavour):
    """The autocast the unpatched call would run under, on top of the caller's own context.

    TRL >= 1.15 enters ``accelerator.autocast()`` around the model call itself. Earlier TRLs call the model, whose
    ``forward`` accelerate wrapped in autocast when it prepared the model under mixed precision (it keeps the
    original as ``_original_forward``); the redirection bypasses that wrapper, so its autocast is entered here. A
    model that was never prepared runs in the caller's context, as the unpatched call would.
    """
    acc = getattr(trainer, "accelerator", None)
    if acc is not None and (flavour.fused_head or "_original_forward" in vars(unwrapped)):
        return acc.autocast()
    return contextlib.nullcontext()


def _score(trainer, flavour, call, target: Target, options: Options, input_ids, attention_mask):
    lm, backbone, head = target.lm, target.backbone, target.head
    softcap, scale = logit_transform(lm.config)
    temperature = float(getattr(trainer, "temperature", 1.0))  # every TRL in the table divides by it
    entropy = bool(call.get("compute_entropy"))
    entropy_grad = entropy and bool(getattr(trainer, "_entropy_bonus_enabled", False))
    aux_wanted = bool(call.get("compute_aux_loss"))
    fp32_head = bool(getattr(getattr(trainer, "args", None), "cast_lm_head_to_fp32", False))
    fkw = dict(temperature=temperature, softcap=softcap, logit_scale=scale,
               ignore_index=-100 if flavour.masks_padding else None)
    fn = functools.partial(token_logprobs_and_entropy if entropy else token_logprobs, **fkw)
    bs = call.get("batch_size") or input_ids.size(0)
    K = call["logits_to_keep"]

    all_lp, all_ent, all_aux = [], [], []
    for start in range(0, input_ids.size(0), bs):
        end = min(start + bs, input_ids.size(0))
        ids, am = input_ids[start:end], attention_mask[start:end]
        kw = dict(input_ids=ids, attention_mask=am, use_cache=False)
        if aux_wanted:
            kw["output_router_logits"] = True
        labels = ids[:, -K:]
        comp_mask = am[:, -K:]
        if flavour.masks_padding:
            labels = labels.masked_fill(comp_mask == 0, -100)
        # backbone and head both run under the autocast of the unpatched call
        with _autocast_ctx(trainer, target.unwrapped, flavour):
            out = backbone(**kw)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            hidden = hidden[:, :-1][:, -K:]  # position t predicts token t+1
            rows = _real_rows(trainer, flavour, comp_mask.to(hidden.device))
            if rows is not None:  # only the completion tokens reach the head: [n, H], [n]
                hidden, labels = hidden[rows], labels.to(hidden.device)[rows]
            # under autocast, TRL >= 1.15's fused head forms dX in float32; earlier TRLs' lm_head rounds it to bf16
            res = _through_head(head, hidden, labels, fn, fp32_head, options, fp32_grad_input=flavour.fused_head)
        if rows is not None:
            res = tuple(_scatter(r, rows) for r in res) if entropy else _scatter(res, rows)
        lp, ent = res if entropy else (res, None)
        if entropy:
            if not entropy_grad:
                ent = ent.detach()
            if flavour.masks_padding:
                ent = ent.masked_fill(comp_mask.to(ent.device) == 0, 0.0)
            all_ent.append(ent)
        all_lp.append(lp)
        if aux_wanted:
            all_aux.append(_aux_loss(lm, out, am))
    logps = torch.cat(all_lp, 0)
    ents = torch.cat(all_ent, 0) if entropy else None
    aux = torch.stack(all_aux).mean() if aux_wanted else None
    return logps, ents, aux


def _real_rows(trainer, flavour: TRLFlavour, comp_mask: torch.Tensor) -> torch.Tensor | None:
    """The completion positions that go through the head (a ``[b, K]`` bool mask), or None for all of them.

    Padding (completion mask 0: after the first EOS, or a whole row under ``mask_truncated_completions``) never
    reaches the head's GEMMs; its log-probs and entropies come back 0. Per TRL release, why that changes no loss,
    gradient or logged metric (read in the pins' ``trl/trainer/grpo_trainer.py``, ``rloo_trainer.py``, ``utils.py``):

    * 1.14 - 1.16 (``flavour.masks_padding``): TRL returns 0 there itself. 1.14: ``_full_logits_logps`` passes
      ``row_mask=completion_mask`` to ``selective_log_softmax`` / ``selective_log_softmax_and_entropy``, which
      ``masked_fill(row_mask == 0, 0.0)`` both (and ``_chunked_logps``, its Liger path, projects
      ``hidden_states[completion_mask]`` only); 1.15 - 1.16: the labels are -100 there and ``add_fused_lm_head``
      projects ``hidden_states[mask]`` only (``masked_fill(~mask, 0)`` on its torch fallback). Same for RLOO.
    * 0.16 - 1.13 (read: the 0.16.1 and 0.19.1 pins, and the 0.18.2, 0.24.0 and 1.13.0 releases; the others are
      taken on their table row): TRL returns the log-prob of the pad token (and its entropy) there, but every
      reader multiplies by the completion mask before anything is summed or logged: the loss (every ``loss_type``)
      forms the ratio ``exp(logps - old)`` and the k3 KL ``exp(ref - logps) - (ref - logps) - 1`` elementwise,
      then sums ``per_token_loss * completion_mask``; the KL, clip-ratio and entropy metrics are masked means; the
      top-entropy quantile reads ``entropies[mask]``; vLLM's importance-sampling ratio and its metrics are masked
      (0.24: the ratio is formed unmasked but enters the loss only times the mask); ``_generate_and_score_
      completions`` only stores the old and reference log-probs for the loss. The policy, old and reference
      log-probs all come from this method, so at a padded position all three are 0: the ratio is 1 and the KL 0,
      finite, and times 0 they add 0 to every sum and pass 0 gradient, as TRL's own values there do.
    * Not skipped: those releases with Liger's loss (``use_liger_loss``, 1.x: ``use_liger_kernel``).
      ``compute_liger_loss`` hands the old and reference log-probs to Liger's GRPO loss, which pairs them with
      policy log-probs it computes itself at every position (the pad token's): its k3 KL ``exp(ref - logp)``
      with the reference at 0 instead of its own value could overflow to inf before the mask multiplies it
      (inf * 0 = NaN), so there every position is computed, as TRL does.
    * Not skipped either: a single completion position (K = 1) on those releases. 0.2x - 1.13 tell a sequence-level
      tensor by ``x.shape[1] == 1`` in their metric means (``masked_batch_mean``, ``global_masked_mean``) and then
      average it unmasked, so a [B, 1] entropy or KL whose one position is padding (a truncated row under
      ``mask_truncated_completions``) would be logged with grpo_mel's 0 instead of TRL's value.
    """
    if not flavour.masks_padding and (comp_mask.size(-1) == 1 or any(
            getattr(trainer, a, False) for a in ("use_liger_loss", "use_liger_kernel"))):
        return None
    rows = comp_mask != 0
    return None if bool(rows.all()) else rows


def _scatter(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``values`` ([n], the real positions' outputs) back to ``rows``' shape [b, K], 0 at padding. Like TRL's fused
    head, ``masked_scatter`` keeps the result on the graph when no position is real (an all-padding micro-batch
    backpropagates a zero, and the head, called with 0 rows, still gets its zero gradient)."""
    rows = rows.to(values.device)
    return values.new_zeros(rows.shape).masked_scatter(rows, values)


def _through_head(head, hidden, labels, fn, fp32_head: bool, options: Options, fp32_grad_input: bool):
    """``fn`` over the head's logits, chunked, computed INSIDE a call of the head module.

    ``head(hidden, labels)`` with the inner module's ``forward`` redirected to the chunked computation runs every
    hook the engine put on that module: FSDP1/FSDP2 unshard the weight before and reshard after it (and again
    around the backward, where they reduce-scatter its gradient); DeepSpeed ZeRO-3 fetches and releases its
    partitions. Reading ``head.weight`` from outside the call would see a shard (FSDP1: a flat 1-D shard, FSDP2: a
    DTensor) and skip the gradient's reduction. Nothing is gathered or copied here; the backward's recompute reads
    the weight the engine re-gathers for it, exactly as ``lm_head``'s own backward would.
    """
    inner = head_module(head)

    def forward(h):
        weight, bias = _full(inner.weight), _full(inner.bias)
        # cast_lm_head_to_fp32: TRL runs the head in float32 outside autocast; otherwise the GEMM inside runs in the
        # autocast dtype where autocast is on, as ``lm_head(hidden)`` would (f upcasts to float32 after it)
        ctx = torch.autocast(h.device.type, enabled=False) if fp32_head else contextlib.nullcontext()
        with ctx:
            dtype = torch.float32 if fp32_head else weight.dtype
            h = h.to(device=weight.device, dtype=dtype)
            w = weight if weight.dtype == dtype else weight.to(dtype)
            b = None if bias is None else (bias if bias.dtype == dtype else bias.to(dtype))
            return chunked_linear(h, w, fn, labels.to(weight.device), bias=b, chunk_size=options.chunk_size,
                                  memory_budget=options.memory_budget, fp32_grad_input=fp32_grad_input,
                                  compile=options.compile)

    return _redirect(head, inner, forward, hidden)  # one argument, as lm_head(hidden): pre-hooks see what they expect


def _full(t):
    """A tensor-parallel DTensor head weight (not FSDP-managed: FSDP unshards inside the call) gathered whole."""
    if t is None:
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return t
    return t.full_tensor() if isinstance(t, DTensor) else t


def _aux_loss(lm, out, attention_mask):
    """MoE load-balancing loss as the model's own forward (and TRL's fused head) computes it."""
    router_logits = getattr(out, "router_logits", None)
    if router_logits is None:
        raise RuntimeError(
            f"grpo_mel: compute_aux_loss=True but {type(lm).__name__}'s backbone returned no router_logits; "
            "this model's MoE auxiliary loss is not supported by the chunked path. Call "
            "grpo_mel.unpatch_grpo() or set router_aux_loss_coef=0."
        )
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    n_exp = getattr(lm, "num_experts", None) or getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts")
    top_k = getattr(lm, "num_experts_per_tok", None) or getattr(cfg, "num_experts_per_tok")
    return load_balancing_loss_func(router_logits, n_exp, top_k, attention_mask)
