"""``python -m mlxqat.generate``: same text as mlx-lm, kernels, chat, bad input, Ctrl-C."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm import generate as mlx_lm_generate
from mlx_lm import load as mlx_lm_load
from mlx_lm.sample_utils import make_sampler

import mlxqat
import tiny
from mlxqat import generate as gen
from mlxqat.convert import quantize_rtn
from mlxqat.kernels import KernelQuantizedLinear
from mlxqat.stdlib_data import embedded_model_path

ROOT = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def run_cli(*args, stdin=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "mlxqat.generate", *map(str, args)],
        cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=timeout,
    )


def reference(path, prompt, max_tokens, temp=0.0, top_p=1.0, seed=0):
    """What mlx-lm generates from the model directory at ``path``, computing in float32."""
    model, tokenizer = mlx_lm_load(str(path))
    model.set_dtype(mx.float32)
    mx.random.seed(seed)
    return mlx_lm_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp, top_p))


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """Directories of a briefly trained tiny llama: fp, int4 (mlxqat.save), short context, with chat template."""
    root = tmp_path_factory.mktemp("generate")
    model, config = tiny.train_briefly("llama", tokenizer, steps=100, max_position_embeddings=4096)
    fp = tiny.save_fp_model(model, config, tokenizer, root / "fp")
    mlxqat.prepare(model, mlxqat.recipes.get("int4", scale_dtype="float16"))  # as python -m mlxqat.train does
    mlxqat.convert(model)
    q4 = root / "q4"
    mlxqat.save(model, tokenizer, q4, config=config)
    short = root / "short"
    shutil.copytree(fp, short)
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps(dict(cfg, max_position_embeddings=16)))
    chat = root / "chat"
    shutil.copytree(fp, chat)
    tc = json.loads((chat / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps(dict(tc, chat_template=CHAT_TEMPLATE)))
    return {"fp": fp, "q4": q4, "short": short, "chat": chat}


# ---------------------------------------------------------------------------
# Same text as mlx_lm.generate
# ---------------------------------------------------------------------------


def test_embedded_model_text_equals_mlx_lm_generate():
    path = embedded_model_path()
    assert (path / "config.json").exists(), f"the embedded model is missing from {path}"
    prompt, n, temp, top_p, seed = "def fibonacci(n):", 48, 0.8, 0.9, 3
    r = run_cli("--prompt", prompt, "--max-tokens", n, "--temp", temp, "--top-p", top_p, "--seed", seed)
    assert r.returncode == 0, r.stderr
    want = reference(path, prompt, n, temp, top_p, seed)
    assert len(want) > 20  # a real continuation, not an immediate end-of-sequence
    assert r.stdout == want + "\n"
    assert "Generation:" in r.stderr and "tokens-per-sec" in r.stderr and "Peak memory:" in r.stderr


def test_embedded_model_quantized_and_saved_text_equals_mlx_lm_generate(tmp_path):
    """The embedded model quantized (RTN int4), saved with mlxqat.save, run by both with one seed."""
    model, tokenizer = mlx_lm_load(str(embedded_model_path()))
    quantize_rtn(model, "int4")
    mlxqat.save(model, tokenizer, tmp_path / "q4", config=json.loads((embedded_model_path() / "config.json").read_text()))
    prompt, n = "import os\n\n\ndef ", 40
    want = reference(tmp_path / "q4", prompt, n, temp=0.7, top_p=0.95, seed=1)
    r = run_cli("--model", tmp_path / "q4", "--prompt", prompt, "--max-tokens", n, "--temp", 0.7,
                "--top-p", 0.95, "--seed", 1, "--kernel", "mlx")
    assert r.returncode == 0, r.stderr
    assert len(want) > 20 and r.stdout == want + "\n"


@pytest.mark.parametrize("which,kernel,temp", [
    ("fp", "auto", 0.0), ("fp", "auto", 1.0), ("q4", "mlx", 1.0), ("q4", "mlxqat", 0.0), ("q4", "auto", 0.0),
])
def test_text_equals_mlx_lm_generate(models, which, kernel, temp):
    prompt, n = "class Point:\n", 30
    r = run_cli("--model", models[which], "--prompt", prompt, "--max-tokens", n, "--temp", temp, "--seed", 7,
                "--kernel", kernel)
    assert r.returncode == 0, r.stderr
    want = reference(models[which], prompt, n, temp=temp, seed=7)
    assert len(want) > 10 and r.stdout == want + "\n"
    if which == "q4":
        ours = "mlxqat" if kernel in ("mlxqat", "auto") else None
        assert ("layers on the mlxqat int4 kernel" in r.stderr) == (ours is not None), r.stderr


def test_load_model_kernels_and_dtype(models):
    """--kernel picks the layer class; float32 compute keeps the stored float16 scales of linear layers."""
    m, _, info = gen.load_model(str(models["q4"]), kernel="mlxqat")
    n_linear = sum(isinstance(x, nn.QuantizedLinear) for _, x in m.named_modules())
    assert info["kernel_layers"] == n_linear > 0
    assert sum(isinstance(x, KernelQuantizedLinear) for _, x in m.named_modules()) == n_linear
    m2, _, info2 = gen.load_model(str(models["q4"]), kernel="mlx")
    assert info2["kernel_layers"] == 0 and not any(isinstance(x, KernelQuantizedLinear) for _, x in m2.named_modules())
    layer = m2.model.layers[0].self_attn.q_proj
    assert layer.scales.dtype == mx.float16  # as saved
    assert m2.model.norm.weight.dtype == mx.float32 and m2.model.embed_tokens.scales.dtype == mx.float32
    assert gen.resolve_kernel("auto") == "mlxqat"  # CPU default device in tests
    with pytest.raises(gen.UsageError, match="already quantized"):
        gen.load_model(str(models["q4"]), quantize="int4")


def test_quantize_on_the_fly_stores_scales_as_saved(models):
    m, _, info = gen.load_model(str(models["fp"]), quantize="int4", kernel="mlx")
    assert info["quantized"]
    from mlxqat.footprint import memory_report

    bpw = memory_report(m).bits_per_weight
    assert m.model.layers[0].mlp.up_proj.scales.dtype == mx.float16
    assert 4.4 < bpw < 5.0, bpw  # 4 bits + float16 scale and bias per 64 (embedding scales stay float32)


# ---------------------------------------------------------------------------
# Chat, bad input, Ctrl-C
# ---------------------------------------------------------------------------


def test_chat_uses_the_template_and_keeps_the_conversation(models):
    r = run_cli("--model", models["chat"], "--chat", "--max-tokens", 12, stdin="def fib\n\nclass Point\n")
    assert r.returncode == 0, r.stderr
    model, tokenizer = mlx_lm_load(str(models["chat"]))
    model.set_dtype(mx.float32)
    first = [{"role": "user", "content": "def fib"}]
    reply1 = mlx_lm_generate(model, tokenizer, tokenizer.apply_chat_template(first, add_generation_prompt=True),
                             max_tokens=12)
    second = first + [{"role": "assistant", "content": reply1}, {"role": "user", "content": "class Point"}]
    reply2 = mlx_lm_generate(model, tokenizer, tokenizer.apply_chat_template(second, add_generation_prompt=True),
                             max_tokens=12)
    assert r.stdout == reply1 + "\n" + reply2 + "\n"
    assert r.stderr.count("Generation:") == 2  # the blank line was skipped


@pytest.mark.parametrize("case,args,message", [
    ("missing model", ["--model", "/no/such/model", "--prompt", "x"], "/no/such/model: no such directory"),
    ("not a model", ["--model", "{tmp}", "--prompt", "x"], "config.json does not exist"),
    ("empty prompt", ["--model", "{fp}", "--prompt", ""], "the prompt is empty"),
    ("no prompt", ["--model", "{fp}"], "no prompt"),
    ("zero tokens", ["--model", "{fp}", "--prompt", "x", "--max-tokens", "0"], "--max-tokens 0"),
    ("negative tokens", ["--model", "{fp}", "--prompt", "x", "--max-tokens", "-5"], "--max-tokens -5"),
    ("prompt too long", ["--model", "{short}", "--prompt", "x = 1\n" * 20], "model's context is 16 tokens"),
    ("no chat template", ["--model", "{fp}", "--chat"], "no chat template"),
    ("unknown recipe", ["--model", "{fp}", "--prompt", "x", "--quantize", "int9"], "unknown recipe 'int9'"),
    ("activation recipe", ["--model", "{fp}", "--prompt", "x", "--quantize", "mobile"],
     "recipe 'mobile' quantizes activations; give token windows to calibrate their scales on, or use a "
     "weight-only recipe such as 'int4'"),
    ("a plain file", ["--model", "{fp}/config.json", "--prompt", "x"],
     "config.json is neither a directory nor a GGUF file; pass the model's directory (with config.json) or a GGUF file"),
    ("bad kernel", ["--model", "{fp}", "--prompt", "x", "--kernel", "cuda"], "invalid choice: 'cuda'"),
])
def test_bad_input_exits_2_with_a_clear_message(models, tmp_path, case, args, message):
    paths = {k: str(v) for k, v in models.items()}
    args = [a.format(tmp=tmp_path, **paths) for a in args]
    r = run_cli(*args, stdin="")
    assert r.returncode == 2, (case, r.stdout, r.stderr)
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_long_generation_is_cut_to_the_context(models, capsys):
    ids = gen.encode_prompt(mlx_lm_load(str(models["short"]))[1], "x = 1\n")
    assert gen.check_prompt(ids, 100, 16) == 16 - len(ids)
    assert "reduced to" in capsys.readouterr().err
    assert gen.check_prompt(ids, 3, 16) == 3


def test_ctrl_c_stops_cleanly_with_the_statistics_so_far(models):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxqat.generate", "--model", str(models["fp"]), "--prompt", "def",
         "--max-tokens", "50000", "--temp", "1.0", "--seed", "0"],  # minutes of work: Ctrl-C lands mid-way even
        # when this process is starved for seconds on a loaded machine (4,000 tokens once finished first)
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as a terminal delivers it: a suite started in the background (nohup, `&` in a script)
        # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt in the child
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # the "[model: ...]" line is printed just before generation starts (the first text can come
        # late: a model trained in the suite may begin with bytes that decode to no character yet)
        header = proc.stderr.readline()
        while header and not header.startswith("["):
            header = proc.stderr.readline()
        assert header, proc.stderr.read()
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "[interrupted]" in err
    tokens = int(err.split("Generation: ")[1].split(" tokens")[0])
    assert 0 < tokens < 50000
