"""Quality benchmark: mlxqat QAT against what a user has today, side by side in one run.

    tools/with-blas python benchmarks/quality.py            # the embedded reference model, full table
    tools/with-blas python benchmarks/quality.py --model PATH_OR_HF_ID --data corpus/ --quick

For every setting (int4 g64, q4_0, int3 g64, int2 g64, a sensitivity-allocated
``mixed`` recipe and the ``mobile`` schema) every applicable method quantizes
the same full-precision model with the same calibration data and the same
number of optimizer steps:

* round-to-nearest (``nn.quantize``, or ``mlxqat.prepare`` + ``convert`` for
  recipes ``nn.quantize`` cannot express: symmetric, channel-wise, per-layer);
* mlx-lm's GPTQ, AWQ and DWQ, called as libraries from ``mlx_lm.quant``;
* mlxqat QAT in its three modes: all weights (with learned scales where the
  format allows), scales only, and QA-LoRA.

Each result is measured on held-out text (perplexity, KL to the full-precision
model, top-1 agreement), on out-of-domain text (the Python documentation in
``pydoc_data``, prose that no training split contains), and by its storage (bits
per weight, bytes on disk). ``gap recovered`` is
``(ppl_RTN - ppl_method) / (ppl_RTN - ppl_full)`` at the same setting.

Every method runs through the same CPU matmul: ``nn.QuantizedLinear`` and the
tied-embedding head dequantize their weight and call BLAS (numerically the
same product as ``mx.quantized_matmul``, whose CPU kernel is naive at these
shapes); see :func:`fast_cpu_matmul`. Writes ``<out>.md``, ``<out>.json`` and
``<out>.png`` (default ``benchmarks/results/quality``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlxqat  # noqa: E402
import mlxqat.qat  # noqa: E402
from mlxqat import mixed, quant  # noqa: E402
from mlxqat.convert import prepare_calibrated  # noqa: E402
from mlxqat.data import spread, stdlib_windows  # noqa: E402
from mlxqat.evaluate import evaluate, gap_recovered  # noqa: E402
from mlxqat.qat import RECIPE_DEFAULTED  # noqa: E402
from mlxqat.recipes import QAT_DEFAULTS, LayerSpec, Recipe  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality"

# ---------------------------------------------------------------------------
# Settings, methods and budgets
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    name: str
    label: str  # what the table shows
    bits: Optional[int] = None  # uniform affine settings: what nn.quantize / GPTQ / AWQ / DWQ take
    group_size: Optional[int] = None
    recipe: Optional[str] = None  # a built-in recipe (non-uniform-affine formats)
    budget_bpw: Optional[float] = None  # mixed / mobile: allocated from measured sensitivity

    @property
    def uniform_affine(self) -> bool:
        return self.bits is not None


SETTINGS = {
    "int4": Setting("int4", "int4 g64", 4, 64),
    "q4_0": Setting("q4_0", "q4_0 (g32 symmetric)", recipe="q4_0"),
    "int3": Setting("int3", "int3 g64", 3, 64),
    "int2": Setting("int2", "int2 g64", 2, 64),
    "mixed": Setting("mixed", "mixed (sensitivity, 3.0 bpw budget)", budget_bpw=3.0),
    "mobile": Setting("mobile", "mobile (channel-wise, int8 act, 2.6 bpw budget)", budget_bpw=2.6),
}

METHODS = ("RTN", "GPTQ", "AWQ", "DWQ", "QAT", "QAT scales", "QAT LoRA")
NOT_APPLICABLE = {
    # (method, setting): why it is not run
    ("GPTQ", "q4_0"): "mlx-lm GPTQ makes affine scales only (no symmetric Q4_0)",
    ("AWQ", "q4_0"): "mlx-lm AWQ makes affine scales only (no symmetric Q4_0)",
    ("DWQ", "q4_0"): "DWQ trains scales and biases independently, which leaves Q4_0's symmetric format",
    ("QAT scales", "q4_0"): "learned biases leave Q4_0's symmetric format (QAT trains the weights instead)",
    ("QAT LoRA", "q4_0"): "QA-LoRA merges into the biases, which leaves Q4_0's symmetric format",
    ("GPTQ", "mixed"): "mlx-lm GPTQ takes one bit width for all layers",
    ("AWQ", "mixed"): "mlx-lm AWQ takes one bit width for all layers",
    ("GPTQ", "mobile"): "mlx-lm GPTQ has no channel-wise or activation quantization",
    ("AWQ", "mobile"): "mlx-lm AWQ has no channel-wise or activation quantization",
    ("DWQ", "mobile"): "mlx-lm DWQ has no activation quantization and would break channel-wise scales",
    ("QAT scales", "mobile"): "per-group learned scales would break channel-wise quantization",
    ("QAT LoRA", "mobile"): "QA-LoRA's per-group bias deltas would break channel-wise quantization",
}

# The QAT modes (TrainingArgs fields; steps/batch/seq come from the budget). Learning rates,
# warmup and learned-scale settings are the library's defaults by bit width
# (mlxqat.recipes.QAT_DEFAULTS, applied by mlxqat.qat.quantize_qat, as python -m mlxqat.train does).
QAT_ARGS = {
    "QAT": dict(trainable="all"),
    "QAT scales": dict(trainable="scales"),
    "QAT LoRA": dict(trainable="lora", learning_rate=1e-5, lora_learning_rate=1e-3),
}
# Scales-only mode: the scales/biases are all it trains, at a rate of their own.
QAT_SCALES_LR = {8: 1e-5, 6: 1e-5, 5: 1e-5, 4: 1e-5, 3: 3e-5, 2: 1e-4}
# DWQ's learning rate per bit width (constant, Adam, as mlx_lm.quant.dwq's main):
# the best of 1e-6 / 1e-5 / 1e-4 measured on the reference model (DESIGN.md notes).
DWQ_LR = {4: 1e-5, 3: 1e-5, 2: 1e-4}
# Bit widths the mixed/mobile allocations choose from. At budgets of 2.6-3 bits
# per weight wider options are never picked, so they are not measured (time).
SENSITIVITY_BITS = (2, 3, 4)
# Windows that set static activation scales (mlxqat.calibrate) where a recipe asks.
CALIBRATION_WINDOWS = 16


@dataclass
class Budget:
    steps: int  # optimizer steps of every training method (DWQ and QAT)
    batch_size: int  # windows per step
    seq_len: int  # tokens per window
    eval_windows: int  # held-out windows (in-domain)
    ood_windows: int  # out-of-domain windows
    select_windows: int  # validation windows QAT picks its best step on
    select_every: int  # steps between those checks
    sensitivity_windows: int  # windows of the sensitivity pass
    awq_windows: int  # AWQ calibration windows (the first of the training windows)
    gptq_windows: int  # GPTQ calibration windows (the first of the training windows)
    settings: Tuple[str, ...] = tuple(SETTINGS)
    methods: Tuple[str, ...] = METHODS
    # (method, setting) pairs this budget leaves out for time (asking for the
    # method with --methods runs it everywhere it applies)
    leave_out: Tuple[Tuple[str, str], ...] = ()


FULL = Budget(steps=100, batch_size=8, seq_len=256, eval_windows=64, ood_windows=32, select_windows=8,
              select_every=20, sensitivity_windows=4, awq_windows=32, gptq_windows=128,
              leave_out=(("QAT scales", "int3"), ("QAT LoRA", "int3"), ("QAT scales", "mixed"), ("QAT LoRA", "mixed")))
QUICK = Budget(steps=12, batch_size=4, seq_len=128, eval_windows=12, ood_windows=8, select_windows=4,
               select_every=6, sensitivity_windows=4, awq_windows=8, gptq_windows=16, settings=("int4", "int2", "mixed", "mobile"))


# ---------------------------------------------------------------------------
# One CPU matmul for every method
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def fast_cpu_matmul(enabled: bool = True):
    """Run ``nn.QuantizedLinear`` and ``nn.QuantizedEmbedding.as_linear`` as dequantize + BLAS.

    MLX's CPU ``quantized_matmul`` is a naive loop at training shapes; the
    dequantized weight (``mx.dequantize``, the same numbers) times ``x`` on BLAS
    computes the same product up to float summation order, 20-50x faster
    here. Gradients reach ``scales`` and ``biases`` (codes fixed), which is
    what DWQ trains. On a GPU (or with ``enabled=False``) nothing changes.
    """
    if not enabled or mx.default_device() != mx.cpu:
        yield
        return
    lin_call, emb_linear = nn.QuantizedLinear.__call__, nn.QuantizedEmbedding.as_linear

    def weight(m):
        return quant.dequantize_frozen(m["weight"], m["scales"], m["biases"], m.bits, m.group_size)

    def linear(self, x):
        if getattr(self, "mode", "affine") != "affine" or self.get("biases") is None:
            return lin_call(self, x)
        y = x @ weight(self).astype(x.dtype).T
        return y + self["bias"] if "bias" in self else y

    def as_linear(self, x):
        if getattr(self, "mode", "affine") != "affine" or self.get("biases") is None:
            return emb_linear(self, x)
        return x @ weight(self).astype(x.dtype).T

    nn.QuantizedLinear.__call__, nn.QuantizedEmbedding.as_linear = linear, as_linear
    try:
        yield
    finally:
        nn.QuantizedLinear.__call__, nn.QuantizedEmbedding.as_linear = lin_call, emb_linear


# ---------------------------------------------------------------------------
# Teacher logits, computed once per window and shared by every method
# ---------------------------------------------------------------------------


class CachedTeacher:
    """The full-precision model's logits, cached per window (keyed by its tokens).

    Callable like the teacher model: ``cache(inputs)`` -> logits (B, T, V). Every
    method (DWQ's ``target_fn``, QAT's teacher, the evaluation) reads the same
    numbers, and the teacher runs once per window in the whole benchmark.
    Windows beyond ``max_bytes`` of cache are recomputed on each call.
    """

    def __init__(self, model: nn.Module, max_bytes: float = 6e9):
        self.model, self.max_bytes = model, max_bytes
        self._rows: Dict[bytes, mx.array] = {}
        self.bytes = 0
        self.seconds = 0.0

    def freeze(self, *a, **k):  # the trainer freezes its teacher
        return self

    @staticmethod
    def _key(row: np.ndarray) -> bytes:
        return hashlib.sha1(row.astype(np.int32).tobytes()).digest()

    def __call__(self, inputs: mx.array) -> mx.array:
        arr = np.array(inputs)
        keys = [self._key(r) for r in arr]
        missing = [i for i, k in enumerate(keys) if k not in self._rows]
        fresh = {}
        if missing:
            t0 = time.perf_counter()
            logits = mx.stop_gradient(self.model(mx.array(arr[missing]))).astype(mx.float32)
            mx.eval(logits)
            self.seconds += time.perf_counter() - t0
            for j, i in enumerate(missing):
                fresh[keys[i]] = logits[j]
                if self.bytes + logits[j].nbytes <= self.max_bytes:
                    self._rows[keys[i]] = logits[j]
                    self.bytes += logits[j].nbytes
        return mx.stack([self._rows.get(k, fresh.get(k)) for k in keys])

    def prefill(self, windows: np.ndarray, batch_size: int) -> None:
        for i in range(0, len(windows), batch_size):
            self(mx.array(windows[i : i + batch_size, :-1]))


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def ood_text() -> Tuple[str, str]:
    """Out-of-domain text every Python has: the documentation topics of ``pydoc_data``."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text, "Python documentation prose (pydoc_data.topics, not in any stdlib split)"


def load_data(tokenizer, data: Optional[str], budget: Budget, seq_len: int, max_context) -> dict:
    """Training, selection, held-out and out-of-domain windows, each (n, seq_len + 1)."""
    from mlxqat.data import Document, build_dataset, pack, tokenize_documents

    n_train = budget.steps * budget.batch_size

    def windows_of(text, name):
        return pack(tokenize_documents([Document(name, text)], tokenizer), seq_len)

    if data is None:  # the windows python -m mlxqat.train trains on (mlxqat.data.stdlib_windows)
        train_w = stdlib_windows(tokenizer, "train", seq_len, n_train, oversample=4)
        select_w = stdlib_windows(tokenizer, "validation", seq_len, budget.select_windows)
        eval_w = stdlib_windows(tokenizer, "test", seq_len, budget.eval_windows)
        source = "CPython standard library source (mlxqat.stdlib_data splits: train / validation / test)"
    else:
        ds = build_dataset(data, tokenizer, seq_len, max_context=max_context)
        if len(ds.train) < n_train + budget.select_windows:
            raise ValueError(
                f"{data} gives {len(ds.train)} training windows of {seq_len} tokens; the budget needs "
                f"{n_train + budget.select_windows} (steps x batch + selection): add data or use --quick"
            )
        order = np.random.default_rng(0).permutation(len(ds.train))
        train_w = ds.train[np.sort(order[:n_train])]
        select_w = ds.train[np.sort(order[n_train : n_train + budget.select_windows])]
        eval_w = spread(ds.val, budget.eval_windows)
        source = f"{data} (hash split: 95% train / 5% held out)"
    text, ood_source = ood_text()
    ood_w = spread(windows_of(text, "ood"), budget.ood_windows)
    return dict(train=train_w, select=select_w, eval=eval_w, ood=ood_w, source=source, ood_source=ood_source)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def load_fp(model_path: Optional[str]):
    """``(model, tokenizer, config, storage dtype)``; the model computes in float32."""
    from mlxqat.train import load_model

    model, tokenizer, config = load_model(model_path)
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}
    storage = mx.bfloat16 if dtypes == {mx.bfloat16} else mx.float16
    model.set_dtype(mx.float32)
    model.freeze()
    return model, tokenizer, config, storage


def snap_to_storage(model: nn.Module, dtype) -> None:
    """Round every floating parameter to the dtype it is saved in, so we measure what ships."""
    params = [(k, v.astype(dtype).astype(v.dtype)) for k, v in tree_flatten(model.parameters())
              if mx.issubdtype(v.dtype, mx.floating)]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())


def storage_stats(model: nn.Module, dtype) -> dict:
    """Bits per quantized weight, and the bytes of the saved safetensors."""
    q_bits, q_weights = 0, 0
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            n = m["weight"].size * 32 // m.bits
            q_weights += n
            q_bits += m["weight"].size * 32 + (m["scales"].size + m["biases"].size) * 16
    weights = {k: (v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v)
               for k, v in tree_flatten(model.parameters())}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        mx.save_safetensors(path, weights)
        size = os.path.getsize(path)
    return {"bpw": q_bits / q_weights if q_weights else 16.0, "bytes": size}


def quantize_rtn(model: nn.Module, setting: Setting, recipe: Optional[Recipe], calib: np.ndarray) -> nn.Module:
    if setting.uniform_affine:
        nn.quantize(model, group_size=setting.group_size, bits=setting.bits)
        return model
    prepare_calibrated(model, recipe, calib)
    return mlxqat.convert(model)


def _gptq_pack(w, bits, scales, biases):
    """mlx-lm GPTQ's final packing, for any bit width MLX stores (its own handles 2/4/8)."""
    g = w.shape[-1] // scales.shape[-1]
    return quant.quantize_learned(w, scales, biases, bits, g)


def quantize_gptq(model, setting: Setting, windows: np.ndarray, batch_size: int) -> nn.Module:
    from mlx_lm.quant import gptq

    original = gptq.quantize
    gptq.quantize = _gptq_pack
    try:
        gptq.gptq_quantize(model, mx.array(windows[:, :-1]), setting.bits, setting.group_size,
                           fallback_bits=setting.bits, fallback_group_size=setting.group_size,
                           batch_size=batch_size)
    finally:
        gptq.quantize = original
    return model


def quantize_awq(model, setting: Setting, windows: np.ndarray, model_type: str) -> nn.Module:
    from mlx_lm.quant import awq

    awq.awq_quantize(model, mx.array(windows[:, :-1]), awq.AWQ_MODEL_CONFIGS[model_type],
                     group_size=setting.group_size, bits=setting.bits,
                     embed_group_size=setting.group_size, embed_bits=setting.bits)
    return model


def mlx_predicate(recipe: Recipe):
    """``nn.quantize`` class predicate giving each layer its spec from ``recipe`` (affine only)."""

    def predicate(path, module):
        spec = recipe.spec_for(path)
        if spec is None or not hasattr(module, "to_quantized"):
            return False
        return {"group_size": spec.group_size, "bits": spec.bits}

    return predicate


def quantize_dwq(model, setting: Setting, recipe: Optional[Recipe], data: dict, teacher: CachedTeacher,
                 budget: Budget, seq_len: int) -> nn.Module:
    from mlx_lm.quant.dwq import dwq_quantize

    if setting.uniform_affine:
        nn.quantize(model, group_size=setting.group_size, bits=setting.bits)
        bits = setting.bits
    else:
        nn.quantize(model, class_predicate=mlx_predicate(recipe))
        bits = min(s.bits for s in [recipe.default] + [s for _, s in recipe.overrides])
    # As in mlx_lm.quant.dwq's main: the norms stay trainable, dwq_quantize unfreezes scales/biases.
    as_items = lambda w: [(row, 0) for row in w]  # noqa: E731  (tokens, prompt offset), mlx-lm's format
    valid = data["select"][: max(budget.batch_size, len(data["select"]) // budget.batch_size * budget.batch_size)]
    opt = optim.Adam(learning_rate=DWQ_LR.get(bits, 1e-5), bias_correction=True)
    dwq_quantize(model, lambda batch, idx, split: teacher(batch), opt, as_items(data["train"]), as_items(valid),
                 batch_size=budget.batch_size, max_seq_length=seq_len + 1, seed=0, dtype=mx.float32)
    model.eval()
    return model


def quantize_qat(model, recipe: Recipe, mode: str, data: dict, teacher: CachedTeacher, budget: Budget,
                 seq_len: int, progress: bool, args_override: Optional[dict] = None) -> Tuple[nn.Module, dict]:
    """The product's QAT (mlxqat.qat.quantize_qat, what python -m mlxqat.train runs) in ``mode``."""
    kw = dict(QAT_ARGS[mode], **(args_override or {}))
    if mode == "QAT scales":
        kw.setdefault("scale_learning_rate", QAT_SCALES_LR[min(s.bits for s in recipe.specs())])
    windows = data["train"][: budget.steps * budget.batch_size]
    summary = mlxqat.qat.quantize_qat(
        model, teacher, windows, recipe, select_windows=data["select"], steps=budget.steps,
        batch_size=budget.batch_size, seq_len=seq_len, log_every=min(budget.select_every, budget.steps),
        progress=progress, **kw,
    )
    mlxqat.convert(model)
    info = {"args": {k: v for k, v in summary["args"].items() if k in kw or k in RECIPE_DEFAULTED + ("steps", "batch_size", "seq_len")},
            "best_step": summary["best_step"], "selection_kl": summary["selection_kl"],
            "final_loss": summary["final_loss"]}
    return model, info


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def build_recipe(setting: Setting, fp_model, data, budget, progress, report) -> Optional[Recipe]:
    if setting.recipe:
        return mlxqat.recipes.get(setting.recipe)
    if setting.uniform_affine:
        return Recipe(setting.name, LayerSpec(setting.bits, setting.group_size))
    calib = data["train"][: budget.sensitivity_windows]
    group = -1 if setting.name == "mobile" else 64
    options = tuple(LayerSpec(b, group) for b in SENSITIVITY_BITS)
    t0 = time.perf_counter()
    sens = mixed.layer_sensitivity(fp_model, calib, options, progress=progress)
    seconds = time.perf_counter() - t0
    proxy = mixed.proxy_sensitivity(fp_model, calib, options)
    if setting.name == "mobile":
        recipe = mixed.mobile_recipe(fp_model, calib, setting.budget_bpw, options=options, sensitivity=sens)
    else:
        recipe = mixed.mixed_recipe(fp_model, calib, setting.budget_bpw, options=options, sensitivity=sens)
    report[setting.name] = {
        "options": [o.to_dict() for o in options],
        "sensitivity_kl": sens,
        "sensitivity_seconds": seconds,
        "proxy_rank_correlation": mixed.rank_correlation(sens, proxy),
        "recipe": recipe.to_dict(),
    }
    return recipe


def run(model: Optional[str] = None, data: Optional[str] = None, quick: bool = False, out: str = str(DEFAULT_OUT),
        settings: Optional[List[str]] = None, methods: Optional[List[str]] = None, steps: Optional[int] = None,
        progress: bool = True, budget: Optional[Budget] = None) -> dict:
    """Run the benchmark; write ``<out>.md``, ``<out>.json`` and ``<out>.png``; return the JSON dict."""
    from mlxqat.data import model_context

    t_start = time.perf_counter()
    budget = copy.deepcopy(budget or (QUICK if quick else FULL))
    if steps:
        budget.steps = steps
    if settings:
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; choose from {list(SETTINGS)}")
        budget.settings = tuple(settings)
    if methods:
        unknown = set(methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
        budget.methods = tuple(methods)
        budget.leave_out = ()

    teacher_model, tokenizer, config, storage = load_fp(model)
    ctx = model_context(teacher_model)
    seq_len = min(budget.seq_len, ctx) if ctx else budget.seq_len
    data_sets = load_data(tokenizer, data, budget, seq_len, ctx)
    model_type = config.get("model_type", "")
    n_params = sum(v.size for _, v in tree_flatten(teacher_model.parameters()))
    bf16_bytes = 2 * n_params

    def fresh():
        m, _, _, _ = load_fp(model)
        m.unfreeze()
        return m

    teacher = CachedTeacher(teacher_model)
    t0 = time.perf_counter()
    for name in ("train", "select", "eval", "ood"):
        teacher.prefill(data_sets[name], budget.batch_size)
    teacher_seconds = time.perf_counter() - t0

    rows: List[dict] = []
    skipped: List[dict] = []
    sensitivity_report: Dict[str, dict] = {}

    def measure(name: str, setting: Optional[Setting], m: nn.Module, wall: float, extra=None) -> dict:
        snap_to_storage(m, storage)
        m.eval()
        ev = evaluate(m, data_sets["eval"], teacher)
        ood = evaluate(m, data_sets["ood"], teacher)
        st = storage_stats(m, storage) if setting else {"bpw": 16.0, "bytes": None}
        row = {
            "setting": setting.name if setting else "fp",
            "setting_label": setting.label if setting else "full precision",
            "method": name,
            "ppl": ev["ppl"], "kl": ev["kl"], "top1": ev["top1"],
            "ood_ppl": ood["ppl"], "ood_kl": ood["kl"],
            "bpw": st["bpw"],
            "bytes": st["bytes"] if st["bytes"] is not None else bf16_bytes,
            "wall_s": wall,
        }
        row["ratio_bf16"] = row["bytes"] / bf16_bytes
        if extra:
            row["info"] = extra
        rows.append(row)
        print(f"  {row['setting']:>6} {name:<11} ppl {row['ppl']:.4f}  kl {row['kl']:.5f}  top1 {100 * row['top1']:.2f}%  "
              f"ood {row['ood_ppl']:.3f}  bpw {row['bpw']:.3f}  {wall:.1f} s", flush=True)
        return row

    with fast_cpu_matmul():
        print(f"full precision ({n_params / 1e6:.2f}M parameters)", flush=True)
        fp_row = measure("full precision", None, teacher_model, 0.0)
        for sname in budget.settings:
            setting = SETTINGS[sname]
            print(f"\n== {setting.label} ==", flush=True)
            t0 = time.perf_counter()
            recipe = build_recipe(setting, teacher_model, data_sets, budget, progress, sensitivity_report)
            recipe_seconds = time.perf_counter() - t0
            for method in budget.methods:
                why = NOT_APPLICABLE.get((method, sname))
                if why is None and (method, sname) in budget.leave_out:
                    why = f"left out of the default run for time (`--methods \"{method}\"` runs it)"
                if method == "AWQ" and why is None:
                    from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS

                    if model_type not in AWQ_MODEL_CONFIGS:
                        why = f"mlx-lm AWQ has no configuration for model_type={model_type!r}"
                if why:
                    skipped.append({"setting": sname, "method": method, "why": why})
                    continue
                m = fresh()
                t0 = time.perf_counter()
                extra = None
                if method == "RTN":
                    quantize_rtn(m, setting, recipe, data_sets["train"][:CALIBRATION_WINDOWS])
                elif method == "GPTQ":
                    quantize_gptq(m, setting, data_sets["train"][: budget.gptq_windows], budget.batch_size)
                elif method == "AWQ":
                    quantize_awq(m, setting, data_sets["train"][: budget.awq_windows], model_type)
                elif method == "DWQ":
                    quantize_dwq(m, setting, recipe, data_sets, teacher, budget, seq_len)
                else:
                    m, extra = quantize_qat(m, recipe, method, data_sets, teacher, budget, seq_len, progress)
                # the sensitivity pass is part of every method of a mixed setting
                wall = time.perf_counter() - t0 + recipe_seconds
                measure(method, setting, m, wall, extra)
                del m

    for r in rows:
        rtn = next((x for x in rows if x["setting"] == r["setting"] and x["method"] == "RTN"), None)
        if r["setting"] == "fp" or rtn is None:
            r["gap_recovered"] = None
            r["ood_gap_recovered"] = None
            continue
        r["gap_recovered"] = _finite(gap_recovered(rtn["ppl"], r["ppl"], fp_row["ppl"]))
        r["ood_gap_recovered"] = _finite(gap_recovered(rtn["ood_ppl"], r["ood_ppl"], fp_row["ood_ppl"]))

    result = {
        "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("quality.py") else None,
        "model": model or "embedded:stdlib-llama (mlxqat/assets/stdlib-llama)",
        "model_type": model_type,
        "parameters": n_params,
        "machine": machine(),
        "budget": dataclasses.asdict(budget),
        "seq_len": seq_len,
        "data": {"train": data_sets["source"], "out_of_domain": data_sets["ood_source"],
                 "windows": {k: int(len(data_sets[k])) for k in ("train", "select", "eval", "ood")},
                 "tokens_eval": int(len(data_sets["eval"]) * seq_len), "tokens_ood": int(len(data_sets["ood"]) * seq_len)},
        "teacher_logits_seconds": teacher_seconds,
        "qat_args": QAT_ARGS,
        "qat_defaults": {str(k): dataclasses.asdict(v) for k, v in QAT_DEFAULTS.items()},
        "qat_scales_lr": {str(k): v for k, v in QAT_SCALES_LR.items()},
        "dwq_lr": {str(k): v for k, v in DWQ_LR.items()},
        "fast_cpu_matmul": mx.default_device() == mx.cpu,
        "mixed": sensitivity_report,
        "rows": rows,
        "not_applicable": skipped,
        "total_seconds": time.perf_counter() - t_start,
    }
    write_outputs(result, Path(out))
    print(f"\nwrote {out}.md / .json / .png in {result['total_seconds']:.0f} s", flush=True)
    return result


def _finite(x: float) -> Optional[float]:
    return x if x == x and math.isfinite(x) else None


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), mlx {mx.__version__} on {mx.default_device()}"


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def markdown(result: dict) -> str:
    rows = result["rows"]
    fp = next(r for r in rows if r["setting"] == "fp")
    lines = [
        "# Quality benchmark",
        "",
        f"Model: {result['model']} ({result['parameters'] / 1e6:.2f}M parameters, {result['model_type']}). "
        f"Machine: {result['machine']}.",
        f"Command: `{result['command'] or 'benchmarks/quality.py'}`; total {result['total_seconds'] / 60:.1f} min.",
        "",
        f"Held-out text: {result['data']['tokens_eval']} tokens of {result['data']['train']} (test split). "
        f"Out of domain (OOD): {result['data']['tokens_ood']} tokens of {result['data']['out_of_domain']}.",
        f"Every training method: {result['budget']['steps']} steps x {result['budget']['batch_size']} windows x "
        f"{result['seq_len']} tokens, the same windows and the same teacher logits.",
        "",
        "| setting | method | ppl | ppl / fp | KL to fp | top-1 | gap recovered | OOD ppl | OOD gap rec. | bpw | MB on disk | vs bf16 | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting_label']} | {r['method']} | {r['ppl']:.3f} | {r['ppl'] / fp['ppl']:.3f}x | "
            f"{abs(r['kl']) if r['setting'] == 'fp' else r['kl']:.5f} | {100 * r['top1']:.2f}% | "
            f"{_pct(r.get('gap_recovered'))} | {r['ood_ppl']:.3f} | {_pct(r.get('ood_gap_recovered'))} | "
            f"{r['bpw']:.3f} | {r['bytes'] / 1e6:.2f} | {r['ratio_bf16']:.3f} | {r['wall_s']:.1f} |"
        )
    lines += ["", f"Full-precision perplexity {fp['ppl']:.3f} (OOD {fp['ood_ppl']:.3f})."]
    targets = target_summary(rows)
    if targets:
        lines += ["", "Targets:", ""] + [f"- {t}" for t in targets]
    if result["not_applicable"]:
        lines += ["", "Not run:", ""]
        lines += [f"- {s['method']} at {s['setting']}: {s['why']}" for s in result["not_applicable"]]
    if result["mixed"]:
        lines += ["", "Mixed precision:", ""]
        for name, rep in result["mixed"].items():
            lines.append(
                f"- `{name}`: {rep['recipe']['description']}. Sensitivity pass (per-layer KL) "
                f"{rep['sensitivity_seconds']:.0f} s; rank correlation of the one-pass output-error proxy "
                f"with the measured KL: {rep['proxy_rank_correlation']:.2f}."
            )
    lines += [
        "",
        "Notes:",
        "",
        "- Every method runs through the same CPU matmul (dequantize + BLAS: the same product as "
        "`mx.quantized_matmul`, whose CPU kernel is naive at these shapes), so the table compares quality, not kernels.",
        "- Scales, biases and other floating parameters are rounded to the model's storage dtype before measuring: "
        "the numbers are those of the saved model.",
        f"- The teacher's logits are computed once ({result['teacher_logits_seconds']:.0f} s, not in any row's wall time) "
        "and shared by DWQ, QAT and the evaluation.",
        f"- DWQ: `mlx_lm.quant.dwq.dwq_quantize` (Adam, constant learning rate {result['dwq_lr']} by bit width, "
        "temperature 2, its defaults otherwise). GPTQ: the first "
        f"{result['budget']['gptq_windows']} training windows; AWQ: the first {result['budget']['awq_windows']} "
        "(fewer tokens than mlx-lm's defaults, for CPU time). GPTQ's packing is swapped for mlxqat's (same format) so that "
        "3-bit works; the embedding (tied head) is round-to-nearest at the same bits in every method.",
        "- QAT picks its best step by KL on separate validation windows (checked every "
        f"{result['budget']['select_every']} steps, step 0 included).",
    ]
    return "\n".join(lines) + "\n"


def target_summary(rows: List[dict]) -> List[str]:
    """The product's quality targets, each checked against this run's rows."""

    def row(setting, method):
        return next((r for r in rows if r["setting"] == setting and r["method"] == method), None)

    def gap(r):
        return r.get("gap_recovered") if r else None

    out = []
    for setting, goal in (("int4", 0.90), ("int3", 0.80), ("int2", 0.85)):
        q = row(setting, "QAT")
        if gap(q) is not None:
            verdict = "met" if gap(q) >= goal else "missed"
            out.append(f"{q['setting_label']}: QAT recovers {_pct(gap(q))} of the RTN perplexity gap "
                       f"(target >= {goal:.0%}: {verdict}).")
    for setting in sorted({r["setting"] for r in rows if r["method"] == "DWQ"}, key=list(SETTINGS).index):
        q, d = row(setting, "QAT"), row(setting, "DWQ")
        if q and d:
            verdict = "beats" if q["ppl"] < d["ppl"] and q["kl"] < d["kl"] else "does not beat"
            out.append(f"{q['setting_label']}: QAT {verdict} DWQ (ppl {q['ppl']:.3f} vs {d['ppl']:.3f}, "
                       f"KL {q['kl']:.5f} vs {d['kl']:.5f}).")
    fp = row("fp", "full precision")
    m = row("mobile", "QAT")
    if m and fp:
        ok = m["bpw"] <= 2.6 + 1e-9 and m["ppl"] / fp["ppl"] <= 1.04
        out.append(f"mobile: QAT at {m['bpw']:.3f} bits per weight has {m['ppl'] / fp['ppl']:.3f}x the "
                   f"full-precision perplexity (target <= 2.6 bpw and <= 1.04x: {'met' if ok else 'missed'}).")
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["setting"] != "fp"]
    fp = next(r for r in result["rows"] if r["setting"] == "fp")
    fig, ax = plt.subplots(figsize=(8, 5))
    for method in METHODS:
        pts = sorted((r["bpw"], r["ppl"]) for r in rows if r["method"] == method)
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=method)
    ax.axhline(fp["ppl"], color="k", linestyle="--", linewidth=1, label="full precision")
    ax.set_xlabel("bits per weight (scales and biases included)")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_yscale("log")
    ax.set_title(f"{result['model_type']} {result['parameters'] / 1e6:.1f}M: perplexity vs bits per weight")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(str(out) + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(str(out) + ".md", "w") as f:
        f.write(markdown(result))
    plot(result, Path(str(out) + ".png"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/quality.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Model directory or Hugging Face id (default: the embedded stdlib model).")
    p.add_argument("--data", default=None, help="Calibration/training text (file, folder or JSONL; default: the stdlib source).")
    p.add_argument("--quick", action="store_true", help="A reduced run (fewer settings, steps and windows): a few minutes.")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="Output path prefix for .md, .json and .png.")
    p.add_argument("--settings", nargs="+", default=None, help=f"Subset of {list(SETTINGS)}.")
    p.add_argument("--methods", nargs="+", default=None, help=f"Subset of {list(METHODS)}.")
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps of every training method.")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="No progress bars.")
    args = p.parse_args(argv)
    try:
        run(**vars(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
