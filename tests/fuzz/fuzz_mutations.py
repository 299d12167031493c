"""Seeds and mutations for tests/fuzz/fuzz_loader.py: tiny saved models and GGUF files, and the ways
a careless user, a bad disk or a hostile file damages them (one function per kind of damage)."""


import hashlib
import json
import os
import random
import shutil
import stat
import struct
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


def evil_int(rng: random.Random, width: int, old: int) -> int:
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



def code_fingerprint() -> str:
    """sha256 of the mlxqat sources the run tested (findings belong to one version of the code)."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parents[2] / "mlxqat"
    for p in sorted(pkg.rglob("*.py")):
        h.update(p.relative_to(pkg).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]
