"""The linear part of the chunked backward, written by hand: the gradients of ``X·Wᵀ + b`` from each chunk's dZ.

Two GEMMs per chunk (the seed's equations) and a row sum: ``dX_c = dZ_c·W``, ``dW += dZ_cᵀ·X_c``,
``db += Σ_rows dZ_c``; dW and db accumulate in float32 (docs/design.md, "Why dW accumulates in float32").
"""

from __future__ import annotations

import torch


def chunk_logits(x_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # [c, H] @ [H, V] -> [c, V], in X's dtype (the float32 upcast is f's first step)
    return torch.nn.functional.linear(x_c, weight, bias)


class LinearGrads:
    """dX ([N, H], X's dtype), dW and db (float32 accumulators, cast to W's dtype at the end), filled chunk by chunk.

    ``gemm_dtype`` is the dtype the forward's GEMM produced (the autocast dtype under autocast): the backward's
    GEMMs run in it too. ``dx_fp32``: dX is kept in float32 whatever X's dtype (the frozen head's unit-gradient dX,
    which is multiplied by the upstream gradient later); with half operands CUDA's GEMM writes it in float32, the
    CPU's half GEMM result is upcast.
    """

    def __init__(self, X, weight, bias, need_x: bool, need_w: bool, need_b: bool, gemm_dtype: torch.dtype,
                 fp32_grad_input: bool, dx_fp32: bool = False):
        self.weight, self.bias = weight, bias
        dx_dtype = torch.promote_types(X.dtype, torch.float32) if dx_fp32 else X.dtype
        self.dX = torch.empty(X.shape, dtype=dx_dtype, device=X.device) if need_x else None
        # the [V, H] float32 accumulator is allocated by the first chunk's dZ, not before it: f's backward (e.g. the
        # single kept graph of a one-chunk input) then peaks without it, as autograd's own F.linear backward does
        self.need_w, self.dW = need_w, None
        self.db = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                   if need_b and bias is not None else None)
        # Under autocast (fp32 weights, bf16 GEMMs) cast W once for every chunk's recompute and dX GEMM, as the
        # model's own lm_head under autocast keeps a bf16 copy of W for its backward; dW still accumulates in float32.
        self.w_gemm = weight.detach().to(gemm_dtype)
        self.b_gemm = bias.detach().to(gemm_dtype) if bias is not None else None
        # fp32_grad_input with half operands: CUDA's addmm reads them as they are (out_dtype); elsewhere W is
        # upcast here once, not as a [V, H] float32 temporary in every chunk
        self.fp32_dx = (self.dX is not None and (fp32_grad_input or dx_fp32) and self.dX.dtype == torch.float32
                        and self.w_gemm.dtype != torch.float32)
        upcast_w = self.fp32_dx and fp32_grad_input and X.device.type != "cuda"
        self.w_dx = self.w_gemm.float() if upcast_w else self.w_gemm

    def add_chunk(self, start: int, end: int, x_c: torch.Tensor, dz: torch.Tensor | None) -> None:
        """Rows ``start:end`` of dX, and their share of dW and db, from ``dz`` ([c, V]; None: no gradient)."""
        dX = self.dX
        if dz is None:
            if dX is not None:
                dX[start:end].zero_()
            return
        dz = dz.to(self.w_gemm.dtype)
        if dX is not None:
            if dX.dtype == dz.dtype:
                torch.mm(dz, self.w_gemm, out=dX[start:end])  # [c, V] @ [V, H]
            elif self.fp32_dx and self.w_dx.dtype == torch.float32:  # half operands, float32 result
                torch.mm(dz.float(), self.w_dx, out=dX[start:end])
            elif self.fp32_dx and dX.device.type == "cuda":
                _addmm_fp32(dX[start:end].zero_(), dz, self.w_dx)
            else:  # as autograd of F.linear under autocast: dX in the GEMM's dtype, then cast to X's
                dX[start:end].copy_(torch.mm(dz, self.w_gemm))
        if self.need_w:
            if self.dW is None:
                self.dW = torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device)
            _addmm_fp32(self.dW, dz.t(), x_c.to(dz.dtype))
        if self.db is not None:
            self.db.add_(dz.sum(0, dtype=torch.float32))

    def result(self) -> tuple:
        """``(dX, dW, db)``, dW and db cast to the dtypes of W and b (a no-op for float32 ones)."""
        if self.need_w and self.dW is None:  # no chunk had a gradient
            self.dW = torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        dW = self.dW.to(self.weight.dtype) if self.need_w else None
        db = self.db.to(self.bias.dtype) if self.db is not None else None
        return self.dX, dW, db


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` into a float32 ``acc`` without rounding ``a @ b`` to a half dtype first.

    Rounding each chunk's dW contribution to bf16 before summing would add one rounding error per
    chunk; accumulating in fp32 keeps dW at least as accurate as the full-logits GEMM.
    """
    if acc.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16) and _addmm_out_fp32(acc, a, b):
        return
    acc.addmm_(a.float(), b.float())


def _addmm_out_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.addmm(acc, a, b, out_dtype=float32, out=acc)``; False where this torch cannot do it.

    Only "no ``out_dtype`` support" is caught: a torch whose ``addmm`` has no such keyword (TypeError), no
    kernel for the device (NotImplementedError, "addmm.dtype_out"), or one that rejects this combination of
    dtypes (a RuntimeError naming the dtypes). Anything else, out-of-memory included, propagates.
    """
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError) as e:
        if isinstance(e, torch.cuda.OutOfMemoryError) or "dtype" not in str(e):
            raise
        return False
    return True
