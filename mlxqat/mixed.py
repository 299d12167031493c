"""Mixed precision: measure how much each layer hurts when quantized, then spend a bits budget.

    from mlxqat.mixed import mixed_recipe, mobile_recipe
    recipe = mixed_recipe(model, windows, budget_bpw=3.0)    # per-layer bits, g64 affine
    recipe = mobile_recipe(model, windows, budget_bpw=2.6)   # channel-wise, int8 activations
    mlxqat.prepare(model, recipe)

The sensitivity of a layer to a :class:`~mlxqat.recipes.LayerSpec` is the KL
divergence from the full-precision model's next-token distribution when only
that layer is round-to-nearest quantized with that spec (everything else in
full precision), averaged over the calibration tokens. Assuming the effects
add up, the allocation that minimises the summed KL under a bits-per-weight
budget is a multiple-choice knapsack, solved exactly (up to a fine
discretisation of the cost) by dynamic programming.

:func:`proxy_sensitivity` is a cheaper stand-in that needs one forward pass in
all: the output error ``E||x (W - Wq)^T||^2`` of each layer on the calibration
activations. :func:`rank_correlation` says how well it orders layers like the
measured KL (``benchmarks/quality.py`` reports it); the KL pass is the default:
it orders layers better (rank correlation 0.62 on SmolLM2-135M) and, with the
full-precision outputs of the blocks before each layer's own reused, costs
minutes on a 135M-parameter model on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from . import quant
from .evaluate import distribution, mean_kl
from .recipes import LayerSpec, Recipe
from .training.blockwise import model_blocks, wrapped_block_calls

# Options of the `mixed` allocation: g64 affine at these widths (bits per weight
# 2.5, 3.5, 4.5, 6.5, 8.5).
MIXED_BITS = (2, 3, 4, 6, 8)
# Options of the `mobile` allocation: channel-wise (one scale per output row).
MOBILE_BITS = (2, 3, 4, 8)
# Layers whose input is rounded to int8 with a static per-tensor scale in the
# mobile schema. down_proj is left out: its input (SiLU(gate) * up) has outliers
# a single int8 scale resolves badly; on the reference model int8 inputs cost
# KL 8e-4 there and at most 2e-5 on any other projection (benchmarks/results/quality.md).
MOBILE_ACT_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")


def quantizable_layers(model: nn.Module, options: Sequence[LayerSpec] = ()) -> Dict[str, nn.Module]:
    """``{path: layer}`` of the ``nn.Linear`` / ``nn.Embedding`` leaves a recipe can quantize.

    Layers whose ``in_features`` the group size of one of ``options`` cannot
    divide are left out (``prepare`` would leave them in full precision too).
    """
    out = {}
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if type(m) not in (nn.Linear, nn.Embedding):
            continue
        try:
            for spec in options or (LayerSpec(),):
                quant.storage_group_size(spec.group_size, m.weight.shape[-1])
        except ValueError:
            continue
        out[path] = m
    return out


def rtn_weight(w: mx.array, spec: LayerSpec) -> mx.array:
    """The round-to-nearest dequantized weight ``spec`` gives ``w`` (the converted layer's weight)."""
    g = quant.storage_group_size(spec.group_size, w.shape[-1])
    packed, s, b = quant.init_params(w, spec.bits, spec.group_size, spec.mode, spec.scale_dtype)
    return quant.dequantize(packed, s, b, spec.bits, g).astype(w.dtype)


def _inputs(windows) -> mx.array:
    return mx.array(np.asarray(windows)[:, :-1])


def layer_sensitivity(
    model: nn.Module,
    windows,
    options: Sequence[LayerSpec],
    batch_size: int = 8,
    progress: bool = False,
    reuse_blocks: bool = True,
) -> Dict[str, List[float]]:
    """Per-layer KL to the full-precision model when only that layer is quantized.

    Args:
        model: a full-precision model (not modified: each layer's weight is
            swapped for its quantized value and restored).
        windows: token windows (n, seq_len + 1); the first ``seq_len`` tokens are used.
        options: candidate specs; weight settings only (``act_bits`` is ignored).
        batch_size: windows per forward pass.
        progress: show a progress bar over the layers.
        reuse_blocks: a layer inside transformer block ``i`` (``model.model.layers``) cannot change
            what blocks before ``i`` compute, so their full-precision outputs, kept from the reference
            pass, stand in for them and only blocks ``i`` onwards run again: the same numbers as
            running the whole model (checked once on the calibration tokens, else every pass runs
            the whole model), in about half the time.

    Returns:
        ``{path: [mean KL per token for each option]}`` (nats).
    """

    inputs = _inputs(windows)
    batches = [inputs[i : i + batch_size] for i in range(0, inputs.shape[0], batch_size)]
    blocks = _blocks(model) if reuse_blocks else []
    with _replaying(blocks) as replay:
        logits = [mx.stop_gradient(model(x)) for x in batches]
        mx.eval(logits, replay.outputs)
        replay.recording = False
        if blocks and not _replay_matches(model, batches, logits, replay, len(blocks)):
            blocks = []
        teacher = [distribution(t) for t in logits]  # once, not in every comparison
        del logits
        mx.eval(teacher)
        owner = {id(m): i for i, b in enumerate(blocks) for _, m in b.named_modules()}
        layers = quantizable_layers(model, options)
        out = {}
        for path, layer in tqdm(layers.items(), desc="sensitivity", disable=not progress, dynamic_ncols=True):
            replay.skip = owner.get(id(layer), 0)  # blocks before this layer's own: their kept outputs
            original = layer.weight
            row = []
            for spec in options:
                layer.weight = rtn_weight(original, spec)
                row.append(mean_kl(teacher, replay.batched(model), batches))
            layer.weight = original
            out[path] = row
    return out


def _blocks(model: nn.Module) -> list:
    """The model's transformer blocks (``model.model.layers``), or [] where it has none."""

    try:
        return model_blocks(model)
    except ValueError:
        return []


class _Replay:
    """State of :func:`_replaying`: each block's output on each calibration batch, and how many blocks
    (from the first) return those outputs instead of computing."""

    def __init__(self, blocks: list):
        self.index = {id(b): i for i, b in enumerate(blocks)}
        self.outputs: List[List[mx.array]] = [[] for _ in blocks]  # [block][batch]
        self.recording, self.skip, self.batch = True, 0, 0

    def batched(self, model: nn.Module):
        """``model`` as :func:`mean_kl` calls it (batch after batch, in order), telling the blocks which
        batch they are replaying."""

        def call(x):
            logits = model(x)
            self.batch = (self.batch + 1) % max(len(self.outputs[0]) if self.outputs else 1, 1)
            return logits

        self.batch = 0
        return call


@contextlib.contextmanager
def _replaying(blocks: list):
    """While active, a block records its output (``recording``) or, when its index is below ``skip``,
    returns the output it recorded for the current batch."""

    replay = _Replay(blocks)

    def wrap(fn):
        def call(self, h, *args, **kwargs):
            i = replay.index.get(id(self))
            if i is None:
                return fn(self, h, *args, **kwargs)
            if replay.recording:
                out = fn(self, h, *args, **kwargs)
                replay.outputs[i].append(out)
                return out
            if i < replay.skip:
                return replay.outputs[i][replay.batch]
            return fn(self, h, *args, **kwargs)

        return call

    with wrapped_block_calls(blocks, wrap):
        yield replay


def _replay_matches(model, batches, teacher, replay: _Replay, n_blocks: int) -> bool:
    """Whether the model computes its reference logits exactly with its first ``n_blocks - 1`` blocks
    replayed (a model whose blocks are not one chain of hidden states would not)."""
    replay.skip = n_blocks - 1
    call = replay.batched(model)
    ok = all(bool(mx.array_equal(call(x), t).item()) for x, t in zip(batches, teacher))
    replay.skip = 0
    return ok


def proxy_sensitivity(
    model: nn.Module, windows, options: Sequence[LayerSpec], batch_size: int = 8
) -> Dict[str, List[float]]:
    """A one-pass stand-in for :func:`layer_sensitivity`: mean ``||x (W - Wq)^T||^2`` per token.

    Linear layers use the second moment ``H = X^T X / n`` of their inputs on the
    calibration tokens; an embedding uses its token frequencies (the squared
    error of the rows looked up). Units differ between layers of different
    kinds; check the ordering with :func:`rank_correlation` before relying on it.
    """
    inputs = _inputs(windows)
    layers = quantizable_layers(model, options)
    moments: Dict[str, mx.array] = {}
    counts: Dict[str, int] = {}
    originals = {}

    class Recorder(nn.Module):
        def __init__(self, path, inner):
            super().__init__()
            self.path, self.inner = path, inner

        def __call__(self, x):
            xf = x.reshape(-1, x.shape[-1]).astype(mx.float32)
            moments[self.path] = moments.get(self.path, 0) + xf.T @ xf
            counts[self.path] = counts.get(self.path, 0) + xf.shape[0]
            return self.inner(x)

        def as_linear(self, x):
            return self.inner.as_linear(x)

    linears = {p: m for p, m in layers.items() if isinstance(m, nn.Linear)}

    originals = list(linears.items())
    model.update_modules(tree_unflatten([(p, Recorder(p, m)) for p, m in originals]))
    try:
        for i in range(0, inputs.shape[0], batch_size):
            model(inputs[i : i + batch_size])
            mx.eval(list(moments.values()))
    finally:
        model.update_modules(tree_unflatten(originals))
    ids = np.asarray(inputs).reshape(-1)
    out = {}
    for path, layer in layers.items():
        w = layer.weight.astype(mx.float32)
        row = []
        for spec in options:
            err = w - rtn_weight(layer.weight, spec).astype(mx.float32)
            if path in moments:
                h = moments[path] / counts[path]
                row.append(mx.sum((err @ h) * err).item())
            else:  # embedding: rows weighted by how often they are looked up
                freq = mx.array(np.bincount(ids, minlength=w.shape[0])[: w.shape[0]] / ids.size, mx.float32)
                row.append(mx.sum(freq * mx.sum(err * err, axis=-1)).item())
        out[path] = row
    return out


def rank_correlation(a: Dict[str, List[float]], b: Dict[str, List[float]]) -> float:
    """Spearman correlation of two sensitivity tables over every (layer, option) entry."""
    keys = sorted(set(a) & set(b))
    x = np.array([v for k in keys for v in a[k]], dtype=np.float64)
    y = np.array([v for k in keys for v in b[k]], dtype=np.float64)
    if x.size < 2:
        raise ValueError("rank_correlation needs at least two common entries")
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def layer_sizes(model: nn.Module, options: Sequence[LayerSpec] = ()) -> Dict[str, Tuple[int, int]]:
    """``{path: (number of weights, in_features)}`` of each quantizable layer."""
    return {p: (int(m.weight.size), int(m.weight.shape[-1])) for p, m in quantizable_layers(model, options).items()}


def _size(entry) -> Tuple[int, Optional[int]]:
    return (entry, None) if isinstance(entry, (int, np.integer)) else (int(entry[0]), int(entry[1]))


def _cost(entry, spec: LayerSpec) -> float:
    n, k = _size(entry)
    return n * spec.bits_per_weight(k)


def allocate_bits(
    sensitivity: Dict[str, List[float]],
    sizes: Dict[str, int],
    options: Sequence[LayerSpec],
    budget_bpw: float,
    resolution: int = 4000,
) -> Dict[str, LayerSpec]:
    """Pick one option per layer minimising the summed sensitivity within a bits-per-weight budget.

    A multiple-choice knapsack solved by dynamic programming over the storage
    cost: exactly when costs are whole bits (they are for MLX's formats), else
    discretised into ``resolution`` steps of the budget with costs rounded up,
    so the result never exceeds the budget.

    Args:
        sensitivity: ``{path: [cost of each option]}`` (e.g. from :func:`layer_sensitivity`).
        sizes: ``{path: number of weights}`` or ``{path: (weights, in_features)}``
            (the second counts channel-wise scales at their real storage group).
        options: the specs the costs refer to, in the same order.
        budget_bpw: average bits per weight allowed, scales and biases included
            (:meth:`LayerSpec.bits_per_weight`).

    Returns:
        ``{path: chosen spec}``.

    Raises:
        ValueError: the budget is below the cheapest option everywhere.
    """
    paths = sorted(sensitivity)
    total = sum(_size(sizes[p])[0] for p in paths)
    budget_bits = budget_bpw * total
    cheapest = sum(min(_cost(sizes[p], o) for o in options) for p in paths)
    if cheapest > budget_bits * (1 + 1e-9):
        raise ValueError(
            f"budget_bpw={budget_bpw} is below the cheapest allocation "
            f"({cheapest / total:.3f} bits per weight); raise the budget or add a cheaper option"
        )
    raw = {p: [_cost(sizes[p], o) for o in options] for p in paths}
    ints = [round(c) for row in raw.values() for c in row]
    exact = all(abs(c - i) < 1e-6 for c, i in zip((c for row in raw.values() for c in row), ints))
    unit = math.gcd(*ints) if exact and ints else 0
    if unit and budget_bits / unit <= 200_000:  # costs are whole bits: solve exactly
        bins = int(math.floor(budget_bits / unit + 1e-9))
        steps = {p: [round(c) // unit for c in raw[p]] for p in paths}
    else:  # discretise, rounding every cost up so the budget still holds
        bins, unit = resolution, budget_bits / resolution
        steps = {p: [int(math.ceil(c / unit - 1e-9)) for c in raw[p]] for p in paths}
    INF = float("inf")
    dp = np.full(bins + 1, INF)
    dp[0] = 0.0
    choice = []
    for p in paths:
        new = np.full(bins + 1, INF)
        arg = np.full(bins + 1, -1, dtype=np.int64)
        for j, c in enumerate(steps[p]):
            if c > bins:
                continue
            cand = np.full(bins + 1, INF)
            cand[c:] = dp[: bins + 1 - c] + sensitivity[p][j]
            better = cand < new
            new[better], arg[better] = cand[better], j
        dp = new
        choice.append(arg)
    if not np.isfinite(dp).any():  # rounding up the cost of the cheapest option overflowed
        raise ValueError(f"budget_bpw={budget_bpw} leaves no room after rounding; raise it slightly")
    c = int(np.argmin(dp))
    out = {}
    for p, arg in zip(reversed(paths), reversed(choice)):
        j = int(arg[c])
        out[p] = options[j]
        c -= steps[p][j]
    return out


def bits_per_weight(assignment: Dict[str, LayerSpec], sizes: Dict[str, int]) -> float:
    """Average storage bits per weight of an assignment (scales and biases included)."""
    total = sum(_size(sizes[p])[0] for p in assignment)
    return sum(_cost(sizes[p], s) for p, s in assignment.items()) / total


def recipe_from_assignment(name: str, assignment: Dict[str, LayerSpec], description: str = "") -> Recipe:
    """A :class:`Recipe` whose overrides name every layer (exact paths; the default is never used)."""
    specs = list(assignment.values())
    default = max(set(specs), key=specs.count)
    overrides = tuple((p, s) for p, s in sorted(assignment.items()) if s != default)
    # An exact path is a glob matching only itself (module paths hold no * ? [ ]).
    return Recipe(name, default, overrides, description=description)


def _with_act(spec: LayerSpec, path: str, act_layers: Sequence[str]) -> LayerSpec:
    if path.rsplit(".", 1)[-1] in act_layers:
        return dataclasses.replace(spec, act_bits=8)
    return spec


def mixed_recipe(
    model: nn.Module,
    windows,
    budget_bpw: float = 3.0,
    *,
    options: Optional[Sequence[LayerSpec]] = None,
    name: str = "mixed",
    sensitivity: Optional[Dict[str, List[float]]] = None,
    act_layers: Sequence[str] = (),
    batch_size: int = 8,
    progress: bool = False,
) -> Recipe:
    """A recipe with per-layer bits chosen from measured sensitivity to meet ``budget_bpw``.

    Args:
        model: the full-precision model (not modified).
        windows: calibration token windows (n, seq_len + 1); a few thousand tokens suffice.
        budget_bpw: average bits per weight, scales and biases included.
        options: candidate specs (default: g64 affine with bits ``MIXED_BITS``).
        sensitivity: a table from :func:`layer_sensitivity` to reuse (same options).
        act_layers: layer names (last path component) that get static int8 activations.

    Returns:
        The :class:`Recipe`; its description records the budget and the bits per weight reached.
    """
    options = tuple(options or (LayerSpec(b, 64) for b in MIXED_BITS))
    if sensitivity is None:
        sensitivity = layer_sensitivity(model, windows, options, batch_size, progress)
    sizes = {p: n for p, n in layer_sizes(model, options).items() if p in sensitivity}
    assignment = allocate_bits(sensitivity, sizes, options, budget_bpw)
    bpw = bits_per_weight(assignment, sizes)
    assignment = {p: _with_act(s, p, act_layers) for p, s in assignment.items()}
    counts = {}
    for s in assignment.values():
        counts[s.bits] = counts.get(s.bits, 0) + 1
    mix = ", ".join(f"{n} layers at {b} bits" for b, n in sorted(counts.items()))
    return recipe_from_assignment(
        name, assignment, f"sensitivity-allocated to {budget_bpw} bits per weight (reached {bpw:.3f}): {mix}"
    )


def mobile_recipe(
    model: nn.Module,
    windows,
    budget_bpw: float = 2.6,
    *,
    options: Optional[Sequence[LayerSpec]] = None,
    sensitivity: Optional[Dict[str, List[float]]] = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Recipe:
    """The mobile schema fitted to a model: channel-wise weights, 2 bits where the model
    tolerates it and more where it is sensitive (measured), static int8 activations on
    every projection but ``down_proj`` (``MOBILE_ACT_LAYERS``). Call :func:`mlxqat.calibrate`
    after ``prepare``.
    """
    return mixed_recipe(
        model, windows, budget_bpw, options=options or mobile_options(), name="mobile", sensitivity=sensitivity,
        act_layers=MOBILE_ACT_LAYERS, batch_size=batch_size, progress=progress,
    )


def mobile_options() -> Tuple[LayerSpec, ...]:
    """Channel-wise affine candidates of the mobile allocation (weights only)."""
    return tuple(LayerSpec(b, -1) for b in MOBILE_BITS)
