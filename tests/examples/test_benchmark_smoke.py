"""benchmarks/bench_lm_head.py runs end to end at a tiny shape: every variant that runs here agrees with naive."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_lm_head_tiny(tmp_path):
    out = tmp_path / "bench.csv"
    md = tmp_path / "bench.md"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_lm_head.py"), "--device", "cpu", "--dtype",
           "float32", "--hidden", "32", "--tokens", "96", "--vocab", "500", "--chunks", "7", "64",
           "--repeats", "1", "--csv", str(out), "--md", str(md)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = list(csv.DictReader(open(out)))
    ran = [r for r in rows if not r["note"]]
    assert {r["task"] for r in ran} == {"logprobs", "logprobs_entropy", "ce"}
    for r in ran:
        assert float(r["peak_MiB"]) > 0 and float(r["time_s"]) > 0 and float(r["cpu_s"]) > 0, r
        if r["variant"] != "naive":
            assert r["ok"] == "ok", r  # outputs, dX and dW within tolerance of naive
    names = {r["variant"] for r in ran}
    assert {"naive", "grpo_mel@7", "grpo_mel@64", "grpo_mel@auto"} <= names
    assert "CPU time / naive" in md.read_text()


def test_bench_lm_head_frozen_weight_appends_its_own_rows(tmp_path):
    """``--frozen-weight`` (a LoRA policy's head): every variant computes outputs and dX only, checked against naive's,
    and its rows go into the same CSV beside the trainable head's (the GPU suite's head-1 and head-1-frozen)."""
    out = tmp_path / "bench.csv"
    base = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_lm_head.py"), "--device", "cpu", "--dtype",
            "float32", "--hidden", "32", "--tokens", "96", "--vocab", "500", "--chunks", "7", "--repeats", "1",
            "--tasks", "logprobs", "--csv", str(out)]
    for extra in ([], ["--frozen-weight", "--append"]):
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ran = [r for r in csv.DictReader(open(out)) if not r["note"]]
    by_head = {h: {r["variant"]: r for r in ran if r["head"] == h} for h in ("trainable", "frozen")}
    assert {"naive", "grpo_mel@7", "grpo_mel@auto"} <= set(by_head["frozen"]) and by_head["trainable"]
    for r in by_head["frozen"].values():
        assert r["diff_dW"] in ("", "nan"), r  # no variant formed dW
        if r["variant"] != "naive":
            assert r["ok"] == "ok" and float(r["diff_dX"]) < 1e-4, r
    for r in by_head["trainable"].values():
        if r["variant"] != "naive":
            assert float(r["diff_dW"]) < 1e-4, r


def test_bench_padding_tiny(tmp_path):
    """benchmarks/bench_padding.py at a tiny shape: both variants run, the skip sends only the real rows to the head."""
    import pytest

    pytest.importorskip("trl")
    md = tmp_path / "padding.md"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_padding.py"), "--padding", "0.5", "0",
           "--tokens", "16", "--vocab", "1024", "--hidden", "64", "--runs", "1", "--md", str(md)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in md.read_text().splitlines() if line.startswith("| 0.")]
    got = {(float(r[0]) > 0, r[1].strip()): int(r[2]) for r in rows}  # (padded?, variant) -> rows through the head
    assert len(got) == 4 and got[True, "all rows"] == 128 and 0 < got[True, "skip"] < 128
    assert got[False, "skip"] == got[False, "all rows"] == 128


def test_bench_compile_overhead_tiny():
    """benchmarks/bench_compile_overhead.py runs (one batch of two calls per case) and reports both modes."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_compile_overhead.py"), "--repeats", "1",
           "--calls", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if "per extra chunk" in line]
    assert [line.split(":")[0].strip() for line in lines] == ["eager", "compiled"], proc.stdout


def test_bench_gemm_chunks_tiny_with_naive():
    """benchmarks/bench_gemm_chunks.py --naive runs at a tiny shape and reports the naive head and, per row count,
    both GEMMs as a share of it."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_gemm_chunks.py"), "--tokens", "64", "--hidden",
           "32", "--vocab", "500", "--chunks", "16", "--repeats", "1", "--naive"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "naive frozen head" in proc.stdout, proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("rows")]
    assert [int(line.split(":")[0].split()[1]) for line in rows] == [64, 16], proc.stdout
    assert all("both / naive head" in line for line in rows), proc.stdout
