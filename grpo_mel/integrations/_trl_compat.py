"""What the installed TRL's GRPOTrainer log-prob method looks like: an explicit table per TRL version range.

The table below was read off the TRL sources of every release from 0.16.0 to 1.16.0 (each release's
``trl/trainer/grpo_trainer.py``); the tests check the installed TRL's row against its source on every pinned
version (scripts/test_trl_pins.sh). The facts per range:

* 0.16: ``_get_per_token_logps(model, input_ids, attention_mask, logits_to_keep)`` returns a tensor;
  ``logits / self.temperature``. 0.17 - 0.19 add ``batch_size``.
* 0.20 - 1.6: ``_get_per_token_logps_and_entropies(..., compute_entropy=False, pixel_values=...)`` returns
  ``(logps, entropies)``; the vision-language arguments grow over the releases (0.24, 0.29, 1.0, 1.1).
* 1.7 - 1.13: ``compute_aux_loss`` and a third element, the MoE load-balancing loss (or None).
* 1.14: ``(model, *args, batch_size=None, compute_aux_loss=False, **kwargs)`` forwards everything to
  ``_full_logits_logps`` (unless Liger is on), which divides by the temperature and zeroes the log-probs (and
  entropies) where the completion's attention mask is 0 (``row_mask``).
* 1.15 - 1.16: the model carries TRL's fused LM head (``add_fused_lm_head`` in ``GRPOTrainer.__init__``, built with
  the temperature); the method calls ``model(..., labels=labels, fused_lm_head=True)`` with padded labels -100, so
  those positions are zero too.

:func:`detect` takes the flags from the table. Where the installed method's signature and source can be read it
cross-checks them; where they cannot (a decorator without ``functools.wraps``, a compiled or frozen module) the
table alone decides. Anything the two cannot settle - the source disagrees with the table, or the TRL is newer
than the table - gives a :class:`TRLFlavour` with ``unsettled`` set: the patch then runs TRL's own method, with one
warning naming the reason. TRL older than :data:`MIN_TRL` raises :class:`UnsupportedTRLVersion`.
"""

from __future__ import annotations

import ast
import functools
import inspect
from dataclasses import dataclass, fields

MIN_TRL = "0.16.0"  # the oldest release in the table (and the oldest pin tested)
NEWEST_TRL = "1.16.0"  # the newest release read and tested; a newer TRL runs its own method, with a warning

_TENSOR = "tensor"
_PAIR = "pair"
_TRIPLE = "triple"
_LOGPS = "_get_per_token_logps"
_LOGPS_ENT = "_get_per_token_logps_and_entropies"


class UnsupportedTRLVersion(RuntimeError):
    """patch_grpo() cannot patch the installed TRL."""


@dataclass(frozen=True)
class _Flags:
    """What the patch needs to know about a TRL's log-prob method; each a column of the table below."""

    method_name: str | None = None  # the trainer method that is patched
    returns: str | None = None  # "tensor" | "pair" | "triple"
    masks_padding: bool | None = None  # log-probs (and entropies) are 0 where the completion's attention mask is 0
    fused_head: bool | None = None  # TRL's own fused LM head (>= 1.15)


@dataclass(frozen=True, kw_only=True)
class _Row(_Flags):
    first: str  # first release of the range; the range ends where the next row starts (the last at NEWEST_TRL)
    params: str  # the method's parameters after self, as TRL declares them
    delegate: str | None = None  # the method forwards its arguments, unchanged, to this one


_FLAGS = tuple(f.name for f in fields(_Flags))

_P016 = "model, input_ids, attention_mask, logits_to_keep"
_P017 = _P016 + ", batch_size=None"
_P020 = (_P017 + ", compute_entropy=False, pixel_values=None, image_grid_thw=None, pixel_attention_mask=None, "
         "image_sizes=None")
_P024 = (_P017 + ", compute_entropy=False, pixel_values=None, image_grid_thw=None, num_images=None, "
         "pixel_attention_mask=None, image_sizes=None, token_type_ids=None")
_P029 = _P024 + ", mm_token_type_ids=None"
_P170 = (_P017 + ", compute_entropy=False, compute_aux_loss=False, pixel_values=None, image_grid_thw=None, "
         "num_images=None, pixel_attention_mask=None, spatial_shapes=None, num_tiles=None, image_sizes=None, "
         "token_type_ids=None, mm_token_type_ids=None, image_position_ids=None")
# keyword rows: the method, what it returns, whether TRL zeroes padded completion positions, TRL's fused head. Every
# release in both tables divides the logits by the trainer's temperature (1.15+: inside the fused head)
_TABLE = (
    _Row(first="0.16.0", params=_P016, method_name=_LOGPS, returns=_TENSOR, masks_padding=False, fused_head=False),
    _Row(first="0.17.0", params=_P017, method_name=_LOGPS, returns=_TENSOR, masks_padding=False, fused_head=False),
    _Row(first="0.20.0", params=_P020, method_name=_LOGPS_ENT, returns=_PAIR, masks_padding=False, fused_head=False),
    _Row(first="0.24.0", params=_P024, method_name=_LOGPS_ENT, returns=_PAIR, masks_padding=False, fused_head=False),
    _Row(first="0.29.0", params=_P029, method_name=_LOGPS_ENT, returns=_PAIR, masks_padding=False, fused_head=False),
    _Row(first="1.0.0", params=_P029 + ", pixel_position_ids=None", method_name=_LOGPS_ENT, returns=_PAIR,
         masks_padding=False, fused_head=False),
    _Row(first="1.1.0", params=_P029 + ", image_position_ids=None", method_name=_LOGPS_ENT, returns=_PAIR,
         masks_padding=False, fused_head=False),
    _Row(first="1.7.0", params=_P170, method_name=_LOGPS_ENT, returns=_TRIPLE, masks_padding=False,
         fused_head=False),
    _Row(first="1.14.0", params="model, *args, batch_size=None, compute_aux_loss=False, **kwargs",
         delegate="_full_logits_logps", method_name=_LOGPS_ENT, returns=_TRIPLE, masks_padding=True,
         fused_head=False),
    _Row(first="1.15.0", params=_P170, method_name=_LOGPS_ENT, returns=_TRIPLE, masks_padding=True, fused_head=True),
)
# RLOOTrainer: TRL 0.16 - 0.19 ship the older, PPO-style RLOOTrainer (a Trainer subclass with its own rollout loop and
# no per-token log-prob method of GRPO's kind): it cannot be patched. The GRPO-style RLOOTrainer was read in 1.14.2
# and 1.16.0: 1.14's method is GRPO 1.7's signature computing full logits with TRL's ``row_mask`` (as GRPO 1.14's
# delegate does); 1.15 - 1.16's calls TRL's fused head, as GRPO's does. Releases before 1.14 were not read.
_RLOO_TABLE = (
    _Row(first="1.14.0", params=_P170, method_name=_LOGPS_ENT, returns=_TRIPLE, masks_padding=True, fused_head=False),
    _Row(first="1.15.0", params=_P170, method_name=_LOGPS_ENT, returns=_TRIPLE, masks_padding=True, fused_head=True),
)
MIN_TRL_RLOO = "1.14.0"


@dataclass(frozen=True)
class Trainer:
    """A TRL trainer class grpo_mel patches: its kind (``"grpo"``), its name, its version table."""

    kind: str
    name: str
    table: tuple
    min_trl: str
    older: str = ""  # why a TRL older than min_trl cannot be patched

    @property
    def patch(self) -> str:
        return f"patch_{self.kind}"


GRPO = Trainer("grpo", "GRPOTrainer", _TABLE, MIN_TRL)
RLOO = Trainer("rloo", "RLOOTrainer", _RLOO_TABLE, MIN_TRL_RLOO,
               older=" (TRL < 1.14's RLOOTrainer: 0.16 - 0.19's is the older PPO-style trainer with no per-token "
                     "log-prob method to patch; 0.20 - 1.13's were not read)")


@dataclass(frozen=True, kw_only=True)
class TRLFlavour(_Flags):
    """The installed TRL's method, as :func:`detect` settled it (every flag None where ``unsettled``)."""

    version: str
    # the method's signature, then (1.14) its delegate's: a call is named by binding it through each in turn
    signatures: tuple = ()
    unsettled: str | None = None  # why the flags are unknown; the patch then runs TRL's own method (one warning)


def trl_version() -> str:
    import trl

    return getattr(trl, "__version__", "0")


def _version(v: str):
    from packaging.version import Version

    return Version(v)


def row_for(version: str, table: tuple = _TABLE) -> _Row | None:
    """The table's row for ``version``; None if it is newer than :data:`NEWEST_TRL` (or older than the table)."""
    v = _version(version)
    if v > _version(NEWEST_TRL):
        return None
    rows = [r for r in table if _version(r.first) <= v]
    return rows[-1] if rows else None


def parse_params(params: str) -> inspect.Signature:
    """``"model, *args, batch_size=None"`` -> the signature of ``def f(self, model, *args, batch_size=None)``."""
    P = inspect.Parameter
    out, kind = [P("self", P.POSITIONAL_OR_KEYWORD)], P.POSITIONAL_OR_KEYWORD
    for item in params.split(", "):
        name, _, default = item.partition("=")
        if name.startswith("**"):
            out.append(P(name[2:], P.VAR_KEYWORD))
        elif name.startswith("*"):
            out.append(P(name[1:], P.VAR_POSITIONAL))
            kind = P.KEYWORD_ONLY
        else:
            out.append(P(name, kind, default=ast.literal_eval(default) if default else P.empty))
    return inspect.Signature(out)


def _plain(sig: inspect.Signature) -> inspect.Signature:
    """``sig`` without annotations (the table records names, kinds and defaults)."""
    params = [p.replace(annotation=p.empty) for p in sig.parameters.values()]
    return sig.replace(parameters=params, return_annotation=sig.empty)


def _readable(fn) -> tuple[inspect.Signature, str] | None:
    """The method's own signature and source, or None where they cannot be read (or belong to an anonymous
    ``(*args, **kwargs)`` wrapper, e.g. a decorator without functools.wraps, which says nothing about TRL)."""
    try:
        sig, src = inspect.signature(fn), inspect.getsource(fn)
    except (OSError, TypeError, ValueError):
        return None
    var = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    if len([p for p in sig.parameters.values() if p.kind not in var]) <= 1:  # self at most
        return None
    return sig, src


def from_source(cls, name: str, row: _Row) -> dict | None:
    """The table's columns (and the signature) as the installed method's signature and source show them, or None
    where they cannot be read. ``row`` only names the delegate whose source to read as well (1.14)."""
    read = _readable(getattr(cls, name))
    if read is None:
        return None
    sig, src = read
    delegate = row.delegate if row.delegate and f"self.{row.delegate}(" in src else None
    if delegate is not None:
        helper = _readable(getattr(cls, delegate, None))
        if helper is None:
            return None
        src += helper[1]
    fused = "fused_lm_head" in src
    params = sig.parameters
    return dict(
        method_name=name,
        returns=_TENSOR if name == _LOGPS else (_TRIPLE if "compute_aux_loss" in params else _PAIR),
        masks_padding=fused or "row_mask" in src,
        fused_head=fused,
        delegate=delegate,
        signature=_plain(sig),
    )


def _disagreements(row: _Row, seen: dict) -> list[str]:
    table = {f: getattr(row, f) for f in _FLAGS}
    table.update(delegate=row.delegate, signature=parse_params(row.params))
    return [f"{k}: table {table[k]}, source {seen[k]}" for k in table if table[k] != seen[k]]


def _unsettled(version: str, name: str, why: str, trainer: Trainer = GRPO) -> TRLFlavour:
    return TRLFlavour(version=version, method_name=name,
                      unsettled=f"{why}; {trainer.name}.{name} stays TRL's own (no memory saving)")


def detect(cls=None, trainer: Trainer | None = None) -> TRLFlavour:
    """Describe ``trl.GRPOTrainer``'s (or ``cls``'s; ``trainer=RLOO``: ``trl.RLOOTrainer``'s) log-prob method from
    the table; raise if it cannot be patched."""
    trainer = GRPO if trainer is None else trainer
    version = trl_version()
    if _version(version) < _version(trainer.min_trl):
        raise UnsupportedTRLVersion(
            f"grpo_mel.{trainer.patch} supports TRL >= {trainer.min_trl}{trainer.older}; the installed TRL is "
            f"{version}. Upgrade TRL (pip install -U trl) or use grpo_mel.linear_token_logprobs directly."
        )
    if cls is None:
        try:
            import trl

            cls = getattr(trl, trainer.name)
        except Exception as e:  # pragma: no cover - broken TRL install
            raise UnsupportedTRLVersion(f"cannot import trl.{trainer.name} from TRL {version}: {e}") from e
    attrs = _class_attrs(cls)
    name = next((n for n in (_LOGPS_ENT, _LOGPS) if n in attrs), None)
    if name is None:
        raise UnsupportedTRLVersion(
            f"the installed TRL {version}'s {cls.__name__} has neither `{_LOGPS_ENT}` nor `{_LOGPS}`; "
            f"grpo_mel.{trainer.patch} cannot patch it (supported: TRL {trainer.min_trl} - {NEWEST_TRL})."
        )
    unsettled = functools.partial(_unsettled, trainer=trainer)
    row = row_for(version, trainer.table)
    if row is None:
        return unsettled(version, name, f"TRL {version} is newer than the newest release grpo_mel's table "
                                        f"covers ({NEWEST_TRL})")
    seen = from_source(cls, name, row)
    if seen is not None:
        diff = _disagreements(row, seen)
        if diff:
            return unsettled(version, name, f"the installed {cls.__name__}.{name} does not match grpo_mel's table "
                                             f"for TRL {version} ({'; '.join(diff)})")
        signature = inspect.signature(getattr(cls, name))
    else:  # unreadable: the table's signature names the arguments
        if name != row.method_name:
            return unsettled(version, name, f"TRL {version}'s table row patches {row.method_name}, but "
                                             f"{cls.__name__} has {name}")
        signature = parse_params(row.params)
    signatures = (signature,)
    if row.delegate is not None:
        if not callable(getattr(cls, row.delegate, None)):
            return unsettled(version, name, f"TRL {version}'s {name} forwards to {row.delegate}, which "
                                             f"{cls.__name__} lacks")
        signatures += (inspect.signature(getattr(cls, row.delegate)),)
    return TRLFlavour(version=version, signatures=signatures, **{f: getattr(row, f) for f in _FLAGS})


def _class_attrs(cls) -> set:
    names = set()
    for k in cls.__mro__:
        names.update(vars(k))
    return names
