"""Checks on model files before MLX reads them: config.json, safetensors headers, quantized shapes.

MLX trusts its inputs: a safetensors header whose offsets point past the end of
the file, or a quantized layer whose ``scales`` have the wrong shape, can end
the process with a signal instead of an exception. Everything a model directory
holds is checked here first, so that malformed input is a :class:`ValueError`
that names the file, the value and the fix.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import stat
import struct
from pathlib import Path
from typing import Dict, List, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

PathLike = Union[str, os.PathLike]


MAX_CONFIG_BYTES = 16 << 20


MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


MAX_DIMS = 8


# (low, high) bounds of the integer sizes of a config; generous for real models,
# small enough that no size makes MLX allocate absurd amounts or loop for minutes.
INT_BOUNDS = {
    "hidden_size": (1, 1 << 17),
    "intermediate_size": (1, 1 << 20),
    "moe_intermediate_size": (1, 1 << 20),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 4096),
    "num_key_value_heads": (1, 4096),
    "head_dim": (1, 4096),
    "vocab_size": (1, 1 << 23),
    "max_position_embeddings": (1, 1 << 24),
    "sliding_window": (1, 1 << 24),
    "sliding_window_pattern": (1, 1024),
    "num_experts": (1, 4096),
    "num_local_experts": (1, 4096),
    "num_experts_per_tok": (1, 4096),
}


POSITIVE_FLOATS = ("rope_theta", "rope_local_base_freq", "query_pre_attn_scalar")


EPSILONS = ("rms_norm_eps", "layer_norm_eps")  # added to a variance before its square root: small, in (0, 1)


BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias")


QUANT_BITS = (2, 3, 4, 5, 6, 8)


QUANT_GROUPS = (16, 32, 64, 128)


QUANT_MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")


MODEL_TYPE = re.compile(r"^[A-Za-z0-9_]{1,64}$")


# safetensors dtype -> bytes per element (the ones MLX reads)
ST_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "U32": 4, "I32": 4, "U64": 8, "I64": 8,
    "F16": 2, "BF16": 2, "F32": 4, "F64": 8,
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_json_file(path: Path, what: str, max_bytes: int = MAX_CONFIG_BYTES):
    """Parse a small JSON file that must be a regular file; ValueError naming it otherwise."""
    check_regular_file(path)
    size = os.stat(path).st_size
    if size > max_bytes:
        raise ValueError(f"{path} is {size} bytes, too large for {what} (at most {max_bytes})")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore {what} from the original model") from e


def check_directory_entries(directory: Path) -> None:
    """Refuse FIFOs, devices and links to them inside a model directory (reading one can hang).

    Links to regular files are allowed: a Hugging Face cache snapshot is made of them.
    """

    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            try:
                mode = os.stat(full).st_mode  # follows links
            except OSError as e:
                raise ValueError(f"{full} cannot be read ({e.strerror}); remove it or restore the model") from None
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ValueError(f"{full} is not a regular file (a device, FIFO or socket); remove it from the model directory")


def check_regular_file(path: Path) -> None:
    """Refuse FIFOs, devices and directories (or links to them) where a file is expected."""

    try:
        st = os.stat(path)  # a link to a regular file is fine (Hugging Face cache snapshots)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise ValueError(f"{path} is {kind}; a model directory holds regular files only")


def _check_quant_entry(q, where: str, per_layer_ok: bool) -> None:
    if not isinstance(q, dict):
        raise ValueError(f"{where} is {type(q).__name__}; expected an object with group_size, bits, mode")
    for key, value in q.items():
        if key in ("group_size", "bits", "mode"):
            continue
        if not per_layer_ok:
            continue
        if isinstance(value, bool):
            continue
        _check_quant_entry(value, f"{where}[{key!r}]", per_layer_ok=False)
    mode = q.get("mode", "affine")
    if mode not in QUANT_MODES:
        raise ValueError(f"{where}: mode={mode!r}; use one of {QUANT_MODES}")
    if "bits" in q and (not _is_int(q["bits"]) or q["bits"] not in QUANT_BITS):
        raise ValueError(f"{where}: bits={q['bits']!r}; use one of {QUANT_BITS}")
    if "group_size" in q and (not _is_int(q["group_size"]) or q["group_size"] not in QUANT_GROUPS):
        raise ValueError(f"{where}: group_size={q['group_size']!r}; use one of {QUANT_GROUPS}")
    if "bits" not in q or "group_size" not in q:
        raise ValueError(f"{where} needs both 'bits' and 'group_size'")


def check_config_values(cfg, where: str = "config.json") -> None:
    """Types and bounds of the fields mlx-lm builds a model from (recursing into ``text_config``)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where} holds {type(cfg).__name__}; expected a JSON object")
    mt = cfg.get("model_type")
    if mt is not None and (not isinstance(mt, str) or not MODEL_TYPE.match(mt)):
        raise ValueError(f"{where}: model_type={mt!r} is not an architecture name (e.g. \"llama\")")
    for key, (lo, hi) in INT_BOUNDS.items():
        if key in cfg and cfg[key] is not None:
            v = cfg[key]
            if not _is_int(v) or not lo <= v <= hi:
                raise ValueError(f"{where}: {key}={v!r}; expected an integer in [{lo}, {hi}]")
    for key in POSITIVE_FLOATS:
        if key in cfg and cfg[key] is not None and (not _is_number(cfg[key]) or cfg[key] <= 0):
            raise ValueError(f"{where}: {key}={cfg[key]!r}; expected a positive number")
    for key in EPSILONS:
        if key in cfg and cfg[key] is not None and (not _is_number(cfg[key]) or not 0 < cfg[key] < 1):
            raise ValueError(f"{where}: {key}={cfg[key]!r}; expected a small positive number in (0, 1), e.g. 1e-05; "
                             "restore it from the original model")
    for key in BOOLS:
        if key in cfg and not isinstance(cfg[key], bool):
            raise ValueError(f"{where}: {key}={cfg[key]!r}; expected true or false")
    if "rope_scaling" in cfg and cfg["rope_scaling"] is not None and not isinstance(cfg["rope_scaling"], dict):
        raise ValueError(f"{where}: rope_scaling={cfg['rope_scaling']!r}; expected an object or null")
    factor = (cfg.get("rope_scaling") or {}).get("factor")
    if factor is not None and (not _is_number(factor) or factor <= 0):
        raise ValueError(f"{where}: rope_scaling factor={factor!r}; expected a positive number (how many times the "
                         "trained context is stretched, e.g. 2.0); restore it from the original model")
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if _is_int(heads) and _is_int(kv) and heads % kv:
        raise ValueError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    hidden = cfg.get("hidden_size")
    if _is_int(hidden) and _is_int(heads) and cfg.get("head_dim") is None and hidden % heads:
        raise ValueError(f"{where}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}; set head_dim")
    for key in ("quantization", "quantization_config"):
        value = cfg.get(key)
        if value is None or (key == "quantization_config" and isinstance(value, dict) and "quant_method" in value):
            continue
        _check_quant_entry(value, f"{where}: {key}", per_layer_ok=True)
    if isinstance(cfg.get("text_config"), dict):
        check_config_values(cfg["text_config"], f"{where}: text_config")


@functools.lru_cache(maxsize=1)
def _mlx_lm_modules() -> frozenset:
    """The architectures mlx-lm has a module for (``mlx_lm/models/NAME.py`` defining ``ModelArgs``), found
    without importing them."""
    spec = importlib.util.find_spec("mlx_lm")
    names = set()
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        for path in Path(root, "models").glob("*.py"):
            try:
                if re.search(r"^class ModelArgs\b", path.read_text(encoding="utf-8"), re.MULTILINE):
                    names.add(path.stem)
            except (OSError, UnicodeDecodeError):
                continue
    return frozenset(names)


def check_model_type(cfg: dict, where: str = "config.json") -> None:
    """``model_type`` names an architecture mlx-lm builds (a module of ``mlx_lm.models`` or a name it remaps).

    Raises:
        ValueError: naming the value and the supported ones.
    """
    model_type = cfg.get("model_type")
    modules = _mlx_lm_modules()
    if model_type in modules:
        return
    from mlx_lm import utils  # the names mlx-lm remaps to a module (e.g. mistral -> llama)

    remapped = set(getattr(utils, "MODEL_REMAPPING", {}))
    remapped |= {key[0] for key in getattr(utils, "MODEL_ARCHITECTURE_REMAPPING", {})}
    if model_type in remapped:
        return
    version = importlib.metadata.version("mlx-lm")
    raise ValueError(
        f"{where}: model_type={model_type!r} is not an architecture mlx-lm {version} supports; supported: "
        f"{', '.join(sorted(modules | remapped))}. Set model_type to the model's architecture (e.g. \"llama\"), "
        "or upgrade mlx-lm if the architecture is newer"
    )


def safetensors_header(path: Path) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """Read and check a safetensors header without loading any tensor.

    Checks: the header length, the JSON, every tensor's dtype and shape, and that
    its ``data_offsets`` lie inside the file, match its size and overlap no other.

    Returns:
        ``{name: (dtype, shape)}``.

    Raises:
        ValueError: naming the file and the first problem.
    """
    check_regular_file(path)
    size = os.stat(path).st_size
    fix = "the file is damaged; restore it from the original model"
    if size < 8:
        raise ValueError(f"{path} is {size} bytes: too short for a safetensors file; {fix}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{path}: header length {n} exceeds the file ({size} bytes); {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: the safetensors header is not valid JSON ({e}); {fix}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object; {fix}")
    data_size = size - 8 - n
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and (not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values())):
                raise ValueError(f"{path}: __metadata__ must map strings to strings; {fix}")
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{path}: tensor {name!r} needs exactly dtype, shape and data_offsets; {fix}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype!r}; expected one of {sorted(ST_DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(_is_int(d) and 0 <= d < 1 << 40 for d in shape)):
            raise ValueError(f"{path}: tensor {name!r} has shape {shape!r}; {fix}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise ValueError(f"{path}: tensor {name!r} has data_offsets {offsets!r}; {fix}")
        begin, end = offsets
        nbytes = math.prod(shape) * ST_DTYPES[dtype]
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise ValueError(
                f"{path}: tensor {name!r} ({dtype} {shape}, {nbytes} bytes) has data_offsets "
                f"[{begin}, {end}] outside the {data_size} data bytes or of the wrong size; {fix}"
            )
        out[name] = (dtype, tuple(shape))
        if nbytes:
            spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ValueError(f"{path}: tensors {n0!r} and {n1!r} share bytes (overlapping data_offsets); {fix}")
    return out


def weight_files(directory: Path) -> List[Path]:
    """The weight files mlx-lm reads (``model*.safetensors``), checked against the index if there is one."""
    files = sorted(p for p in directory.glob("model*.safetensors"))
    index_path = directory / "model.safetensors.index.json"
    if os.path.lexists(index_path):
        index = read_json_file(index_path, "the weight index")
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise ValueError(f"{index_path} has no valid 'weight_map'; restore it from the original model")
        named = set(wmap.values())
        present = {p.name for p in files}
        if present - named:
            raise ValueError(
                f"{directory}: {sorted(present - named)[0]} is not in model.safetensors.index.json; "
                "mlx-lm would merge its tensors into the model: remove the file"
            )
        if named - present:
            raise ValueError(f"{directory}: {sorted(named - present)[0]} is listed in the weight index but missing")
    return files


def check_weight_files(directory: Path) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """Check every weight file's header; refuse a tensor defined in two files."""
    files = weight_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory} has no model*.safetensors weight files")
    tensors: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
    owner: Dict[str, str] = {}
    for p in files:
        for name, info in safetensors_header(p).items():
            if name in owner:
                raise ValueError(
                    f"{directory}: tensor {name!r} is in both {owner[name]} and {p.name}; one of them "
                    "does not belong to this model: remove it"
                )
            owner[name] = p.name
            tensors[name] = info
    return tensors


def check_quantized_tensors(tensors: Dict[str, Tuple[str, Tuple[int, ...]]], config: dict, where: str) -> None:
    """Every ``X.scales`` agrees with ``X.weight`` and the bits/group size config.json gives layer X.

    ``tensors`` is :func:`check_weight_files`' table: only headers are read.
    """
    q = config.get("quantization")
    if not isinstance(q, dict):
        return
    for name, (dtype, shape) in tensors.items():
        if not name.endswith(".scales"):
            continue
        layer = name[: -len(".scales")]
        spec = q.get(layer, q)
        if not isinstance(spec, dict) or spec.get("mode", "affine") != "affine":
            continue
        bits, gs = spec.get("bits"), spec.get("group_size")
        w = tensors.get(f"{layer}.weight")
        if w is None or w[0] != "U32" or len(w[1]) != 2:
            raise ValueError(f"{where}: {layer}.weight must be a 2-d U32 tensor beside {name}; the weights are damaged")
        in_dims = w[1][1] * 32 // bits
        expected = (w[1][0], in_dims // gs)
        if in_dims % gs or tuple(shape) != expected or 0 in expected:
            raise ValueError(
                f"{where}: {name} has shape {list(shape)} but a {bits}-bit, group {gs} weight of shape "
                f"{list(w[1])} needs {list(expected)}; the weights do not match config.json's quantization"
            )
        b = tensors.get(f"{layer}.biases")
        if b is not None and tuple(b[1]) != expected:
            raise ValueError(f"{where}: {layer}.biases has shape {list(b[1])}; expected {list(expected)}")


def check_layers_against_files(model: nn.Module, tensors: Dict[str, Tuple[str, Tuple[int, ...]]],
                               config: dict, where: str) -> None:
    """Before quantized layers are built: each layer the files or config.json quantize fits its settings.

    ``model`` is the freshly built (float) model; a layer whose input size is
    not a multiple of its group size stops MLX with a signal when quantized,
    and a stored weight of another shape than config.json implies is refused
    here by name.
    """
    q = config.get("quantization") if isinstance(config.get("quantization"), dict) else {}
    for path, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Embedding)) or "weight" not in m:
            continue
        out_dims, in_dims = m.weight.shape
        spec = q.get(path, q) if q else None
        quantized = f"{path}.scales" in tensors or isinstance(q.get(path), dict)
        stored = tensors.get(f"{path}.weight")
        if quantized and isinstance(spec, dict) and spec.get("mode", "affine") == "affine":
            bits, gs = spec["bits"], spec["group_size"]
            if in_dims % gs:
                raise ValueError(
                    f"{where}: {path} has {in_dims} inputs (from config.json), not a multiple of its group size "
                    f"{gs}; config.json does not match the weights"
                )
            expected = (out_dims, in_dims * bits // 32)
        elif quantized:
            continue  # another mode: MLX checks it
        else:
            expected = (out_dims, in_dims)
        if stored is not None and tuple(stored[1]) != expected:
            raise ValueError(
                f"{where}: {path}.weight is stored with shape {list(stored[1])} but config.json makes it "
                f"{list(expected)}; config.json does not match the weights"
            )


def check_output_layer(model: nn.Module, tensors: Dict[str, Tuple[str, Tuple[int, ...]]], config: dict,
                       directory: Path) -> None:
    """The weights and config.json agree on whether the model has an output layer of its own (``lm_head``).

    mlx-lm builds ``lm_head`` only when ``tie_word_embeddings`` is false (and
    defaults it to true), and drops a stored ``lm_head.weight`` when it is true:
    a deleted or flipped ``tie_word_embeddings`` would silently replace the
    trained output layer by the embedding. A stored copy of the embedding
    itself (some checkpoints hold one) is dropped harmlessly and allowed.
    """
    has_head = "lm_head" in dict(model.named_modules())
    stored = sorted(k for k in tensors if k.startswith("lm_head."))
    tie = config.get("tie_word_embeddings")
    if stored and not has_head and not _copies_embedding(model, stored, tensors, directory):
        if tie is None:
            said = "has no tie_word_embeddings (mlx-lm then ties it)"
        else:
            said = f"sets tie_word_embeddings={json.dumps(tie)}"
        raise ValueError(
            f"{directory}: the weights hold lm_head.weight, an output layer of its own, but config.json {said}, "
            "so the model would drop it and use the embedding instead; set \"tie_word_embeddings\": false in "
            "config.json (or restore config.json from the original model)"
        )
    if has_head and not stored and getattr(getattr(model, "args", None), "tie_word_embeddings", None) is False:
        raise ValueError(
            f"{directory}: config.json sets tie_word_embeddings=false (an output layer of its own) but the weights "
            "hold no lm_head.weight; set \"tie_word_embeddings\": true in config.json (or restore config.json from "
            "the original model)"
        )


def _copies_embedding(model: nn.Module, stored: List[str], tensors: dict, directory: Path) -> bool:
    """True if every stored ``lm_head.*`` tensor equals the model's one embedding's (headers checked already)."""
    embeddings = [p for p, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if len(embeddings) != 1:
        return False
    pairs = {name: f"{embeddings[0]}.{name[len('lm_head.'):]}" for name in stored}
    if any(tensors.get(a) != tensors.get(b) for a, b in pairs.items()):
        return False
    arrays = {}
    for path in weight_files(directory):
        loaded = mx.load(str(path))  # lazy: only the tensors compared are read
        arrays.update({k: loaded[k] for k in (*pairs, *pairs.values()) if k in loaded})
    return all(mx.array_equal(arrays[a], arrays[b]).item() for a, b in pairs.items())


def check_module_parameters(model: nn.Module, where: str) -> None:
    """Refuse quantized layers whose shapes disagree and integer tensors where floats belong.

    Runs on a lazily loaded model, before its parameters are evaluated:
    ``quantized_matmul`` with inconsistent ``weight``/``scales`` shapes can stop
    the process with a signal instead of raising.
    """
    for path, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            _check_quantized(path, m, where)
        elif isinstance(m, (nn.Linear, nn.Embedding, nn.RMSNorm, nn.LayerNorm)):
            for k, v in m.parameters().items():
                if isinstance(v, mx.array) and not mx.issubdtype(v.dtype, mx.floating):
                    raise ValueError(f"{where}: {path}.{k} is {v.dtype}; a {type(m).__name__} needs floats")


def _check_quantized(path: str, m: nn.Module, where: str) -> None:
    w, scales = m.weight, m.scales
    biases = m.get("biases") if hasattr(m, "get") else None
    bits, gs = m.bits, m.group_size
    if w.dtype != mx.uint32 or w.ndim != 2:
        raise ValueError(f"{where}: {path}.weight is {w.dtype} {tuple(w.shape)}; quantized weights are 2-d uint32")
    in_dims = w.shape[1] * 32 // bits
    expected = (w.shape[0], in_dims // gs) if in_dims % gs == 0 and w.shape[1] * 32 % bits == 0 else None
    if expected is None or tuple(scales.shape) != expected or expected[1] == 0:
        raise ValueError(
            f"{where}: {path}.scales has shape {tuple(scales.shape)} but a {bits}-bit, group {gs} weight of "
            f"shape {tuple(w.shape)} needs {expected}; the weights do not match config.json's quantization"
        )
    for name, a in (("scales", scales), ("biases", biases)):
        if a is not None and not mx.issubdtype(a.dtype, mx.floating):
            raise ValueError(f"{where}: {path}.{name} is {a.dtype}; expected a float type")
    if biases is not None and tuple(biases.shape) != expected:
        raise ValueError(f"{where}: {path}.biases has shape {tuple(biases.shape)}; expected {expected}")


def check_finite(model: nn.Module, where: str) -> None:
    """Refuse NaN/Inf in floating parameters (after they were read)."""

    for k, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating) and not bool(mx.all(mx.isfinite(v)).item()):
            raise ValueError(f"{where}: {k} holds NaN or Inf values; the weights are damaged")
