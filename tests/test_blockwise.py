"""Block-wise QAT (:mod:`mlxqat.training.blockwise`, ``python -m mlxqat.train --method blockwise``): it converts
exactly, every block reconstructs better than its round-to-nearest start, a killed run resumes to the same
weights, and the job runs it end to end and refuses bad flags with one line."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlxqat
import tiny
from mlxqat.training import job
from mlxqat.training.blockwise import blockwise_qat, model_blocks
from mlxqat.kernels import use_dequantized_matmul
from mlxqat.layers import is_fake_quant
from mlxqat.training.qat import quantize_qat

SEQ = 40  # longer than gemma3_text's sliding window (32): its local layers get a windowed mask


def _windows(n=12, seq=SEQ, seed=0):
    return np.random.default_rng(seed).integers(0, tiny.VOCAB, (n, seq + 1)).astype(np.int32)


def _params(model):
    return dict(tree_flatten(model.parameters()))


def _block_phase(arch, windows, **kw):
    model, _ = tiny.make_model(arch, 0, scale=3.0)
    kw = {"steps_per_block": 20, "batch_size": 4, "learning_rate": 1e-3, "scale_init": "minmax",
          "progress": False, **kw}
    return model, blockwise_qat(model, windows, "int4", **kw)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_block_then_scales_converts_exactly(arch):
    windows = _windows()
    model, summary = _block_phase(arch, windows, steps_per_block=5)
    rtn, _ = tiny.make_model(arch, 0, scale=3.0)
    mlxqat.prepare(rtn, mlxqat.recipes.get("int4").for_qat("scales", scale_init="minmax"))
    teacher, _ = tiny.make_model(arch, 0, scale=3.0)
    quantize_qat(model, teacher, windows, "int4", trainable="scales", scale_init="minmax", steps=2, batch_size=4,
                 seq_len=SEQ, learning_rate=1e-3, progress=False)
    x = mx.array(windows[:3, :-1])
    fake = model(x)
    assert float(mx.abs(fake - rtn(x)).max()) > 1e-3  # training moved the model (the test could fail)
    mlxqat.convert(model)
    assert not any(is_fake_quant(m) for _, m in model.named_modules())
    prompt = mx.array(windows[0, :12])
    converted = model(x)
    assert float(mx.abs(converted - fake).max()) <= 1e-4  # quantized_matmul: another kernel, summation order
    use_dequantized_matmul(model)  # the same op as the fake-quant forward: bit for bit
    assert mx.array_equal(model(x), fake).item()
    use_dequantized_matmul(model, enabled=False)
    assert tiny.greedy(model, prompt, 8) == tiny.greedy(model, prompt, 8)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_every_block_reconstructs_better_than_its_rtn_start(arch):
    _, summary = _block_phase(arch, _windows())
    blocks = summary["blocks"]
    assert [r["block"] for r in blocks] == [0, 1]
    for r in blocks:
        assert 0 < r["after"]["mse"] < 0.8 * r["before"]["mse"], r
        assert r["after"]["rel"] < r["before"]["rel"] < 1
    assert summary["tokens"] == 2 * 20 * 4 * SEQ and summary["peak_memory_gb"] > 0


def test_same_target_and_memory_and_disk_give_the_same_weights(tmp_path):
    windows = _windows(8)
    a, sa = _block_phase("llama", windows, steps_per_block=6)
    b, sb = _block_phase("llama", windows, steps_per_block=6, out_dir=tmp_path / "b")
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys() and all(mx.array_equal(pa[k], pb[k]).item() for k in pa)
    assert sa["blocks"][1]["after"] == sb["blocks"][1]["after"]
    assert not any(p.name.startswith("acts_") for p in (tmp_path / "b").iterdir())  # only the blocks are kept
    c, sc = _block_phase("llama", windows, steps_per_block=6, target="same")
    # "same": the full-precision block on the student's own inputs, so the error left by the quantized
    # embedding and earlier blocks is not part of it: every block starts closer to that target
    assert all(c["before"]["mse"] < a["before"]["mse"] for c, a in zip(sc["blocks"], sa["blocks"]))


def test_a_killed_run_resumes_to_identical_weights(tmp_path):
    windows = _windows(8)
    whole, s_whole = _block_phase("qwen3", windows, out_dir=tmp_path / "whole")

    def kill_after_block_0(record):
        if record["block"] == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _block_phase("qwen3", windows, out_dir=tmp_path / "cut", callback=kill_after_block_0)
    state = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert state["done"] == 1 and (tmp_path / "cut" / "acts_001").is_dir()
    resumed, s_res = _block_phase("qwen3", windows, out_dir=tmp_path / "cut", resume=True)
    def untimed(records):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]

    assert s_res["resumed_from_block"] == 1 and untimed(s_res["blocks"]) == untimed(s_whole["blocks"])
    pw, pr = _params(whole), _params(resumed)
    assert all(mx.array_equal(pw[k], pr[k]).item() for k in pw)
    with pytest.raises(ValueError, match=r"other settings: steps_per_block=20 \(now 21\)"):
        _block_phase("qwen3", windows, out_dir=tmp_path / "cut", resume=True, steps_per_block=21)
    with pytest.raises(FileNotFoundError, match="no block-wise checkpoint"):
        _block_phase("qwen3", windows, out_dir=tmp_path / "none", resume=True)


def test_bad_arguments_are_named():
    windows = _windows(8)
    cases = [
        ({"target": "teacher"}, "target='teacher' is not supported"),
        ({"steps_per_block": 0}, "steps_per_block=0 must be an integer >= 1"),
        ({"batch_size": 16}, "8 calibration windows are fewer than the block batch size 16"),
        ({"learn_scales": False}, "drop --no-learn-scales"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            _block_phase("llama", windows, **kw)
    with pytest.raises(ValueError, match="model.model.layers"):
        model_blocks(nn.Linear(4, 4))


# ---------------------------------------------------------------------------
# The job: python -m mlxqat.train --method blockwise
# ---------------------------------------------------------------------------


@pytest.fixture()
def fp_model_dir(tmp_path, tokenizer):
    model, config = tiny.make_model("llama", 0)
    config["max_position_embeddings"] = 64
    return tiny.save_fp_model(model, config, tokenizer, tmp_path / "fp")


def _argv(fp_model_dir, tmp_path, out, *extra):
    text = tmp_path / "t.txt"
    text.write_text(tiny.CORPUS * 4)
    return ["--model", str(fp_model_dir), "--data", str(text), "--out", str(out), "--method", "blockwise",
            "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-windows", "4", "--no-progress",
            "--steps-per-block", "5", "--block-windows", "8",
            "--learning-rate", "1e-3", "--log-every", "1", "--checkpoint-every", "2", *extra]


def test_job_runs_blockwise_end_to_end_and_resumes_identically(tmp_path, fp_model_dir, capsys):
    out = tmp_path / "q"
    assert job.main(_argv(fp_model_dir, tmp_path, out)) == 0
    printed = capsys.readouterr().out
    assert "block 0: relative reconstruction error" in printed and "| QAT |" in printed
    manifest = mlxqat.verify(out)
    training = manifest["training"]
    assert training["method"] == "blockwise" and training["args"]["trainable"] == "scales"
    blocks = training["block_phase"]["blocks"]
    assert len(blocks) == 2 and all(b["after"]["mse"] < b["before"]["mse"] for b in blocks)
    model, tok = mlxqat.load(out)
    from mlx_lm import load as mlx_lm_load

    m2, _ = mlx_lm_load(str(out))
    x = mx.array([tok.encode("def f(x):")])
    assert mx.array_equal(model(x), m2(x)).item()
    first = mx.load(str(out / "model.safetensors"))

    # killed in the end-to-end phase after its checkpoint at step 2; resumed: the same model
    out2 = tmp_path / "q2"

    def kill(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    args = job.build_parser().parse_args(_argv(fp_model_dir, tmp_path, out2))
    with pytest.raises(KeyboardInterrupt):
        job.run(**dict(vars(args), callback=kill))
    assert job.main(_argv(fp_model_dir, tmp_path, out2, "--resume")) == 0
    second = mx.load(str(out2 / "model.safetensors"))
    assert first.keys() == second.keys() and all(mx.array_equal(first[k], second[k]).item() for k in first)


@pytest.mark.parametrize("extra,message", [
    (["--trainable", "lora"], "--method blockwise trains every weight block by block, then scales and biases "
                              "end to end (trainable='scales'); drop --trainable lora"),
    (["--no-learn-scales"], "drop --no-learn-scales"),
    (["--block-windows", "2", "--block-batch-size", "4"], "--block-windows 2 is fewer than --block-batch-size 4"),
    (["--steps-per-block", "0"], "--steps-per-block 0: must be an integer >= 1"),
    (["--block-learning-rate", "-1"], "--block-learning-rate -1: must be a finite number > 0"),
    (["--block-target", "teacher"], "invalid choice: 'teacher'"),
    (["--resume"], "no block-wise checkpoint under"),
])
def test_job_refuses_bad_blockwise_flags_with_one_line(tmp_path, fp_model_dir, capsys, extra, message):
    out = tmp_path / "o"
    argv = ["--model", str(fp_model_dir), "--out", str(out), "--method", "blockwise", "--steps", "2",
            "--no-progress", "--seq-len", "16", *extra]
    code = job.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()  # a flag argparse refuses comes after its usage lines
    assert code == 2 and "Traceback" not in err and message in lines[-1], err
    assert sum("error: " in line for line in lines) == 1
    assert not out.exists() and not Path(str(out) + ".train").exists()


def test_block_flags_need_the_blockwise_method(tmp_path, fp_model_dir, capsys):
    for argv in (["--steps-per-block", "5"], ["--block-target", "same"]):
        code = job.main(["--model", str(fp_model_dir), "--out", str(tmp_path / "o"), "--no-progress", *argv])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1
        assert f"{argv[0]} sets the block phase of --method blockwise; add --method blockwise or drop it" in err
    code = job.main(["--method", "blocks"])
    assert code == 2 and "invalid choice: 'blocks'" in capsys.readouterr().err


def test_a_block_that_training_makes_worse_keeps_its_start():
    windows = _windows(8)
    start, _ = tiny.make_model("llama", 0, scale=3.0)
    mlxqat.prepare(start, mlxqat.recipes.get("int4").for_qat("scales", scale_init="minmax"))
    model, summary = _block_phase("llama", windows, steps_per_block=3, learning_rate=10.0, grad_clip=0.0)
    assert all(r["kept"] == "start" and r["after"] == r["before"] for r in summary["blocks"])
    x = mx.array(windows[:2, :-1])
    assert mx.array_equal(model(x), start(x)).item()


# ---------------------------------------------------------------------------
# Block weights held in the checkpoint's 16-bit type


def _bf16_exact(arch):
    """A tiny model whose float32 weights are bfloat16 values (a bfloat16 checkpoint read as float32),
    and those weights as the checkpoint stores them."""
    from mlx.utils import tree_map

    model, config = tiny.make_model(arch, 0, scale=3.0)
    stored = tree_map(lambda p: p.astype(mx.bfloat16), model.parameters())
    model.update(tree_map(lambda p: p.astype(mx.float32), stored))
    mx.eval(model.parameters())
    return model, dict(tree_flatten(stored)), config


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_held_block_weights_train_to_the_very_same_model_in_less_memory(arch):
    from mlxqat.training.blockwise import hold_weights

    windows = _windows(8)
    kw = {"steps_per_block": 6, "batch_size": 4, "learning_rate": 1e-3, "scale_init": "minmax", "progress": False}
    plain = _bf16_exact(arch)[0]
    s_plain = blockwise_qat(plain, windows, "int4", **kw)
    held, stored, _ = _bf16_exact(arch)
    n = hold_weights(held, stored)
    blocks = model_blocks(held)
    linears = [m for b in blocks for _, m in b.named_modules() if isinstance(m, nn.Linear)]
    assert n == sum(m.weight.size for m in linears) > 0
    assert all(m.weight.dtype == mx.bfloat16 for m in linears)
    x = mx.array(windows[:2, :-1])
    assert mx.array_equal(held(x), _bf16_exact(arch)[0](x)).item()  # a matmul promotes them to float32
    seen = []

    def dtypes_after(record):  # the blocks not trained yet are still held when a block is done
        seen.append({m.weight.dtype for b in blocks[record["block"] + 1:] for _, m in b.named_modules()
                     if is_fake_quant(m)})

    s_held = blockwise_qat(held, windows, "int4", callback=dtypes_after, **kw)
    assert seen[0] == {mx.bfloat16} and seen[-1] == set()
    # the same training, bit for bit: every block upcast exactly when its turn came
    untimed = [[{k: v for k, v in r.items() if k != "wall_s"} for r in s["blocks"]] for s in (s_plain, s_held)]
    assert untimed[0] == untimed[1]
    pp, ph = _params(plain), _params(held)
    assert pp.keys() == ph.keys()
    assert all(mx.array_equal(pp[k], ph[k]).item() for k in pp), [k for k in pp if not mx.array_equal(pp[k], ph[k]).item()]
    assert mx.array_equal(held(x), plain(x)).item()


def test_the_job_holds_a_bfloat16_checkpoint_and_saves_what_float32_saves(tmp_path, tokenizer, capsys):
    model, _, config = _bf16_exact("llama")
    config["max_position_embeddings"] = 64
    f32 = tiny.save_fp_model(model, config, tokenizer, tmp_path / "f32")
    model.set_dtype(mx.bfloat16)
    bf16 = tiny.save_fp_model(model, dict(config, torch_dtype="bfloat16"), tokenizer, tmp_path / "bf16")
    assert job.main(_argv(f32, tmp_path, tmp_path / "a")) == 0
    assert "held" not in capsys.readouterr().out
    assert job.main(_argv(bf16, tmp_path, tmp_path / "b")) == 0
    printed = capsys.readouterr().out
    assert "block weights kept in the checkpoint's 16-bit type" in printed
    a, b = mx.load(str(tmp_path / "a" / "model.safetensors")), mx.load(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    # the block weights: identical codes, scales and biases (the rest is stored in each checkpoint's type)
    blocks = [k for k in a if k.startswith("model.layers.") and not k.endswith("norm.weight")]
    assert blocks and all(mx.array_equal(a[k], b[k]).item() for k in blocks)
    # and the same table: round-to-nearest on the held weights computes what it computes on float32 ones
    ma, mb = mlxqat.verify(tmp_path / "a")["metrics"], mlxqat.verify(tmp_path / "b")["metrics"]
    for row in ("full precision", "round-to-nearest", "QAT"):
        assert ma[row]["ppl"] == mb[row]["ppl"] and ma[row]["kl"] == mb[row]["kl"], row


def test_a_killed_held_run_resumes_to_the_same_weights(tmp_path):
    from mlxqat.training.blockwise import hold_weights

    windows = _windows(8)
    kw = {"steps_per_block": 6, "batch_size": 4, "learning_rate": 1e-3, "scale_init": "minmax", "progress": False}

    def held():
        model, stored, _ = _bf16_exact("qwen3")
        assert hold_weights(model, stored) > 0
        return model

    whole = held()
    blockwise_qat(whole, windows, "int4", out_dir=tmp_path / "whole", **kw)

    def kill_after_block_0(record):
        if record["block"] == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        blockwise_qat(held(), windows, "int4", out_dir=tmp_path / "cut", callback=kill_after_block_0, **kw)
    resumed = held()
    s = blockwise_qat(resumed, windows, "int4", out_dir=tmp_path / "cut", resume=True, **kw)
    assert s["resumed_from_block"] == 1
    pw, pr = _params(whole), _params(resumed)
    assert pw.keys() == pr.keys() and all(mx.array_equal(pw[k], pr[k]).item() for k in pw)
