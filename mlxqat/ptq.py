"""Post-training quantization as QAT's starting point: per layer, the best start this package can compute.

QAT trains float latent weights that each forward rounds to the recipe's grid, so it can start
from any quantized weight that round-to-nearest of some latent weight gives. :func:`ptq_start`
picks, for every fake-quant linear layer of a prepared model, the candidate with the lowest
output error on calibration inputs ``X``:

    err(Wq) = tr((W - Wq) H (W - Wq)^T) / n,   H = X^T X  (n input rows)

which is exactly the layer's mean squared output error ``||(W - Wq) x||^2`` over those inputs.
A candidate is a rounding rule under a set of scales:

* ``rtn/minmax``  round-to-nearest, min/max scales (the recipe's own rule; plain RTN)
* ``rtn/mse``     round-to-nearest, the per-group clip search (:func:`mlxqat.quant.mse_clip_params`)
* ``rtn/hmse``    round-to-nearest, the clip search weighted by ``diag(H)`` (the diagonal part of err)
* ``rtn/imatrix`` (K-quant layers with learned scales) llama.cpp's importance-weighted Q4_K / Q5_K
                  quantizer with ``diag(H)`` as the importance matrix (what ``llama-imatrix`` computes), scales
                  on their grid; for Q6_K its algorithm on the paired sub-blocks of 32 MLX holds
* ``gptq/S``      GPTQ's error-compensating rounding under the scales ``S`` of one of the above

GPTQ (Frantar et al., 2022) quantizes one input column at a time and spreads each column's
rounding error over the columns not yet quantized through the inverse Hessian (damped by 1% of
its mean diagonal), here with the scales fixed beforehand, columns in order of decreasing
``diag(H)`` ("act order", which fixed scales allow) and its lazy block updates.

How a start becomes the layer's state. A round-to-nearest candidate keeps the layer's own float
weight. A GPTQ candidate sets the latent weight to one that rounds back to GPTQ's codes under
the candidate's scales: by default the weights as GPTQ rounded them (each column with the errors
of the columns before it added), which sit within their step where they fell, as a float weight
does under round-to-nearest (``latent="grid"``: the dequantized codes, ``scale * code + bias``).
Whatever a candidate is, its error is measured on the weight the layer computes once it is set
(``layer.dequantized_weight()``), so the chosen layer computes exactly the candidate's weight,
and the layer's own start and round-to-nearest are always candidates: no layer's error is above
theirs. Layers whose scales are derived from the weight in every forward
(``learn_scales=False``: Q4_0, channel-wise, LoRA's frozen base) get ``rtn`` and ``gptq`` under
their own rule, with grid latents and each group's smallest and largest elements kept at their
round-to-nearest codes, so that the rule gives the same scales again (exactly for Q4_0; an affine
min/max rule recomputed may differ by a rounding, which the measured error includes).

Calibration inputs are the full-precision model's (fake quantization off while they are
captured): each layer's ``H`` is accumulated in float32 from hooks on the layers' calls, layers
fed the very same input array (``q/k/v_proj``, ``gate/up_proj``) sharing one ``H``. At most
``max_hessian_bytes`` of them exist at once: the layers are taken in call order, a chunk per
forward pass (MLX computes a pass only as far as the chunk's layers need). Embeddings, and the
tied output head, keep the start the recipe gives them.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from . import quant
from .layers import FakeQuantLinear, is_fake_quant, quantized_params, weight_released

SCALES = ("minmax", "mse", "hmse", "imatrix")
CANDIDATES = tuple(f"{r}/{s}" for r in ("rtn", "gptq") for s in SCALES)
DAMP = 0.01  # GPTQ's damping: this fraction of H's mean diagonal is added to its diagonal
BLOCK = 128  # GPTQ's lazy-update block of columns
MAX_HESSIAN_BYTES = 1 << 30
LATENTS = ("compensated", "grid")


@dataclass
class _Group:
    """Layers fed the same input array, and their shared ``H = X^T X`` over ``tokens`` input rows."""

    members: List[Tuple[str, FakeQuantLinear]]
    dim: int
    h: Optional[mx.array] = None
    tokens: int = 0


def targets(model: nn.Module) -> List[Tuple[str, FakeQuantLinear]]:
    """The layers :func:`ptq_start` sets: fake-quant linear layers with a float latent weight (codes not frozen)."""
    return [(p, m) for p, m in model.named_modules()
            if isinstance(m, FakeQuantLinear) and "codes" not in m and not weight_released(m)]


@contextlib.contextmanager
def _observing(on_input):
    """Within the body every :class:`FakeQuantLinear` call first passes ``(layer, x)`` to ``on_input``."""
    original = FakeQuantLinear.__call__

    def observed(self, x):
        on_input(self, x)
        return original(self, x)

    FakeQuantLinear.__call__ = observed
    try:
        yield
    finally:
        FakeQuantLinear.__call__ = original


@contextlib.contextmanager
def _full_precision(model: nn.Module, weights: Dict[int, mx.array]):
    """For the body, the full-precision model: fake quantization off in every fake-quant layer, and the
    layers in ``weights`` (``{id(layer): weight}``) computing with that weight (their full-precision one,
    where a start was already set); each layer's own setting and weight back after."""
    layers = [m for _, m in model.named_modules() if is_fake_quant(m)]
    before = [(m.fake_quant_enabled, m.weight) for m in layers]
    for m in layers:
        m.fake_quant_enabled = False
        m.weight = weights.get(id(m), m.weight)
    try:
        yield
    finally:
        for m, (enabled, w) in zip(layers, before):
            m.fake_quant_enabled, m.weight = enabled, w


def _input_groups(model: nn.Module, layers: Sequence[Tuple[str, FakeQuantLinear]], tokens: mx.array) -> List[_Group]:
    """The layers grouped by input array, in the order a forward pass on ``tokens`` first calls them."""
    index = {id(m): (p, m) for p, m in layers}
    groups: List[_Group] = []
    seen: Dict[int, Tuple[mx.array, _Group]] = {}  # id(x) -> (x, its group); x held so no id is reused
    placed = set()  # ids of the layers already in a group (a layer called twice stays in its first)

    def on_input(layer, x):
        if id(layer) not in index or id(layer) in placed:
            return
        placed.add(id(layer))
        hit = seen.get(id(x))
        if hit is None:
            hit = (x, _Group([], x.shape[-1]))
            seen[id(x)] = hit
            groups.append(hit[1])
        hit[1].members.append(index[id(layer)])

    with _observing(on_input):
        model(tokens)  # never evaluated: only the calls matter
    missing = [p for p, m in layers if id(m) not in placed]
    if missing:
        raise ValueError(f"the model's forward pass never called {missing[:3]} ({len(missing)} layers); "
                         "a layer's start is chosen from its inputs")
    return groups


def _chunks(groups: List[_Group], max_bytes: int) -> Iterator[List[_Group]]:
    chunk, size = [], 0
    for g in groups:
        b = 4 * g.dim * g.dim
        if chunk and size + b > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(g)
        size += b
    if chunk:
        yield chunk


def _accumulate(model: nn.Module, chunk: List[_Group], windows: np.ndarray, batch_size: int) -> None:
    """Fill each group's ``H`` (float32) and token count from ``windows`` (tokens ``(n, seq_len + 1)``)."""
    group_of = {id(m): g for g in chunk for _, m in g.members}
    for g in chunk:
        g.h, g.tokens = mx.zeros((g.dim, g.dim), mx.float32), 0
    batch_inputs: Dict[int, List[mx.array]] = {}  # per group: the input arrays already counted in this batch

    def on_input(layer, x):
        g = group_of.get(id(layer))
        if g is None or any(x is y for y in batch_inputs.setdefault(id(g), [])):
            return
        batch_inputs[id(g)].append(x)
        x2 = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        g.h = g.h + x2.T @ x2
        g.tokens += x2.shape[0]

    with _observing(on_input):
        for k in range(0, len(windows), batch_size):
            model(mx.array(windows[k : k + batch_size, :-1]))  # lazily: computed only as far as the H need
            mx.eval([g.h for g in chunk])
            batch_inputs.clear()


def capture_hessians(model: nn.Module, windows: np.ndarray, layers=None, batch_size: int = 4,
                     max_hessian_bytes: int = MAX_HESSIAN_BYTES) -> Iterator[List[_Group]]:
    """Chunks of layer groups with their ``H = X^T X`` on ``windows``, the full-precision model's inputs.

    Args:
        model: a prepared model (its fake-quant layers compute in full precision while this runs).
        windows: token windows ``(n, seq_len + 1)`` (the last token of each is not an input).
        layers: ``[(path, FakeQuantLinear)]`` to capture (default: :func:`targets`).
        max_hessian_bytes: the most float32 ``H`` bytes held at once (one group is always allowed).

    Yields:
        Lists of groups (``.members``: ``[(path, layer)]`` fed one input; ``.h``; ``.tokens``), in call
        order. A chunk's ``H`` are computed when it is yielded and dropped when the next one is asked for.
    """
    layers = targets(model) if layers is None else list(layers)
    if not layers:
        return
    windows = np.asarray(windows)
    # the weights now: a caller that sets a chunk's layers before asking for the next chunk (ptq_start)
    # does not change what the later layers are fed
    weights = {id(m): m.weight for _, m in layers}
    with _full_precision(model, weights):
        groups = _input_groups(model, layers, mx.array(windows[:1, :-1]))
    for chunk in _chunks(groups, max_hessian_bytes):
        with _full_precision(model, weights):  # not while the caller holds the chunk: it measures quantized layers
            _accumulate(model, chunk, windows, batch_size)
        yield chunk
        for g in chunk:
            g.h = None


# ---------------------------------------------------------------------------
# GPTQ with fixed scales
# ---------------------------------------------------------------------------


def _factor(a: mx.array, upper: bool = False) -> Optional[mx.array]:
    """Cholesky factor of ``a`` (float32, on the CPU), or None where ``a`` is not positive definite enough.

    MLX's Cholesky does not report failure (it returns a partial factor), so the factor is
    checked: a positive diagonal and ``L L^T`` reproducing ``a`` to float32 precision.
    """
    f = mx.linalg.cholesky(a, upper=upper, stream=mx.cpu)
    lower = f.T if upper else f
    d = mx.diagonal(lower)
    scale = mx.max(mx.abs(a))
    bad = mx.any(~mx.isfinite(lower)) | mx.any(d <= 0) | (mx.max(mx.abs(lower @ lower.T - a)) > 1e-3 * scale)
    return None if bool(bad.item()) else f


def _inverse_cholesky(h: mx.array, damp: float) -> Optional[mx.array]:
    """Upper ``U`` with ``U^T U = (H + damping)^-1``, raising the damping until it exists; None if it never does."""
    diag = mx.diagonal(h)
    live = diag > 0
    n_live = int(mx.sum(live).item())
    mean = float((mx.sum(mx.where(live, diag, 0)) / n_live).item()) if n_live else 1.0
    # an input that is always 0 (a dead column) reaches no output: a unit diagonal keeps H invertible
    h = h + mx.diag(mx.where(live, mx.zeros_like(diag), 1.0 - diag))
    eye = mx.eye(h.shape[0], dtype=mx.float32)
    for _ in range(6):
        lower = _factor(h + (damp * mean) * eye)
        if lower is not None:
            u = _factor(mx.linalg.cholesky_inv(lower, stream=mx.cpu), upper=True)
            if u is not None:
                return u
        damp *= 10
    return None


def _round(w, s, b, qmax):
    """Codes ``clip(round((w - b) / s), 0, qmax)``, a zero scale giving code 0 (as :func:`mlxqat.quant.quantize_codes`)."""
    zero = s == 0
    u = mx.where(zero, 0.0, (w - b) / mx.where(zero, 1.0, s))
    return mx.clip(mx.round(u), 0, qmax)


def gptq_codes(w: mx.array, h: mx.array, scales: mx.array, biases: mx.array, qmax,
               damp: float = DAMP, block: int = BLOCK, act_order: bool = True,
               pinned: Optional[mx.array] = None, return_updated: bool = False):
    """Integer codes of ``w`` under fixed scales by GPTQ's error-compensating rounding.

    Args:
        w: ``(rows, k)`` weights.
        h: ``(k, k)`` ``X^T X`` of the layer's inputs (any positive multiple of it: the result is the same).
        scales, biases: ``(rows, k)``: each weight's scale and offset (per-group values repeated over the group).
        qmax: the largest code, a number or one per row ``(rows,)``.
        damp: fraction of the mean diagonal added to the diagonal of ``h``.
        block: columns per lazy update.
        act_order: quantize columns in order of decreasing ``diag(h)``.
        pinned: ``(rows, k)``: a code that element must take, or -1 where GPTQ chooses (the
            pinned elements' errors are spread over the later columns as any other's).

        return_updated: also return the weights as GPTQ rounded them (each column with the errors
            of the columns before it added): round-to-nearest of those gives the codes.

    Returns:
        ``(rows, k)`` float32 codes in ``[0, qmax]`` (and with ``return_updated``, ``(codes, updated)``).
        If the damped ``h`` cannot be factored, the round-to-nearest codes (pinned codes kept).
    """
    w, s, b = (mx.array(a).astype(mx.float32) for a in (w, scales, biases))
    pinned = mx.full(w.shape, -1.0) if pinned is None else mx.array(pinned).astype(mx.float32)
    h = mx.array(h).astype(mx.float32)
    qmax = mx.array(qmax, dtype=mx.float32)
    qmax = qmax.reshape(-1, 1) if qmax.ndim else qmax
    n = w.shape[1]
    perm = mx.argsort(-mx.diagonal(h)) if act_order else mx.arange(n)
    u = _inverse_cholesky(h[perm][:, perm], damp)
    if u is None:
        codes = mx.where(pinned >= 0, pinned, _round(w, s, b, qmax))
        return (codes, w) if return_updated else codes
    w, s, b, pinned = w[:, perm], s[:, perm], b[:, perm], pinned[:, perm]
    col_qmax = qmax[:, 0] if qmax.ndim else qmax
    codes, updated = [], []
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, s1, b1, u1, p1 = w[:, i1:i2], s[:, i1:i2], b[:, i1:i2], u[i1:i2, i1:i2], pinned[:, i1:i2]
        errs = []
        for j in range(i2 - i1):
            col = w1[:, j]
            q = mx.where(p1[:, j] >= 0, p1[:, j], _round(col, s1[:, j], b1[:, j], col_qmax))
            e = (col - (s1[:, j] * q + b1[:, j])) / u1[j, j]
            # u1 is upper triangular: the columns before j are unchanged, column j is done with
            w1 = w1 - e[:, None] * u1[j][None, :]
            errs.append(e)
            codes.append(q)
            updated.append(col)
        if i2 < n:  # the block's errors reach the later columns in one product
            w = mx.concatenate([w[:, :i2], w[:, i2:] - mx.stack(errs, axis=1) @ u[i1:i2, i2:]], axis=1)
        mx.eval(w, codes[i1:i2], updated[i1:i2])
    back = mx.argsort(perm)
    codes = mx.stack(codes, axis=1)[:, back]
    return (codes, mx.stack(updated, axis=1)[:, back]) if return_updated else codes


def output_error(dw: mx.array, h: mx.array) -> float:
    """``tr(dW H dW^T)``: the summed squared output error of a weight error ``dW`` on inputs whose ``X^T X`` is ``h``."""
    dw = dw.astype(mx.float32)
    return float(mx.sum((dw @ h.astype(mx.float32)) * dw).item())


# ---------------------------------------------------------------------------
# Candidates of one layer
# ---------------------------------------------------------------------------


def _state(layer) -> dict:
    return {k: layer[k] for k in ("weight", "scales", "biases") if k in layer}


def _set(layer, state: dict) -> None:
    for k, v in state.items():
        setattr(layer, k, v)


def _scale_sources(layer, names: Sequence[str]) -> List[str]:
    """The scale rules a layer can start from: its own rule always; clip searches where its affine scales are
    learned; the importance-weighted K-quant algorithm for K-quant layers."""
    spec = layer.spec
    learned_affine = spec.learn_scales and spec.mode == "affine"
    ok = {"minmax": True, "mse": learned_affine, "hmse": learned_affine,
          "imatrix": spec.mode == "kquant" and spec.learn_scales}
    return [s for s in SCALES if s in names and ok[s]]


def _scales(layer, source: str, w0: mx.array, h_diag: mx.array) -> Tuple[mx.array, mx.array]:
    spec = layer.spec
    if source == "minmax":
        _, s, b = quant.init_params(w0, spec.bits, spec.group_size, spec.mode, spec.scale_dtype)
    elif source == "imatrix":
        _, s, b = quant.init_params(w0, spec.bits, spec.group_size, spec.mode,
                                    importance=np.array(h_diag.astype(mx.float32)))
    elif source == "mse":
        s, b = quant.mse_clip_params(w0, spec.bits, spec.group_size)
    else:
        s, b = quant.weighted_clip_params(w0, spec.bits, spec.group_size, h_diag)
    if spec.scale_dtype is not None and source not in ("minmax", "imatrix"):
        dt = getattr(mx, spec.scale_dtype)
        s, b = quant.snap_to(dt, s), quant.snap_to(dt, b)
    return s, b


def _anchors(layer, w: mx.array, s: mx.array, b: mx.array) -> mx.array:
    """Codes GPTQ must keep (-1: free): for a layer that derives its scales from its weight in every
    forward, each quantization group's smallest and largest elements keep their round-to-nearest
    codes, so that the new latent weight gives the same scales again (exactly for Q4_0's rule: its
    largest element stays on code 0; affine min/max scales recomputed can differ by a rounding)."""
    if layer.spec.learn_scales:
        return mx.full(w.shape, -1.0)
    g = w.shape[-1] if layer.spec.group_size == quant.CHANNELWISE else layer.group_size
    wg = w.reshape(w.shape[0], -1, g)
    ends = (wg == mx.min(wg, axis=-1, keepdims=True)) | (wg == mx.max(wg, axis=-1, keepdims=True))
    rtn = quant.quantize_codes(w, s, b, layer.spec.bits, layer.group_size).astype(mx.float32)
    return mx.where(ends.reshape(w.shape), rtn, -1.0)


def _baseline(layer) -> str:
    """The start the recipe gives the layer (what :func:`mlxqat.prepare` set)."""
    return "rtn/mse" if layer.spec.learn_scales and layer.spec.scale_init == "mse" else "rtn/minmax"


def _latent(layer, codes: mx.array, updated: mx.array, s: mx.array, b: mx.array, rule: str) -> mx.array:
    """The latent weight that gives a layer GPTQ's ``codes``: their dequantized values (``"grid"``), or
    (``"compensated"``, learned scales only) the weights as GPTQ rounded them, which round to the same
    codes and sit where they were within their step (as a float weight does under round-to-nearest),
    the dequantized value wherever they do not round back or are clipped (no gradient reaches those)."""
    spec, g = layer.spec, layer.group_size
    grid = quant.dequantize(quant.pack(codes.astype(mx.uint32), spec.bits), s.astype(mx.float32),
                            b.astype(mx.float32), spec.bits, g)
    if rule == "grid" or not spec.learn_scales:  # derived scales: a weight off the grid may move them
        return grid.astype(layer.weight.dtype)
    updated = updated.astype(layer.weight.dtype)
    wg = updated.astype(mx.float32).reshape(updated.shape[0], -1, g)  # as quant.quantize_codes computes
    sg, bg = s.astype(mx.float32)[..., None], b.astype(mx.float32)[..., None]
    r = mx.round((wg - bg) / mx.where(sg == 0, 1.0, sg))
    keep = (r >= 0) & (r <= 2**spec.bits - 1) & (sg != 0) & (r == codes.reshape(wg.shape))
    return mx.where(keep.reshape(updated.shape), updated, grid.astype(layer.weight.dtype))


def _choose_group(group: _Group, names: Sequence[str], damp: float, act_order: bool, clock: dict,
                  latent_rule: str = "compensated") -> Dict[str, dict]:
    """Set each layer of ``group`` to its best candidate; ``{path: {"chosen", "errors", ...}}``.

    The layer's own start (what the recipe gave it) and round-to-nearest are always candidates;
    the own start wins ties."""
    names = list(dict.fromkeys([*names, "rtn/minmax"]))
    h = group.h / max(group.tokens, 1)  # per input row: errors are mean squared outputs
    h_diag = mx.diagonal(h)
    plans = []  # per layer: (path, layer, float32 weight, {name: state}, {gptq name: its scales and biases})
    rows = []  # GPTQ rows, all of the group's layers and scales at once: (plan, source, scales, biases)
    for path, layer in group.members:
        own, base = _state(layer), _baseline(layer)
        states, used = {base: own}, {}
        for src in _scale_sources(layer, [n.split("/")[1] for n in names]):
            if f"rtn/{src}" == base and layer.spec.learn_scales:
                s, b = own["scales"], own["biases"]  # the scales prepare computed with this very rule
            else:
                s, b = _scales(layer, src, own["weight"], h_diag)
            learned = {"scales": s, "biases": b} if layer.spec.learn_scales else {}
            if f"rtn/{src}" in names and f"rtn/{src}" not in states:
                states[f"rtn/{src}"] = {"weight": own["weight"], **learned}
            if f"gptq/{src}" in names:
                rows.append((len(plans), src, s, b))
        plans.append((path, layer, own["weight"].astype(mx.float32), states, used))
    if rows:  # rows are independent given H: one GPTQ pass for every layer and scale set of the group
        full = [(plans[i][2], mx.repeat(s.astype(mx.float32), plans[i][1].group_size, axis=1),
                 mx.repeat(b.astype(mx.float32), plans[i][1].group_size, axis=1),
                 mx.full((plans[i][2].shape[0],), 2 ** plans[i][1].spec.bits - 1, mx.float32),
                 _anchors(plans[i][1], plans[i][2], s, b))
                for i, _, s, b in rows]
        w, s_full, b_full, qmax, pinned = (mx.concatenate([f[k] for f in full]) for k in range(5))
        t = time.perf_counter()
        codes, updated = gptq_codes(w, h, s_full, b_full, qmax, damp=damp, act_order=act_order, pinned=pinned,
                                    return_updated=True)
        clock["gptq"] += time.perf_counter() - t
        start = 0
        for i, src, s, b in rows:
            layer = plans[i][1]
            rows_i = slice(start, start + layer.weight.shape[0])
            start += layer.weight.shape[0]
            latent = _latent(layer, codes[rows_i], updated[rows_i], s, b, latent_rule)
            learned = {"scales": s, "biases": b} if layer.spec.learn_scales else {}
            plans[i][3][f"gptq/{src}"] = {"weight": latent, **learned}
            plans[i][4][f"gptq/{src}"] = (s, b)
    report = {}
    for path, layer, w0, states, used in plans:
        errors = {}
        for name, state in states.items():
            _set(layer, state)  # measured as the layer computes it: the start it will have
            errors[name] = output_error(w0 - layer.dequantized_weight().astype(mx.float32), h)
        best = base = _baseline(layer)
        for name in errors:
            if errors[name] < errors[best]:
                best = name
        _set(layer, states[best])
        mx.eval(_state(layer))
        report[path] = {"chosen": best, "baseline": base, "errors": errors, "output_power": output_error(w0, h)}
        if best in used and not layer.spec.learn_scales:
            # the layer derives its scales from the new latent weight: GPTQ's own codes only if they are GPTQ's scales
            _, s, b = quantized_params(layer)
            report[path]["gptq_scales_kept"] = bool(mx.array_equal(s, used[best][0]).item()
                                                    and mx.array_equal(b, used[best][1]).item())
    return report


def ptq_start(model: nn.Module, windows: np.ndarray, *, candidates: Sequence[str] = CANDIDATES,
              batch_size: int = 4, damp: float = DAMP, act_order: bool = True, latent: str = "compensated",
              max_hessian_bytes: int = MAX_HESSIAN_BYTES, progress: bool = False) -> dict:
    """Set every fake-quant linear layer of a prepared ``model`` to its best post-training start, in place.

    Each layer gets the candidate (see the module docstring) with the lowest output error
    ``tr((W - Wq) H (W - Wq)^T)`` on the full-precision model's inputs over ``windows``; the
    layer then computes exactly that candidate's weight. Round-to-nearest and the start the recipe
    gives the layer (the clip search, for learned affine scales) are always candidates, so no
    layer's error is above theirs.

    Args:
        model: a model prepared with :func:`mlxqat.prepare` (fake-quant layers holding the
            full-precision weights as their latent weights).
        windows: calibration token windows ``(n, seq_len + 1)``.
        candidates: names from :data:`CANDIDATES` (``"rounding/scales"``) to try besides those two.
        batch_size: windows per forward pass.
        damp: GPTQ's damping (fraction of the mean diagonal of ``H``).
        act_order: GPTQ quantizes columns in order of decreasing input energy.
        latent: the latent weight of a layer that starts from GPTQ (same codes, same quantized
            weight either way): ``"compensated"``, the weights as GPTQ rounded them, each where it
            was within its step; ``"grid"``, the dequantized codes, each at the centre of its step.
            Layers with derived scales always take ``"grid"``.
        max_hessian_bytes: the most float32 ``X^T X`` bytes held at once.
        progress: show a progress bar over the layers.

    Returns:
        ``{"layers", "windows", "tokens", "chosen": {name: count}, "error": {"baseline", "rtn", "ptq"},
        "relative": {...}, "seconds", "seconds_in": {"capture", "gptq", "choose"},
        "per_layer": {path: {"chosen", "baseline", "errors", "output_power"}}}``; errors are mean
        squared outputs per input row, summed over layers, ``relative`` divides them by the layers'
        summed output power ``tr(W H W^T)``. A layer whose scales are derived from its weight and
        that starts from GPTQ also has ``gptq_scales_kept``: whether the scales its new latent weight
        gives are GPTQ's (then it computes GPTQ's codes exactly).

    Raises:
        ValueError: an unknown candidate, no windows, or a model without fake-quant linear layers.
    """
    if latent not in LATENTS:
        raise ValueError(f"latent={latent!r}: choose one of {LATENTS}")
    unknown = [c for c in candidates if c not in CANDIDATES]
    if unknown or not candidates:
        raise ValueError(f"unknown PTQ candidates {unknown or list(candidates)}; choose from {list(CANDIDATES)}")
    windows = np.asarray(windows)
    if windows.ndim != 2 or len(windows) == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows of shape {windows.shape}: give token windows (n, seq_len + 1), n >= 1")
    layers = targets(model)
    if not layers:
        raise ValueError("the model has no fake-quant linear layer with a float weight; prepare it first "
                         "(mlxqat.prepare(model, recipe))")
    t0 = time.perf_counter()
    per_layer: Dict[str, dict] = {}
    tokens, clock = 0, {"capture": 0.0, "gptq": 0.0, "choose": 0.0}
    bar = tqdm(total=len(layers), desc="PTQ start", unit="layer", disable=not progress, dynamic_ncols=True, leave=False)
    chunks = capture_hessians(model, windows, layers, batch_size, max_hessian_bytes)
    while True:
        t = time.perf_counter()
        chunk = next(chunks, None)
        clock["capture"] += time.perf_counter() - t
        if chunk is None:
            break
        for group in chunk:
            tokens = max(tokens, group.tokens)
            per_layer.update(_choose_group(group, candidates, damp, act_order, clock, latent))
            bar.update(len(group.members))
    bar.close()
    clock["choose"] = time.perf_counter() - t0 - clock["capture"] - clock["gptq"]
    per_layer = {p: per_layer[p] for p, _ in layers}  # model order
    chosen: Dict[str, int] = {}
    for r in per_layer.values():
        chosen[r["chosen"]] = chosen.get(r["chosen"], 0) + 1
    power = sum(r["output_power"] for r in per_layer.values())
    error = {
        "baseline": sum(r["errors"][r["baseline"]] for r in per_layer.values()),
        "rtn": sum(r["errors"]["rtn/minmax"] for r in per_layer.values()),
        "ptq": sum(r["errors"][r["chosen"]] for r in per_layer.values()),
    }
    return {"layers": len(per_layer), "windows": int(len(windows)), "tokens": int(tokens), "chosen": chosen,
            "error": error, "relative": {k: v / power if power > 0 else 0.0 for k, v in error.items()},
            "seconds": time.perf_counter() - t0, "seconds_in": clock, "per_layer": per_layer}
