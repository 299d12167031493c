"""Fake-quant layers and the real quantized layers they convert to.

``FakeQuantLinear`` and ``FakeQuantEmbedding`` keep full-precision master
weights, and compute with the weight a converted layer will hold
(:func:`mlxqat.quant.fake_quant`). ``to_quantized()`` returns MLX's own
``nn.QuantizedLinear`` / ``nn.QuantizedEmbedding`` holding exactly that
weight, or :class:`ActQuantizedLinear` when activations are quantized too.

Inside :func:`quantized_once`, a fake-quant layer computes its dequantized
weight once and reuses it for every forward pass (evaluation, not training).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import mlx.core as mx
import mlx.nn as nn

from . import quant
from .recipes import LayerSpec

# Narrower float types a float32 model may hold some weights in (block-wise QAT keeps the blocks it has not
# trained yet in the checkpoint's own type, :func:`mlxqat.training.blockwise.hold_weights`): a fake-quant layer given
# float32 inputs computes with such a weight upcast to float32, exactly as with a float32 copy of it.
HELD_DTYPES = (mx.bfloat16, mx.float16)


def _init_quant_state(layer: nn.Module, weight: mx.array, spec: LayerSpec, recipe=None) -> None:
    layer.spec = spec
    layer.recipe = recipe  # the Recipe the spec came from (None: the layer was built by hand)
    layer.fake_quant_enabled = True
    # the dtype a file stores the layer's learned scales and biases in: every forward rounds them to its
    # values (None: they compute as they are); set for layers read from a quantized model (from_quantized)
    layer.stored_dtype = None
    layer.group_size = quant.storage_group_size(spec.group_size, weight.shape[-1])
    if spec.learn_scales:
        _, layer.scales, layer.biases = quant.init_params(
            weight, spec.bits, spec.group_size, spec.mode, spec.scale_dtype
        )
        if spec.scale_init == "mse":
            s, b = quant.mse_clip_params(weight, spec.bits, spec.group_size)
            if spec.scale_dtype is not None:
                dt = getattr(mx, spec.scale_dtype)
                s, b = quant.snap_to(dt, s), quant.snap_to(dt, b)
            layer.scales, layer.biases = s, b


def _tied_biases(spec: LayerSpec, scales: mx.array) -> mx.array:
    """A symmetric layer's offsets: ``-2**(bits-1) * scale`` (Q4_0's rule; they are not free parameters)."""
    return scales * -(2 ** (spec.bits - 1))


def _learned(spec: LayerSpec, stored, scales: mx.array, biases: Optional[mx.array]):
    """Learned scales and biases as the forward and the converted layer use them: rounded to the dtype they are
    stored in (straight-through), the biases of a symmetric layer without its own derived from its scales."""
    scales = quant.round_as_stored(scales, stored)
    if biases is None:
        return scales, _tied_biases(spec, scales)
    biases = quant.round_as_stored(biases, stored)
    if spec.mode == "kquant":  # GGUF's two-level scales: each forward computes with what the file holds
        return quant.kquant_grid(scales, biases, spec.bits)
    if spec.mode == "zeropoint":  # offsets of whole steps (an integer zero point)
        return scales, quant.integer_offsets(scales, biases, spec.bits)
    return scales, biases


def _fake_quant(spec: LayerSpec, group_size: int, w: mx.array, codes=None, scales=None, biases=None,
                stored=None) -> mx.array:
    """The fake-quant weight of rows ``w`` given the layer's state (frozen codes, learned or derived scales;
    ``stored``: the dtype learned scales and biases are stored in)."""
    if codes is not None:
        return quant.dequantize_frozen(codes, *_learned(spec, stored, scales, biases), spec.bits, group_size)
    if spec.learn_scales:
        return quant.fake_quant(w, spec.bits, spec.group_size, spec.mode, *_learned(spec, stored, scales, biases))
    return quant.fake_quant(w, spec.bits, spec.group_size, spec.mode, scale_dtype=spec.scale_dtype)


def _dequantized(layer: nn.Module, weight: mx.array) -> mx.array:
    if not layer.fake_quant_enabled:  # a fake-quant delay: full precision for now
        if weight_released(layer):
            raise ValueError("this layer's full-precision weight was released when its codes were frozen "
                             "(scales-only training); it computes with its quantized weight only")
        return weight
    return _fake_quant(layer.spec, layer.group_size, weight, layer.get("codes"), layer.get("scales"), layer.get("biases"),
                       layer.stored_dtype)


def quantized_params(layer: nn.Module):
    """(packed, scales, biases) of a fake-quant layer exactly as its forward uses them (and its converted layer holds)."""
    spec = layer.spec
    w = layer.weight
    if "codes" in layer or spec.learn_scales:
        biases = layer.get("biases")
        s, b = _learned(spec, layer.stored_dtype, layer.scales.astype(w.dtype),
                        None if biases is None else biases.astype(w.dtype))
        packed = layer.codes if "codes" in layer else quant.quantize_learned(w, s, b, spec.bits, layer.group_size)
        return packed, s, b
    return quant.init_params(w, spec.bits, spec.group_size, spec.mode, spec.scale_dtype)


def _release_weight(layer: nn.Module, shape, dtype) -> None:
    """Give the layer a zero-stride placeholder weight of ``shape`` and ``dtype`` (4 bytes): its codes are the model."""
    layer.weight = mx.broadcast_to(mx.zeros((1,) * len(shape), dtype), shape)
    object.__setattr__(layer, "_weight_released", True)


def _init_from_quantized(layer: nn.Module, q: nn.Module, spec: LayerSpec, recipe, keep_codes: bool, dtype) -> None:
    """Set a fake-quant layer's state from the quantized layer ``q``: its own codes, scales and biases, exactly.

    ``keep_codes``: the codes stay frozen (only scales and biases can train) and no float weight is
    held; otherwise the master weight is ``q``'s dequantized weight in ``dtype``, which quantizes back
    to the same codes under the same scales. Scales and biases compute in ``dtype`` and are rounded,
    in every forward, to the dtype ``q`` stores them in.
    """
    if getattr(q, "mode", "affine") != "affine" or q.get("biases") is None:
        raise ValueError(f"a {type(q).__name__} in mode {getattr(q, 'mode', None)!r}: only MLX's affine format "
                         "(codes, scales and biases) can be fine-tuned")
    layer.spec, layer.recipe, layer.fake_quant_enabled = spec, recipe, True
    layer.group_size = q.group_size
    layer.stored_dtype = q.scales.dtype
    scales, biases = q.scales.astype(dtype), q.biases.astype(dtype)
    shape = (q.weight.shape[0], q.weight.shape[1] * 32 // q.bits)
    if keep_codes:
        layer.codes = q.weight
        _release_weight(layer, shape, dtype)
        layer.scales = scales
        if spec.mode != "symmetric":  # a symmetric layer's offsets follow its scales (_tied_biases)
            layer.biases = biases
        layer.freeze(keys=["codes"], recurse=False)
        return
    layer.weight = quant.dequantize(q.weight, scales, biases, q.bits, q.group_size)
    if spec.learn_scales:
        layer.scales, layer.biases = scales, biases


def freeze_codes(layer: nn.Module, release: bool = True) -> None:
    """Fix a learned-scale layer's integer codes at their current values.

    Afterwards only scales and biases move the dequantized weight (the
    scales-only training mode); the master weight no longer matters, and with
    ``release`` (the default) its memory is given back: the weight becomes a
    zero-stride placeholder of the same shape and dtype (4 bytes), so a
    scales-only model holds packed codes instead of float weights.
    """
    if not layer.spec.learn_scales:
        raise ValueError("freeze_codes() needs a layer with learn_scales=True")
    if "codes" not in layer:
        layer.codes = quantized_params(layer)[0]
        layer.freeze(keys=["codes"], recurse=False)
    if release and not weight_released(layer):
        mx.eval(layer.codes)
        _release_weight(layer, layer.weight.shape, layer.weight.dtype)


def weight_released(layer: nn.Module) -> bool:
    """Whether :func:`freeze_codes` released the layer's full-precision weight."""
    return bool(getattr(layer, "_weight_released", False))


def _weight_state(layer: nn.Module) -> tuple:
    """What a fake-quant layer's forward weight is computed from: its settings and its arrays (by identity)."""
    return (layer.fake_quant_enabled, layer.stored_dtype, layer.spec, layer.group_size,
            layer.get("weight"), layer.get("codes"), layer.get("scales"), layer.get("biases"))


def _same_state(a: tuple, b: tuple) -> bool:
    # settings compare by value; arrays by identity (MLX arrays never change in place: a new value is a new array)
    return a[:4] == b[:4] and all(x is y for x, y in zip(a[4:], b[4:]))


def _kept(layer: nn.Module, upcast: bool) -> Optional[mx.array]:
    """The forward weight :func:`quantized_once` computed for ``layer`` (``upcast``: from a held weight made
    float32), while the layer still has the settings and arrays it was computed from; else ``None``."""
    cache = layer._quantized_once
    kept = cache.get(upcast) if cache is not None else None
    if kept is None or not _same_state(kept[0], _weight_state(layer)):
        return None
    return kept[1]


def _forward_weight(layer: nn.Module, upcast: bool = False) -> mx.array:
    """The weight a fake-quant layer computes with (the kept one inside :func:`quantized_once`)."""
    w = _kept(layer, upcast)
    if w is None:
        w = _dequantized(layer, layer.weight.astype(mx.float32) if upcast else layer.weight)
    return w


@contextlib.contextmanager
def quantized_once(model) -> Iterator:
    """Within the context, every fake-quant layer of ``model`` computes with a weight quantized once, on entry.

    On entry each fake-quant layer's dequantized weight is computed by the very ops of the
    ordinary forward (so every output is the same, bit for bit) and evaluated; forward passes
    inside the context reuse it instead of re-quantizing the weight in every pass. Nothing is
    added to the module tree: parameters, ``trainable_parameters()``, ``save_weights`` and
    ``update`` see the model as it was, and on exit (also on an exception) nothing is left. A layer
    whose weight, codes, scales or biases have been replaced since (``model.update``, an optimizer
    step, a gradient transform's inputs) or whose fake quantization was switched computes as it
    does outside the context, so gradients are those of the ordinary forward. Layers with fake
    quantization off compute with their weight as it is (nothing to keep), and layers whose float
    weight was released (frozen codes, :func:`freeze_codes`) dequantize their codes as outside: that
    is one cheap pass, and keeping its result would hold a float copy of weights the model keeps
    as packed codes.

    Meant for forward passes without gradients (evaluation, selection, probes); it costs one
    float copy of the kept layers' weights (which the model holds in float already) while open.
    ``model`` may be any callable; without fake-quant layers this does nothing. Nested contexts
    keep the outermost one's weights.
    """
    layers = []
    if isinstance(model, nn.Module):
        layers = [m for _, m in model.named_modules() if is_fake_quant(m) and m._quantized_once is None]
    try:
        for m in layers:
            # a held narrower weight computes as float32 (FakeQuantLinear.__call__ on float32 inputs)
            upcast = isinstance(m, FakeQuantLinear) and m.weight.dtype in HELD_DTYPES
            keep = m.fake_quant_enabled and not weight_released(m)
            cache = {upcast: (_weight_state(m), _forward_weight(m, upcast))} if keep else {}
            object.__setattr__(m, "_quantized_once", cache)  # an instance attribute: not a parameter, never saved
        mx.eval([w for m in layers for _, w in m._quantized_once.values()])
        yield model
    finally:
        for m in layers:
            if "_quantized_once" in vars(m):
                object.__delattr__(m, "_quantized_once")  # back to the class's None


class FakeQuantLinear(nn.Module):
    """A linear layer whose weight (and optionally input) is fake-quantized.

    Args:
        weight: (output_dims, input_dims) master weight.
        bias: optional (output_dims,) bias, kept in full precision.
        spec: how to quantize (see :class:`mlxqat.recipes.LayerSpec`).
    """

    _quantized_once = None  # {upcast: (state, weight)} inside quantized_once()

    def __init__(self, weight: mx.array, bias: Optional[mx.array], spec: LayerSpec, recipe=None):
        super().__init__()
        self.weight = weight
        if bias is not None:
            self.bias = bias
        _init_quant_state(self, weight, spec, recipe)
        if spec.act_bits is not None:
            # Set by mlxqat.calibrate(); None until then.
            self.act_scale = None
        self._act_max = None  # running max |x| while calibrating

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LayerSpec, recipe=None) -> "FakeQuantLinear":
        """Wrap an ``nn.Linear`` (weights shared, not copied); ``recipe``: the one ``spec`` came from."""
        return cls(linear.weight, linear.get("bias"), spec, recipe)

    @classmethod
    def from_quantized(cls, q: nn.QuantizedLinear, spec: LayerSpec, recipe=None, *, keep_codes: bool = True,
                       dtype=mx.float32) -> "FakeQuantLinear":
        """The fake-quant layer holding ``q``'s own codes, scales and biases (no re-quantization).

        Args:
            q: an affine ``nn.QuantizedLinear`` (a loaded quantized model's layer).
            spec: its spec; ``spec.learn_scales`` for layers whose scales and biases train.
            keep_codes: freeze the codes and hold no float weight (scales-only or LoRA training);
                ``False``: a float master weight that re-quantizes to the same codes (full QAT).
            dtype: the dtype it computes in (float32 on a CPU).
        """
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        _init_from_quantized(layer, q, spec, recipe, keep_codes, dtype)
        if "bias" in q:
            layer.bias = q.bias.astype(dtype)
        layer._act_max = None
        return layer

    def _extra_repr(self) -> str:
        out_dims, in_dims = self.weight.shape
        s = self.spec
        return (
            f"input_dims={in_dims}, output_dims={out_dims}, bias={'bias' in self}, "
            f"bits={s.bits}, group_size={s.group_size}, mode={s.mode}, "
            f"learn_scales={s.learn_scales}, act_bits={s.act_bits}"
        )

    def dequantized_weight(self) -> mx.array:
        """The weight the converted layer will hold (differentiable, STE)."""
        return _forward_weight(self)

    def quantize_input(self, x: mx.array) -> mx.array:
        """Static activation fake-quant (identity for weight-only specs)."""
        if self.spec.act_bits is None or not self.fake_quant_enabled:
            return x
        if self._act_max is not None:  # calibrating: observe, don't round
            self._act_max = max(self._act_max, float(mx.max(mx.abs(x)).item()))
            return x
        if self.get("act_scale") is None:
            raise RuntimeError(
                "this layer quantizes activations but has no calibrated scale; "
                "run mlxqat.calibrate(model, batches) after prepare()"
            )
        return quant.fake_quant_activation(x, self.act_scale, self.spec.act_bits)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.quantize_input(x)
        # a weight held narrower computes as float32, as a plain matmul promotes it
        upcast = self.weight.dtype in HELD_DTYPES and x.dtype == mx.float32
        y = x @ _forward_weight(self, upcast).T
        if "bias" in self:
            y = y + self.bias
        return y

    def to_quantized(self, **_ignored) -> nn.Module:
        """The real quantized layer computing what this layer computes."""
        packed, scales, biases = quantized_params(self)
        out_dims, in_dims = self.weight.shape
        spec = self.spec
        cls = ActQuantizedLinear if spec.act_bits is not None else nn.QuantizedLinear
        ql = cls(in_dims, out_dims, "bias" in self, self.group_size, spec.bits)
        ql.weight, ql.scales, ql.biases = packed, scales, biases
        if "bias" in self:
            ql.bias = self.bias
        if spec.act_bits is not None:
            if self.get("act_scale") is None:
                raise RuntimeError(
                    "cannot convert an activation-quantized layer before calibration; "
                    "run mlxqat.calibrate(model, batches) first"
                )
            ql.act_bits = spec.act_bits
            ql.act_scale = self.act_scale
        carry_spec(self, ql)
        ql.freeze()
        return ql


class FakeQuantEmbedding(nn.Module):
    """An embedding whose table is fake-quantized (also as a tied output head).

    Rows are quantized independently, so looking up rows of the fake-quant
    table equals fake-quantizing the looked-up rows; only those are computed.
    """

    def __init__(self, weight: mx.array, spec: LayerSpec, recipe=None):
        super().__init__()
        if spec.act_bits is not None:
            raise ValueError(
                "act_bits applies to linear layers only; give embeddings a spec "
                "without act_bits (e.g. an override for '*embed_tokens')"
            )
        self.weight = weight
        _init_quant_state(self, weight, spec, recipe)

    _quantized_once = None  # {upcast: (state, weight)} inside quantized_once()

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, spec: LayerSpec, recipe=None) -> "FakeQuantEmbedding":
        return cls(emb.weight, spec, recipe)

    @classmethod
    def from_quantized(cls, q: nn.QuantizedEmbedding, spec: LayerSpec, recipe=None, *, keep_codes: bool = True,
                       dtype=mx.float32) -> "FakeQuantEmbedding":
        """The fake-quant embedding holding ``q``'s own codes, scales and biases (as :meth:`FakeQuantLinear.from_quantized`)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        _init_from_quantized(layer, q, spec, recipe, keep_codes, dtype)
        return layer

    def _extra_repr(self) -> str:
        n, d = self.weight.shape
        s = self.spec
        return f"{n}, {d}, bits={s.bits}, group_size={s.group_size}, mode={s.mode}"

    def dequantized_weight(self) -> mx.array:
        return _forward_weight(self)

    def __call__(self, ids: mx.array) -> mx.array:
        table = _kept(self, False)
        if table is not None:  # the table quantized once (rows quantize independently: the same values)
            return table[ids]
        spec = self.spec
        rows = self.weight[ids]  # (..., dims)
        flat = rows.reshape(-1, rows.shape[-1])
        if not self.fake_quant_enabled:
            dq = _dequantized(self, flat)  # the rows themselves (refused once the weight is released)
        else:
            n = flat.shape[0]
            state = [self[k][ids].reshape(n, -1) if k in self else None for k in ("codes", "scales", "biases")]
            dq = _fake_quant(spec, self.group_size, flat, *state, stored=self.stored_dtype)
        return dq.reshape(rows.shape)

    def as_linear(self, x: mx.array) -> mx.array:
        """Use the table as the output projection (tied embeddings)."""
        return x @ self.dequantized_weight().T

    def to_quantized(self, **_ignored) -> nn.Module:
        packed, scales, biases = quantized_params(self)
        n, d = self.weight.shape
        qe = nn.QuantizedEmbedding(n, d, self.group_size, self.spec.bits)
        qe.weight, qe.scales, qe.biases = packed, scales, biases
        carry_spec(self, qe)
        qe.freeze()
        return qe


class ActQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` that first rounds its input with a static int scale.

    Computes ``quantized_matmul(fake_quant_activation(x, act_scale), W)``: the
    same activation rounding the fake-quant layer applied during training.
    """

    def __init__(self, input_dims, output_dims, bias=True, group_size=64, bits=4, act_bits=8):
        super().__init__(input_dims, output_dims, bias, group_size, bits)
        self.act_bits = act_bits
        self.act_scale = mx.array(1.0)

    def _extra_repr(self) -> str:
        return super()._extra_repr() + f", act_bits={self.act_bits}"

    def __call__(self, x: mx.array) -> mx.array:
        x = quant.fake_quant_activation(x, self.act_scale, self.act_bits)
        return super().__call__(x)


def carry_spec(source: nn.Module, target: nn.Module) -> nn.Module:
    """Give ``target`` (the layer replacing ``source``) the spec and recipe ``source`` was quantized with.

    A converted or loaded layer knows how it was quantized, so the recipe saved
    with a model is read from its layers (:func:`mlxqat.convert.recipe_of`).
    """
    if getattr(source, "spec", None) is not None:
        target.spec = source.spec
        target.recipe = getattr(source, "recipe", None)
    return target


def is_fake_quant(module: nn.Module) -> bool:
    return isinstance(module, (FakeQuantLinear, FakeQuantEmbedding))


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Turn fake quantization on or off in every fake-quant layer (off = full precision)."""
    for _, m in model.named_modules():
        if is_fake_quant(m):
            m.fake_quant_enabled = enabled


def untie_weights(model: nn.Module) -> int:
    """Move master weights that sit on a rounding boundary off it (:func:`mlxqat.quant.untie`), in place.

    The quantized model is unchanged (every code stays); training then moves
    those weights across the boundary one by one, as the gradient asks, instead
    of all at once at its first step. Returns how many weights were moved.
    Layers with frozen codes (scales-only training) are left alone.
    """
    moved = 0
    for _, m in model.named_modules():
        if not is_fake_quant(m) or "codes" in m:
            continue
        _, s, b = quantized_params(m)
        w = quant.untie(m.weight, s, b, m.spec.bits, m.group_size)
        n = int(mx.sum(w != m.weight).item())
        if n:
            m.weight = w
            moved += n
    return moved
