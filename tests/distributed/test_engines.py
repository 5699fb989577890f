"""Patched GRPOTrainer under real engines (FSDP2, FSDP1, DeepSpeed ZeRO-2/3) = the same step under DDP.

2 CPU processes (gloo), each launched with ``accelerate launch`` and a generated config; one launch per engine
runs every case of that engine (tied/untied embeddings, default wrap / LM head as its own FSDP unit, patched /
unpatched) in turn (tests/distributed/_engine_worker.py). Every case takes one SGD step (Adam's first step,
``lr * sign(g)``, would hide a wrong gradient scale) on the same global batch, generated once here. The
reference is TRL's own method under DDP. After the step, each parameter tensor must be within 1e-6 of how far
the reference moved it (max |p - p_ddp| <= 1e-6 * max |p_ddp - p_init|), and so must the norm of the gradient
the step applied ((p_init - p) / lr, in float64); the grad norm the engine logged is itself an fp32 reduction
(measured up to 5e-6 from the float64 norm of the same gradient), so it is compared at 2e-5.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
from _spawn import free_port

trl = pytest.importorskip("trl")

import grpo_mel  # noqa: E402
from grpo_mel import testing as gt  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "examples"))  # the local reward task and its tokenizer (examples/arithmetic_task.py)
import arithmetic_task as task  # noqa: E402
from grpo_mel.integrations._trl_compat import detect  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LR = 1000.0  # as in _engine_worker.py
PARAM_RTOL = 1e-6
LOGGED_NORM_RTOL = 2e-5
LAUNCH_TIMEOUT_S = 600

_FSDP = """\
fsdp_config:
  fsdp_version: {version}
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_reshard_after_forward: {reshard}
  fsdp_offload_params: false
  fsdp_cpu_ram_efficient_loading: false
  fsdp_sync_module_states: false
  fsdp_use_orig_params: true
"""
_ZERO = """\
deepspeed_config:
  zero_stage: {stage}
  zero3_init_flag: false
  zero3_save_16bit_model: true
  offload_optimizer_device: none
  offload_param_device: none
  gradient_accumulation_steps: 1
"""
# The launcher's distributed_type picks the launcher (torchrun) and the engine's environment; use_cpu stays false
# there, since accelerate's CPU launcher would start one process. GRPOConfig(use_cpu=True) keeps each process on CPU.
ENGINES = {
    "ddp": ("MULTI_GPU", ""),
    "fsdp2": ("FSDP", _FSDP.format(version=2, reshard="true")),
    "fsdp1": ("FSDP", _FSDP.format(version=1, reshard="FULL_SHARD")),
    "zero2": ("DEEPSPEED", _ZERO.format(stage=2)),
    "zero3": ("DEEPSPEED", _ZERO.format(stage=3)),
}
# variant -> (tied, LM head as its own FSDP unit, LM head frozen as under LoRA: grpo_mel's gradients-in-forward path,
# grpo_mel's chunk compiled: patch_grpo(compile=True), patched only, compared with the untied variant's runs)
VARIANTS = {"untied": (False, False, False, False), "tied": (True, False, False, False),
            "untied-head": (False, True, False, False), "tied-head": (True, True, False, False),
            "frozen": (False, False, True, False), "compiled": (False, False, False, True)}
ENGINE_VARIANTS = {
    "ddp": ("untied", "tied", "frozen", "compiled"),
    "fsdp2": ("untied", "tied", "untied-head", "tied-head", "frozen", "compiled"),
    "fsdp1": ("untied", "tied", "untied-head", "tied-head", "frozen", "compiled"),
    "zero2": ("untied", "tied", "frozen", "compiled"),
    "zero3": ("untied", "tied", "frozen", "compiled"),
}
# A tied head cannot be an FSDP unit of its own: the engine itself refuses or breaks, with or without grpo_mel
# (the embedding in another unit shares the weight). Both must fail with the same error.
ENGINE_ERRORS = {
    ("fsdp2", "tied-head"): "'lm_head.weight' is shared with a parameter already managed by another FSDP group",
    ("fsdp1", "tied-head"): "'weight' must be 2-D",  # the embedding, in the root unit, gets the flat shard
}

_TRL_FUSED = detect(trl.GRPOTrainer).fused_head
# (engine, variant) where TRL's own method is wrong (see _TRL_HEAD_BUG)
_TRL_WRONG = {(e, "untied-head") for e in ("fsdp2", "fsdp1")} if _TRL_FUSED else set()
_TRL_HEAD_BUG = pytest.mark.xfail(
    _TRL_FUSED, strict=True,
    reason="TRL 1.15-1.16's fused LM head (add_fused_lm_head) reads lm_head.weight outside the module, so the "
    "head's own FSDP unit never gathers/reduces it: a wrong head gradient (FSDP2) or a crash on the flat shard "
    "(FSDP1, 'mat2 must be a matrix'). strict: this turns red once TRL fixes it.",
)


@pytest.fixture(scope="module")
def work():
    with tempfile.TemporaryDirectory() as d:
        tok = task.tiny_tokenizer(1024)
        for tied in (False, True):
            gt.tiny_llama(vocab_size=1024, tokenizer=tok, tie_word_embeddings=tied).save_pretrained(
                os.path.join(d, "model-tied" if tied else "model-untied"))
        _save_batch(d, tok)
        yield d


def _save_batch(d, tok):
    """One global batch (2 prompts x 4 completions, rewards that vary), generated once for every engine."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    grpo_mel.unpatch_grpo()
    args = GRPOConfig(output_dir=os.path.join(d, "gen"), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=8, report_to="none", use_cpu=True, save_strategy="no", seed=0,
                      beta=0.0, bf16=False, loss_type="grpo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=os.path.join(d, "model-untied"), reward_funcs=[task.format_reward], args=args,
                              train_dataset=Dataset.from_list(task.arithmetic_prompts(8)), processing_class=tok)
        batch = [dict(trainer.train_dataset[i]) for i in range(2) for _ in range(4)]
        torch.manual_seed(1234)
        inputs = trainer._generate_and_score_completions(batch)
    assert inputs["completion_ids"].shape[0] == 8 and inputs["advantages"].abs().sum() > 0
    torch.save(inputs, os.path.join(d, "inputs.pt"))


_RUNS: dict[str, dict | str] = {}  # engine -> {case name: worker output}, or why its launch failed


def _runs(work, engine) -> dict:
    """The engine's cases, from one launch (2 processes) made at the first call; a failed launch fails each test."""
    if engine not in _RUNS:
        _RUNS[engine] = _launch(work, engine)
    if isinstance(_RUNS[engine], str):
        pytest.fail(_RUNS[engine])
    return _RUNS[engine]


def _launch(work, engine) -> dict | str:
    if engine.startswith("zero"):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            return "deepspeed is not installed: it is in the [dev] extra (pip install -e '.[dev]')"
    distributed_type, extra = ENGINES[engine]
    config = os.path.join(work, f"{engine}.yaml")
    with open(config, "w") as f:
        f.write(f"compute_environment: LOCAL_MACHINE\ndistributed_type: {distributed_type}\nnum_machines: 1\n"
                f"machine_rank: 0\nnum_processes: 2\nmixed_precision: 'no'\nuse_cpu: false\n{extra}")
    cases = [dict(name=f"{v}-{'patched' if p else 'unpatched'}", tied=VARIANTS[v][0], head_unit=VARIANTS[v][1],
                  frozen_head=VARIANTS[v][2], patched=p, compile=VARIANTS[v][3])
             for v in ENGINE_VARIANTS[engine] for p in (True, False) if p or not VARIANTS[v][3]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
           "--main_process_port", str(free_port()), os.path.join(HERE, "_engine_worker.py"), work, engine,
           json.dumps(cases)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        return f"{engine} launch timed out after {LAUNCH_TIMEOUT_S} s:\n{e.stderr[-6000:] if e.stderr else ''}"
    if proc.returncode != 0:
        return f"{engine} launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {c["name"]: torch.load(os.path.join(work, f"{engine}-{c['name']}.pt")) for c in cases}


@functools.lru_cache(None)
def _initial(work, tied) -> dict:
    from safetensors.torch import load_file

    (path,) = glob.glob(os.path.join(work, "model-tied" if tied else "model-untied", "*.safetensors"))
    return load_file(path)


def _ok(run: dict, what: str) -> dict:
    assert run["checked"], f"{what}: the engine/world/wrap check did not run: {run.get('error')}"
    assert "error" not in run, f"{what} raised:\n{run['traceback']}"
    return run


def _params(run: dict, tied: bool) -> dict:
    p = dict(run["params"])
    if tied:  # one tensor under two names: check it is one, then keep the embedding's name (the saved model's)
        torch.testing.assert_close(p.pop("lm_head.weight"), p["model.embed_tokens.weight"], rtol=0, atol=0)
    return p


def _applied_grad_norm(p0: dict, p1: dict) -> float:
    return torch.stack([((p0[k].double() - p1[k].double()) / LR).norm() for k in p0]).norm().item()


def _assert_same_step(run: dict, ref: dict, p0: dict, tied: bool, what: str) -> None:
    got, want = _params(run, tied), _params(ref, tied)
    assert got.keys() == want.keys() == p0.keys(), (what, got.keys() ^ p0.keys())
    worst = {}
    for k in p0:
        moved = (want[k] - p0[k]).abs().max().item()
        off = (got[k] - want[k]).abs().max().item()
        worst[k] = off / moved if moved else (0.0 if off == 0 else float("inf"))  # a frozen parameter must not move
    bad = {k: f"{r:.2e}" for k, r in worst.items() if not r <= PARAM_RTOL}
    assert not bad, f"{what}: parameters off by more than {PARAM_RTOL} of their movement: {bad}"
    g, g_ref = _applied_grad_norm(p0, got), _applied_grad_norm(p0, want)
    assert abs(g - g_ref) <= PARAM_RTOL * g_ref, f"{what}: applied grad norm {g} vs {g_ref}"
    (logged,), (logged_ref,) = run["grad_norm"], ref["grad_norm"]
    assert abs(logged - logged_ref) <= LOGGED_NORM_RTOL * logged_ref, f"{what}: logged norm {logged} vs {logged_ref}"
    assert abs(logged - g) <= LOGGED_NORM_RTOL * g, f"{what}: logged grad norm {logged}, applied {g}"


def _ddp_variant(variant: str) -> str:
    """The DDP run a variant is compared with: the same model and frozen parameters (DDP has no head unit)."""
    tied, _, frozen, _ = VARIANTS[variant]
    return "frozen" if frozen else ("tied" if tied else "untied")


def _unpatched_variant(variant: str) -> str:
    """The unpatched run of the same engine a patched variant is compared with (a compiled chunk: the untied one)."""
    return "untied" if VARIANTS[variant][3] else variant


PATCHED = [pytest.param(e, v, id=f"{e}-{v}") for e, vs in ENGINE_VARIANTS.items() for v in vs]
UNPATCHED = [pytest.param(e, v, id=f"{e}-{v}", marks=[_TRL_HEAD_BUG] if (e, v) in _TRL_WRONG else [])
             for e, vs in ENGINE_VARIANTS.items() for v in vs
             if e != "ddp" and (e, v) not in ENGINE_ERRORS and not VARIANTS[v][3]]


@pytest.mark.slow
@pytest.mark.parametrize("engine,variant", PATCHED)
def test_patched_step_equals_ddp(work, engine, variant):
    """grpo_mel under the engine = TRL's own method under DDP (and = TRL's own under the same engine)."""
    tied = VARIANTS[variant][0]
    runs = _runs(work, engine)
    patched, unpatched = runs[f"{variant}-patched"], runs[f"{_unpatched_variant(variant)}-unpatched"]
    if (engine, variant) in ENGINE_ERRORS:
        expected = ENGINE_ERRORS[engine, variant]
        for run in (patched, unpatched):
            assert run["checked"] and expected in run.get("error", ""), run.get("traceback", "no error")
        assert patched["error"] == unpatched["error"]
        return
    ref = _ok(_runs(work, "ddp")[f"{_ddp_variant(variant)}-unpatched"], "ddp reference")
    p0 = _initial(work, tied)
    _assert_same_step(_ok(patched, f"{engine}-{variant} patched"), ref, p0, tied, f"{engine}-{variant} vs ddp")
    if engine != "ddp" and (engine, variant) not in _TRL_WRONG:
        _assert_same_step(patched, unpatched, p0, tied, f"{engine}-{variant} patched vs unpatched")


@pytest.mark.slow
@pytest.mark.parametrize("engine,variant", UNPATCHED)
def test_unpatched_step_equals_ddp(work, engine, variant):
    """TRL's own method under the engine = under DDP: the harness runs each engine right (and TRL's own bugs show)."""
    tied = VARIANTS[variant][0]
    run = _ok(_runs(work, engine)[f"{variant}-unpatched"], f"{engine}-{variant} unpatched")
    ref = _ok(_runs(work, "ddp")[f"{_ddp_variant(variant)}-unpatched"], "ddp reference")
    _assert_same_step(run, ref, _initial(work, tied), tied, f"{engine}-{variant} unpatched vs ddp")
