"""Findings of the hostile-user probe (issue 22, section 3), one test each: the chat template by default,
prompts too long to process, profile lengths checked when parsed and against the context, --seq-len against
the context before the memory estimate, preparing a prepared model, and the work directory of a failed run."""

import io
import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import generate as mlx_lm_generate
from mlx_lm import load as mlx_lm_load

import mlxqat
import tiny
from mlxqat import generate as gen
from mlxqat.training import job
from mlxqat import profile as prof
from mlxqat.training import loop as training_loop
from mlxqat.training.checkpoints import latest_checkpoint
from mlxqat.training.loop import _loop
from mlxqat.data import model_context

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer):
    """Tiny llama directories: ``chat`` (a chat template, context 256), ``plain`` (no template, no context length)."""
    root = tmp_path_factory.mktemp("hostile")
    model, config = tiny.train_briefly("llama", tokenizer, steps=30, max_position_embeddings=256)
    chat = tiny.save_fp_model(model, config, tokenizer, root / "chat")
    tc = json.loads((chat / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps(dict(tc, chat_template=CHAT_TEMPLATE)))
    config = {k: v for k, v in config.items() if k != "max_position_embeddings"}
    plain = tiny.save_fp_model(model, config, tokenizer, root / "plain")
    return {"chat": chat, "plain": plain}


def _generate(capsys, argv):
    code = gen.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _reference(path, prompt, max_tokens):
    """What mlx-lm generates from ``prompt`` (text or token ids) greedily, computing in float32."""
    model, tokenizer = mlx_lm_load(str(path))
    model.set_dtype(mx.float32)
    return mlx_lm_generate(model, tokenizer, prompt, max_tokens=max_tokens)


# ---------------------------------------------------------------------------
# 1. generate applies the tokenizer's chat template, as mlx_lm.generate does
# ---------------------------------------------------------------------------


def test_generate_wraps_the_prompt_in_the_chat_template_by_default(dirs, capsys):
    _, tokenizer = mlx_lm_load(str(dirs["chat"]))
    messages = [{"role": "user", "content": "def fib"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    code, out, err = _generate(capsys, ["--model", str(dirs["chat"]), "--prompt", "def fib", "--max-tokens", "8"])
    assert code == 0, err
    assert f"Prompt: {len(ids)} tokens" in err
    assert out == _reference(dirs["chat"], ids, 8) + "\n"
    assert "--ignore-chat-template" in err  # the note says how to send the text as it is


def test_ignore_chat_template_sends_the_prompt_as_it_is(dirs, capsys):
    _, tokenizer = mlx_lm_load(str(dirs["chat"]))
    raw = tokenizer.encode("def fib")
    code, out, err = _generate(capsys, ["--model", str(dirs["chat"]), "--prompt", "def fib", "--max-tokens", "8",
                                        "--ignore-chat-template"])
    assert code == 0, err
    assert f"Prompt: {len(raw)} tokens" in err
    assert out == _reference(dirs["chat"], "def fib", 8) + "\n"


def test_system_prompt_goes_into_the_template_and_needs_one(dirs, capsys):
    _, tokenizer = mlx_lm_load(str(dirs["chat"]))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def fib"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    code, _, err = _generate(capsys, ["--model", str(dirs["chat"]), "--prompt", "def fib", "--max-tokens", "2",
                                      "--system-prompt", "be brief"])
    assert code == 0, err
    assert f"Prompt: {len(ids)} tokens" in err
    code, out, err = _generate(capsys, ["--model", str(dirs["plain"]), "--prompt", "x", "--system-prompt", "be brief",
                                        "--quiet"])
    assert code == 2 and out == ""
    assert err.startswith("error: --system-prompt: ") and "no chat template" in err and err.count("\n") == 1
    code, out, err = _generate(capsys, ["--model", str(dirs["chat"]), "--prompt", "x", "--system-prompt", "be brief",
                                        "--ignore-chat-template"])
    assert code == 2 and "--ignore-chat-template" in err and out == ""


# ---------------------------------------------------------------------------
# 2. prompts too long to process: refused at once, by one check that generate and profile share
# ---------------------------------------------------------------------------


def _no_generation(*args, **kwargs):
    raise AssertionError("generation started")


def test_a_huge_prompt_on_a_model_without_a_context_length_is_refused_at_once(dirs, capsys, monkeypatch):
    model, tokenizer = mlxqat.load(dirs["plain"])
    assert model_context(model) is None
    prompt = tiny.CORPUS * 100  # ~97 KB read from stdin: ~50,000 tokens
    n = len(tokenizer.encode(prompt))
    monkeypatch.setattr(gen, "generate", _no_generation)
    monkeypatch.setattr("sys.stdin", io.StringIO(prompt))
    code, out, err = _generate(capsys, ["--model", str(dirs["plain"]), "--prompt", "-", "--quiet"])
    assert code == 2, err
    assert err.startswith(f"error: the prompt is {n} tokens") and err.count("\n") == 1
    assert "names no context length" in err and f"--max-prompt-tokens {n}" in err
    # asked for, it is processed
    monkeypatch.setattr(gen, "generate", lambda *a, **k: ("", gen.GenerationStats(prompt_tokens=n)))
    monkeypatch.setattr("sys.stdin", io.StringIO(prompt))
    code, _, err = _generate(capsys, ["--model", str(dirs["plain"]), "--prompt", "-", "--quiet",
                                      "--max-prompt-tokens", str(n)])
    assert code == 0, err


def test_profile_refuses_a_prompt_length_generate_refuses(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(prof, "_time_cells", _no_generation)
    code = prof.main(["--prompt-lengths", "200000", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == ("error: --prompt-lengths 200000: the prompt is 200000 tokens, but the model's context is 256 "
                   "tokens (max_position_embeddings); give --prompt-lengths of at most 255 tokens\n")
    assert not (tmp_path / "o").exists()


def test_profile_default_grid_leaves_out_what_does_not_fit_the_context():
    result = prof.profile_model(baseline="none", kernels="mlx", gen_lengths=(2,), repeats=1, progress=False)
    assert result["meta"]["context"] == 256 and result["meta"]["prompt_lengths"] == [32, 128]
    assert any("512" in n and "context is 256 tokens" in n for n in result["notes"]), result["notes"]


# ---------------------------------------------------------------------------
# 3. profile's lengths are checked when parsed; --quick does not replace them
# ---------------------------------------------------------------------------


def test_profile_prompt_lengths_are_checked_when_parsed(capsys, monkeypatch, tmp_path):
    with pytest.raises(SystemExit) as e:
        prof.build_parser().parse_args(["--quick", "--prompt-lengths", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: --prompt-lengths 0: each length must be at least 1" in err
    assert prof.main(["--quick", "--gen-lengths", "1", "--out", str(tmp_path / "o")]) == 2
    assert "error: --gen-lengths 1: each length must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    given = {}

    def record(**kwargs):
        given.update(kwargs)
        raise mlxqat._cli.UsageError("stop")

    monkeypatch.setattr(prof, "profile_model", record)
    assert prof.main(["--quick", "--prompt-lengths", "8,24", "--out", str(tmp_path / "o")]) == 2
    assert given["prompt_lengths"] == [8, 24] and given["quick"] is True


# ---------------------------------------------------------------------------
# 4. train: --seq-len against the context before the memory estimate
# ---------------------------------------------------------------------------


def test_train_seq_len_beyond_the_context_names_the_context_not_the_memory(capsys, tmp_path):
    code = job.main(["--seq-len", "100000", "--out", str(tmp_path / "o"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2
    assert err == ("error: seq_len=100000 is longer than the model's context of 256 tokens; "
                   "use --seq-len 256 or less\n")
    assert "estimated peak memory" not in out
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.train").exists()


# ---------------------------------------------------------------------------
# 5. prepare on a prepared (or quantized) model says so
# ---------------------------------------------------------------------------


def test_prepare_on_a_prepared_model_says_it_is_prepared():
    model, _ = tiny.make_model("llama")
    mlxqat.prepare(model, "int4")
    with pytest.raises(ValueError) as e:
        mlxqat.prepare(model, "int4")
    message = str(e.value)
    assert message.startswith("the model is already prepared: 16 fake-quant layers (e.g. model.embed_tokens)")
    assert "mlxqat.convert(model)" in message and "unprepared" in message and "matched no" not in message
    mlxqat.convert(model)
    with pytest.raises(ValueError, match=r"^the model is already quantized: 16 quantized layers \(e\.g\. "
                                         r"model\.embed_tokens\); prepare the full-precision original"):
        mlxqat.prepare(model, "int4")


# ---------------------------------------------------------------------------
# 6. a failed train run removes the work directory it created, when nothing in it is worth keeping
# ---------------------------------------------------------------------------


@pytest.fixture()
def train_argv(tmp_path, tokenizer):
    model, config = tiny.make_model("llama", 0)
    fp = tiny.save_fp_model(model, dict(config, max_position_embeddings=64), tokenizer, tmp_path / "fp")
    text = tmp_path / "t.txt"
    text.write_text(tiny.CORPUS * 4)
    return ["--model", str(fp), "--data", str(text), "--out", str(tmp_path / "q"), "--batch-size", "2",
            "--seq-len", "16", "--eval-windows", "2", "--select-windows", "0", "--no-progress"]


def _failing_loop(after_real_steps: bool):
    real = _loop

    def loop(*args, **kwargs):
        if after_real_steps:
            real(*args, **kwargs)
        raise FloatingPointError("loss is nan at step 1; lower --learning-rate")

    return loop


def test_a_run_that_fails_before_its_first_step_leaves_no_work_directory(train_argv, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(training_loop, "_loop", _failing_loop(False))
    assert job.main(train_argv + ["--steps", "2"]) == 2
    assert "loss is nan" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    assert not (tmp_path / "q.train").exists(), sorted(p.name for p in (tmp_path / "q.train").iterdir())
    # a work directory that was there before the run stays
    mlxqat.storage.destinations.work_dir(tmp_path / "q.train")
    assert job.main(train_argv + ["--steps", "2"]) == 2
    assert (tmp_path / "q.train" / "mlxqat.json").is_file()


def test_a_failed_run_keeps_the_checkpoints_a_resume_can_use(train_argv, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(training_loop, "_loop", _failing_loop(True))
    assert job.main(train_argv + ["--steps", "3", "--checkpoint-every", "1"]) == 2
    capsys.readouterr()
    work = tmp_path / "q.train"
    assert latest_checkpoint(work / "checkpoints") is not None
    monkeypatch.undo()
    assert job.main(train_argv + ["--steps", "3", "--checkpoint-every", "1", "--resume"]) == 0
    assert "| QAT |" in capsys.readouterr().out
    assert Path(tmp_path / "q" / "mlxqat.json").is_file()
