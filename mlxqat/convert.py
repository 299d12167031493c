"""The two module swaps of QAT: ``prepare`` (fake-quant in) and ``convert`` (real quantized out).

Both walk ``model.leaf_modules()`` like ``mlx.nn.quantize`` and replace leaves
in place with ``model.update_modules``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from typing import Iterable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from . import quant
from .kernels import KernelQuantizedLinear, is_supported
from .layers import HELD_DTYPES, ActQuantizedLinear, FakeQuantEmbedding, FakeQuantLinear, carry_spec, is_fake_quant
from .lora import QALoRALinear, merge_lora
from .recipes import LayerSpec, Recipe, block_index, kquant_fallback
from .recipes import get as get_recipe


def _swap(model: nn.Module, fn) -> int:
    """Replace each leaf module ``m`` at ``path`` with ``fn(path, m)``; count replacements."""
    count = 0

    def visit(path, m):
        nonlocal count
        new = fn(path, m)
        if new is not m:
            count += 1
        return new

    leaves = tree_map_with_path(visit, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
    return count


def _check_layer(path: str, weight: mx.array, spec) -> Optional[str]:
    """Why the layer at ``path`` cannot take ``spec`` (None if it can)."""
    in_features = weight.shape[-1]
    try:
        quant.storage_group_size(spec.group_size, in_features)
    except ValueError as e:
        return f"{path}: {e}"
    return None


def head_path(model: nn.Module) -> Optional[str]:
    """The path of the layer that computes the logits: ``lm_head``, or the embedding when the model ties them."""
    paths = [p.removesuffix(".base") for p, _ in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)]
    heads = [p for p in paths if p.rsplit(".", 1)[-1] == "lm_head"]
    if heads:
        return heads[0]
    embeddings = [p for p, m in model.named_modules()
                  if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding, FakeQuantEmbedding))]
    return embeddings[0] if len(embeddings) == 1 else None


def block_count(model: nn.Module) -> Optional[int]:
    """The number of transformer blocks (distinct ``layers.N`` in the module paths), or None when there are none."""
    found = {i for i in (block_index(p) for p, _ in model.named_modules()) if i is not None}
    return max(found) + 1 if found else None


def _spec_for(recipe: Recipe, path: str, m: nn.Module, head: Optional[str] = None, n_layers: Optional[int] = None):
    """The spec ``recipe`` gives the layer ``m`` at ``path`` (embeddings take no activation bits);
    ``head`` is the model's :func:`head_path`, ``n_layers`` its :func:`block_count`."""
    spec = recipe.spec_for(path, path == head, n_layers)
    if spec is not None and spec.act_bits is not None and isinstance(m, (nn.Embedding, nn.QuantizedEmbedding, FakeQuantEmbedding)):
        spec = dataclasses.replace(spec, act_bits=None)
    if spec is not None and spec.mode == "kquant" and getattr(m, "weight", None) is not None:
        width = m.weight.shape[-1] * 32 // m.bits if quant.is_quantized(m) else m.weight.shape[-1]
        spec = kquant_fallback(spec, width)  # rows K-quant blocks cannot hold: llama.cpp's fallback
    return spec


def prepare(model: nn.Module, recipe="int4", *, strict: bool = False) -> nn.Module:
    """Swap ``nn.Linear`` / ``nn.Embedding`` leaves for fake-quant layers, in place.

    Args:
        model: any mlx-lm model (or ``nn.Module``) with full-precision layers.
        recipe: a :class:`~mlxqat.recipes.Recipe` or the name of a built-in one.
        strict: raise instead of warning when a layer's shape does not fit the
            recipe (e.g. ``in_features`` not divisible by the group size).

    Returns:
        The same model, for chaining.

    Raises:
        ValueError: NaN/Inf in a weight, an unknown recipe, (``strict``) a
            layer that cannot be quantized as asked, or no layer to prepare (the
            model already prepared or quantized, or a recipe that skips them all).
    """
    recipe = get_recipe(recipe)
    skipped = []
    done = {"fake-quant": [], "quantized": []}  # layers prepared or quantized before
    head, n_layers = head_path(model), block_count(model)

    def swap(path, m):
        if is_fake_quant(m) or isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            done["fake-quant" if is_fake_quant(m) else "quantized"].append(path)
            return m
        if not isinstance(m, (nn.Linear, nn.Embedding)):
            return m
        spec = _spec_for(recipe, path, m, head, n_layers)
        if spec is None:
            return m
        quant.check_finite(m.weight, f"{path}.weight")
        problem = _check_layer(path, m.weight, spec)
        if problem:
            if strict:
                raise ValueError(problem)
            skipped.append(problem)
            return m
        if isinstance(m, nn.Embedding):
            return FakeQuantEmbedding.from_embedding(m, spec, recipe)
        return FakeQuantLinear.from_linear(m, spec, recipe)

    n = _swap(model, swap)
    prepared, quantized = done["fake-quant"], done["quantized"]
    if n == 0 and prepared:
        raise ValueError(
            f"the model is already prepared: {len(prepared)} fake-quant layers (e.g. {prepared[0]}); train it and "
            "quantize it for real with mlxqat.convert(model), or call prepare on the unprepared full-precision model"
        )
    if n == 0 and quantized:
        raise ValueError(
            f"the model is already quantized: {len(quantized)} quantized layers (e.g. {quantized[0]}); "
            "prepare the full-precision original instead"
        )
    if n == 0:
        raise ValueError(
            f"recipe {recipe.name!r} matched no nn.Linear or nn.Embedding layer of "
            f"{type(model).__name__}; check its skip patterns and overrides"
        )
    for problem in skipped:
        warnings.warn(f"left in full precision: {problem}", stacklevel=2)
    return model


def quantized_spec(path: str, q: nn.Module) -> LayerSpec:
    """The spec a loaded quantized layer was made with: the one its saved recipe gives it, else MLX's
    affine format of its bits and group size (what ``mlx_lm.convert -q`` writes)."""
    spec = getattr(q, "spec", None)
    if spec is not None:
        return spec
    try:
        return LayerSpec(q.bits, q.group_size, "affine")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def prepare_quantized(model: nn.Module, *, keep_codes: bool = True, learn_scales: bool = True,
                      dtype: mx.Dtype = mx.float32) -> nn.Module:
    """Swap a quantized model's ``nn.QuantizedLinear`` / ``QuantizedEmbedding`` leaves for fake-quant layers, in place.

    Each fake-quant layer holds its quantized layer's own codes, scales and biases
    (:meth:`FakeQuantLinear.from_quantized`): nothing is re-quantized, and :func:`convert`
    gives the same arrays back. The fake-quant model computes what the quantized one did.

    Args:
        model: a quantized model (``mlxqat.load`` of an ``mlx_lm.convert -q`` or ``mlxqat.save`` directory).
        keep_codes: freeze the integer codes (no float weights are held): scales and biases train,
            or adapters on top (:func:`mlxqat.lora.apply_lora`); ``False``: float master weights that
            quantize back to the same codes, for full QAT.
        learn_scales: with ``keep_codes=False``, train the scales and biases too where the format keeps
            them (:data:`mlxqat.quant.LEARNED_SCALE_MODES`); symmetric layers derive them from the weights.
        dtype: what the fake-quant layers compute in (float32 on a CPU); scales and biases are rounded to
            the dtype they were stored in, in every forward, so :func:`convert` stores them losslessly.

    Returns:
        The same model, for chaining.

    Raises:
        ValueError: no quantized layer, or one that cannot train (activation-quantized, or not MLX's
            affine format).
    """
    leaves = [(p, m) for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module) if quant.is_quantized(m)]
    if not leaves:
        raise ValueError(f"{type(model).__name__} has no quantized layer (nn.QuantizedLinear or QuantizedEmbedding); "
                         "quantize it first (mlxqat.convert.quantize_rtn(model, recipe)) or pass a quantized model")
    refused = [f"{p} quantizes its activations" for p, m in leaves
               if isinstance(m, ActQuantizedLinear) or getattr(getattr(m, "spec", None), "act_bits", None) is not None]
    refused += [f"{p} is in MLX's {m.mode!r} mode, not affine" for p, m in leaves if getattr(m, "mode", "affine") != "affine"]
    if not keep_codes:  # the symmetric rule rounds the scales it derives to float16 values, not bfloat16's
        refused += [f"{p} is symmetric with bfloat16 scales (train its scales alone: keep_codes=True)" for p, m in leaves
                    if getattr(getattr(m, "spec", None), "mode", None) == "symmetric" and m.scales.dtype == mx.bfloat16]
    if refused:
        raise ValueError(f"{len(refused)} quantized layer(s) cannot be fine-tuned yet: {'; '.join(refused[:3])}")
    specs = {p: quantized_spec(p, m) for p, m in leaves}  # every spec checked before any layer is swapped

    def swap(path, m):
        if path not in specs:
            return m
        spec = specs[path]
        learn = keep_codes or (learn_scales and spec.mode in quant.LEARNED_SCALE_MODES)
        spec = dataclasses.replace(spec, learn_scales=learn, scale_init=spec.scale_init if learn else "minmax")
        cls = FakeQuantEmbedding if isinstance(m, nn.QuantizedEmbedding) else FakeQuantLinear
        return cls.from_quantized(m, spec, getattr(m, "recipe", None), keep_codes=keep_codes, dtype=dtype)

    _swap(model, swap)
    return model


def calibrate(model: nn.Module, batches: Iterable[mx.array]) -> dict:
    """Set the static activation scales of layers whose spec has ``act_bits``.

    Runs the model on ``batches`` (token arrays) without rounding activations,
    records the largest ``|x|`` each such layer sees, and sets
    ``act_scale = max|x| / (2**(act_bits-1) - 1)``.

    Returns:
        ``{layer path: act_scale}`` for the calibrated layers.

    Raises:
        ValueError: if no batch was given or an observed activation is not finite.
    """
    layers = [
        (p, m)
        for p, m in model.named_modules()
        if isinstance(m, FakeQuantLinear) and m.spec.act_bits is not None
    ]
    if not layers:
        return {}
    for _, m in layers:
        m._act_max = 0.0
    n = 0
    try:
        for batch in batches:
            mx.eval(model(batch))
            n += 1
    finally:
        maxima = {p: m._act_max for p, m in layers}
        for _, m in layers:
            m._act_max = None
    if n == 0:
        raise ValueError("calibrate() got no batches; pass at least one token array")
    scales = {}
    for p, m in layers:
        amax = maxima[p]
        if not (amax == amax and amax != float("inf")):
            raise ValueError(f"{p}: activation max is {amax}; the model produced NaN/Inf")
        qmax = 2 ** (m.spec.act_bits - 1) - 1
        scale = max(amax, 1e-8) / qmax
        m.act_scale = mx.array(scale, dtype=m.weight.dtype)
        scales[p] = scale
    return scales



def prepare_calibrated(model: nn.Module, recipe, windows, n_windows: int = 16, batch_size: int = 4) -> nn.Module:
    """:func:`prepare`, then :func:`calibrate` the static activation scales on the first
    ``n_windows`` token windows ``(n, seq_len + 1)`` when the recipe quantizes activations."""
    prepare(model, recipe)
    if any(getattr(getattr(m, "spec", None), "act_bits", None) for _, m in model.named_modules()):
        windows = windows[:n_windows]
        calibrate(model, [mx.array(windows[k : k + batch_size, :-1]) for k in range(0, len(windows), batch_size)])
    return model

def convert(model: nn.Module, *, kernel: str = "mlx") -> nn.Module:
    """Replace fake-quant layers with real quantized layers, in place.

    The converted layers hold exactly the weight the fake-quant forward used
    (same codes, scales and biases), so the converted model computes what
    training saw.

    Args:
        model: a model prepared with :func:`prepare` (and possibly trained).
        kernel: ``"mlx"`` for MLX's ``quantized_matmul`` (what ``mlx_lm.load``
            builds), or ``"mlxqat"`` for this package's int4 kernel where a
            layer supports it (4-bit affine); other layers keep MLX's kernel.

    Returns:
        The same model, for chaining.
    """
    if kernel not in ("mlx", "mlxqat"):
        raise ValueError(f"kernel={kernel!r} is not one of 'mlx', 'mlxqat'")

    merge_lora(model)  # adapters fold into the biases of their converted base

    def swap(path, m):
        if is_fake_quant(m):
            return m.to_quantized()
        return m

    n = _swap(model, swap)
    if n == 0 and not any(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()
    ):
        raise ValueError("convert() found no fake-quant layer; call mlxqat.prepare(model, recipe) first")
    if kernel == "mlxqat":
        use_kernel(model)
    model.freeze()
    return model


def use_kernel(model: nn.Module, kernel: str = "mlxqat") -> nn.Module:
    """Switch the model's 4-bit quantized linear layers between MLX's and our kernel.

    ``kernel="mlxqat"`` runs supported layers (4-bit affine) with
    :func:`mlxqat.kernels.int4_matmul`; ``"mlx"`` goes back to
    ``nn.QuantizedLinear``. Parameters are shared, not copied; saving the model
    writes the same files.
    """
    if kernel not in ("mlx", "mlxqat"):
        raise ValueError(f"kernel={kernel!r} is not one of 'mlx', 'mlxqat'")

    def swap(path, m):
        if kernel == "mlxqat":
            if type(m) is nn.QuantizedLinear and is_supported(m):
                return carry_spec(m, KernelQuantizedLinear.from_quantized(m))
        elif isinstance(m, KernelQuantizedLinear):
            ql = nn.QuantizedLinear.__new__(nn.QuantizedLinear)
            nn.Module.__init__(ql)
            ql.group_size, ql.bits, ql.mode = m.group_size, m.bits, m.mode
            for k, v in m.items():  # the same arrays, shared
                setattr(ql, k, v)
            carry_spec(m, ql)
            ql.freeze()
            return ql
        return m

    _swap(model, swap)
    return model


def _float_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype the model computes in: that of its unquantized floating parameters."""
    quantized = {p for p, m in model.named_modules() if quant.is_quantized(m)}
    for path, v in tree_flatten(model.parameters()):
        if path.rpartition(".")[0] not in quantized and mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float32


def dequantize(model: nn.Module, dtype: Optional[mx.Dtype] = None) -> nn.Module:
    """Replace quantized and fake-quant layers by plain ``nn.Linear`` / ``nn.Embedding``, in place.

    A fake-quant layer gives back its master (unquantized) weight. A real
    quantized layer gives its dequantized weight (:func:`mlxqat.quant.dequantized_weight`,
    float32) cast to ``dtype`` (default: the dtype of the model's unquantized
    parameters, e.g. its norms); static activation quantization is dropped.

    Returns:
        The same model, for chaining.
    """
    dtype = dtype or _float_dtype(model)

    def swap(path, m):
        if is_fake_quant(m):
            w = m.weight
        elif quant.is_quantized(m):
            w = quant.dequantized_weight(m).astype(dtype)
        else:
            return m
        if isinstance(m, (FakeQuantEmbedding, nn.QuantizedEmbedding)):
            out = nn.Embedding(*w.shape)
        else:
            out = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            if "bias" in m:
                out.bias = m.bias
        out.weight = w
        return out

    _swap(model, swap)
    return model


def _layer_specs(model: nn.Module) -> dict:
    """``{path: layer}`` of the layers that carry a spec (fake-quant, converted or loaded), LoRA-wrapped
    bases under their wrapper's path."""

    out, bases = {}, set()
    for path, m in model.named_modules():
        if isinstance(m, QALoRALinear):
            out[path] = m.base
            bases.add(f"{path}.base")
        elif getattr(m, "spec", None) is not None and (is_fake_quant(m) or quant.is_quantized(m)):
            out[path] = m
    return {p: m for p, m in out.items() if p not in bases}


def recipe_of(model: nn.Module) -> Optional[Recipe]:
    """The recipe the model's layers were quantized with, read from the layers' own specs.

    When every layer came from one recipe and that recipe describes the model
    exactly (each quantized layer has the spec it gives, each full-precision
    ``Linear``/``Embedding`` is one it skips), that recipe is returned, patterns
    and name intact. Otherwise a recipe naming every layer by its exact path
    is built: the most common spec as default, the others as overrides, the
    full-precision layers as skips.

    Returns:
        The :class:`~mlxqat.recipes.Recipe`, or None when no layer carries a spec.
    """
    layers = _layer_specs(model)
    if not layers:
        return None
    specs = {p: m.spec for p, m in layers.items()}
    full = {
        p: m for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if isinstance(m, (nn.Linear, nn.Embedding)) and p not in specs
    }
    origins = {id(m.recipe): m.recipe for m in layers.values()}
    origin = next(iter(origins.values())) if len(origins) == 1 else None
    head, n_layers = head_path(model), block_count(model)
    if origin is not None and all(_spec_for(origin, p, layers[p], head, n_layers) == s for p, s in specs.items()) and all(
        origin.spec_for(p, p == head, n_layers) is None for p in full
    ):
        return origin
    default = Counter(specs[p] for p in sorted(specs)).most_common(1)[0][0]
    named = {r.name for r in origins.values() if r is not None}
    # An exact path is a glob matching only itself (module paths hold no * ? [ ]).
    return Recipe(
        named.pop() if len(named) == 1 else "custom",
        default,
        overrides=tuple((p, s) for p, s in sorted(specs.items()) if s != default),
        skip=tuple(sorted(full)),
        description="per-layer specs as quantized",
    )


def attach_recipe(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Give each quantized layer of a loaded model its spec under ``recipe`` (the saved one).

    Raises:
        ValueError: a quantized layer the recipe skips, or whose bits or group
            size differ from its spec (the recipe does not describe these weights).
    """
    head, n_layers = head_path(model), block_count(model)
    for path, m in model.named_modules():
        if not quant.is_quantized(m):
            continue
        spec = _spec_for(recipe, path, m, head, n_layers)
        in_features = m.weight.shape[-1] * 32 // m.bits
        if spec is None or spec.bits != m.bits or quant.storage_group_size(spec.group_size, in_features) != m.group_size:
            raise ValueError(
                f"{path}: the recipe gives {spec} but the layer holds {m.bits}-bit codes in groups of "
                f"{m.group_size}; the recipe does not describe these weights"
            )
        m.spec, m.recipe = spec, recipe
    return model


def layer_specs(model: nn.Module) -> dict:
    """``{path: quantization dict}`` of the quantized leaves, as mlx-lm's config stores them."""
    out = {}
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if quant.is_quantized(m):
            out[path] = {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
    return out


def quantize_rtn(model: nn.Module, recipe="int4", windows=None, *,
                 scale_dtype: Optional[str] = "float16", fake_quant: bool = False) -> nn.Module:
    """Quantize a full-precision model in place with plain round-to-nearest, stored as a saved model stores it.

    Round-to-nearest is the recipe's bits and groups with min/max scales and
    nothing learned (:meth:`~mlxqat.recipes.Recipe.plain`: what ``mlx_lm.convert -q``
    computes, and the baseline every "gap recovered" is measured from). The
    weights are quantized from float32; linear layers keep their scales and
    biases in float16 when they are float16 values (as :func:`mlxqat.save`
    stores them), and the other parameters go back to the dtype the model had.

    Args:
        model: a full-precision model.
        recipe: a recipe name or :class:`~mlxqat.recipes.Recipe`.
        windows: token windows ``(n, seq_len + 1)`` to calibrate static activation
            scales on (:func:`prepare_calibrated`); needed when the recipe quantizes activations.
        scale_dtype: round scales and biases to this dtype's values; ``None`` keeps the recipe's choice.
        fake_quant: stop before :func:`convert`: the model keeps float32 fake-quant layers,
            which compute the same numbers and, on a CPU, evaluate several times faster
            than ``quantized_matmul`` (how ``python -m mlxqat.train`` measures its baseline).

    Returns:
        The same model, with real quantized layers (fake-quant ones with ``fake_quant``).

    Raises:
        ValueError: an unknown recipe, or a recipe that quantizes activations without ``windows``.
    """
    plain = get_recipe(recipe, **({"scale_dtype": scale_dtype} if scale_dtype is not None else {})).plain()
    if windows is None and any(s.act_bits is not None for s in plain.specs()):
        raise ValueError(f"recipe {plain.name!r} quantizes activations; give token windows to calibrate "
                         "their scales on, or use a weight-only recipe such as 'int4'")
    floats = [v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    loaded = floats[0] if floats else mx.float32
    held = mx.float32 in floats and any(f in HELD_DTYPES for f in floats)
    if not (fake_quant and held):  # held 16-bit block weights (block-wise QAT) compute as float32 as they are
        model.set_dtype(mx.float32)
    if windows is None:
        prepare(model, plain)
    else:
        prepare_calibrated(model, plain, windows)
    if fake_quant:
        return model
    half = {p for p, m in model.named_modules()  # a zero-point layer's offsets (-k x scale) stay float32 products
            if isinstance(m, FakeQuantLinear) and m.spec.mode != "zeropoint"
            and (m.spec.scale_dtype == "float16" or m.spec.mode == "symmetric")}  # symmetric: float16 by its rule
    # K-quant and zero-point scales and offsets are float32 products (d * sc, -k * scale), embeddings' too
    products = {p for p, m in model.named_modules() if is_fake_quant(m) and m.spec.mode in ("kquant", "zeropoint")}
    convert(model)
    kept = [(m, mx.float16 if p in half else m.scales.dtype, m.scales, m.biases)
            for p, m in model.named_modules()
            if isinstance(m, nn.QuantizedLinear) or (p in products and quant.is_quantized(m))]
    model.set_dtype(loaded)
    for m, dtype, scales, biases in kept:  # quantized_matmul computes in the activation dtype
        m.scales, m.biases = scales.astype(dtype), biases.astype(dtype)
    return model
