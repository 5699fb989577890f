"""What the installed TRL's GRPOTrainer log-prob method looks like, read from TRL itself.

Facts checked in the TRL sources (0.15.0, 0.19.1, 0.20.0, 1.6.0, 1.7.0, 1.14.2, 1.15.0, 1.16.0):

* 0.15 - 0.19: ``_get_per_token_logps(model, input_ids, attention_mask, logits_to_keep[, batch_size])`` returns a
  tensor. 0.15.0 does not divide by the temperature; later releases do (``logits / self.temperature``).
* 0.20 - 1.6: ``_get_per_token_logps_and_entropies(..., compute_entropy=False, pixel_values=...)`` returns
  ``(logps, entropies)``; entropies are computed under ``no_grad``.
* 1.7+: the same with ``compute_aux_loss`` and a third element, the MoE load-balancing loss (or None).
  From about 1.14 the log-probs (and entropies) are zeroed where the completion's attention mask is 0
  (``row_mask``), and the entropy carries gradient when the entropy bonus is on (``_entropy_bonus_enabled``).
* 1.15+: the model carries TRL's fused LM head (``add_fused_lm_head`` in ``GRPOTrainer.__init__``) and the method
  calls ``model(..., labels=labels, fused_lm_head=True)``; padded labels are -100, so those positions are zero too.

Rather than a table of version ranges, the behaviour flags are read from the signature and the source of the
installed method (with the version only used for the error message and the minimum).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

MIN_TRL = "0.15.0"

_TENSOR = "tensor"
_PAIR = "pair"
_TRIPLE = "triple"


class UnsupportedTRLVersion(RuntimeError):
    """patch_grpo() cannot patch the installed TRL."""


@dataclass(frozen=True)
class TRLFlavour:
    version: str
    method_name: str  # the GRPOTrainer method that is patched
    returns: str  # "tensor" | "pair" | "triple"
    uses_temperature: bool  # divides the logits by self.temperature
    masks_padding: bool  # log-probs (and entropies) are 0 where the completion's attention mask is 0
    fused_head: bool  # TRL's own fused LM head (>= 1.15)
    has_batch_size: bool  # the method takes batch_size


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def trl_version() -> str:
    import trl

    return getattr(trl, "__version__", "0")


def _version_tuple(v: str) -> tuple:
    from packaging.version import Version

    return Version(v).release


def detect(cls=None) -> TRLFlavour:
    """Inspect ``trl.GRPOTrainer`` (or ``cls``) and describe its log-prob method; raise if unsupported."""
    version = trl_version()
    if _version_tuple(version) < _version_tuple(MIN_TRL):
        raise UnsupportedTRLVersion(
            f"grpo_mel.patch_grpo supports TRL >= {MIN_TRL}; the installed TRL is {version}. "
            "Upgrade TRL (pip install -U trl) or use grpo_mel.linear_token_logprobs directly."
        )
    if cls is None:
        try:
            from trl import GRPOTrainer as cls  # noqa: N813
        except Exception as e:  # pragma: no cover - broken TRL install
            raise UnsupportedTRLVersion(f"cannot import trl.GRPOTrainer from TRL {version}: {e}") from e

    if "_get_per_token_logps_and_entropies" in _class_attrs(cls):
        name = "_get_per_token_logps_and_entropies"
    elif "_get_per_token_logps" in _class_attrs(cls):
        name = "_get_per_token_logps"
    else:
        raise UnsupportedTRLVersion(
            f"the installed TRL {version}'s GRPOTrainer has neither `_get_per_token_logps_and_entropies` nor "
            "`_get_per_token_logps`; grpo_mel.patch_grpo cannot patch it (supported: TRL 0.15 - 1.16)."
        )
    fn = getattr(cls, name)
    src = _source(fn)
    helper = getattr(cls, "_full_logits_logps", None)  # 1.14: the full-logits path moved into a helper
    helper_src = _source(helper) if helper is not None else ""
    params = inspect.signature(fn).parameters
    if name == "_get_per_token_logps":
        returns = _TENSOR
    else:
        returns = _TRIPLE if "compute_aux_loss" in params else _PAIR
    fused = "fused_lm_head" in src
    return TRLFlavour(
        version=version,
        method_name=name,
        returns=returns,
        uses_temperature=fused or "temperature" in src or "temperature" in helper_src,
        masks_padding=fused or "row_mask" in src or "row_mask" in helper_src,
        fused_head=fused,
        has_batch_size="batch_size" in params,
    )


def _class_attrs(cls) -> set:
    names = set()
    for k in cls.__mro__:
        names.update(vars(k))
    return names
