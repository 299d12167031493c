"""Every bad input ends with one clear line and exit status 2, never a traceback (issue 11).

The commands' error path (:mod:`mlxqat._cli`), parse-time range checks of every
numeric flag (with hypothesis), and bad training data (binary files, JSONL lines
that are not objects, chat templates that fail, are unsafe or never finish).
"""

import contextlib
import errno
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tiny
from mlxqat import _cli, cli, data
from mlxqat import export as export_mod
from mlxqat import generate as gen
from mlxqat.training import job
from mlxqat import profile as prof
from mlxqat.training.args import TrainingArgs

ROOT = Path(__file__).resolve().parent.parent
BUG = ("this is a bug in mlxqat: please report it on the issue tracker of the mlxqat repository, with the "
       "command line and the traceback that MLXQAT_DEBUG=1 prints")


def _one_error_line(err: str) -> str:
    """The single ``error:`` line of ``err``; fails if there is any other output or a traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------
# run_main: one error path
# ---------------------------------------------------------------------------


def _raise(exc):
    def fn():
        raise exc

    return fn


@pytest.mark.parametrize("exc,line", [
    (ValueError("seq_len=1 is too short\nuse 2"), "error: seq_len=1 is too short use 2"),
    (_cli.UsageError("--max-tokens 0: generate at least 1 token"), "error: --max-tokens 0: generate at least 1 token"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS), "/x/y"),
     f"error: cannot write /x/y: [Errno {errno.EROFS}] {os.strerror(errno.EROFS)}; choose a writable location"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/model.safetensors"),
     f"error: cannot write /x/model.safetensors: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}; "
     "free some disk space or choose another location"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/root/m"),
     f"error: /root/m: [Errno {errno.EACCES}] {os.strerror(errno.EACCES)}"),
    (IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), "/tmp"),
     f"error: /tmp: [Errno {errno.EISDIR}] {os.strerror(errno.EISDIR)}"),
    (NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), "/a/b"),
     f"error: /a/b: [Errno {errno.ENOTDIR}] {os.strerror(errno.ENOTDIR)}"),
    (FileNotFoundError("data path d does not exist"), "error: data path d does not exist"),
    (FloatingPointError("loss is nan at step 3"), "error: loss is nan at step 3"),
    (jinja2.exceptions.SecurityError("access to attribute 'append' is unsafe"),
     "error: access to attribute 'append' is unsafe"),
])
def test_expected_failures_are_one_line_and_exit_2(capsys, exc, line):
    assert _cli.run_main(_raise(exc)) == 2
    out, err = capsys.readouterr()
    assert out == "" and _one_error_line(err) == line


def test_unexpected_failure_is_one_line_naming_a_bug_and_exit_1(capsys, monkeypatch):
    monkeypatch.delenv("MLXQAT_DEBUG", raising=False)
    assert _cli.run_main(_raise(KeyError("boom"))) == 1
    assert _one_error_line(capsys.readouterr().err) == f"error: unexpected KeyError: 'boom'; {BUG}"
    monkeypatch.setenv("MLXQAT_DEBUG", "1")
    assert _cli.run_main(_raise(KeyError("boom"))) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith(BUG)


def test_interrupt_status_and_system_exit(capsys):
    assert _cli.run_main(_raise(KeyboardInterrupt()), interrupted="[stopped]") == 130
    assert capsys.readouterr().err.strip() == "[stopped]"
    assert _cli.run_main(_raise(SystemExit(0))) == 0
    assert _cli.run_main(_raise(SystemExit(2))) == 2
    assert _cli.run_main(lambda: None) == 0 and _cli.run_main(lambda: 3) == 3


# ---------------------------------------------------------------------------
# Every command goes through it
# ---------------------------------------------------------------------------


def test_commands_report_expected_and_unexpected_errors(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("MLXQAT_DEBUG", raising=False)
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/model.safetensors")
    monkeypatch.setattr(gen, "run", lambda args: (_ for _ in ()).throw(enospc))
    assert gen.main(["--prompt", "x"]) == 2
    assert _one_error_line(capsys.readouterr().err).startswith("error: cannot write /out/model.safetensors: [Errno")
    monkeypatch.setattr(gen, "run", lambda args: 1 / 0)
    assert gen.main(["--prompt", "x"]) == 1
    assert _one_error_line(capsys.readouterr().err) == f"error: unexpected ZeroDivisionError: division by zero; {BUG}"
    assert cli.main(["generate", "--prompt", "x"]) == 1  # the same through the dispatcher
    capsys.readouterr()

    def interrupted(**kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "run", interrupted)
    assert job.main([]) == 130
    assert "resume with --resume" in capsys.readouterr().err
    assert export_mod.main(["/no/such/model", "--format", "mlx", "--out", str(tmp_path / "x")]) == 2
    assert "/no/such/model" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_python_dash_m_paths(tmp_path):
    """The real entry points: bad input is exit 2 without a traceback; a bug is exit 1."""
    r = subprocess.run([sys.executable, "-m", "mlxqat.train", "--log-every", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--log-every 0: must be an integer >= 1" in r.stderr
    assert "Traceback" not in r.stderr
    bug = ("import sys, mlxqat.generate as g; g.run = lambda a: [][1]; "
           "sys.exit(g.main(['--prompt', 'x']))")
    env = {k: v for k, v in os.environ.items() if k != "MLXQAT_DEBUG"}
    r = subprocess.run([sys.executable, "-c", bug], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert _one_error_line(r.stderr) == f"error: unexpected IndexError: list index out of range; {BUG}"
    r = subprocess.run([sys.executable, "-c", bug], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(env, MLXQAT_DEBUG="1"))
    assert r.returncode == 1 and "Traceback" in r.stderr and "IndexError" in r.stderr


@pytest.mark.parametrize("command", ["train", "export", "verify", "generate", "profile"])
def test_python_dash_m_mlxqat_runs_every_command(command):
    """``python -m mlxqat CMD`` is ``python -m mlxqat.CMD`` (and the ``mlxqat`` script)."""
    r = subprocess.run([sys.executable, "-m", "mlxqat", command, "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith(f"usage: python -m mlxqat.{command}"), r
    r = subprocess.run([sys.executable, "-m", "mlxqat", "no-such-command"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "unknown command 'no-such-command'" in r.stderr


# ---------------------------------------------------------------------------
# Numbers: checked at parse time, named with the range
# ---------------------------------------------------------------------------


def _cli_error(capsys, main, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv,message", [
    (["--min-lr-ratio=-0.5"], "--min-lr-ratio -0.5: must be a number in [0, 1]"),
    (["--min-lr-ratio", "nan"], "--min-lr-ratio nan: must be a number in [0, 1]"),
    (["--min-lr-ratio", "1.5"], "--min-lr-ratio 1.5: must be a number in [0, 1]"),
    (["--scale-learning-rate=-1e-4"], "--scale-learning-rate -1e-4: must be a finite number > 0"),
    (["--learning-rate", "nan"], "--learning-rate nan: must be a finite number > 0"),
    (["--learning-rate", "inf"], "--learning-rate inf: must be a finite number > 0"),
    (["--lora-learning-rate", "0"], "--lora-learning-rate 0: must be a finite number > 0"),
    (["--temperature", "inf"], "--temperature inf: must be a finite number > 0"),
    (["--grad-clip", "nan"], "--grad-clip nan: must be a finite number >= 0"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1: must be a finite number >= 0"),
    (["--teacher-top-k", "-1"], "--teacher-top-k -1: must be an integer >= 0"),
    (["--eval-windows", "0"], "--eval-windows 0: must be an integer >= 1"),
    (["--self-generate", "-3"], "--self-generate -3: must be an integer >= 0"),
    (["--checkpoint-every", "-1"], "--checkpoint-every -1: must be an integer >= 0"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints -1: must be an integer >= 0"),
    (["--log-every", "0"], "--log-every 0: must be an integer >= 1"),
    (["--warmup-steps", "-5"], "--warmup-steps -5: must be an integer >= 0"),
    (["--steps", "2.5"], "--steps 2.5: must be an integer >= 1"),
    (["--seq-len", "1"], "--seq-len 1: must be an integer >= 2"),
    (["--seed", "-1"], "--seed -1: must be an integer >= 0"),
    (["--reverse-kl", "2"], "--reverse-kl 2: must be a number in [0, 1]"),
    (["--schedule", "step"], "invalid choice: 'step'"),
    (["--trainable", "bias"], "invalid choice: 'bias'"),
])
def test_train_refuses_bad_numbers_at_parse_time(capsys, argv, message):
    assert message in _cli_error(capsys, job.main, argv)


def test_train_refuses_a_quant_delay_that_leaves_no_qat(capsys):
    err = _cli_error(capsys, job.main, ["--steps", "50", "--quant-delay", "50"])
    assert _one_error_line(err) == (
        "error: quant_delay=50 is not below steps=50: no step would train through the quantizer; "
        "use a quant_delay below 50 (0: quantize from the first step)"
    )


@pytest.mark.parametrize("argv,message", [
    (["--temp", "-1"], "--temp -1: must be a finite number >= 0"),
    (["--temp", "nan"], "--temp nan: must be a finite number >= 0"),
    (["--top-p", "2"], "--top-p 2: must be a number in (0, 1]"),
    (["--top-p", "0"], "--top-p 0: must be a number in (0, 1]"),
    (["--top-k", "-5"], "--top-k -5: must be an integer >= 0"),
    (["--min-p", "1.5"], "--min-p 1.5: must be a number in [0, 1]"),
    (["--min-p", "-0.1"], "--min-p -0.1: must be a number in [0, 1]"),
    (["--max-tokens", "0"], "--max-tokens 0: must be an integer >= 1"),
    (["-m", "-2"], "--max-tokens -2: must be an integer >= 1"),
    (["--seed", "-3"], "--seed -3: must be an integer >= 0"),
])
def test_generate_refuses_bad_numbers_at_parse_time(capsys, argv, message):
    assert message in _cli_error(capsys, gen.main, ["--prompt", "x", *argv])
    assert message in _cli_error(capsys, cli.main, ["generate", "--prompt", "x", *argv])


@pytest.mark.parametrize("argv,message", [
    (["--repeats", "0"], "--repeats 0: must be an integer >= 1"),
    (["--seed", "-1"], "--seed -1: must be an integer >= 0"),
    (["--prompt-lengths", "a,b"], "--prompt-lengths 'a,b': give comma-separated integers"),
    (["--prompt-lengths", "0,8"], "each length must be at least 1"),
    (["--gen-lengths", "1"], "each length must be at least 2"),
])
def test_profile_refuses_bad_numbers(capsys, argv, message, tmp_path):
    err = _cli_error(capsys, prof.main, [*argv, "--out", str(tmp_path / "o")])
    assert message in err
    assert not (tmp_path / "o").exists()


NUMERIC_PARSERS = {"train": job.build_parser, "generate": gen.build_parser, "profile": prof.build_parser}


def _numeric_flags():
    """``(command, flag, dest, Number)`` for every range-checked flag of every command."""
    out = []
    for name, build in NUMERIC_PARSERS.items():
        for action in build()._actions:
            number = getattr(action.type, "number", None)
            if number is not None:
                out.append((name, max(action.option_strings, key=len), action.dest, number))
    return out


NUMERIC_FLAGS = _numeric_flags()


def test_every_numeric_flag_is_range_checked():
    for name, build in NUMERIC_PARSERS.items():
        for action in build()._actions:
            assert action.type in (None, str) or hasattr(action.type, "number"), (name, action.option_strings)
    assert len(NUMERIC_FLAGS) >= 30
    # the TrainingArgs flags use the field's own check: one range for the CLI and the library
    fields = {f.name: f for f in TrainingArgs.__dataclass_fields__.values()}
    for name, _, dest, number in NUMERIC_FLAGS:
        if name == "train" and dest in fields:
            assert number is fields[dest].metadata["check"]


def _python_value(text: str, kind: type):
    try:
        return int(text) if kind is int else float(text)
    except ValueError:
        return None


@settings(max_examples=400, deadline=None)
@given(flag=st.sampled_from(NUMERIC_FLAGS),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**9, 10**9),
                       st.sampled_from(["nan", "-inf", "inf", "1e3", "0x10", "", "abc", "1_000", "-0", "0.5"])))
def test_numbers_are_accepted_in_range_or_refused_with_exit_2(flag, value):
    name, option, dest, number = flag
    text = value if isinstance(value, str) else repr(value)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            parsed = getattr(NUMERIC_PARSERS[name]().parse_args([f"{option}={text}"]), dest)
        except SystemExit as e:
            parsed, code = None, e.code
    if parsed is None:
        assert code == 2 and f"{option} {text}: must be {number.describe()}" in err.getvalue()
        as_number = _python_value(text, number.kind)
        assert as_number is None or not number.contains(as_number)
        if name == "train" and dest in TrainingArgs.__dataclass_fields__ and as_number is not None:
            with pytest.raises(ValueError, match=f"^{dest}="):  # the library refuses it too
                TrainingArgs(**{dest: as_number})
    else:
        assert number.contains(parsed) and math.isfinite(parsed)
        assert parsed == float(text)


def test_library_training_args_refuse_what_the_cli_refuses():
    cases = [
        (dict(min_lr_ratio=-0.5), "min_lr_ratio=-0.5 must be a number in [0, 1]"),
        (dict(min_lr_ratio=float("nan")), "min_lr_ratio=nan must be a number in [0, 1]"),
        (dict(learning_rate=float("inf")), "learning_rate=inf must be a finite number > 0"),
        (dict(scale_learning_rate=-1e-3), "scale_learning_rate=-0.001 must be a finite number > 0"),
        (dict(weight_decay=-1.0), "weight_decay=-1.0 must be a finite number >= 0"),
        (dict(teacher_top_k=-1), "teacher_top_k=-1 must be an integer >= 0"),
        (dict(log_every=0), "log_every=0 must be an integer >= 1"),
        (dict(checkpoint_every=-2), "checkpoint_every=-2 must be an integer >= 0"),
        (dict(warmup_steps=-1), "warmup_steps=-1 must be an integer >= 0"),
        (dict(steps=10.0), "steps=10.0 must be an integer >= 1"),
        (dict(grad_clip=float("nan")), "grad_clip=nan must be a finite number >= 0"),
        (dict(temperature=True), "temperature=True must be a finite number > 0"),
        (dict(grad_checkpoint="no"), "grad_checkpoint='no' must be True or False"),
        (dict(schedule="step"), "schedule='step' is not supported; use one of ('cosine', 'linear', 'constant')"),
        (dict(steps=10, quant_delay=10), "quant_delay=10 is not below steps=10"),
        (dict(keep_checkpoints=-1), "keep_checkpoints=-1 must be an integer >= 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as e:
            TrainingArgs(**kwargs)
        assert message in str(e.value), kwargs
    TrainingArgs(scale_learning_rate=None, min_lr_ratio=0, grad_clip=0)  # the edges are fine


# ---------------------------------------------------------------------------
# Bad training data
# ---------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10"


def test_binary_files_are_refused_by_name(tmp_path):
    png = tmp_path / "notes.txt"
    png.write_bytes(PNG)
    with pytest.raises(ValueError, match=rf"^{png} is a binary file, not text \(a NUL byte at offset 8\)"):
        data.load_documents(png)
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.py").write_text("print('hello')\n")
    (folder / "sub" / "image.md").write_bytes(PNG)
    with pytest.raises(ValueError, match=r"corpus/sub/image\.md is a binary file"):
        data.load_documents(folder)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{latin} is not UTF-8 text \(byte b'\\xe9' at offset 3\)"):
        data.load_documents(latin)
    (tmp_path / "ok.txt").write_text("caf\xe9 \u00fcber \U0001f600\n")
    assert data.load_documents(tmp_path / "ok.txt")[0].text == "caf\xe9 \u00fcber \U0001f600\n"


@pytest.mark.parametrize("line,message", [
    ("42", "is a number, not a JSON object"),
    ('"just a string"', "is a string, not a JSON object"),
    ("[1, 2]", "is an array, not a JSON object"),
    ("null", "is null, not a JSON object"),
    ("true", "is a boolean, not a JSON object"),
    ('{"prompt": 1, "completion": "x"}', "'prompt' and 'completion' must both be strings"),
    ('{"text": 5}', "the text is int, not a string"),
    ("{", "is not valid JSON"),
])
def test_jsonl_lines_that_are_not_documents_name_file_and_line(tmp_path, line, message):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(ValueError) as e:
        data.load_documents(p)
    assert str(e.value).startswith(f"{p}:3") and message in str(e.value)


def test_jsonl_line_that_is_not_utf8(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"^{p}:2 is not UTF-8 text"):
        data.load_documents(p)


@pytest.fixture()
def chat_tokenizer(tokenizer_dir):
    """A fresh tokenizer whose chat template each test sets."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(tokenizer_dir)


def _chat_file(tmp_path, messages=None):
    p = tmp_path / "chat.jsonl"
    msgs = messages if messages is not None else [{"role": "user", "content": "hi"}]
    p.write_text(json.dumps({"text": "first"}) + "\n" + json.dumps({"messages": msgs}) + "\n")
    return p


@pytest.mark.parametrize("template,message", [
    ("{{ messages.append(1) }}", "SecurityError: access to attribute 'append' of 'list' object is unsafe"),
    ("{{ ''.__class__.__mro__ }}", "SecurityError"),
    ("{{ raise_exception('no system messages') }}", "TemplateError: no system messages"),
    ("{{ range(200000) | list }}", "OverflowError: Range too big"),
    ("{% for m in messages %}{{ m.content ", "TemplateSyntaxError"),
])
def test_chat_template_errors_name_file_and_line(tmp_path, chat_tokenizer, template, message):
    chat_tokenizer._tokenizer.chat_template = template
    p = _chat_file(tmp_path)
    with pytest.raises(ValueError) as e:
        data.load_documents(p, chat_tokenizer)
    text = str(e.value)
    assert text.startswith(f"{p}:2: the tokenizer's chat template failed on this document") and message in text


def test_chat_template_that_never_finishes_is_stopped(tmp_path, chat_tokenizer, monkeypatch):
    monkeypatch.setattr(data, "TEMPLATE_TIME_LIMIT_S", 0.5)
    chat_tokenizer._tokenizer.chat_template = (
        "{% for i in range(99999) %}{% for j in range(99999) %}{{ '' }}{% endfor %}{% endfor %}"
    )
    p = _chat_file(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=rf"^{p}:2: the tokenizer's chat template ran longer than 0.5 s"):
        data.load_documents(p, chat_tokenizer)
    assert time.monotonic() - t0 < 10
    # the alarm is gone: a good template renders afterwards
    chat_tokenizer._tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert [d.text for d in data.load_documents(p, chat_tokenizer)] == ["first", "hi"]


def test_chat_messages_of_the_wrong_shape(tmp_path, chat_tokenizer):
    chat_tokenizer._tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for bad in ("hello", [], ["hello"]):
        p = _chat_file(tmp_path, bad)
        with pytest.raises(ValueError, match=rf"^{p}:2: 'messages' must be a non-empty list of objects"):
            data.load_documents(p, chat_tokenizer)


def test_train_cli_names_the_binary_data_file(tmp_path, tokenizer, capsys):
    model, config = tiny.make_model("llama", 0)
    fp = tiny.save_fp_model(model, config, tokenizer, tmp_path / "fp")
    png = tmp_path / "photo.txt"
    png.write_bytes(PNG)
    err = _cli_error(capsys, job.main, ["--model", str(fp), "--data", str(png), "--out", str(tmp_path / "o"),
                                        "--steps", "2", "--seq-len", "16", "--no-progress"])
    assert f"error: {png} is a binary file, not text" in err
    assert not (tmp_path / "o").exists()
