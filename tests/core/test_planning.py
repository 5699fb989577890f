"""grpo_mel.planning: argument checks, the default budget, the per-row cost model and the chunk size it gives.

References are computed here from the documented model (bytes per row = V · (itemsize + 3·4)), independently
of the module's own arithmetic; the end-to-end checks (a budget really splits the work, any budget gives parity)
are in test_parity.py and test_properties.py.
"""

from __future__ import annotations

import pytest
import torch

from grpo_mel import chunked_linear, planning
from grpo_mel import functions as G
from grpo_mel.planning import (
    DEFAULT_CPU_BUDGET_BYTES,
    bytes_per_row,
    default_memory_budget,
    plan_chunk_size,
    validate_chunk_size,
    validate_memory_budget,
)

from .conftest import ChunkRecorder, assert_close_fp32, make_inputs, naive_apply, ref_token_logprobs


@pytest.mark.parametrize("value,rows", [(None, 196), (1, 1), (7, 7), (10**9, 1000)])
def test_validate_chunk_size_accepts(value, rows):
    """An accepted chunk size is the one the planner then uses (None: planned from the default budget)."""
    assert validate_chunk_size(value) is None
    assert plan_chunk_size(1000, 32000, torch.float32, "cpu", chunk_size=value) == rows


@pytest.mark.parametrize("value,exc,msg", [
    (0, ValueError, r"chunk_size must be >= 1, got 0"),
    (-3, ValueError, r"chunk_size must be >= 1, got -3"),
    (2.0, TypeError, r"chunk_size must be an int >= 1 or None \(automatic\), got 2.0"),
    (True, TypeError, r"got True"),
    ("8", TypeError, r"got '8'"),
    (torch.tensor(4), TypeError, r"chunk_size must be an int"),
])
def test_validate_chunk_size_rejects(value, exc, msg):
    with pytest.raises(exc, match=msg):
        validate_chunk_size(value)


@pytest.mark.parametrize("value,rows", [(None, 196), (1, 1), (0.5, 1), (2**30, 1000), (1e12, 1000),
                                        (2**20 * 50, 102)])
def test_validate_memory_budget_accepts(value, rows):
    """An accepted budget is the one the planner then divides (bytes // 512000 per fp32 row at V=32000, in [1, N])."""
    assert validate_memory_budget(value) is None
    assert plan_chunk_size(1000, 32000, torch.float32, "cpu", memory_budget=value) == rows


@pytest.mark.parametrize("value,exc,msg", [
    (0, ValueError, r"memory_budget must be a finite number of bytes > 0, got 0"),
    (-1, ValueError, r"got -1"),
    (float("nan"), ValueError, r"got nan"),
    (float("inf"), ValueError, r"got inf"),
    (False, TypeError, r"memory_budget must be a number of bytes or None, got False"),
    ("1e6", TypeError, r"got '1e6'"),
])
def test_validate_memory_budget_rejects(value, exc, msg):
    with pytest.raises(exc, match=msg):
        validate_memory_budget(value)


def test_default_budget_on_the_cpu_is_96_mib():
    assert DEFAULT_CPU_BUDGET_BYTES == 96 * 2**20
    assert default_memory_budget(torch.device("cpu")) == 96 * 2**20


def test_default_budget_on_cuda_is_a_clamped_share_of_free_memory(monkeypatch):
    """0.25 x free memory, clamped to [96 MiB, 512 MiB] (the CUDA query is faked: no GPU needed)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda")
    for free, expected in [(100 * 2**20, 96 * 2**20), (1 * 2**30, 256 * 2**20), (80 * 2**30, 512 * 2**20)]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 80 * 2**30))
        assert default_memory_budget(cuda) == expected


@pytest.mark.parametrize("dtype,itemsize", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2),
                                            (torch.float64, 8)])
def test_bytes_per_row_is_the_logits_plus_three_float32_buffers(dtype, itemsize):
    assert planning.LIVE_FP32_BUFFERS == 3
    assert bytes_per_row(32000, dtype) == 32000 * (itemsize + 12)
    assert bytes_per_row(1, dtype) == itemsize + 12


def test_plan_default_cpu_chunk_at_v32000_fp32():
    # 96 MiB // (32000 · 16 B) = 196 rows (the figure docs/design.md quotes)
    assert plan_chunk_size(10_000, 32_000, torch.float32, "cpu") == 196


@pytest.mark.parametrize("n,v,budget,expected", [
    (100, 10, 10 * 16 * 7, 7),        # exactly 7 rows' worth
    (100, 10, 10 * 16 * 7 + 159, 7),  # one byte short of 8 rows rounds down
    (100, 10, 10 * 16 * 8, 8),
    (5, 10, 10**9, 5),                # never more rows than there are
    (100, 10, 1, 1),                  # never fewer than one
    (0, 10, 10**9, 1),                # an empty input still gets a valid chunk size
    (0, 10, 1, 1),
])
def test_plan_from_budget_edge_cases(n, v, budget, expected):
    assert plan_chunk_size(n, v, torch.float32, "cpu", memory_budget=budget) == expected


@pytest.mark.parametrize("n,chunk,expected", [(13, 4, 4), (13, 13, 13), (13, 100, 13), (0, 4, 1), (1, 1, 1)])
def test_explicit_chunk_size_wins_and_is_clamped(n, chunk, expected):
    # a budget that alone would give 1 row is ignored when chunk_size is given
    assert plan_chunk_size(n, 50, torch.float32, "cpu", chunk_size=chunk, memory_budget=1) == expected


def test_bf16_rows_cost_less_than_fp32():
    budget = 14 * 1000 * 50  # 50 bf16 rows at V=1000 (14 B per logit), 43 fp32 rows (16 B)
    assert plan_chunk_size(10**6, 1000, torch.bfloat16, "cpu", memory_budget=budget) == 50
    assert plan_chunk_size(10**6, 1000, torch.float32, "cpu", memory_budget=budget) == 43


def test_plan_validates_its_arguments():
    with pytest.raises(ValueError, match=r"chunk_size must be >= 1"):
        plan_chunk_size(10, 10, chunk_size=0)
    with pytest.raises(ValueError, match=r"memory_budget must be a finite number"):
        plan_chunk_size(10, 10, memory_budget=float("nan"))


# --------------------------------------------------------------------------------------------------
# the plan as chunked_linear uses it
# --------------------------------------------------------------------------------------------------

def test_memory_budget_really_chunks():
    """The explicit budget used above does split the work (3 rows per chunk), forward and backward (the last chunk's graph is kept from the forward)."""
    X, W, _, labels = make_inputs((13,), 16, 50)
    rec = ChunkRecorder(G.token_logprobs)
    out = chunked_linear(X, W, rec, labels, memory_budget=3 * bytes_per_row(50, torch.float32))
    out.sum().backward()
    assert rec.rows == [1, 3, 3, 3, 3] + [1, 3, 3, 3]  # the backward recomputes all but the kept last chunk


def test_tiny_memory_budget_still_works():
    """A positive budget below one row's cost clamps to one row per chunk (no error, right result)."""
    X, W, _, labels = make_inputs((13,), 16, 50)
    rec = ChunkRecorder(G.token_logprobs)
    out = chunked_linear(X, W, rec, labels, memory_budget=1)
    assert_close_fp32(out, naive_apply(X, W, ref_token_logprobs, labels))
    assert rec.rows == [1] * 13


# --------------------------------------------------------------------------------------------------
# the head-aware plan: a chunk's fixed cost priced, the floor the call holds anyway counted
# --------------------------------------------------------------------------------------------------

def _head(h=2048, trained=True, compiled=False, dtype=torch.float32):
    return planning.Head(hidden=h, weight_dtype=dtype, gemm_dtype=dtype, trained=trained, compiled=compiled)


def test_weight_bytes_is_ws_own_size():
    v, h = 1000, 64
    assert _head(h, trained=False).weight_bytes(v) == v * h * 4
    assert _head(h, trained=True, dtype=torch.bfloat16).weight_bytes(v) == v * h * 2


def test_rows_for_time_from_the_device_model():
    """The model written out here: the rows r with fixed / (fixed + r·per_row) = FIXED_COST_SHARE."""
    v, h = 128256, 2048
    m = planning.DEVICE_MODELS["cpu"]
    s = planning.FIXED_COST_SHARE
    for trained, compiled in [(True, False), (False, False), (False, True)]:
        streamed = (3 * v * h * 4 + 2 * v * h * 4) if trained else 2 * v * h * 4
        fixed = m.overhead + streamed / m.bandwidth
        per_row = (8 if trained else 4) * v * h / m.gemm_flops + planning.F_PASSES[compiled] * v * 4 / m.bandwidth
        want = fixed * (1 - s) / (s * per_row)
        got = planning.rows_for_time(v, _head(h, trained, compiled), "cpu")
        assert want <= got < want + 1


def test_head_plan_is_the_fewer_of_time_and_memory_rows():
    v, n = 128256, 4096
    for trained, compiled in [(True, False), (False, False), (True, True), (False, True)]:
        head = _head(2048, trained, compiled)
        # half of W (fp32), less the [N, H] float32 dX the call fills
        budget = max(planning.DEFAULT_CPU_BUDGET_BYTES, int(0.5 * v * 2048 * 4) - n * 2048 * 4)
        mem_rows = budget // bytes_per_row(v, torch.float32, compiled)
        want = min(mem_rows, planning.rows_for_time(v, head, "cpu"))
        assert plan_chunk_size(n, v, torch.float32, "cpu", head=head) == want
        # where dX alone would reach half of W, the device's default budget decides
        assert plan_chunk_size(10**6, v, torch.float32, "cpu", head=head) == min(
            planning.DEFAULT_CPU_BUDGET_BYTES // bytes_per_row(v, torch.float32, compiled),
            planning.rows_for_time(v, head, "cpu"))
        # an explicit budget is the memory bound, the time rows still cap it
        assert plan_chunk_size(10**6, v, torch.float32, "cpu", memory_budget=10**12, head=head) == \
            planning.rows_for_time(v, head, "cpu")
        assert plan_chunk_size(10**6, v, torch.float32, "cpu", memory_budget=3 * bytes_per_row(v, torch.float32,
                                                                                                 compiled),
                               head=head) == 3


def test_head_plan_keeps_the_reference_shape_and_grows_chunks_at_large_w():
    """At H=256, V=32000 (W is 31 MiB) the 96 MiB default still decides (196 eager rows, as without a head); at the
    1B head (W is 1002 MiB) half of W lets a chunk hold more rows than the 49 the 96 MiB budget gave."""
    assert plan_chunk_size(10_000, 32_000, torch.float32, "cpu", head=_head(256, True)) == 196
    assert plan_chunk_size(10_000, 32_000, torch.float32, "cpu", head=_head(256, False)) == 196
    for trained in (True, False):
        assert plan_chunk_size(4096, 128256, torch.float32, "cpu", head=_head(2048, trained)) > 4 * 49


def test_compiled_rows_cost_less():
    assert bytes_per_row(1000, torch.float32, compiled=True) == 1000 * (4 + 4)
    assert bytes_per_row(1000, torch.bfloat16, compiled=True) == 1000 * (2 + 4)


def test_default_compile_from_the_measured_size_on_the_cpu_only():
    """Compiled by default on the CPU where a backward follows and N·V reaches COMPILE_MIN_LOGITS (between the
    largest shape measured without a gain and the smallest measured with one: docs/benchmarks.md, "Compiled
    chunks"); never by default on CUDA (unmeasured) or without a backward."""
    from grpo_mel.planning import COMPILE_MIN_LOGITS, default_compile

    assert 1024 * 128256 < COMPILE_MIN_LOGITS <= 2048 * 128256
    assert default_compile("cpu", 2048, 128256)
    assert default_compile(torch.device("cpu"), 4096, 128256, grad_follows=True)
    assert not default_compile("cpu", 1024, 128256)
    assert not default_compile("cpu", 2048, 32000)  # the reference shape
    assert not default_compile("cpu", 4096, 128256, grad_follows=False)
    assert not default_compile("cuda", 4096, 128256)
    assert not default_compile("cpu")
