"""Fine-tuning a quantized model: it enters with its own codes, learns, and the saved file computes what was trained.

The models are tiny llamas trained for a few steps on tiny.CORPUS (so completions are learnable), quantized by
round-to-nearest and stored in bfloat16 (as ``mlx_lm.convert -q`` stores a bfloat16 model), or as mlxqat's q4_0.
"""

import hashlib
import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlxqat
import tiny
from mlxqat.convert import prepare_quantized, quantize_rtn
from mlxqat.evaluate import completion_loss
from mlxqat.finetune_data import encode_example, load_finetune_data
from mlxqat.layers import FakeQuantEmbedding, FakeQuantLinear
from mlxqat.lora import apply_lora
from mlxqat.training import finetune as ft

PAIRS = [("def fibonacci(n):", "\n    if n < 2:\n        return n"), ("class Point:", "\n    def __init__(self, x, y):"),
         ("The quick brown fox", " jumps over the lazy dog."), ("import os,", " sys, json")]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
LEARNING_RATES = {"lora": 3e-3, "scales": 3e-3, "full": 3e-4}  # high: a few steps must show a gain (scales: relative)
FAST = dict(steps=6, batch_size=4, log_every=3, progress=False, val_batches=-1)


def _write_jsonl(path: Path, objs) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def _data_dir(root: Path, n=(16, 8, 8)) -> Path:
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "valid", "test"), n):
        _write_jsonl(d / f"{split}.jsonl", [{"prompt": PAIRS[i % 4][0], "completion": PAIRS[i % 4][1]}
                                            for i in range(count)])
    return d


def _quantized_dir(root: Path, tokenizer, recipe="int4", arch="llama", dtype=mx.bfloat16) -> Path:
    model, config = tiny.train_briefly(arch, tokenizer, steps=40)
    quantize_rtn(model, recipe)
    model.set_dtype(dtype)  # every float stored as a bfloat16 model's are: scales, biases, norms
    out = root / f"{arch}-{recipe}"
    mlxqat.save(model, tokenizer, out, config=config)
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("finetune")
    return {"root": root, "data": _data_dir(root), "int4": _quantized_dir(root, tokenizer)}


def _weights(directory: Path) -> dict:
    return mx.load(str(Path(directory) / "model.safetensors"))


def _sha(packed: mx.array) -> str:
    """The sha256 of a packed uint32 weight's bytes."""
    assert packed.dtype == mx.uint32
    return hashlib.sha256(np.array(packed).tobytes()).hexdigest()


# ---------------------------------------------------------------------------
# A quantized model enters with its own codes, scales and biases
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("keep_codes", [True, False])
@pytest.mark.parametrize("recipe", ["int4", "int3", "int8", "q4_0", "int2"])
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_a_quantized_model_becomes_fake_quant_with_the_same_numbers(arch, recipe, keep_codes):
    model, _ = tiny.make_model(arch, 1)
    quantize_rtn(model, recipe)
    stored_dtype = mx.float16 if recipe == "q4_0" else mx.bfloat16  # mlxqat stores Q4_0's float16 scales as such
    model.set_dtype(stored_dtype)
    original = dict(tree_flatten(model.parameters()))
    stored = {k: v.dtype for k, v in original.items()}
    quantized = {p: m for p, m in model.named_modules() if mlxqat.quant.is_quantized(m)}
    reference = {p: mlxqat.quant.dequantized_weight(m) for p, m in quantized.items()}
    x = mx.random.randint(0, tiny.VOCAB, (2, 12))
    model.set_dtype(mx.float32)  # float32 compute, as fine-tuning runs: every stored value is kept
    expected = model(x)
    model.set_dtype(stored_dtype)

    prepare_quantized(model, keep_codes=keep_codes)
    model.set_dtype(mx.float32)
    modules = dict(model.named_modules())
    for p, w in reference.items():  # the fake-quant weight is the stored one, bit for bit
        assert isinstance(modules[p], (FakeQuantLinear, FakeQuantEmbedding))
        assert mx.array_equal(modules[p].dequantized_weight(), w), p
    got = model(x)
    assert float(mx.abs(got - expected).max()) <= 1e-5  # dequantize + matmul against quantized_matmul

    mlxqat.convert(model)  # and converting gives the very same arrays back
    ft.restore_dtypes(model, stored)
    after = dict(tree_flatten(model.parameters()))
    assert set(after) == set(original)
    for k, v in original.items():
        assert after[k].dtype == v.dtype and mx.array_equal(after[k], v), k


def test_models_that_cannot_train_so_are_refused():
    model, _ = tiny.make_model("llama", 0)
    with pytest.raises(ValueError, match="no quantized layer"):
        prepare_quantized(model)
    quantize_rtn(model, "q4_0")
    model.set_dtype(mx.bfloat16)  # the symmetric rule derives float16 scales: bfloat16 could not store them
    with pytest.raises(ValueError, match="symmetric with bfloat16 scales"):
        prepare_quantized(model, keep_codes=False)
    assert not any(isinstance(m, FakeQuantLinear) for _, m in model.named_modules())  # nothing swapped


# ---------------------------------------------------------------------------
# The data: mlx-lm's layout, the loss on the completion only
# ---------------------------------------------------------------------------


def test_the_mask_covers_the_completion_only(tokenizer):
    ids, offset = encode_example({"prompt": "class Point:", "completion": " pass"}, tokenizer, "x:1")
    prompt = tokenizer.encode("class Point:")
    assert ids[:offset] == prompt and ids[-1] == tokenizer.eos_token_id
    assert ids[offset:-1] == tokenizer.encode(" pass", add_special_tokens=False)
    assert encode_example({"prompt": "class Point:", "completion": " pass"}, tokenizer, "x:1", False)[1] == 0
    text_ids, text_offset = encode_example({"text": "class Point:"}, tokenizer, "x:1")
    assert text_offset == 0 and text_ids[-1] == tokenizer.eos_token_id


def test_chat_lines_count_the_last_assistant_message(tmp_path, tokenizer_dir):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    tok._tokenizer.chat_template = CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "class Point:"}, {"role": "assistant", "content": "def __init__(self, x, y):"}]
    ids, offset = encode_example({"messages": msgs}, tok, "x:1")
    assert tok.decode(ids[:offset]) == "user: class Point:\nassistant:"
    assert tok.decode(ids[offset:]) == " def __init__(self, x, y):\n"
    with pytest.raises(ValueError, match=r"x:1: the last message is from 'user', not the assistant"):
        encode_example({"messages": msgs[:1]}, tok, "x:1")
    d = tmp_path / "chat"
    d.mkdir()
    for split in ("train", "valid"):
        _write_jsonl(d / f"{split}.jsonl", [{"messages": msgs}] * 4)
    data = load_finetune_data(d, tok, 64)
    row = data.train[0]
    assert data.test is None and data.formats["train"] == ["messages"]
    assert row[1, :offset].sum() == 0 and row[1, offset : len(ids)].all() and row[1, len(ids):].sum() == 0


def test_the_loss_ignores_the_prompt_targets(workspace, tokenizer):
    model, _ = tiny.train_briefly("llama", tokenizer, steps=20)
    data = load_finetune_data(workspace["data"], tokenizer, 64)
    batch = mx.array(data.train[:4])
    inputs, targets = batch[:, 0, :-1], batch[:, :, 1:]
    loss = ft.finetune_loss(model, inputs, targets)
    mask = np.array(targets[:, 1])
    changed = np.array(targets)
    changed[:, 0] = np.where(mask == 0, (changed[:, 0] + 7) % 50, changed[:, 0])  # every prompt target replaced
    assert (changed[:, 0] != np.array(targets[:, 0])).any()
    assert ft.finetune_loss(model, inputs, mx.array(changed)).item() == loss.item()
    unmasked = np.array(targets)
    unmasked[:, 1] = 1  # counting the prompt's tokens does change it
    assert ft.finetune_loss(model, inputs, mx.array(unmasked)).item() != loss.item()
    everything = load_finetune_data(workspace["data"], tokenizer, 64, mask_prompt=False)
    assert everything.train[:, 1, 1:].sum() > data.train[:, 1, 1:].sum()


# ---------------------------------------------------------------------------
# The gain is kept: the saved file computes what was trained
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(workspace):
    out = {}
    for method in ft.METHODS:
        target = workspace["root"] / f"tuned-{method}"
        result = mlxqat.finetune(str(workspace["int4"]), str(workspace["data"]), str(target), method=method,
                                 learning_rate=LEARNING_RATES[method], **FAST)
        out[method] = (result, target)
    return out


@pytest.mark.parametrize("method", ft.METHODS)
def test_the_saved_model_computes_what_was_trained(runs, workspace, method):
    result, target = runs[method]
    before, after, saved = result["before"]["test"], result["after"]["test"], result["saved"]["test"]
    assert after < before - 0.05, result  # it learned the held-out completions
    # the saved file, read back into fake-quant layers: the same numbers, to the bit
    assert saved == after and result["gain_kept"] == 1.0
    # ... and as the quantized model mlx-lm runs (quantized_matmul: another kernel, float32 rounding)
    model, tokenizer = mlxqat.load(target)
    model.set_dtype(mx.float32)
    test = load_finetune_data(workspace["data"], tokenizer, 64).test
    assert abs(completion_loss(model, test, 4)["loss"] - after) <= 1e-5


@pytest.mark.parametrize("method", ft.METHODS)
def test_the_output_has_the_input_format(runs, workspace, method):
    _, target = runs[method]
    a, b = _weights(workspace["int4"]), _weights(target)
    assert set(a) == set(b)
    assert all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in a)
    qa = json.loads((workspace["int4"] / "config.json").read_text())["quantization"]
    qb = json.loads((target / "config.json").read_text())["quantization"]
    assert qa == qb
    packed = [k for k in a if a[k].dtype == mx.uint32]
    assert len(packed) == 16  # 7 linears x 2 blocks, the embedding and the head
    same = {kind: all(mx.array_equal(a[k], b[k]) for k in a if k.endswith(f".{kind}"))
            for kind in ("weight", "scales", "biases")}
    if method == "lora":  # the integers and the scales are the input's; the offsets took the adapters
        assert all(_sha(a[k]) == _sha(b[k]) for k in packed)
        assert same["scales"] and not same["biases"]
    elif method == "scales":  # the integers are the input's
        assert all(_sha(a[k]) == _sha(b[k]) for k in packed)
        assert not same["scales"] and not same["biases"]
    else:
        assert any(_sha(a[k]) != _sha(b[k]) for k in packed)
    norms = [k for k in a if "norm" in k]
    assert norms and all(mx.array_equal(a[k], b[k]) for k in norms)  # what is not quantized does not train
    from mlx_lm import load as mlx_lm_load

    model, _ = mlx_lm_load(str(target))
    assert model(mx.array([[1, 2, 3]])).shape[-1] == model.args.vocab_size


def test_resume_gives_the_same_model(workspace, tmp_path):
    kw = dict(method="scales", learning_rate=LEARNING_RATES["scales"], checkpoint_every=2, **dict(FAST, steps=4))
    first = tmp_path / "first"
    mlxqat.finetune(str(workspace["int4"]), str(workspace["data"]), str(first), **kw)
    second = tmp_path / "second"
    shutil.copytree(str(first) + ".train", str(second) + ".train")
    result = mlxqat.finetune(str(workspace["int4"]), str(workspace["data"]), str(second), resume=True, **kw)
    assert result["training"]["resumed_from"] == 2
    a, b = _weights(first), _weights(second)
    assert all(mx.array_equal(a[k], b[k]) for k in a)


def test_symmetric_models_refuse_lora_and_keep_tied_offsets(workspace, tokenizer, tmp_path):
    q40 = _quantized_dir(tmp_path, tokenizer, "q4_0", dtype=mx.float32)
    with pytest.raises(ValueError, match="symmetric .*use --method scales or --method full"):
        mlxqat.finetune(str(q40), str(workspace["data"]), str(tmp_path / "lora"), method="lora", **FAST)
    assert not (tmp_path / "lora.train").exists()
    mlxqat.finetune(str(q40), str(workspace["data"]), str(tmp_path / "scales"), method="scales",
                    learning_rate=LEARNING_RATES["scales"], **FAST)
    a, b = _weights(q40), _weights(tmp_path / "scales")
    for k in a:
        if k.endswith(".scales"):
            base = k[: -len(".scales")]
            bits = a[base + ".weight"].shape[-1] // a[k].shape[-1]  # 32 / bits codes a word, 32 a group
            assert bits in (4, 8) and not mx.array_equal(a[k], b[k])
            assert mx.array_equal(b[base + ".biases"], b[k] * -(2 ** (bits - 1))), k  # still Q4_0 (head: Q8_0)
        elif a[k].dtype == mx.uint32:
            assert mx.array_equal(a[k], b[k])


def test_a_full_precision_model_needs_a_recipe(workspace, tokenizer, tmp_path):
    model, config = tiny.train_briefly("llama", tokenizer, steps=10)
    fp = tiny.save_fp_model(model, config, tokenizer, tmp_path / "fp")
    with pytest.raises(ValueError, match="is not quantized; pass --recipe"):
        mlxqat.finetune(str(fp), str(workspace["data"]), str(tmp_path / "a"), **FAST)
    with pytest.raises(ValueError, match="already quantized .* drop it"):
        mlxqat.finetune(str(workspace["int4"]), str(workspace["data"]), str(tmp_path / "b"), recipe="int4", **FAST)
    result = mlxqat.finetune(str(fp), str(workspace["data"]), str(tmp_path / "c"), recipe="int4", method="scales",
                             learning_rate=LEARNING_RATES["scales"], **FAST)
    assert result["after"]["test"] < result["before"]["test"]
    assert json.loads((tmp_path / "c" / "config.json").read_text())["quantization"]["bits"] == 4


# ---------------------------------------------------------------------------
# The command: one error line, exit status 2
# ---------------------------------------------------------------------------


def _error(capsys, workspace, data, *extra) -> str:
    status = ft.main(["--model", str(workspace["int4"]), "--data", str(data), "--out",
                      str(workspace["root"] / "never"), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err, err
    assert not (workspace["root"] / "never").exists() and not (workspace["root"] / "never.train").exists()
    if err[-1].startswith("python -m mlxqat.finetune: error: "):  # a flag refused by the parser, under its usage
        return err[-1]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("case,match", [
    ("missing train", r"has no train\.jsonl"),
    ("missing valid", r"has no valid\.jsonl"),
    ("empty", r"train\.jsonl is empty: no examples"),
    ("no completion", r"train\.jsonl:2: the completion is empty"),
    ("chat without a template", r"train\.jsonl:1 holds chat 'messages' but the tokenizer has no chat template"),
    ("too long", r"train\.jsonl:3 is \d+ tokens long, more than --seq-len 8; raise --seq-len to \d+"),
    ("a file", r"is a file; give a directory"),
])
def test_bad_data_is_one_clear_error(workspace, tmp_path, capsys, case, match):
    d = tmp_path / "d"
    d.mkdir()
    good = [{"prompt": p, "completion": c} for p, c in PAIRS]
    lines = {"missing train": None, "missing valid": good, "empty": [], "no completion": good[:1] + [{"prompt": "x", "completion": ""}],
             "chat without a template": [{"messages": [{"role": "user", "content": "hi"}]}],
             "too long": [{"prompt": "a", "completion": "b"}] * 2 + [good[0]], "a file": good}[case]
    if lines is not None:
        _write_jsonl(d / "train.jsonl", lines)
    if case != "missing valid":
        _write_jsonl(d / "valid.jsonl", good)
    extra = ["--seq-len", "8"] if case == "too long" else []
    assert re.search(match, _error(capsys, workspace, d / "train.jsonl" if case == "a file" else d, *extra))


def test_bad_settings_are_one_clear_error(workspace, tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + bytes(60))
    data = _data_dir(tmp_path)
    assert "model.gguf: GGUF version 0 is not supported" in _error(capsys, {"int4": fake, "root": workspace["root"]}, data)
    assert "--learning-rate -1: must be" in _error(capsys, workspace, data, "--learning-rate", "-1")
    assert "val_batches=0" in _error(capsys, workspace, data, "--val-batches", "0")


def test_the_adapters_gradient_is_that_of_the_merged_weight():
    """QA-LoRA computes with the merged offsets and gets their gradient from the group-summed input: the same as
    differentiating through the merged weight, without forming an (out, in) weight gradient."""
    mx.random.seed(3)
    net = nn.Sequential(FakeQuantLinear.from_linear(nn.Linear(128, 48), mlxqat.LayerSpec(4, 64)))
    apply_lora(net, rank=4, seed=0)
    layer = net.layers[0]
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    x = mx.random.normal((3, 5, 128))

    def through_the_weight(model, x):
        w = mlxqat.quant.dequantize_frozen(*layer.merged(), 4, 64)
        return ((x @ w.T + layer.base.bias) ** 2).sum()

    _, got = nn.value_and_grad(net, lambda model, x: (model(x) ** 2).sum())(net, x)
    _, want = nn.value_and_grad(net, through_the_weight)(net, x)
    for k in ("lora_a", "lora_b"):
        a, b = got["layers"][0][k], want["layers"][0][k]
        assert float(mx.abs(a - b).max()) <= 1e-5 * float(mx.abs(b).max()), k  # float32 sums in another order


def test_plain_text_trains_on_every_token(workspace, tokenizer, tmp_path):
    """A folder of text files (no train.jsonl) is split by document, cut into windows, every token counted."""
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(40):  # enough documents that the name hash sends some to validation
        (folder / f"doc{i}.txt").write_text(tiny.CORPUS[i:] + tiny.CORPUS[:i])
    data = load_finetune_data(folder, tokenizer, 2048, text_window=32)
    assert data.formats == {"train": ["plain text"], "valid": ["plain text"]} and data.test is None
    assert data.train.shape[1:] == (2, 33) and len(data.valid) >= 1
    assert data.train[:, 1, 1:].all() and not data.train[:, 1, 0].any()  # every next token counts
    result = mlxqat.finetune(str(workspace["int4"]), str(folder), str(tmp_path / "out"), method="scales",
                             learning_rate=LEARNING_RATES["scales"], seq_len=32, **FAST)
    assert result["saved"]["valid"] == result["after"]["valid"] != result["before"]["valid"]  # trained, and kept
    single = tmp_path / "one.md"
    single.write_text(tiny.CORPUS * 4)
    assert load_finetune_data(single, tokenizer, 2048, text_window=32).train.shape[1:] == (2, 33)


def test_general_text_holds_the_model_to_its_start(workspace, tokenizer, tmp_path):
    """--general-data mixes general windows into training, distilled from the starting model: the tuned model
    drifts less from its start on general text than one trained on the task alone, at the same rate and steps."""
    from mlxqat.data import build_dataset, spread
    from mlxqat.evaluate import evaluate

    general = tmp_path / "general"
    general.mkdir()
    for i in range(30):
        (general / f"g{i}.txt").write_text(tiny.CORPUS[i:] + tiny.CORPUS[:i])
    kw = dict(method="full", learning_rate=3e-3, **FAST)
    alone = mlxqat.finetune(str(workspace["int4"]), str(workspace["data"]), str(tmp_path / "alone"), **kw)
    held = mlxqat.finetune(str(workspace["int4"]), str(workspace["data"]), str(tmp_path / "held"),
                           general_data=str(general), general_weight=10.0, general_share=1.0, **kw)
    assert alone["drift"] is None and held["drift"]["windows"] >= 1
    assert held["saved"]["test"] == held["after"]["test"]  # the saved file is what trained
    start = ft.read_back(workspace["int4"])
    seq_len = load_finetune_data(workspace["data"], tokenizer, 2048).seq_len  # the rows' width, as the run's
    windows = spread(build_dataset(general, tokenizer, seq_len).val, ft.DRIFT_WINDOWS)
    drift = {name: evaluate(ft.read_back(tmp_path / name), windows, start)["kl"] for name in ("alone", "held")}
    assert abs(drift["held"] - held["drift"]["kl_to_start"]) <= 1e-4 * drift["held"]  # the run reports the saved file's
    assert drift["held"] < 0.9 * drift["alone"], drift  # measured here: 1.21 against 1.55
    with pytest.raises(ValueError, match="--general-weight -1"):
        mlxqat.finetune(str(workspace["int4"]), str(workspace["data"]), str(tmp_path / "bad"),
                        general_data=str(general), general_weight=-1, **FAST)


def test_scales_step_relative_by_default_from_the_command_line_too():
    kwargs = vars(ft.build_parser().parse_args(["--model", "m", "--data", "d", "--out", "o", "--method", "scales"]))
    assert kwargs["scale_step"] is None  # left to the method
    assert ft.finetune_args("scales", scale_step=kwargs["scale_step"]).scale_step == "relative"
    assert ft.finetune_args("scales", scale_step="absolute").scale_step == "absolute"
    assert ft.finetune_args("full", scale_step=None).scale_step == "absolute"


def test_resume_after_a_kill_is_exact(workspace, tmp_path):
    """A fine-tune killed (SIGKILL) after a checkpoint and resumed saves the model an uninterrupted run saves."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "run.py"
    script.write_text(
        "import sys, time, mlxqat\n"
        "out, resume, pause = sys.argv[1], sys.argv[2] == '1', float(sys.argv[3])\n"
        f"mlxqat.finetune({str(workspace['int4'])!r}, {str(workspace['data'])!r}, out, method='full',\n"
        f"                learning_rate={LEARNING_RATES['full']}, steps=8, batch_size=4, log_every=1,\n"
        "                checkpoint_every=2, val_batches=1, progress=False, resume=resume,\n"
        "                callback=lambda r: time.sleep(pause))\n")
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run([sys.executable, str(script), str(full), "0", "0"], check=True, timeout=300)
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "0", "0.5"])
    latest = Path(str(killed) + ".train") / "checkpoints" / "latest.json"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and json.loads(latest.read_text())["step"] >= 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not killed.exists(), "the run finished before it was killed"
    subprocess.run([sys.executable, str(script), str(killed), "1", "0"], check=True, timeout=300)
    a, b = _weights(full), _weights(killed)
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]) for k in a)  # bit for bit

