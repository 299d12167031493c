"""Loader fuzzing: mutated model directories and GGUF files against mlxqat's loaders.

Builds seed inputs once (tiny models saved by ``mlxqat.save`` with and without
their ``mlxqat.json`` manifest, GGUF files written by ``export_gguf``), then
runs cases: case ``i`` of seed ``s`` copies one seed, mutates it with
``random.Random(f"{s}:{i}")`` (byte flips, truncation, JSON field edits,
safetensors header and GGUF field edits, extra / missing / special files) and
hands it to the loaders (``verify``, ``load`` plus one forward pass, GGUF
``memory_report``). Cases run in a child process under a memory limit that the
parent supervises, so a signal, an abort or a hang is recorded, not fatal.

Outcomes: ``refused`` (ValueError or OSError), ``accepted_unchanged``,
``accepted_no_manifest`` (allowed: no manifest, nothing can tell a change),
``accepted_resealed`` (allowed: the mutation was followed by rewriting
``mlxqat.json``, as someone editing the model on purpose would; these cases
reach the code behind the hash check), ``refused_unchanged`` (a false refusal
of an input with the seed's content: reported, not a failure) and the failures
``accepted_changed_with_manifest``, ``unclean_exception``, ``crash``, ``hang``.
"Changed" means the names, types or bytes of the files (read through symlinks
to regular files) differ from the seed's.

    python benchmarks/fuzz_loader.py --cases 2000 --mix manifest=5,plain=3,gguf=2,reseal=0.3   # the CI test's run
    python benchmarks/fuzz_loader.py --cases 100000 --seconds 1800 \\
        --json benchmarks/results/fuzz_loader.json --md benchmarks/results/fuzz_loader.md
    python benchmarks/fuzz_loader.py --seed 0 --repro 137 --keep /tmp/case137   # one case, in-process
                                                        # (pass the run's --mix: a case depends on it)

Exit status 1 if any failure. On Linux run it with tools/with-blas.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import hashlib
import json
import os
import random
import re
import resource
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

MANIFEST = "mlxqat.json"
FAILURES = ("accepted_changed_with_manifest", "unclean_exception", "crash", "hang")
OUTCOMES = ("refused", "accepted_unchanged", "accepted_no_manifest", "accepted_resealed",
            "refused_unchanged") + FAILURES
CLEAN = (ValueError, OSError)  # ValueError includes mlxqat.IntegrityError and JSONDecodeError
SEED_FORMAT = 1  # bump when build_seeds changes what it writes
TOKENS = [[0, 1, 2, 3, 5, 8]]  # the forward pass after a successful load
INPUT_KINDS = ("manifest", "plain", "gguf")
DEFAULT_MIX = "manifest=4,plain=3,gguf=3,reseal=0.2"  # reseal: share of manifest cases

# ---------------------------------------------------------------------------
# Seed inputs
# ---------------------------------------------------------------------------

TINY = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)
CONFIGS = {
    "llama": dict(TINY, model_type="llama", rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen3": dict(TINY, model_type="qwen3", rms_norm_eps=1e-6, max_position_embeddings=512,
                  rope_theta=10000.0, head_dim=16, tie_word_embeddings=True),
    "gemma3_text": dict(TINY, model_type="gemma3_text", head_dim=16, rms_norm_eps=1e-6,
                        query_pre_attn_scalar=16, sliding_window=32, sliding_window_pattern=2,
                        max_position_embeddings=512),
}
CORPUS = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
          "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n") * 4


def _tokenizer(directory: Path):
    """A byte-level BPE trained on CORPUS, saved in ``directory`` (no network)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token=None)
    fast.save_pretrained(str(directory))
    return load_tokenizer(directory)


def _saved_model(arch: str, recipe, tokenizer, out: Path, seed: int = 0) -> Path:
    import importlib

    import mlx.core as mx

    import mlxqat

    mod = importlib.import_module(f"mlx_lm.models.{arch}")
    config = dict(CONFIGS[arch])
    mx.random.seed(seed)
    model = mod.Model(mod.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    if recipe is not None:
        mlxqat.prepare(model, recipe)
        mlxqat.calibrate(model, [mx.array(TOKENS)])
        mlxqat.convert(model)
    mlxqat.save(model, tokenizer, out, config=config)
    return out


def build_seeds(root: Path) -> list:
    """Write the seed inputs under ``root``; returns their descriptions (also in seeds.json)."""
    import warnings

    from mlxqat import export
    from mlxqat.recipes import LayerSpec, Recipe

    index = root / "seeds.json"
    stamp = {"format": SEED_FORMAT, "code": code_fingerprint()}  # seeds are what this code's save() writes
    if index.exists():  # a reused --seeds-dir
        info = json.loads(index.read_text())
        if {k: info.get(k) for k in stamp} == stamp:
            return info["seeds"]
        for sub in ("tokenizer", "manifest", "plain", "gguf-src", "gguf"):
            shutil.rmtree(root / sub, ignore_errors=True)
    mixed = Recipe("fuzz-mixed", LayerSpec(4, 32, "symmetric"),
                   overrides=(("*.mlp.down_proj", LayerSpec(8, 64)),
                              ("*.self_attn.o_proj", LayerSpec(4, 64, act_bits=8))),
                   skip=("lm_head",))
    tokenizer = _tokenizer(root / "tokenizer")
    seeds = []
    for name, arch, recipe in (("int4", "llama", "int4"), ("mixed", "qwen3", mixed), ("fp", "gemma3_text", None)):
        d = _saved_model(arch, recipe, tokenizer, root / "manifest" / name)
        plain = root / "plain" / name
        shutil.copytree(d, plain, symlinks=True)
        (plain / MANIFEST).unlink()
        seeds += [dict(name=f"manifest/{name}", kind="manifest", path=str(d)),
                  dict(name=f"plain/{name}", kind="plain", path=str(plain))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, arch, recipe in (("llama-q4_0", "llama", "q4_0"), ("qwen3-q8_0", "qwen3", "q8_0")):
            src = _saved_model(arch, recipe, tokenizer, root / "gguf-src" / name)
            out = root / "gguf" / f"{name}.gguf"
            export.export_gguf(src, out, recipe, exact=True, name=name, verbose=False)
            seeds.append(dict(name=f"gguf/{name}", kind="gguf", path=str(out)))
    for s in seeds:
        s["fingerprint"] = fingerprint(Path(s["path"]))
    index.write_text(json.dumps(dict(stamp, seeds=seeds), indent=1))
    return seeds


# ---------------------------------------------------------------------------
# Fingerprints: did a mutation change anything?
# ---------------------------------------------------------------------------


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _entries(path: Path, rel: str, out: list) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.stat(path)
        except OSError:
            target = None
        if target is not None and stat.S_ISREG(target.st_mode):
            out.append((rel, "file", _sha(path)))  # a link to the same bytes is no change (HF cache layout)
        else:
            out.append((rel, "link", os.readlink(path)))
    elif stat.S_ISREG(st.st_mode):
        out.append((rel, "file", _sha(path)))
    elif stat.S_ISDIR(st.st_mode):
        out.append((rel, "dir", ""))
        for name in sorted(os.listdir(path)):
            _entries(path / name, f"{rel}/{name}", out)
    else:
        out.append((rel, f"special-{stat.S_IFMT(st.st_mode):o}", ""))


def fingerprint(path: Path) -> str:
    """sha256 over the names, types and contents of everything at ``path`` (links not followed
    except to regular files; FIFOs and devices are never opened)."""
    out: list = []
    _entries(Path(path), ".", out)
    return hashlib.sha256(json.dumps(out).encode()).hexdigest()


# ---------------------------------------------------------------------------
# Mutation helpers
# ---------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000  # json.loads -> RecursionError
HUGE_LOOP = "{% for i in range(99999) %}{% for j in range(99999) %}{{ i }}{% endfor %}{% endfor %}"
EVIL = [None, True, False, 0, -1, 1, 3, 7, 2000006, 2**31, 2**32 + 1, 2**63, -2**63, 10**30, 1e308,
        float("nan"), float("inf"), -0.0, 0.5, "", "x" * 5000, "64", "../../x", "/etc/hostname",
        "/dev/zero", [], [1, 2], {}, {"a": {"b": [{}]}}]
TARGETED = {
    "config.json": {
        "num_hidden_layers": [2000006, 0, -1, 1, 3, "2", 2.5, None],
        "hidden_size": [0, -64, 63, 65, 128, 2**31, 2**40, "64"],
        "intermediate_size": [0, -1, 1, 2**31, 10**12],
        "num_attention_heads": [0, 3, 5, -4, 2**31],
        "num_key_value_heads": [0, 3, 5, 8, -2],
        "head_dim": [0, 15, 17, -16, 2**31],
        "vocab_size": [0, 1, 100, 513, 2**31, 2**40, -512],
        "rms_norm_eps": [0, -1.0, "x", float("nan")],
        "rope_theta": [0, -1.0, float("inf"), "x"],
        "max_position_embeddings": [0, -1, 2**62],
        "sliding_window": [0, -1, 2**40],
        "sliding_window_pattern": [0, -1, 2**40],
        "tie_word_embeddings": [True, False, "yes", None],
        "model_type": ["../../x", "nonexistent", "llama", "qwen3", "gemma3_text", "mistral3", 5, ""],
        "model_file": ["evil.py", "/etc/hostname", "../../x"],
        "rope_scaling": [{"type": "linear", "factor": 0}, {"rope_type": "yarn"}, {"type": "llama3"}, "x"],
        "quantization": [True, "int4", [], {}, {"bits": 4}, {"group_size": 0, "bits": 4},
                         {"group_size": 7, "bits": 4}, {"group_size": 64, "bits": 0},
                         {"group_size": 64, "bits": 16}, {"group_size": 64, "bits": 4, "mode": "nvfp4"},
                         {"group_size": 64, "bits": 4, "mode": "junk"}, {"group_size": 2**31, "bits": 4}],
        "quantization_config": [{"quant_method": "awq"}, {"quant_method": "gptq", "bits": 4},
                                {"quant_method": "bitnet"}, {"quant_method": "modelopt"}, {"quant_method": 5}],
        "quantize_activations": [True],
        "eos_token_id": [-1, 2**40, "x", [None]],
        "text_config": [{"quantization_config": {"quant_method": "mxfp4"}}, "x"],
    },
    MANIFEST: {
        "files": [None, [], "x", {}, {"/etc/hostname": "0" * 64}, {"/dev/zero": "0" * 64},
                  {"../../x": "0" * 64}, {"config.json": 5}, {"config.json": None}],
        "format_version": [2, 999, "1", None, -1],
        "format": ["other", None, 5],
        "activation_quantization": [{"model.layers.0.mlp.down_proj": 8}, {"model.layers.0.self_attn.o_proj": 0},
                                    {"model.layers.0.self_attn.o_proj": "x"}, {"lm_head": 8}, {"nope": 8},
                                    ["x"], "x", 5],
        "recipe": [{"name": "x"}, {"junk": 1}, "int4", 5, [], {"name": "x", "default": {"bits": 99}}],
    },
    "tokenizer_config.json": {
        "chat_template": [HUGE_LOOP, "{% for %}", "{{" * 10000, "x" * 10_000_000,
                          "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}"],
        "auto_map": [{"AutoTokenizer": ["evil.EvilTokenizer", None]},
                     {"AutoTokenizer": ["../../x.Evil", "../../x.Evil"]}],
        "tokenizer_class": ["EvilTokenizer", "LlamaTokenizer", "../../x", 5, None],
        "model_max_length": [1e30, -1, "x", None],
        "eos_token": [{"content": 5}, 5, "", None, "x" * 100_000],
        "added_tokens_decoder": [{"x": 1}, {"0": {"content": None}}, "x"],
    },
}
EVIL_PY = "import os\nos._exit(77)  # the fuzz harness counts this as a crash: remote code ran\n"


class Case:
    """One mutated input: ``root`` is the copied seed (a directory or one .gguf file)."""

    def __init__(self, rng: random.Random, root: Path, seed: dict, work: Path):
        self.rng, self.root, self.seed, self.work = rng, root, seed, work

    def files(self, suffix: str = "") -> list:
        """Regular files (no links, FIFOs or devices: a mutation must not block reading one)."""
        if not self.root.is_dir():
            return [self.root] if stat.S_ISREG(os.lstat(self.root).st_mode) else []
        return sorted(p for p in self.root.rglob("*") if p.is_file() and not p.is_symlink() and p.name.endswith(suffix))

    def pick(self, suffix: str = "") -> Path:
        return self.rng.choice(self.files(suffix) or self.files())

    def rel(self, p: Path) -> str:
        return p.name if not self.root.is_dir() else p.relative_to(self.root).as_posix()


def _rand_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(n))


def _evil_int(rng: random.Random, width: int, old: int) -> int:
    top = (1 << (8 * width)) - 1
    return rng.choice([0, 1, 2, 3, old + 1, max(old - 1, 0), old * 2, 255, 0x7FFF, 0xFFFF, 0x7FFFFFFF,
                       0xFFFFFFFF, 2**40, top >> 1, top, top - 1, rng.randrange(top + 1)]) & top


def _find_json_path(rng: random.Random, doc, depth: int = 0):
    """A random (container, key) inside ``doc``, or None for the document itself."""
    if isinstance(doc, dict) and doc and (depth == 0 or rng.random() < 0.7):
        k = rng.choice(list(doc))
        deeper = _find_json_path(rng, doc[k], depth + 1) if rng.random() < 0.5 else None
        return deeper or (doc, k)
    if isinstance(doc, list) and doc and rng.random() < 0.7:
        k = rng.randrange(len(doc))
        deeper = _find_json_path(rng, doc[k], depth + 1) if rng.random() < 0.5 else None
        return deeper or (doc, k)
    return None


# ---------------------------------------------------------------------------
# Directory mutations: each returns a description
# ---------------------------------------------------------------------------


def m_byte_flip(c: Case) -> str:
    p = c.pick()
    data = bytearray(p.read_bytes())
    if not data:
        return f"byte_flip {c.rel(p)}: empty file, no-op"
    spots = []
    for _ in range(c.rng.choice([1, 1, 2, 4, 16])):
        if p.name.endswith(".safetensors") and c.rng.random() < 0.5:  # the header and the first data bytes
            off = c.rng.randrange(min(len(data), 8 + struct.unpack("<Q", bytes(data[:8]).ljust(8, b"\0"))[0] + 64))
        elif p.name.endswith(".gguf") and c.rng.random() < 0.5:
            off = c.rng.randrange(min(len(data), 8192))
        else:
            off = c.rng.randrange(len(data))
        if c.rng.random() < 0.5:
            data[off] ^= 1 << c.rng.randrange(8)
        else:
            data[off] = c.rng.choice([0, 0xFF, 0x7F, 0x80, ord('"'), ord("{"), ord("9"), c.rng.randrange(256)])
        spots.append(off)
    p.write_bytes(bytes(data))
    return f"byte_flip {c.rel(p)} at {spots}"


def m_truncate(c: Case) -> str:
    p = c.pick()
    n = p.stat().st_size
    cut = c.rng.choice([0, 1, 7, 8, 9, n // 2, max(n - 1, 0), c.rng.randrange(n + 1)])
    if p.name.endswith(".safetensors") and n >= 8 and c.rng.random() < 0.5:
        hlen = struct.unpack("<Q", p.read_bytes()[:8])[0]
        cut = c.rng.choice([8 + hlen - 1, 8 + hlen, 8 + hlen + 1, n - 4])
    cut = max(0, min(cut, n))
    os.truncate(p, cut)
    return f"truncate {c.rel(p)} {n} -> {cut} bytes"


def m_append(c: Case) -> str:
    p = c.pick()
    junk = c.rng.choice([b"\0", b"\0" * 4096, _rand_bytes(c.rng, 64), b'{"x": 1}', b"\n", b" "])
    with open(p, "ab") as f:
        f.write(junk)
    return f"append {len(junk)} bytes to {c.rel(p)}"


def m_json_edit(c: Case) -> str:
    jsons = [p for p in c.files(".json")]
    p = c.rng.choice(jsons)
    name = c.rel(p)
    doc = json.loads(p.read_text())
    targeted = TARGETED.get(name, {})
    if name == "model.safetensors.index.json":
        wm = doc.get("weight_map", {})
        targeted = {"weight_map": [{k: v for k, v in wm.items()} | {next(iter(wm), "x"): t}
                                   for t in ("/dev/zero", "../../x", "/etc/hostname", "missing.safetensors")]
                    + [[], "x", None]}
    r = c.rng.random()
    if targeted and r < 0.6:
        key = c.rng.choice(list(targeted))
        val = c.rng.choice(targeted[key])
        if name == "config.json" and key == "quantization" and isinstance(doc.get(key), dict) and c.rng.random() < 0.5:
            layers = [k for k in doc[key] if isinstance(doc[key][k], dict)] or ["model.layers.0.mlp.down_proj"]
            layer = c.rng.choice(layers)
            val = c.rng.choice([{"bits": 8, "group_size": 64}, {"bits": 4, "group_size": 32}, False, True,
                                {"bits": 3, "group_size": 64, "mode": "affine"}, "x", {}, None])
            doc[key][layer] = val
            desc = f"json_edit {name}: quantization[{layer!r}] = {val!r}"
        elif name == MANIFEST and key == "files" and c.rng.random() < 0.5 and isinstance(doc.get("files"), dict):
            listed = list(doc["files"])
            old = c.rng.choice(listed)
            new = c.rng.choice(["/etc/hostname", "../../x", "/dev/zero", "./" + old, old + "/", old.upper(),
                                "model-zz-extra.safetensors"])
            doc["files"][new] = doc["files"].pop(old)
            desc = f"json_edit {name}: files entry {old!r} renamed to {new!r}"
        else:
            doc[key] = val
            desc = f"json_edit {name}: {key} = {_short(val)}"
        if key == "model_file" or key == "auto_map":
            (p.parent / "evil.py").write_text(EVIL_PY)
            desc += " (+ evil.py that exits 77)"
    elif r < 0.75:
        doc = c.rng.choice(EVIL + [DEEP])
        if doc is DEEP:
            p.write_text(DEEP)
            return f"json_edit {name}: whole document = 100000-deep nested list"
        desc = f"json_edit {name}: whole document = {_short(doc)}"
    else:
        where = _find_json_path(c.rng, doc)
        if where is None:
            return "json_edit: empty document, no-op"
        container, key = where
        op = c.rng.choice(["set", "set", "delete", "deep"])
        if op == "delete":
            del container[key]
            desc = f"json_edit {name}: delete {key!r}"
        elif op == "deep":
            container[key] = "__DEEP__"
            p.write_text(json.dumps(doc).replace('"__DEEP__"', "[" * 5000 + "]" * 5000))
            return f"json_edit {name}: {key!r} = 5000-deep nested list"
        else:
            val = c.rng.choice(EVIL)
            old = container[key]
            container[key] = val
            desc = f"json_edit {name}: {_short(key)} {_short(old)} -> {_short(val)}"
    p.write_text(json.dumps(doc, indent=1))
    return desc


def _short(v, n: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= n else f"{s[:n]}...({len(s)} chars)"


def _st_read(p: Path):
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _st_write(p: Path, header, data: bytes, header_text: str = None) -> None:
    text = (header_text if header_text is not None else json.dumps(header, separators=(",", ":"))).encode()
    text += b" " * (-len(text) % 8)
    p.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


ST_OPS = {"reshape": 5, "dtype": 2, "offsets": 3, "header_len": 1, "swap": 1, "rename": 1, "delete": 1,
          "metadata": 0.5, "dims_overflow": 1, "duplicate_key": 1, "header_junk": 0.5}


def m_safetensors(c: Case) -> str:
    p = c.pick(".safetensors")
    if not p.name.endswith(".safetensors"):
        return m_byte_flip(c)
    header, data = _st_read(p)
    names = [k for k in header if k != "__metadata__"]
    quant = [k for k in names if k.endswith((".scales", ".biases")) or header[k]["dtype"] == "U32"]
    name = c.rng.choice(quant if quant and c.rng.random() < 0.6 else names)
    t = header[name]
    shape, (a, b) = list(t["shape"]), t["data_offsets"]
    op = c.rng.choices(list(ST_OPS), weights=list(ST_OPS.values()))[0]
    text = None
    if op == "reshape":
        n = _prod(shape)
        divisors = [d for d in (2, 4, 8, 16, 32, 64) if n % d == 0 and d < n]
        choices = [[n], [1, n], shape + [1], [1] + shape, [s + 1 for s in shape], [0] + shape[1:],
                   [-s for s in shape], [n * 2]] + [[n // d, d] for d in divisors]
        choices = [x for x in choices if x != shape]
        new = shape[::-1] if len(set(shape)) > 1 and c.rng.random() < 0.4 else c.rng.choice(choices)  # [N, 1] -> [1, N]
        t["shape"] = new
        desc = f"{name} shape {shape} -> {new} (same bytes)"
    elif op == "dtype":
        old = t["dtype"]
        new = c.rng.choice(["F32", "F16", "BF16", "U32", "I32", "U8", "I8", "F64", "I64", "BOOL", "U4", "X9", 5])
        t["dtype"] = new
        desc = f"{name} dtype {old} -> {new}"
    elif op == "offsets":
        other = header[c.rng.choice(names)]["data_offsets"]
        new = c.rng.choice([list(other), [a + 1, b + 1], [a, b + 4], [b, a], [a, len(data) + 4], [-4, b],
                            [a, 2**64 - 1], [2**63, 2**63 + (b - a)], [a, a], [0, b - a], [a, b, 0], "x",
                            [len(data) - (b - a) + 8, len(data) + 8]])
        t["data_offsets"] = new
        desc = f"{name} data_offsets {[a, b]} -> {new}"
    elif op == "header_len":
        raw = bytearray(p.read_bytes())
        n = struct.unpack("<Q", raw[:8])[0]
        new = c.rng.choice([0, 1, 2, 7, n - 1, n + 1, n + 8, len(raw), len(raw) - 7, len(raw) + 1, 2**31,
                            2**63, 2**64 - 1])
        raw[:8] = struct.pack("<Q", new)
        p.write_bytes(bytes(raw))
        return f"safetensors {c.rel(p)}: header length {n} -> {new} (file {len(raw)} bytes)"
    elif op == "swap":
        same = [k for k in names if k != name and header[k]["shape"] == shape and header[k]["dtype"] == t["dtype"]]
        if not same:
            return f"safetensors {c.rel(p)}: no tensor with {name}'s shape, no-op"
        other = c.rng.choice(same)
        t["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], t["data_offsets"]
        desc = f"swap the data of {name} and {other} (same shape and dtype)"
    elif op == "rename":
        new = c.rng.choice([name + "x", name.replace("layers.0", "layers.9"), "lm_head.weight", "", "x" * 1000])
        header[new] = header.pop(name)
        desc = f"rename tensor {name} -> {new!r}"
    elif op == "delete":
        del header[name]
        desc = f"delete tensor {name}"
    elif op == "metadata":
        header["__metadata__"] = c.rng.choice([{"format": 5}, {"format": "pt"}, [], "x", {"x": {"y": 1}}, None])
        desc = f"__metadata__ = {header['__metadata__']!r}"
    elif op == "dims_overflow":
        new = c.rng.choice([[2**31, 2], [2**32, 2**32], [2**62, 4], [2**33, 2**31], [2**63, 2], [-1, -1],
                            [2**31 - 1, 2**31 - 1], [1] * 64])
        t["shape"] = new
        desc = f"{name} shape {shape} -> {new} (element count overflows)"
    elif op == "duplicate_key":
        dup = dict(t, shape=shape[::-1] if len(shape) > 1 else [1] + shape)
        body = json.dumps(header, separators=(",", ":"))
        text = "{" + json.dumps(name) + ":" + json.dumps(dup) + "," + body[1:]
        desc = f"duplicate header key {name} (first with shape {dup['shape']})"
    else:  # header_junk
        text = c.rng.choice(["[]", "5", '"x"', "{" * 10000, '{"a":', "\xff\xfe", DEEP, "{}", "null"])
        desc = f"header = {_short(text, 30)}"
    _st_write(p, header, data, text)
    return f"safetensors {c.rel(p)}: {desc}"


def m_extra_file(c: Case) -> str:
    import mlx.core as mx

    kind = c.rng.choice(["override", "override", "garbage_weights", "generation_config", "chat_template",
                         "tokenizer_model", "special_tokens", "hf_quant_config", "subdir", "activation"])
    root = c.root
    if kind == "override":
        main = [p for p in c.files(".safetensors") if p.name.startswith("model")]
        if not main:
            return "extra_file: no weights, no-op"
        arrays = mx.load(str(main[0]))
        name = "lm_head.weight" if "lm_head.weight" in arrays and c.rng.random() < 0.5 else c.rng.choice(list(arrays))
        v = arrays[name]
        fake = mx.zeros_like(v) if c.rng.random() < 0.5 else (v + 1).astype(v.dtype)
        target = c.rng.choice(["model-zz-extra.safetensors", "model-00002-of-00002.safetensors",
                               "model.safetensors.bak.safetensors"])
        mx.save_safetensors(str(root / target), {name: fake}, metadata={"format": "mlx"})
        return f"extra_file {target} overriding {name} {list(v.shape)} {v.dtype}"
    if kind == "garbage_weights":
        (root / "model-zz-extra.safetensors").write_bytes(c.rng.choice([b"", b"\0" * 16, b"\x08" + b"\0" * 7 + b"{}",
                                                                        _rand_bytes(c.rng, 64)]))
        return "extra_file model-zz-extra.safetensors with garbage"
    if kind == "generation_config":
        val = c.rng.choice([{"eos_token_id": "x"}, {"eos_token_id": [None]}, {"eos_token_id": 2**40}, "x", None])
        (root / "generation_config.json").write_text(json.dumps(val))
        return f"extra_file generation_config.json = {val!r}"
    if kind == "chat_template":
        name = c.rng.choice(["chat_template.jinja", "chat_template.json"])
        body = HUGE_LOOP if name.endswith("jinja") else json.dumps({"chat_template": HUGE_LOOP})
        (root / name).write_text(body)
        return f"extra_file {name} with a 10^10-step loop"
    if kind == "tokenizer_model":
        (root / "tokenizer.model").write_bytes(_rand_bytes(c.rng, 256))
        return "extra_file tokenizer.model (random bytes)"
    if kind == "special_tokens":
        name = c.rng.choice(["special_tokens_map.json", "added_tokens.json"])
        (root / name).write_text(json.dumps(c.rng.choice([{"eos_token": 5}, {"x": 2**40}, [1], "x"])))
        return f"extra_file {name} with junk"
    if kind == "hf_quant_config":
        (root / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))
        return "extra_file hf_quant_config.json (NVFP4)"
    if kind == "subdir":
        (root / "sub").mkdir(exist_ok=True)
        (root / "sub" / "model.safetensors").write_bytes(b"\0" * 8)
        return "extra_file sub/model.safetensors"
    arrays = {"model.layers.0.self_attn.o_proj.act_scale": mx.array(c.rng.choice([0.0, -1.0, 1e30, float("nan")]))}
    mx.save_safetensors(str(root / "activation_scales.safetensors"), arrays)
    return "extra_file activation_scales.safetensors (junk scale)"


def m_delete(c: Case) -> str:
    p = c.pick()
    p.unlink()
    return f"delete {c.rel(p)}"


def m_rename(c: Case) -> str:
    p = c.pick()
    new = c.rng.choice([p.name.upper(), p.name + ".bak", "model-00001-of-00002.safetensors", "x", "." + p.name,
                        "model.safetensors", "config.json", "tokenizer.json"])
    os.replace(p, p.parent / new)
    return f"rename {c.rel(p)} -> {new}"


def m_special(c: Case) -> str:
    """Replace a file by a FIFO, a symlink or a directory."""
    p = c.pick()
    if c.rng.random() < 0.4 and not c.root.is_file():  # the files a loader must open
        p = c.root / c.rng.choice([MANIFEST, "config.json", "model.safetensors", "tokenizer.json",
                                   "tokenizer_config.json"])
    kind = c.rng.choice(["fifo", "dev_zero", "dev_urandom", "etc_hostname", "dangling", "loop", "other_seed",
                         "directory"])
    if p.exists() or p.is_symlink():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "directory":
        p.mkdir()
        (p / "x").write_bytes(b"x")
    else:
        target = {"dev_zero": "/dev/zero", "dev_urandom": "/dev/urandom", "etc_hostname": "/etc/hostname",
                  "dangling": "../../x", "loop": p.name}.get(kind)
        if kind == "other_seed":
            others = [q for q in Path(c.seed["path"]).parent.parent.rglob(p.name) if q.is_file()]
            target = str(c.rng.choice(others)) if others else "/etc/hostname"
        os.symlink(target, p)
    return f"special {c.rel(p)} -> {kind}"


def m_hf_cache_layout(c: Case) -> str:
    """Every file a relative symlink into ../blobs (the Hugging Face cache layout): no change."""
    blobs = c.root.parent / "blobs"
    blobs.mkdir(exist_ok=True)
    for p in c.files():
        blob = blobs / _sha(p)
        os.replace(p, blob)
        os.symlink(os.path.relpath(blob, p.parent), p)
    return "hf_cache_layout (no change)"


def m_noop(c: Case) -> str:
    return "noop (no change)"


DIR_MUTATIONS = {
    "byte_flip": (m_byte_flip, 3), "truncate": (m_truncate, 2), "append": (m_append, 1),
    "json_edit": (m_json_edit, 6), "safetensors": (m_safetensors, 8), "extra_file": (m_extra_file, 3),
    "delete": (m_delete, 1), "rename": (m_rename, 1), "special": (m_special, 2),
    "hf_cache_layout": (m_hf_cache_layout, 0.3), "noop": (m_noop, 0.2),
}


# ---------------------------------------------------------------------------
# GGUF mutations
# ---------------------------------------------------------------------------

GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # type id -> bytes


@functools.lru_cache(maxsize=4)  # the seeds' layouts: most cases mutate a pristine copy
def gguf_layout(raw: bytes) -> dict:
    """Byte ranges of a valid GGUF file: fields [(offset, width, role)], KV and tensor-info blobs."""
    fields, pos = [(0, 4, "magic"), (4, 4, "version"), (8, 8, "n_tensors"), (16, 8, "n_kv")], 24
    n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)
    if max(n_tensors, n_kv) > len(raw):
        raise ValueError(f"{n_tensors} tensors, {n_kv} KVs in a {len(raw)}-byte file")

    def string(role):
        nonlocal pos
        n = struct.unpack_from("<Q", raw, pos)[0]
        fields.append((pos, 8, role))
        pos += 8 + n
        return raw[pos - n:pos]

    def value(vtype, role):
        nonlocal pos
        if vtype == 8:
            string(f"{role}_str_len")
        elif vtype == 9:
            fields.append((pos, 4, "arr_type"))
            atype, count = struct.unpack_from("<IQ", raw, pos)
            if count > len(raw):  # an earlier mutation of this case broke the file
                raise ValueError(f"array of {count} items in a {len(raw)}-byte file")
            fields.append((pos + 4, 8, "arr_len"))
            pos += 12
            for _ in range(count):
                value(atype, "arr_item")
        else:
            fields.append((pos, GGUF_SCALARS[vtype], f"{role}_{vtype}"))
            pos += GGUF_SCALARS[vtype]

    kvs = []
    for _ in range(n_kv):
        start = pos
        key = string("key_len").decode()
        vtype = struct.unpack_from("<I", raw, pos)[0]
        fields.append((pos, 4, "kv_type"))
        pos += 4
        value(vtype, "kv_value")
        kvs.append((key, raw[start:pos]))
    tis_start = pos
    for _ in range(n_tensors):
        string("ti_name_len")
        n_dims = struct.unpack_from("<I", raw, pos)[0]
        if n_dims > len(raw):
            raise ValueError(f"{n_dims} dims")
        fields.append((pos, 4, "ti_n_dims"))
        pos += 4
        for i in range(n_dims):
            fields.append((pos + 8 * i, 8, "ti_dim"))
        pos += 8 * n_dims
        fields += [(pos, 4, "ti_type"), (pos + 4, 8, "ti_offset")]
        pos += 12
    data_start = pos + (-pos % 32)
    return dict(fields=fields, kvs=kvs, tis=raw[tis_start:pos], data=raw[data_start:], n_tensors=n_tensors)


def _gguf_build(raw: bytes, layout: dict, kvs: list) -> bytes:
    head = raw[:8] + struct.pack("<QQ", layout["n_tensors"], len(kvs)) + b"".join(b for _, b in kvs) + layout["tis"]
    return head + b"\0" * (-len(head) % 32) + layout["data"]


def _kv(key: str, vtype: int, payload: bytes) -> tuple:
    k = key.encode()
    return key, struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + payload


def m_gguf_field(c: Case) -> str:
    raw = bytearray(c.pick().read_bytes())
    fields = gguf_layout(bytes(raw))["fields"]
    roles = sorted({r for _, _, r in fields})
    role = c.rng.choice(roles)
    off, width, _ = c.rng.choice([f for f in fields if f[2] == role])
    old = int.from_bytes(raw[off:off + width], "little")
    new = _evil_int(c.rng, width, old)
    raw[off:off + width] = new.to_bytes(width, "little")
    c.root.write_bytes(bytes(raw))
    return f"gguf_field {role} at {off}: {old} -> {new}"


def m_gguf_kv(c: Case) -> str:
    raw = c.pick().read_bytes()
    layout = gguf_layout(raw)
    kvs = list(layout["kvs"])
    op = c.rng.choice(["alignment", "alignment", "drop", "duplicate", "retype"])
    if op == "alignment":
        val = c.rng.choice([0, 1, 3, 7, 31, 64, 2**31, 2**32 - 1])
        kvs.append(_kv("general.alignment", 4, struct.pack("<I", val)))
        desc = f"general.alignment = {val} (data still at 32-byte alignment)"
    elif op == "drop":
        i = c.rng.randrange(len(kvs))
        desc = f"drop KV {kvs[i][0]}"
        del kvs[i]
    elif op == "duplicate":
        i = c.rng.randrange(len(kvs))
        kvs.insert(c.rng.randrange(len(kvs) + 1), kvs[i])
        desc = f"duplicate KV {kvs[i][0]}"
    else:
        i = c.rng.randrange(len(kvs))
        key = kvs[i][0]
        vtype, payload = c.rng.choice([(8, struct.pack("<Q", 1) + b"x"), (4, struct.pack("<I", 2**31)),
                                       (6, struct.pack("<f", float("nan"))), (9, struct.pack("<IQ", 4, 0)),
                                       (9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 0)), (7, b"\x02")])
        kvs[i] = _kv(key, vtype, payload)
        desc = f"KV {key} retyped to type {vtype}"
    c.root.write_bytes(_gguf_build(raw, layout, kvs))
    return f"gguf_kv {desc}"


def m_gguf_truncate(c: Case) -> str:
    raw = c.pick().read_bytes()
    fields = gguf_layout(raw)["fields"]
    cut = c.rng.choice([0, 3, 4, 8, 23, 24, len(raw) - 1, len(raw) // 2, c.rng.randrange(len(raw))] +
                       [c.rng.choice(fields)[0] + d for d in (0, 1)])
    os.truncate(c.root, cut)
    return f"gguf_truncate {len(raw)} -> {cut} bytes"


GGUF_MUTATIONS = {
    "gguf_field": (m_gguf_field, 6), "gguf_kv": (m_gguf_kv, 2), "gguf_truncate": (m_gguf_truncate, 2),
    "byte_flip": (m_byte_flip, 2), "append": (m_append, 0.5), "special": (m_special, 0.5), "noop": (m_noop, 0.1),
}


def _choose(rng: random.Random, table: dict) -> str:
    names = list(table)
    return rng.choices(names, weights=[table[n][1] for n in names])[0]


def make_case(run_seed: int, index: int, seeds: list, mix: dict, work: Path) -> dict:
    """Copy a seed into ``work`` and mutate it; everything follows from (run_seed, index)."""
    rng = random.Random(f"{run_seed}:{index}")
    kind = rng.choices(INPUT_KINDS, weights=[mix[k] for k in INPUT_KINDS])[0]
    seed = rng.choice([s for s in seeds if s["kind"] == kind])
    src = Path(seed["path"])
    work.mkdir(parents=True)
    root = work / src.name
    if kind == "gguf":
        shutil.copyfile(src, root)
    else:
        shutil.copytree(src, root, symlinks=True)
    c = Case(rng, root, seed, work)
    table = GGUF_MUTATIONS if kind == "gguf" else DIR_MUTATIONS
    n = 1 if rng.random() < 0.85 else rng.choice([2, 3])
    names, descs = [], []
    for _ in range(n):
        name = _choose(rng, table)
        try:
            descs.append(table[name][0](c))
        except Exception as e:  # noqa: BLE001 - e.g. an earlier mutation of this case broke the file
            descs.append(f"{name}: not applicable ({type(e).__name__})")
        names.append(name)
    resealed = kind == "manifest" and rng.random() < mix.get("reseal", 0.0)
    if resealed:
        names.append("reseal")
        descs.append(reseal(root))
        resealed = not descs[-1].startswith("reseal failed")
    changed = fingerprint(root) != seed["fingerprint"]
    has_manifest = kind == "manifest" and os.path.lexists(root / MANIFEST)
    return dict(i=index, input=seed["name"], kind=kind, mutation="+".join(names), desc="; ".join(descs),
                changed=changed, manifest=has_manifest, resealed=resealed, path=str(root))


def reseal(root: Path) -> str:
    """Rewrite mlxqat.json for the mutated files (keeping its other entries, edited or not), as
    someone who changed the files on purpose would: reaches the code behind the manifest check."""
    try:
        from mlxqat.io import RESERVED_KEYS, write_manifest

        doc = {}
        with contextlib.suppress(OSError, ValueError):
            if stat.S_ISREG(os.stat(root / MANIFEST).st_mode):  # never open a FIFO or /dev/zero
                doc = json.loads((root / MANIFEST).read_text())
        info = {k: v for k, v in doc.items() if k not in RESERVED_KEYS} if isinstance(doc, dict) else {}
        write_manifest(root, info)
        return "reseal mlxqat.json"
    except Exception as e:  # noqa: BLE001 - the mutated directory cannot get a manifest
        return f"reseal failed ({type(e).__name__}: {str(e)[:80]})"


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def t_verify(path: Path):
    import mlxqat

    mlxqat.verify(path)


def t_load_forward(path: Path):
    import mlx.core as mx

    import mlxqat

    model, _ = mlxqat.load(path)
    mx.eval(model(mx.array(TOKENS)))


def t_memory_report(path: Path):
    from mlxqat.export import memory_report

    memory_report(path)


# name -> (input kinds, function, decides acceptance). A case is accepted when every deciding
# target succeeds; all targets run (a refusal by one does not spare the next from the input).
# verify does not decide: a no-manifest directory always fails it.
TARGETS = {
    "verify": (("manifest", "plain"), t_verify, False),
    "load+forward": (("manifest", "plain"), t_load_forward, True),
    "memory_report": (("gguf",), t_memory_report, True),
    "gguf_load+forward": (("gguf",), t_load_forward, True),  # once mlxqat.load opens a .gguf (probed)
    "dir_memory_report": (("manifest", "plain"), t_memory_report, False),  # lazy mlx_lm load, no manifest check
}
DEFAULT_TARGETS = "verify,load+forward,memory_report,gguf_load+forward"


def select_targets(names: str, seeds: list) -> list:
    """[(name, kinds, fn, decides)] for ``--targets``; the GGUF load only if load accepts the seed GGUFs."""
    out = []
    for name in names.split(","):
        if name not in TARGETS:
            raise SystemExit(f"--targets: {name!r} is not one of {sorted(TARGETS)}")
        if name == "gguf_load+forward" and not gguf_load_supported(seeds):
            continue
        out.append((name, *TARGETS[name]))
    return out


def gguf_load_supported(seeds: list) -> bool:
    """Whether mlxqat.load opens the unmutated seed GGUF files (and the model runs)."""
    try:
        for s in seeds:
            if s["kind"] == "gguf":
                t_load_forward(Path(s["path"]))
        return True
    except Exception:  # noqa: BLE001 - not supported (yet)
        return False


def run_targets(case: dict, targets: list, on_stage=lambda name: None) -> dict:
    """Run the targets that apply to ``case``; classify the outcome."""
    path, kind = Path(case["path"]), case["kind"]
    stages, accepted = {}, None
    for name, kinds, fn, decides in targets:
        if kind not in kinds:
            continue
        on_stage(name)
        try:
            fn(path)
            stages[name] = "ok"
            ok = True
        except CLEAN as e:
            stages[name] = "refused"
            ok = False
            if decides or "refusal" not in case:  # keep the refusal that decided the outcome
                case["refusal"] = f"{name}: {type(e).__name__}: {str(e)[:300]}"
        except BaseException as e:  # noqa: BLE001 - everything else is the finding
            if isinstance(e, KeyboardInterrupt):
                raise
            stages[name] = "unclean"
            case.update(outcome="unclean_exception", stage=name, exc_type=_exc_name(e), exc=str(e)[:500],
                        where=_where(e))
            return case
        if decides:
            accepted = ok if accepted is None else (accepted and ok)
    case["stages"] = stages
    if not accepted:
        case["outcome"] = "refused" if case["changed"] else "refused_unchanged"
    elif not case["changed"]:
        case["outcome"] = "accepted_unchanged"
    elif case.get("resealed"):
        case["outcome"] = "accepted_resealed"
    elif case["manifest"]:
        case["outcome"] = "accepted_changed_with_manifest"
    else:
        case["outcome"] = "accepted_no_manifest"
    return case


def _exc_name(e: BaseException) -> str:
    t = type(e)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"


def _where(e: BaseException) -> str:
    """The innermost frames of the traceback and the innermost mlxqat frame, to group findings."""
    tb = traceback.extract_tb(e.__traceback__)
    frames = tb[-2:]
    ours = [f for f in tb if f"{os.sep}mlxqat{os.sep}" in f.filename]
    if ours and ours[-1] not in frames:
        frames = [ours[-1]] + frames
    return " < ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"
                      for f in reversed(frames))


# ---------------------------------------------------------------------------
# Child: runs cases, one line per event on the report pipe
# ---------------------------------------------------------------------------


def child_main(args) -> int:
    limit = args.memory_gb << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    import warnings

    warnings.simplefilter("ignore")
    import mlx.core as mx  # noqa: F401 - import under the limit, before the first case

    import mlxqat.export  # noqa: F401
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out = os.fdopen(args.report_fd, "w", buffering=1)
    seeds = json.loads(Path(args.seeds_dir, "seeds.json").read_text())["seeds"]
    targets = select_targets(args.targets, seeds)
    out.write("R " + json.dumps({"targets": [t[0] + ":" + ",".join(t[1]) for t in targets]}) + "\n")
    mix = parse_mix(args.mix)
    work = Path(args.work)
    inject = {int(i): what for what, _, i in (x.partition(":") for x in args.inject.split(",") if x)}
    for i in range(args.start, args.cases):
        if time.time() > args.deadline:
            break
        out.write(f"S {i}\n")
        t0 = time.perf_counter()
        case = make_case(args.seed, i, seeds, mix, work / f"c{i}")
        out.write("M " + json.dumps({k: case[k] for k in ("i", "input", "kind", "mutation", "desc")}) + "\n")
        faults = [("inject", INPUT_KINDS, lambda _, what=inject[i]: _inject(what), False)] if i in inject else []
        run_targets(case, faults + targets, lambda name: out.write(f"T {i} {name}\n"))
        case["t"] = round(time.perf_counter() - t0, 4)
        case.pop("path")
        out.write("D " + json.dumps(case) + "\n")
        shutil.rmtree(work / f"c{i}", ignore_errors=True)
    out.write("E\n")
    out.close()
    return 0


def _inject(what: str) -> None:
    """Faults for checking the harness itself (--inject crash:I,hang:I,abort:I,exit:I,memory:I,unclean:I)."""
    if what == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif what == "abort":
        os.abort()
    elif what == "exit":
        os._exit(3)
    elif what == "hang":
        time.sleep(3600)
    elif what == "memory":
        bytearray(64 << 30)  # over RLIMIT_AS: MemoryError, not the machine's memory
    elif what == "unclean":
        raise KeyError("injected")
    else:
        raise SystemExit(f"--inject: unknown fault {what!r}")


def parse_mix(text: str) -> dict:
    mix = {k: 0.0 for k in INPUT_KINDS + ("reseal",)}
    for part in text.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in mix:
            raise SystemExit(f"--mix: {k!r} is not one of {INPUT_KINDS + ('reseal',)}")
        mix[k.strip()] = float(v)
    return mix


# ---------------------------------------------------------------------------
# Parent: supervises children, restarts them after a crash or hang
# ---------------------------------------------------------------------------


def _tail(path: Path, n: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def supervise(args, seeds_dir: Path, work: Path, deadline: float) -> tuple:
    """Run cases [0, args.cases) in children; returns (results, info)."""
    results, info = [], dict(children=0, targets=None, startup_s=[])
    start = 0
    while start < args.cases and time.time() < deadline:
        r, w = os.pipe()
        err_path = work / f"child{info['children']}.stderr"
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--report-fd", str(w), "--seed", str(args.seed),
               "--start", str(start), "--cases", str(args.cases), "--deadline", repr(deadline),
               "--seeds-dir", str(seeds_dir), "--work", str(work), "--mix", args.mix,
               "--memory-gb", str(args.memory_gb), "--inject", args.inject, "--targets", args.targets]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                               os.environ.get("PYTHONPATH", "")]))
        with open(err_path, "wb") as err:
            child = subprocess.Popen(cmd, pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=err, env=env,
                                     start_new_session=True)
        os.close(w)
        try:
            start = _watch(child, r, err_path, start, args, results, info)
        finally:  # also on KeyboardInterrupt: no orphaned child stuck on a FIFO
            if child.poll() is None:  # not yet reaped, so its process group id is still ours
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            os.close(r)
    if args.progress:
        print(file=sys.stderr)
    return results, info


def _watch(child, r: int, err_path: Path, start: int, args, results: list, info: dict) -> int:
    """Read one child's events until it ends, crashes or hangs; returns the next case to run.

    Events, one line each: ``R`` ready, ``S i`` case i starts, ``M {...}`` its mutation,
    ``T i target`` a target starts, ``D {...}`` case done, ``E`` all done.
    """
    info["children"] += 1
    t_spawn = timer = time.time()
    buf, current, stage, meta, ended, ready = b"", None, "startup", {}, False, False
    while True:
        limit = args.case_timeout if ready else args.startup_timeout
        wait = timer + limit - time.time()
        if wait <= 0 or not select.select([r], [], [], wait)[0]:  # hang: no event for too long
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            idx = current if current is not None else start
            results.append(dict(meta.get(idx, {"i": idx}), outcome="hang", stage=stage,
                                exc=f"no progress in {limit:g} s", stderr=_tail(err_path)))
            return idx + 1 if ready else args.cases
        chunk = os.read(r, 1 << 16)
        if not chunk:  # EOF: the child exited
            code = child.wait()
            if ended and code == 0:
                return args.cases
            idx = current if current is not None else start
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            results.append(dict(meta.get(idx, {"i": idx}), outcome="crash", stage=stage, exc=how,
                                stderr=_tail(err_path)))
            return idx + 1 if ready else args.cases  # a child that cannot start is not retried
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            tag, _, rest = line.decode().partition(" ")
            timer = time.time()
            if tag == "R":
                ready, stage = True, None
                info["targets"] = json.loads(rest)["targets"]
                info["startup_s"].append(round(time.time() - t_spawn, 2))
            elif tag == "S":
                current = start = int(rest)
                stage = "mutate"
            elif tag == "M":
                m = json.loads(rest)
                meta[m["i"]] = m
            elif tag == "T":
                stage = rest.split(" ", 1)[1]
            elif tag == "D":
                results.append(json.loads(rest))
                meta.pop(current, None)
                current, start, stage = None, results[-1]["i"] + 1, None
            elif tag == "E":
                ended = True
        if args.progress and lines and len(results) % 50 == 0 and lines[-1].startswith(b"D "):
            print(f"\r{len(results)} cases", end="", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


FILE_NAME = re.compile(r"[\w./-]+\.(?:json|safetensors|gguf|jinja|model|py)\b")


def signature(r: dict) -> str:
    """Groups failures: an exception by its type and where it was raised; an accepted change by
    the mutation and the file it touched; a crash or hang by its signal, stage and mutation."""
    if r["outcome"] == "unclean_exception":
        return f"unclean | {r.get('stage')} | {r.get('exc_type')} | {r.get('where')}"
    touched = FILE_NAME.search(r.get("desc", ""))
    what = f"{r.get('mutation', '?').split('+')[0]} {touched.group(0) if touched else ''}"
    if r["outcome"] == "accepted_changed_with_manifest":
        return f"accepted_changed | {what}"
    return f"{r['outcome']} | {re.sub(r'[0-9]+', 'N', r.get('exc', ''))} | {r.get('stage')} | {what}"


def code_fingerprint() -> str:
    """sha256 of the mlxqat sources the run tested (findings belong to one version of the code)."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parents[1] / "mlxqat"
    for p in sorted(pkg.rglob("*.py")):
        h.update(p.relative_to(pkg).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def summarize(results: list, args, wall: float, seeds_s: float, info: dict) -> dict:
    by_outcome = collections.Counter(r["outcome"] for r in results)
    by_kind = collections.defaultdict(collections.Counter)
    by_mutation = collections.defaultdict(collections.Counter)
    seconds = collections.Counter()
    for r in results:
        kind = r.get("kind") or r.get("input", "?").split("/")[0]
        by_kind[kind][r["outcome"]] += 1
        by_mutation[r.get("mutation", "?")][r["outcome"]] += 1
        seconds[kind] += r.get("t", 0.0)  # hangs and crashes are not timed
    failures = [r for r in results if r["outcome"] in FAILURES]
    groups = collections.OrderedDict()
    for r in failures:
        g = groups.setdefault(signature(r), dict(count=0, example=r, mutations=collections.Counter()))
        g["count"] += 1
        g["mutations"][r.get("mutation", "?")] += 1
    for g in groups.values():
        g["example"] = dict(g["example"], repro=f"python benchmarks/fuzz_loader.py --seed {args.seed} "
                                               f"--mix {args.mix} --repro {g['example']['i']} --keep /tmp/fuzz-case")
        g["mutations"] = dict(g["mutations"])
    return dict(
        seed=args.seed, code=code_fingerprint(), cases_requested=args.cases, cases_run=len(results),
        wall_s=round(wall, 1),
        seeds_s=round(seeds_s, 1), cases_per_s=round(len(results) / max(wall - seeds_s, 1e-9), 2),
        children=info["children"], child_startup_s=info["startup_s"], targets=info["targets"], mix=args.mix,
        case_timeout_s=args.case_timeout, memory_limit_gb=args.memory_gb,
        outcomes={k: by_outcome.get(k, 0) for k in OUTCOMES},
        by_input={k: dict(cases=sum(v.values()), in_child_s=round(seconds[k], 2),
                          cases_per_s=round(sum(v.values()) / seconds[k], 1) if seconds[k] else None, **dict(v))
                  for k, v in sorted(by_kind.items())},
        by_mutation={k: dict(v) for k, v in sorted(by_mutation.items())},
        n_failures=len(failures), failure_groups=list(groups.values()), failures=failures[:300],
        refused_unchanged=[r for r in results if r["outcome"] == "refused_unchanged"][:20],
    )


def markdown(s: dict) -> str:
    cols = ["cases"] + list(OUTCOMES)
    lines = [f"Loader fuzz run: seed {s['seed']}, {s['cases_run']} cases in {s['wall_s']} s "
             f"({s['cases_per_s']} cases/s after {s['seeds_s']} s building seeds), {s['children']} child "
             f"process(es), limit {s['memory_limit_gb']} GB, {s['case_timeout_s']} s per case.", "",
             "| input | cases/s (in child) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for k, v in s["by_input"].items():
        lines.append(f"| {k} | {v['cases_per_s']} | " + " | ".join(str(v.get(c, 0)) for c in cols) + " |")
    lines += ["", "| mutation | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k, v in s["by_mutation"].items():
        lines.append(f"| {k} | {sum(v.values())} | " + " | ".join(str(v.get(c, 0)) for c in cols[1:]) + " |")
    if s["failure_groups"]:
        lines += ["", f"{s['n_failures']} failure(s) in {len(s['failure_groups'])} group(s):", ""]
        for g in s["failure_groups"]:
            e = g["example"]
            lines.append(f"- **{e['outcome']}** x{g['count']} ({e.get('stage')}): `{e.get('exc_type', '')}` "
                         f"{_short(e.get('exc', ''), 200)} -- e.g. case {e['i']} {e.get('input', '')}: "
                         f"{_short(e.get('desc', ''), 200)}; repro `{e['repro']}`")
    return "\n".join(lines) + "\n"


def repro(args, seeds: list) -> int:
    """Rebuild case ``args.repro`` in ``--keep`` (or a temp dir) and run it here, tracebacks shown."""
    import warnings

    warnings.simplefilter("ignore")
    work = Path(args.keep or tempfile.mkdtemp(prefix="fuzz-repro-"))
    if work.exists():
        shutil.rmtree(work)
    case = make_case(args.seed, args.repro, seeds, parse_mix(args.mix), work)
    print(json.dumps({k: case[k] for k in ("i", "input", "mutation", "desc", "changed", "manifest", "path")},
                     indent=1))
    targets = select_targets(args.targets, seeds)
    for name, kinds, fn, _ in targets:
        if case["kind"] in kinds:
            print(f"--- {name}", flush=True)
            try:
                fn(Path(case["path"]))
                print("ok")
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
    print(f"case kept in {work}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=2000, help="number of cases (indices 0..N-1)")
    p.add_argument("--seconds", type=float, default=0, help="time budget for the whole run (0: none)")
    p.add_argument("--seed", type=int, default=0, help="run seed; case i depends only on (seed, i, --mix)")
    p.add_argument("--json", type=Path, help="write the summary here")
    p.add_argument("--md", type=Path, help="write a Markdown summary here")
    p.add_argument("--case-timeout", type=float, default=10.0, help="seconds without progress that count as a hang")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds a child may take to start")
    p.add_argument("--memory-gb", type=int, default=4, help="RLIMIT_AS of the child process")
    p.add_argument("--mix", default=DEFAULT_MIX, help=f"weights of the input kinds (default {DEFAULT_MIX})")
    p.add_argument("--targets", default=DEFAULT_TARGETS,
                   help=f"comma-separated, from {sorted(TARGETS)} (default {DEFAULT_TARGETS})")
    p.add_argument("--seeds-dir", type=Path, help="build (or reuse) the seed inputs here instead of a temp dir")
    p.add_argument("--repro", type=int, help="rebuild one case and run it in this process")
    p.add_argument("--keep", type=Path, help="with --repro: put the case here")
    p.add_argument("--progress", action="store_true", help="count cases on stderr")
    # internal: the child process
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--inject", default="", help=argparse.SUPPRESS)  # harness self-test: faults by case index
    args = p.parse_args(argv)
    if args.child:
        return child_main(args)

    t0 = time.time()
    deadline = t0 + args.seconds if args.seconds > 0 else float("inf")
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-loader-"))
    try:
        seeds_dir = args.seeds_dir or tmp / "seeds"
        seeds_dir.mkdir(parents=True, exist_ok=True)
        seeds = build_seeds(seeds_dir)
        if args.repro is not None:
            if args.seeds_dir is None:
                print(f"seeds built in {seeds_dir} (kept: the case may link to them)")
            return repro(args, seeds)
        seeds_s = time.time() - t0
        work = tmp / "work"
        work.mkdir()
        results, info = supervise(args, seeds_dir, work, deadline)
    finally:
        if args.repro is None or args.seeds_dir is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    s = summarize(results, args, time.time() - t0, seeds_s, info)
    print(markdown(s))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(s, indent=1, default=str))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown(s))
    return 1 if s["n_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
