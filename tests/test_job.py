"""The QAT job (``python -m mlxqat.train``, :mod:`mlxqat.training.job`): end to end on a model directory, bad input
refused before any work, resume checked, the user's files never replaced; the RTN baseline row."""

import json
import os
from pathlib import Path

import mlx.core as mx
import pytest

import mlxqat
import tiny
from mlxqat.training.job import main as train_main


@pytest.fixture()
def fp_model_dir(tmp_path, tokenizer):
    model, config = tiny.make_model("llama", 0)
    config["max_position_embeddings"] = 64
    return tiny.save_fp_model(model, config, tokenizer, tmp_path / "fp")


def _err(capsys, argv):
    code = train_main(argv)
    err = capsys.readouterr().err
    return code, err


def test_cli_bad_input_fails_before_training(tmp_path, fp_model_dir, capsys):
    out = str(tmp_path / "o")
    base = ["--model", str(fp_model_dir), "--out", out, "--steps", "2", "--no-progress", "--seq-len", "16"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    text = tmp_path / "t.txt"
    text.write_text(tiny.CORPUS)
    cases = [
        (["--data", str(tmp_path / "missing")], "does not exist"),
        (["--data", str(tmp_path / "empty")], "holds no text"),
        (["--data", str(chat)], "no chat template"),
        (["--data", str(text), "--recipe", "int5"], "unknown recipe 'int5'"),
        (["--data", str(text), "--seq-len", "128"], "longer than the model's context of 64"),
        (["--data", str(text), "--learning-rate", "-1"], "--learning-rate -1: must be a finite number > 0"),
        (["--data", str(text), "--recipe", "q4_0", "--scale-init", "mse"], "needs learn_scales=True and mode='affine'"),
    ]
    for extra, msg in cases:
        argv = base + extra
        code, err = _err(capsys, argv)
        assert code == 2, (extra, err)
        assert msg in err, (extra, err)
        assert "Traceback" not in err
        assert not Path(out).exists() and not Path(out + ".train").exists()


def test_a_quantized_model_is_refused_as_teacher(tmp_path, tokenizer, capsys):
    model, config = tiny.make_model("llama", 0)
    mlxqat.prepare(model, "int4")
    mlxqat.convert(model)
    q4 = tmp_path / "q4"
    mlxqat.save(model, tokenizer, q4, config=config)
    code, err = _err(capsys, ["--model", str(q4), "--out", str(tmp_path / "o"), "--steps", "2", "--no-progress"])
    assert code == 2 and err.startswith(f"error: {q4} is already quantized (16 quantized layers, e.g. model.embed_tokens); ")
    assert err.rstrip().endswith("; pass its full-precision original") and err.count("\n") == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.train").exists()


def test_cli_end_to_end_on_a_model_directory(tmp_path, fp_model_dir, capsys):
    text = tmp_path / "t.txt"
    text.write_text(tiny.CORPUS * 4)
    out = tmp_path / "q"
    code = train_main(["--model", str(fp_model_dir), "--data", str(text), "--out", str(out), "--steps", "6",
                       "--batch-size", "2", "--seq-len", "16", "--eval-windows", "4", "--no-progress",
                       "--learning-rate", "1e-3", "--log-every", "2"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| round-to-nearest |" in printed and "| QAT |" in printed
    manifest = mlxqat.verify(out)
    assert set(manifest["metrics"]) >= {"full precision", "round-to-nearest", "QAT", "gap_recovered"}
    assert "master_weights.safetensors" in manifest["files"]
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]
    model, tok = mlxqat.load(out)
    from mlx_lm import load as mlx_lm_load

    m2, _ = mlx_lm_load(str(out))
    x = mx.array([tok.encode("def f(x):")])
    assert mx.array_equal(model(x), m2(x)).item()
    # scales of linear layers were stored as float16, losslessly
    w = mx.load(str(out / "model.safetensors"))
    assert w["model.layers.0.mlp.up_proj.scales"].dtype == mx.float16


def test_cli_resume_with_other_settings_or_a_damaged_checkpoint(tmp_path, fp_model_dir, capsys):
    text = tmp_path / "t.txt"
    text.write_text(tiny.CORPUS * 4)
    out = tmp_path / "q"
    base = ["--model", str(fp_model_dir), "--data", str(text), "--out", str(out), "--steps", "4", "--batch-size", "2",
            "--eval-windows", "2", "--no-progress", "--log-every", "1", "--checkpoint-every", "2"]
    assert train_main(base + ["--seq-len", "16"]) == 0
    capsys.readouterr()
    code, err = _err(capsys, base + ["--seq-len", "8", "--resume"])
    assert code == 2 and "was written with seq_len=16, this run has seq_len=8; resume with --seq-len 16" in err
    weights = Path(str(out) + ".train") / "checkpoints" / "step_0000002" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    code, err = _err(capsys, base + ["--seq-len", "16", "--resume"])
    assert code == 2 and "step_0000002 is damaged" in err and "or run without --resume" in err
    assert "Traceback" not in err


def test_cli_out_never_replaces_what_the_user_owns(tmp_path, fp_model_dir, capsys, monkeypatch):
    """The commands that deleted user data: each is refused before any work, every byte left in place."""
    work = tmp_path / "work"
    (work / "d" / "sub").mkdir(parents=True)
    (work / "d" / "notes.txt").write_text("x")
    (work / "plain.txt").write_text("plain")
    monkeypatch.chdir(work)

    def tree():
        return {p.relative_to(tmp_path).as_posix(): p.read_bytes() if p.is_file() else None
                for p in sorted(tmp_path.rglob("*"))}

    before = tree()
    cases = [
        ("d", "folder holding files mlxqat did not write"),
        (str(work), "current directory"),
        (".", "current directory"),
        (str(fp_model_dir), "source model"),
        ("plain.txt", "a file mlxqat did not write"),
        ("/dev/null", "a device or special file"),
        ("", "output path is empty"),
    ]
    for out, message in cases:
        code, err = _err(capsys, ["--model", str(fp_model_dir), "--out", out, "--steps", "2", "--no-progress"])
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, (out, err)
    assert tree() == before
    assert os.path.exists("/dev/null") and not os.path.isdir("/dev/null")


def test_cli_with_cached_top_k_frees_the_teacher_and_still_measures_against_it(tmp_path, fp_model_dir, capsys):
    text = tmp_path / "t.txt"
    text.write_text(tiny.CORPUS * 4)
    out = tmp_path / "q"
    code = train_main(["--model", str(fp_model_dir), "--data", str(text), "--out", str(out), "--steps", "4",
                       "--batch-size", "2", "--seq-len", "16", "--eval-windows", "4", "--select-windows", "2",
                       "--no-progress", "--learning-rate", "1e-3", "--log-every", "2", "--teacher-top-k", "16",
                       "--optimizer-state-dtype", "bfloat16", "--loss-chunk", "5"])
    assert code == 0
    cache = Path(str(out) + ".train") / "teacher_cache"
    assert len(list(cache.glob("*.safetensors"))) == 4  # every step's targets, computed before training
    metrics = mlxqat.verify(out)["metrics"]
    # the QAT row was measured against the teacher's kept hidden states and head: the same KL as the teacher's
    from mlxqat.data import build_dataset, split_selection
    from mlxqat.evaluate import evaluate

    teacher, tokenizer = mlxqat.load(fp_model_dir)
    val = build_dataset(str(text), tokenizer, 16, max_context=64, max_val_windows=6).val
    val_w, _ = split_selection(val, 2)
    kl = evaluate(mlxqat.load(out)[0], val_w, teacher)["kl"]
    assert metrics["QAT"]["kl"] == pytest.approx(kl, rel=1e-4) and kl > 0


def test_the_memory_settings_are_flags():
    from mlxqat.training.job import build_parser

    parse = build_parser().parse_args
    assert parse([]).grad_checkpoint is None  # automatic
    assert parse(["--grad-checkpoint"]).grad_checkpoint is True
    assert parse(["--no-grad-checkpoint"]).grad_checkpoint is False
    a = parse(["--loss-chunk", "0", "--optimizer-state-dtype", "bfloat16"])
    assert (a.loss_chunk, a.optimizer_state_dtype) == (0, "bfloat16")
