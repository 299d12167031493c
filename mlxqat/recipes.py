"""Recipes: which layers are quantized, and how.

A :class:`LayerSpec` describes one layer's quantization; a :class:`Recipe` is a
default spec plus per-path overrides and a skip list. Paths are the dotted
module paths MLX uses (``model.layers.3.mlp.down_proj``); a pattern is a glob
(``*.mlp.*``) or, with the prefix ``re:``, a regular expression.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import numbers
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from . import quant
from .gguf.kquants import use_more_bits
from .quant import CHANNELWISE, MODES, SCALE_INITS, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

ACT_BITS = (4, 8)


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is quantized."""

    bits: int = 4  # weight bits: 2, 3, 4, 5, 6 or 8
    group_size: int = 64  # 32, 64, 128, or -1 for one scale per output channel
    # "affine" (MLX min/max), "symmetric" (llama.cpp Q4_0 rule), "zeropoint" (affine, integer zero point)
    # or "kquant" (Q4_K / Q5_K / Q6_K)
    mode: str = "affine"
    learn_scales: bool = False  # train scales and biases along with (or instead of) weights
    act_bits: Optional[int] = None  # static per-tensor activation quantization (8 or 4)
    scale_dtype: Optional[str] = None  # "float16": round scales/biases to float16 (exact GGUF)
    scale_init: str = "minmax"  # learned scales start from "minmax" or an "mse" clip search

    def __post_init__(self):
        for f in dataclasses.fields(self):  # types first: 4.0 == 4 and "no" is truthy
            object.__setattr__(self, f.name, _checked_type(f, getattr(self, f.name)))
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"bits={self.bits!r} is not supported; use one of {SUPPORTED_BITS}"
            )
        if self.group_size not in SUPPORTED_GROUP_SIZES + (CHANNELWISE,):
            raise ValueError(
                f"group_size={self.group_size!r} is not supported; use one of "
                f"{SUPPORTED_GROUP_SIZES} or -1 (one group per output channel)"
            )
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not supported; use one of {MODES}")
        if self.mode == "kquant" and (self.bits not in quant.KQUANT_BITS or self.group_size != 32
                                      or self.scale_dtype is not None):
            raise ValueError(
                f"mode='kquant' is GGUF's Q4_K, Q5_K or Q6_K: bits 4, 5 or 6, group_size 32, scale_dtype None (got "
                f"bits={self.bits}, group_size={self.group_size}, scale_dtype={self.scale_dtype!r})"
            )
        if self.act_bits is not None and self.act_bits not in ACT_BITS:
            raise ValueError(
                f"act_bits={self.act_bits!r} is not supported; use one of {ACT_BITS} "
                "or None for weight-only quantization"
            )

        if self.scale_init not in SCALE_INITS:
            raise ValueError(f"scale_init={self.scale_init!r} is not supported; use one of {SCALE_INITS}")
        if self.scale_init != "minmax" and not (self.learn_scales and self.mode == "affine"):
            raise ValueError(
                f"scale_init={self.scale_init!r} sets the starting point of learned affine scales; "
                f"it needs learn_scales=True and mode='affine' (got learn_scales={self.learn_scales}, "
                f"mode={self.mode!r})"
            )
        if self.scale_dtype not in (None, "float16"):
            raise ValueError(
                f"scale_dtype={self.scale_dtype!r} is not supported; use None (the "
                "weight's dtype) or 'float16'"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def bits_per_weight(self, in_features: Optional[int] = None) -> float:
        """Stored bits per weight on a layer with ``in_features`` inputs: the code plus a 16-bit
        scale and bias per storage group (:func:`mlxqat.quant.bits_per_weight`).

        Raises:
            ValueError: a channel-wise spec without ``in_features`` (its storage group
                depends on the layer: 128 when that divides ``in_features``, else 64 or 32).
        """
        if in_features is None:
            if self.group_size == CHANNELWISE:
                raise ValueError(
                    "a channel-wise spec's bits per weight depend on the layer; pass in_features, "
                    "e.g. spec.bits_per_weight(layer.weight.shape[-1])"
                )
            in_features = self.group_size
        return quant.bits_per_weight(self.bits, self.group_size, in_features)


_FIELD_TYPES = {"int": (numbers.Integral, "an integer"), "bool": (bool, "True or False"), "str": (str, "a string"),
                "Optional[int]": (numbers.Integral, "an integer or None"),
                "Optional[str]": (str, "a string or None")}


def _checked_type(f: dataclasses.Field, value):
    """``value`` if it has field ``f``'s type (NumPy ints become ints); ValueError otherwise.

    Bools are not ints here, and 4.0 is not 4: ``bits=4.0`` and ``learn_scales="no"``
    are mistakes to report, not values to coerce.
    """
    kind, what = _FIELD_TYPES[str(f.type)]
    if value is None and str(f.type).startswith("Optional["):
        return value
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ValueError(f"{f.name}={value!r} must be {what}, not {type(value).__name__}")
    return int(value) if kind is numbers.Integral else value


HEAD = "@head"  # the pattern of the layer that computes the logits: lm_head, or the embedding when tied
# a prefix: "@more_bits:*.down_proj" matches the layers of that glob whose block index llama.cpp's mixes give more
# bits (mlxqat.gguf.kquants.use_more_bits: the first and last eighth of the blocks, every third between)
MORE_BITS = "@more_bits:"
_BLOCK_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def block_index(path: str) -> Optional[int]:
    """The transformer block a module path is in (``model.layers.3.mlp`` -> 3), or None."""
    found = _BLOCK_INDEX.search(path)
    return int(found.group(1)) if found else None


def _matches(pattern: str, path: str, head: bool = False, n_layers: Optional[int] = None) -> bool:
    if pattern == HEAD:
        return head
    if pattern.startswith(MORE_BITS):
        if not fnmatch.fnmatchcase(path, pattern[len(MORE_BITS):]):
            return False
        block = block_index(path)
        if block is None or n_layers is None:
            raise ValueError(f"pattern {pattern!r} picks layers by their block index among the model's blocks; "
                             f"{path!r} has " + ("no 'layers.N.' index" if block is None else
                                                 "no block count given (pass n_layers)"))
        return use_more_bits(block, n_layers)
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern)


def _check_pattern(pattern) -> None:
    """Refuse a pattern that is not a string or, with ``re:``, not a valid regular expression."""
    if not isinstance(pattern, str):
        raise ValueError(f"pattern {pattern!r} must be a string (a glob, or 're:' and a regular expression)")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression ({e})") from None


@dataclass(frozen=True)
class QATDefaults:
    """The QAT settings that measured best for a bit width (``python -m mlxqat.train`` uses them).

    Weights and learned scales/biases train together (where the format keeps
    learned scales), the scales starting from a per-group clip search.
    """

    learning_rate: float  # peak learning rate of the weights
    scale_learning_rate: float  # of learned scales/biases: Adam steps are absolute, scales are small
    warmup_steps: int = 5
    scale_init: str = "mse"
    # trainable="scales": the scales/biases are all that trains, at a rate of their own
    scales_only_learning_rate: Optional[float] = None


# By the narrowest bit width of a recipe. Swept at 100 steps x 8 x 256 tokens on the embedded model
# (int4: 1e-5..1e-4, int2: 3e-5..3e-4; int3 interpolated, 5-8 bits as int4): see benchmarks/quality.py.
QAT_DEFAULTS: Dict[int, QATDefaults] = {
    8: QATDefaults(2e-5, 2e-6, scales_only_learning_rate=1e-5),
    6: QATDefaults(2e-5, 2e-6, scales_only_learning_rate=1e-5),
    5: QATDefaults(2e-5, 2e-6, scales_only_learning_rate=1e-5),
    4: QATDefaults(2e-5, 2e-6, scales_only_learning_rate=1e-5),
    3: QATDefaults(4e-5, 4e-6, scales_only_learning_rate=3e-5),
    2: QATDefaults(1e-4, 1e-5, scales_only_learning_rate=1e-4),
}


@dataclass(frozen=True)
class Recipe:
    """A default :class:`LayerSpec`, per-path overrides and a skip list.

    ``overrides`` is a sequence of ``(pattern, spec)``; the first matching
    pattern wins. A layer whose path matches a ``skip`` pattern stays in full
    precision. Both are sequences (a tuple or a list); ``skip="lm_head"`` is
    refused, since a string is not a sequence of patterns: write ``skip=("lm_head",)``.
    """

    name: str
    default: LayerSpec = field(default_factory=LayerSpec)
    overrides: Tuple[Tuple[str, LayerSpec], ...] = ()
    skip: Tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise ValueError(f"name={self.name!r} must be a string")
        if not isinstance(self.default, LayerSpec):
            raise ValueError(f"default={self.default!r} must be a LayerSpec, e.g. LayerSpec(bits=4, group_size=64)")
        for attr, example in (("overrides", "(('*.mlp.*', LayerSpec(8, 64)),)"), ("skip", "('lm_head',)")):
            value = getattr(self, attr)
            if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
                raise ValueError(
                    f"{attr}={value!r} must be a tuple or list, e.g. {attr}={example} "
                    "(a single string is not a list of patterns)"
                )
            object.__setattr__(self, attr, tuple(value))  # lists become tuples: hashable, comparable
        for item in self.overrides:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], LayerSpec)):
                raise ValueError(
                    f"override {item!r} must be a (pattern, LayerSpec) pair"
                )
        for pattern in [p for p, _ in self.overrides] + list(self.skip):
            _check_pattern(pattern)

    def spec_for(self, path: str, head: bool = False, n_layers: Optional[int] = None) -> Optional[LayerSpec]:
        """The spec of the layer at ``path``, or ``None`` if it is skipped.

        ``head``: the layer computes the model's logits (``lm_head``, or the
        embedding of a model that ties them), which the pattern ``"@head"``
        (:data:`HEAD`) matches. ``n_layers``: the model's number of blocks, which
        patterns starting ``"@more_bits:"`` (:data:`MORE_BITS`) need.
        """
        if any(_matches(p, path, head, n_layers) for p in self.skip):
            return None
        for pattern, spec in self.overrides:
            if _matches(pattern, path, head, n_layers):
                return spec
        return self.default

    def with_options(self, **changes) -> "Recipe":
        """The same recipe with ``changes`` (e.g. ``learn_scales=True``) applied to every spec. ``scale_dtype``
        leaves K-quant specs as they are: their scales are stored on their own grid (float32 products)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(LayerSpec)}
        if unknown:
            raise ValueError(
                f"unknown LayerSpec option(s) {sorted(unknown)}; valid options are "
                f"{[f.name for f in dataclasses.fields(LayerSpec)]}"
            )

        def changed(spec: LayerSpec) -> LayerSpec:
            if spec.mode == "kquant" and "scale_dtype" in changes:
                return dataclasses.replace(spec, **{k: v for k, v in changes.items() if k != "scale_dtype"})
            return dataclasses.replace(spec, **changes)

        return dataclasses.replace(self, default=changed(self.default),
                                   overrides=tuple((p, changed(s)) for p, s in self.overrides))

    def specs(self) -> List[LayerSpec]:
        """The default spec and every override's."""
        return [self.default] + [spec for _, spec in self.overrides]

    def keeps_learned_scales(self) -> bool:
        """Whether learned per-group scales and biases fit the format: affine or K-quant, group-wise specs only
        (Q4_0's biases are tied to its scales; channel-wise scales are shared across groups)."""
        return all(s.mode in quant.LEARNED_SCALE_MODES and s.group_size != CHANNELWISE for s in self.specs())

    def qat_defaults(self) -> QATDefaults:
        """The QAT settings measured best for this recipe's narrowest bit width (:data:`QAT_DEFAULTS`)."""
        return QAT_DEFAULTS[min(s.bits for s in self.specs())]

    def for_qat(self, trainable: str = "all", learn_scales: Optional[bool] = None,
                scale_init: Optional[str] = None) -> "Recipe":
        """The recipe QAT trains: learned scales from :meth:`qat_defaults`'s start where the format keeps them.

        Args:
            trainable: ``"all"`` (weights, plus learned scales by default), ``"scales"``
                (learned scales only: required) or ``"lora"`` (none by default).
            learn_scales, scale_init: explicit choices that win over the defaults.
        """
        if learn_scales is None:  # an explicit scale_init asks for learned scales
            learn_scales = (trainable == "scales" or scale_init not in (None, "minmax")
                            or (trainable == "all" and self.keeps_learned_scales()))
        if not learn_scales:
            return self.with_options(learn_scales=False) if any(s.learn_scales for s in self.specs()) else self
        if scale_init is None:  # K-quant scales start from llama.cpp's own quantizer ("minmax": the format's rule)
            affine = all(s.mode == "affine" and s.group_size != CHANNELWISE for s in self.specs())
            scale_init = self.qat_defaults().scale_init if affine else "minmax"
        return self.with_options(learn_scales=True, scale_init=scale_init)

    def plain(self) -> "Recipe":
        """Plain round-to-nearest of the same bits and groups: min/max scales, nothing learned
        (what ``mlx_lm.convert -q`` computes; the baseline every "gap recovered" is measured from)."""
        return self.with_options(learn_scales=False, scale_init="minmax")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "default": self.default.to_dict(),
            "overrides": [[p, s.to_dict()] for p, s in self.overrides],
            "skip": list(self.skip),
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        try:
            return cls(
                name=d["name"],
                default=LayerSpec(**d["default"]),
                overrides=tuple((p, LayerSpec(**s)) for p, s in d.get("overrides", [])),
                skip=tuple(d.get("skip", [])),
                description=d.get("description", ""),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a valid recipe dictionary ({e}): {d!r}") from e


_BUILTINS: Dict[str, Callable[[], Recipe]] = {}


def register(name: str, factory: Callable[[], Recipe]) -> None:
    """Make ``get(name)`` return ``factory()``."""
    _BUILTINS[name] = factory


def names() -> List[str]:
    """Names of the built-in recipes."""
    return sorted(_BUILTINS)


def get(name, **options) -> Recipe:
    """A built-in recipe by name (or a :class:`Recipe`, returned as is).

    ``options`` are :class:`LayerSpec` fields applied to every spec, e.g.
    ``get("int4", learn_scales=True)``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if isinstance(name, Recipe):
        recipe = name
    elif name in _BUILTINS:
        recipe = _BUILTINS[name]()
    else:
        raise ValueError(f"unknown recipe {name!r}; built-in recipes are {names()}")
    return recipe.with_options(**options) if options else recipe


register("int4", lambda: Recipe("int4", LayerSpec(4, 64), description="4-bit affine, group 64 (MLX default)"))
register("int8", lambda: Recipe("int8", LayerSpec(8, 64), description="8-bit affine, group 64"))
register("int3", lambda: Recipe("int3", LayerSpec(3, 64), description="3-bit affine, group 64"))
register("int2", lambda: Recipe("int2", LayerSpec(2, 64), description="2-bit affine, group 64"))
register("int4_zp", lambda: Recipe(
    "int4_zp", LayerSpec(4, 64, "zeropoint"),
    description="4-bit, group 64, offsets of whole steps (an integer zero point): exports exactly to a Hugging Face "
                "compressed-tensors directory (transformers, vLLM)"))
def _gguf_block_recipe(bits: int, symmetric: bool) -> Callable[[], Recipe]:
    """The recipe of GGUF's ``Q{bits}_0`` (symmetric; the output head 8-bit, exactly ``Q8_0``, as llama.cpp keeps
    it) or ``Q{bits}_1`` (affine, float16 scales and offsets) blocks: group 32, exported bit for bit."""
    name = f"q{bits}_{0 if symmetric else 1}"
    if symmetric:
        head = "" if bits == 8 else "; the output head (lm_head, or the tied embedding) 8-bit, exactly GGUF Q8_0"
        overrides = () if bits == 8 else ((HEAD, LayerSpec(8, 32, "symmetric")),)
        return lambda: Recipe(name, LayerSpec(bits, 32, "symmetric"), overrides=overrides,
                              description=f"{bits}-bit symmetric, group 32: exports exactly to GGUF {name.upper()}{head}")
    return lambda: Recipe(name, LayerSpec(bits, 32, "affine", scale_dtype="float16"),
                          description=f"{bits}-bit affine, group 32: float16 scales/biases: exports exactly to GGUF "
                                      f"{name.upper()}")


for _bits, _symmetric in ((4, True), (5, True), (8, True), (4, False), (5, False)):
    register(f"q{_bits}_{0 if _symmetric else 1}", _gguf_block_recipe(_bits, _symmetric))


def kquant_fallback(spec: LayerSpec, in_features: int) -> LayerSpec:
    """``spec``, or for a K-quant spec on rows that are not a multiple of 256 weights the block type llama.cpp
    writes instead (:data:`mlxqat.quant.KQUANT_FALLBACK`: Q4_K -> Q5_0, Q5_K -> Q5_1), learning its scales
    where that type keeps them."""
    if spec.mode != "kquant" or in_features % quant.KQUANT_SUPER == 0:
        return spec
    fallback = get(quant.KQUANT_FALLBACK[spec.bits]).default
    return dataclasses.replace(fallback, learn_scales=spec.learn_scales and fallback.mode == "affine",
                               act_bits=spec.act_bits)


def _kquant_recipe(bits: int) -> Callable[[], Recipe]:
    fallback = quant.KQUANT_FALLBACK[bits].upper()
    if bits == 6:
        what = ("GGUF Q6_K: 6-bit symmetric codes whose scales are signed 8-bit integers against a float16 per 256 "
                "weights, the two 16-weight halves of each group of 32 sharing one (the form MLX holds)")
    else:
        what = (f"GGUF Q{bits}_K: {bits}-bit groups of 32 whose scales and offsets are 6-bit integers against two "
                "float16 numbers per 256 weights")
    return lambda: Recipe(f"q{bits}_k", LayerSpec(bits, 32, "kquant"), description=(
        f"{what}; exports exactly to Q{bits}_K (rows that are not a multiple of 256 weights: {fallback}, as "
        "llama.cpp does)"))


for _bits in quant.KQUANT_BITS:
    register(f"q{_bits}_k", _kquant_recipe(_bits))


def _q4_k_m() -> Recipe:
    """llama.cpp's Q4_K_M mix (:func:`mlxqat.gguf.kquants.q4_k_m_type`) as a recipe."""
    q4, q6 = LayerSpec(4, 32, "kquant"), LayerSpec(6, 32, "kquant")
    return Recipe("q4_k_m", q4, overrides=(
        (HEAD, q6), (MORE_BITS + "*.v_proj", q6), (MORE_BITS + "*.qkv_proj", q6), (MORE_BITS + "*.down_proj", q6)),
        description="GGUF Q4_K_M, llama.cpp's mix: Q4_K, with Q6_K for the output head and for v_proj (or a fused "
                    "qkv_proj) and down_proj in the layers llama.cpp gives more bits (the first and last eighth, "
                    "every third between); rows that are not a multiple of 256 weights take llama.cpp's fallbacks "
                    "(Q5_0, Q8_0). Exports exactly to a Q4_K_M file")


register("q4_k_m", _q4_k_m)


# Mixed precision. These static recipes are what a name gives without a model;
# mlxqat.mixed.mixed_recipe / mobile_recipe allocate bits per layer from the
# model's measured sensitivity to a bits-per-weight budget (the benchmark's rows).
register(
    "mixed",
    lambda: Recipe(
        "mixed",
        LayerSpec(3, 64),
        overrides=(
            ("*embed_tokens", LayerSpec(4, 64)),
            ("lm_head", LayerSpec(4, 64)),
            ("*.v_proj", LayerSpec(4, 64)),
            ("*.down_proj", LayerSpec(4, 64)),
        ),
        description="3-bit g64 with 4-bit embeddings, head, v_proj and down_proj (the layers most "
        "sensitive in mlx-lm's mixed_3_4); mlxqat.mixed.mixed_recipe fits bits to a model and a budget",
    ),
)
register(
    "mobile",
    lambda: Recipe(
        "mobile",
        LayerSpec(2, -1),
        overrides=(
            ("*embed_tokens", LayerSpec(4, -1)),
            ("lm_head", LayerSpec(4, -1)),
            ("*.v_proj", LayerSpec(4, -1, act_bits=8)),
            ("*.down_proj", LayerSpec(4, -1)),
            ("re:.*\\.(q_proj|k_proj|o_proj|gate_proj|up_proj)", LayerSpec(2, -1, act_bits=8)),
        ),
        description="Gemma mobile schema: channel-wise weights, 2-bit where models tolerate it, 4-bit "
        "embeddings/head/v_proj/down_proj, static int8 activations on every projection but down_proj "
        "(run mlxqat.calibrate after prepare); mlxqat.mixed.mobile_recipe fits bits to a model and a budget",
    ),
)
