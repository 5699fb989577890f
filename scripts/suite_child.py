"""The GPU suite's child processes (``scripts/gpu_suite.py`` runs them, each with its own time cap):

    python scripts/suite_child.py --probe OUT.json                       # versions, device, what imports
    python scripts/suite_child.py --run-example NAME OUT.json -- ARGV    # examples/NAME.py main(ARGV), as JSON
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger-kernel",
            "cut-cross-entropy", "triton")
PROBES = ("trl", "datasets", "bitsandbytes", "liger_kernel.ops.fused_linear_cross_entropy", "cut_cross_entropy.cce")


def probe(path: str) -> None:
    """(child) versions, device and which optional modules import, as JSON at ``path``."""
    import importlib.metadata as md
    import platform

    info: dict = {"python": platform.python_version(), "versions": {}, "imports": {}}
    for pkg in PACKAGES:
        try:
            info["versions"][pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info["versions"][pkg] = None
    import torch

    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
    for mod in PROBES:
        try:
            importlib.import_module(mod)
            info["imports"][mod] = None
        except Exception as e:  # noqa: BLE001 - the reason is what we report
            info["imports"][mod] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    with open(path, "w") as f:
        json.dump(info, f)


def run_example(name: str, path: str, argv: list[str]) -> None:
    """(child) ``examples/<name>.py``'s ``main(argv)``; its runs (losses, per-step peaks) as JSON at ``path``.
    ``grpo_mel_calls``: how often the patched run computed through grpo_mel, counted here (the examples and the
    library keep no counters) on the function each patch computes with."""
    from grpo_mel.integrations import _logps, causal_lm

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    obj, attr = (causal_lm, "causal_lm_loss") if name == "sft_loss_match" else (_logps, "chunked_linear")
    real_fn, real_run, box, calls = getattr(obj, attr), mod.run_once, {"n": 0}, {}

    def counted(*a, **k):
        box["n"] += 1
        return real_fn(*a, **k)

    def run_once(src, args, patched, *rest, **kwargs):
        start = box["n"]
        res = real_run(src, args, patched, *rest, **kwargs)
        calls[res.label] = box["n"] - start
        return res

    setattr(obj, attr, counted)
    mod.run_once = run_once
    res = mod.main(argv)
    out = {k: v for k, v in res.items() if isinstance(v, (int, float, str))}
    out["runs"] = [dict(label=r.label, losses=r.losses, peaks=r.peaks, peak_key=r.peak_key, max_peak=r.max_peak,
                        runtime_s=r.runtime_s, metrics=r.metrics, grpo_mel_calls=calls.get(r.label))
                   for r in res["runs"]]
    with open(path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        probe(sys.argv[2])
    elif sys.argv[1:2] == ["--run-example"]:
        run_example(sys.argv[2], sys.argv[3], sys.argv[5:])
    else:
        sys.exit(__doc__)
