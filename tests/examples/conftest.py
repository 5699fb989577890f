"""Fixtures of the example / causal-LM / callback tests: the example modules, loaded from their files.

(No ``__init__.py`` here on purpose: a ``tests/examples`` package would be importable as ``examples`` and
shadow the repository's ``examples/`` directory.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")



def load_example(name: str):
    """Import ``examples/<name>.py`` as a module (its ``main(argv)`` returns the run's results)."""
    mod_name = f"grpo_mel_example_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


def has_bnb_cpu() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, and single-threaded: these models are tiny (a [16, 64] x [64, 2048] matmul), and with two
    OpenMP threads on a busy 2-core machine each such op can wait ~30 ms at the thread barrier (measured),
    which made the example runs 10x slower. Restored after each test (torch's thread count is global)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@contextlib.contextmanager
def calls_per_run(example, obj, name: str):
    """Count the calls of ``obj.name`` (the library function a patch computes with) during each of the example's
    runs: yields ``{"patched": n, "unpatched": n}``, filled as ``example.run_once`` returns. The count is this
    test's own: the examples and the library keep none."""
    counts, box = {}, {"n": 0}
    real_fn, real_run = getattr(obj, name), example.run_once

    def fn(*a, **k):
        box["n"] += 1
        return real_fn(*a, **k)

    def run_once(src, args, patched, *rest, **kw):
        start = box["n"]
        try:
            return real_run(src, args, patched, *rest, **kw)
        finally:
            counts["patched" if patched else "unpatched"] = box["n"] - start

    setattr(obj, name, fn)
    example.run_once = run_once
    try:
        yield counts
    finally:
        setattr(obj, name, real_fn)
        example.run_once = real_run
