"""QAT training: it learns, resumes exactly, merges LoRA exactly, runs data-parallel, refuses bad input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlxqat
import tiny
from mlxqat.evaluate import evaluate
from mlxqat.lora import QALoRALinear, apply_lora
from mlxqat.data import iterate_batches
from mlxqat.training.optim import QATOptimizer, lr_schedule
from mlxqat.training.args import TrainingArgs
from mlxqat.training.loop import train

HERE = Path(__file__).parent
SCRIPT = HERE / "train_script.py"


def _corpus_windows(tokenizer, seq_len=32):
    from mlxqat.data import Document, pack, tokenize_documents

    return pack(tokenize_documents([Document("c", tiny.CORPUS * 3)], tokenizer), seq_len)


@pytest.mark.parametrize("trainable,recipe", [("all", "int2"), ("scales", "int3"), ("lora", "int3")])
def test_qat_lowers_loss_and_beats_round_to_nearest(tokenizer, trainable, recipe):
    windows = _corpus_windows(tokenizer)
    teacher, _ = tiny.make_model("llama", 0, scale=3.0)  # peaked logits: quantization hurts visibly
    student, _ = tiny.make_model("llama", 0, scale=3.0)
    rtn, _ = tiny.make_model("llama", 0, scale=3.0)
    learn = trainable == "scales"
    mlxqat.prepare(rtn, mlxqat.recipes.get(recipe, learn_scales=learn))
    mlxqat.prepare(student, mlxqat.recipes.get(recipe, learn_scales=learn))
    val = windows[-4:]
    before = evaluate(rtn, val, teacher)
    lr = {"all": 1e-3, "scales": 1e-3, "lora": 1e-3}[trainable]
    args = TrainingArgs(steps=40, batch_size=4, seq_len=32, learning_rate=lr, scale_learning_rate=1e-3,
                        lora_learning_rate=3e-3, trainable=trainable, warmup_steps=3, log_every=5)
    summary = train(student, teacher, windows[:-4], val, args, progress=False)
    losses = summary["losses"]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert summary["val"]["kl"] < before["kl"]
    # what was trained survives conversion unchanged
    after = summary["val"]
    mlxqat.convert(student)
    converted = evaluate(student, val, teacher)
    assert converted["kl"] == pytest.approx(after["kl"], rel=1e-4, abs=1e-6)


def test_lora_merge_is_exact():
    model, _ = tiny.make_model("qwen3", 4)
    mlxqat.prepare(model, "int4")
    n = apply_lora(model, rank=4, seed=1)
    assert n == 14
    for _, m in model.named_modules():  # as if trained: non-zero adapters
        if isinstance(m, QALoRALinear):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    x = mx.random.randint(0, tiny.VOCAB, (2, 12))
    adapted = model(x)
    base_only = model  # the adapters really change the output
    mlxqat.convert(model)
    assert not any(isinstance(m, QALoRALinear) for _, m in model.named_modules())
    merged = model(x)
    assert float(mx.abs(merged - adapted).max()) <= 1e-5
    assert base_only is model


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    steps = 14
    full = tmp_path / "full"
    subprocess.run([sys.executable, str(SCRIPT), str(full), str(steps)], check=True, timeout=300)
    ref = json.loads((full / "result_0.json").read_text())["losses"]
    assert len(ref) == steps

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(run), str(steps), "--sleep", "0.4"])
    latest = run / "checkpoints" / "latest.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if latest.exists() and json.loads(latest.read_text())["step"] >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "result_0.json").exists(), "the run finished before it was killed"
    subprocess.run([sys.executable, str(SCRIPT), str(run), str(steps), "--resume"], check=True, timeout=300)
    res = json.loads((run / "result_0.json").read_text())
    k = res["resumed_from"]
    assert 6 <= k < steps
    np.testing.assert_allclose(res["losses"], ref[k:], rtol=0, atol=1e-6)
    a = mx.load(str(full / "params_0.safetensors"))
    b = mx.load(str(run / "params_0.safetensors"))
    assert max(float(mx.abs(a[k] - b[k]).max()) for k in a) <= 1e-6


def test_data_parallel_two_processes_match_one(tmp_path):
    """Two processes of 2 windows each are one process stepping on the same 4 windows.

    With ``--grad-accum 2`` one process sums the same two 2-window gradients as the two processes'
    all-reduce does, in the same float32 operations: equal to the last bit. One process taking the 4
    windows in one micro-batch sums in another order: its losses agree to float32 rounding, and so do
    its parameters, except the few where Adam divides a gradient that is itself rounding noise by its
    own root mean square (an update of up to the learning rate, whatever the sign of the noise).
    """
    launch = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")
    if launch is None:
        pytest.fail("mlx.launch is not installed (it ships with mlx)")
    steps, lr = 6, 1e-3  # as train_script.py trains
    for name, extra in (("one", []), ("accum", ["--grad-accum", "2"])):
        subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / name), str(steps), "--global-batch", "4", *extra],
                       check=True, timeout=300)
    two = tmp_path / "two"
    env = dict(os.environ)
    subprocess.run(
        [launch, "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2", "--starting-port", "35517",
         sys.executable, str(SCRIPT), str(two), str(steps), "--global-batch", "4"],
        check=True, timeout=300, env=env,
    )

    def result(run, rank=0):
        params = {k: np.array(v) for k, v in mx.load(str(tmp_path / run / f"params_{rank}.safetensors")).items()}
        return params, json.loads((tmp_path / run / f"result_{rank}.json").read_text())["losses"]

    accum, accum_losses = result("accum")
    for rank in (0, 1):
        params, losses = result("two", rank)
        assert set(params) == set(accum)
        for k in params:
            assert np.array_equal(params[k], accum[k]), (rank, k)
        assert losses == accum_losses
    one, one_losses = result("one")
    # each loss is a mean over 4 x 16 tokens of sums over the vocabulary: float32 rounding is ~1e-7 of it
    np.testing.assert_allclose(one_losses, accum_losses, rtol=1e-5, atol=0)
    diff = np.concatenate([np.abs(one[k] - accum[k]).ravel() for k in one])
    assert np.isfinite(diff).all() and diff.max() <= 2 * steps * lr  # Adam moves a weight <= ~lr a step
    # a parameter off by more than 1e-3 of Adam's total movement is one whose gradient is noise: rare
    assert np.mean(diff > 1e-3 * steps * lr) <= 1e-3, np.sort(diff)[-10:]


def _losses(tmp_path=None, **kw):
    teacher, _ = tiny.make_model("llama", 0, scale=3.0)
    student, _ = tiny.make_model("llama", 0, scale=3.0)
    mlxqat.prepare(student, "int3")
    windows = np.random.default_rng(0).integers(0, tiny.VOCAB, size=(16, 17)).astype(np.int32)
    args = TrainingArgs(steps=4, batch_size=4, seq_len=16, learning_rate=1e-3, warmup_steps=0, **kw)
    return train(student, teacher, windows, None, args, out_dir=tmp_path, progress=False)["losses"]


def test_gradient_checkpointing_and_accumulation_do_not_change_the_math():
    # float32 moments: bfloat16 ones round stochastically, which turns float rounding into bfloat16 steps
    ref = _losses(optimizer_state_dtype="float32")
    np.testing.assert_allclose(_losses(grad_accum=2, optimizer_state_dtype="float32"), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_losses(grad_checkpoint=True, optimizer_state_dtype="float32"), ref, rtol=1e-5,
                               atol=1e-6)


def test_cached_top_k_teacher_equals_live_teacher_when_k_is_the_vocabulary(tmp_path):
    ref = _losses()
    cached = _losses(tmp_path, teacher_top_k=tiny.VOCAB)
    files = list((tmp_path / "teacher_cache").glob("*.safetensors"))
    assert len(files) == 4  # one per micro-batch, written once
    # what the cache holds is the live teacher's logits: every cached row is one training window's, to float
    # precision (the cache computes them in another batch, so summation order may differ)
    teacher, _ = tiny.make_model("llama", 0, scale=3.0)
    windows = np.random.default_rng(0).integers(0, tiny.VOCAB, size=(16, 17)).astype(np.int32)
    live = np.array(teacher(mx.array(windows[:, :-1])))  # (16, 16, vocab)
    for f in files:
        c = mx.load(str(f))
        full = np.zeros(c["values"].shape, np.float32)
        np.put_along_axis(full, np.array(c["ids"]), np.array(c["values"]), axis=-1)
        for row in full:
            assert np.abs(live - row[None]).max(axis=(1, 2)).min() <= 1e-5 * np.abs(live).max()
    # the same targets give the same first losses; later ones may part where a float-order difference flips an
    # int3 code at a rounding boundary (0.2% apart at step 4 with MLX's bundled BLAS), so they only track
    np.testing.assert_allclose(cached[:2], ref[:2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cached, ref, rtol=1e-2)
    # a smaller k: cross-entropy to the renormalised top-k teacher minus its entropy,
    # which is KL(p_k || q_k / Z) - log Z >= 0 with Z = the student's mass on those tokens
    approx = _losses(teacher_top_k=64)
    assert all(np.isfinite(approx)) and min(approx) >= 0 and approx != ref


def test_quant_delay_trains_in_full_precision_first():
    ref = _losses()
    delayed = _losses(quant_delay=2)
    assert delayed[0] < 1e-6  # the student starts equal to the teacher: KL 0
    assert delayed[2] > 1e-3  # then the quantizer switches on
    assert ref[0] > 1e-3


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_every_schedule_warms_up_to_its_peak_as_arrays(schedule, warmup):
    args = TrainingArgs(steps=8, schedule=schedule, warmup_steps=warmup, min_lr_ratio=0.1)
    lr = lr_schedule(1e-3, args)
    values = [lr(mx.array(i)) for i in range(8)]
    assert all(isinstance(v, mx.array) for v in values)  # what MLX's optimizers need of a schedule
    values = [float(v) for v in values]
    assert values[max(warmup - 1, 0)] == pytest.approx(1e-3) and max(values) == pytest.approx(1e-3)
    if warmup > 1:
        assert values[0] == pytest.approx(1e-3 / warmup)
    assert values[-1] == pytest.approx(1e-3) if schedule == "constant" else values[-1] < 1e-3


def test_the_log_reports_the_weights_learning_rate_of_the_named_optimizer_parts():
    teacher, _ = tiny.make_model("llama", 0)
    student, _ = tiny.make_model("llama", 0)
    mlxqat.prepare(student, mlxqat.recipes.get("int3", learn_scales=True))
    args = TrainingArgs(steps=2, batch_size=4, seq_len=16, learning_rate=1e-3, scale_learning_rate=1e-4,
                        lora_learning_rate=1e-2, schedule="constant", warmup_steps=0, log_every=1)
    records = []
    train(student, teacher, _windows(), None, args, progress=False, callback=records.append)
    assert [r["lr"] for r in records] == pytest.approx([1e-3, 1e-3], rel=1e-6)
    opt = QATOptimizer(args)
    assert opt.optimizers == [opt.scales, opt.lora, opt.weights]  # the state order checkpoints hold
    assert [float(o.learning_rate) for o in (opt.scales, opt.lora, opt.weights)] == pytest.approx([1e-4, 1e-2, 1e-3])


def test_relative_scale_steps_move_every_group_by_the_same_fraction_of_its_scale():
    # two layers whose scales differ 1000-fold get the same gradients: absolute steps move the small
    # scales 1000 times further, relative ones move every group's scale and offset by lr x |scale|
    layers = {"a": {"scales": mx.array([[0.001, 0.002]]), "biases": mx.array([[-0.008, 0.004]])},
              "b": {"scales": mx.array([[1.0, 2.0]]), "biases": mx.array([[-8.0, 4.0]])}}
    grads = {k: {"scales": mx.array([[1.0, -1.0]]), "biases": mx.array([[-1.0, 1.0]])} for k in layers}
    steps = {}
    for step in ("absolute", "relative"):
        args = TrainingArgs(steps=2, scale_learning_rate=1e-2, schedule="constant", warmup_steps=0,
                            optimizer_state_dtype="float32", scale_step=step)
        new = QATOptimizer(args).apply_gradients(grads, layers)
        steps[step] = {(k, p): np.array(new[k][p] - layers[k][p]) for k in layers for p in ("scales", "biases")}
    first = np.abs(steps["absolute"]["a", "scales"][0, 0])  # Adam's first step: the same size for every |gradient|
    assert first > 1e-3
    for (k, p), d in steps["absolute"].items():
        np.testing.assert_allclose(np.abs(d), first, rtol=1e-4)
    for (k, p), d in steps["relative"].items():
        np.testing.assert_allclose(d, steps["absolute"][k, p] * np.abs(np.array(layers[k]["scales"])), rtol=1e-4)
        np.testing.assert_allclose(np.abs(d) / np.abs(np.array(layers[k]["scales"])), first, rtol=1e-4)
    dead = {"c": {"scales": mx.array([[0.0, 0.5]]), "biases": mx.array([[-0.05, -1.0]])}}
    args = TrainingArgs(steps=2, scale_learning_rate=1e-2, schedule="constant", warmup_steps=0,
                        optimizer_state_dtype="float32", scale_step="relative")
    moved = QATOptimizer(args).apply_gradients({"c": {"scales": mx.ones((1, 2)), "biases": mx.ones((1, 2))}}, dead)
    assert float(moved["c"]["biases"][0, 0]) != -0.05  # a zero-scale group's offset still trains
    with pytest.raises(ValueError, match="scale_step='log' is not supported"):
        TrainingArgs(scale_step="log")


def test_a_given_optimizer_and_loss_replace_the_defaults():
    teacher, _ = tiny.make_model("llama", 0)
    student, _ = tiny.make_model("llama", 0)
    mlxqat.prepare(student, "int3")
    windows = _windows()
    args = TrainingArgs(steps=3, batch_size=4, seq_len=16, log_every=1)
    first = mx.array(next(iterate_batches(windows, 4, 0))[1])

    def cross_entropy(model, inputs, targets, teacher_out):
        return nn.losses.cross_entropy(model(inputs), targets, reduction="mean")

    expected = cross_entropy(student, first[:, :-1], first[:, 1:], None).item()
    before = dict(tree_flatten(student.trainable_parameters()))
    records = []
    summary = train(student, teacher, windows, None, args, optimizer=optim.SGD(learning_rate=0.0),
                    loss=cross_entropy, progress=False, callback=records.append)
    assert summary["losses"][0] == pytest.approx(expected, rel=1e-6)  # the given loss, not the KL
    assert expected > 1.0  # cross-entropy over 512 tokens, far from the KL of a near copy of the teacher
    assert [r["lr"] for r in records] == [0.0, 0.0, 0.0]  # the given optimizer's rate, logged
    after = dict(tree_flatten(student.trainable_parameters()))
    assert all(mx.array_equal(before[k], after[k]).item() for k in before)  # SGD at rate 0 changed nothing


# ---------------------------------------------------------------------------
# Bad input to the library: vocabulary, unprepared student, checkpoints (issue 11)
# ---------------------------------------------------------------------------


def _windows(seq_len=16, n=16, seed=0):
    return np.random.default_rng(seed).integers(0, tiny.VOCAB, size=(n, seq_len + 1)).astype(np.int32)


def _run(out, steps=4, resume=False, recipe="int3", windows=None, val=None, prepare=True, **kw):
    """A tiny QAT run writing checkpoints and a log under ``out``; returns its summary."""
    teacher, _ = tiny.make_model("llama", 0)
    student, _ = tiny.make_model("llama", 0)
    if prepare:
        mlxqat.prepare(student, recipe)
    kw = dict(dict(batch_size=4, seq_len=16, learning_rate=1e-3, warmup_steps=0, log_every=1, checkpoint_every=2), **kw)
    windows = _windows(kw["seq_len"]) if windows is None else windows
    return train(student, teacher, windows, val, TrainingArgs(steps=steps, **kw), out_dir=out, resume=resume,
                 progress=False)


def test_token_ids_outside_the_vocabulary_are_refused():
    w = _windows()
    w[3, 5] = tiny.VOCAB
    with pytest.raises(ValueError, match=r"^training data holds token id 512, outside the student's vocabulary of "
                                         r"512 tokens \(ids 0\.\.511; the data's ids span \d+\.\.512\); tokenize with"):
        _run(None, windows=w)
    w[3, 5] = -1
    with pytest.raises(ValueError, match=r"^training data holds token id -1, outside"):
        _run(None, windows=w)
    with pytest.raises(ValueError, match=r"^validation data holds token id 9999"):
        _run(None, val=np.full((2, 17), 9999, dtype=np.int32))
    with pytest.raises(ValueError, match=r"teacher_top_k=513 exceeds the vocabulary of 512 tokens; use at most 512"):
        _run(None, teacher_top_k=513)


def test_an_unprepared_student_is_refused():
    with pytest.raises(ValueError, match=r"has no fake-quant layers.*call mlxqat\.prepare\(student, recipe\) first"):
        _run(None, prepare=False)


def test_resume_refuses_other_settings(tmp_path):
    _run(tmp_path)  # a checkpoint at step 2
    ckpt = tmp_path / "checkpoints" / "step_0000002"
    cases = [
        (dict(seq_len=8), "was written with seq_len=16, this run has seq_len=8; resume with --seq-len 16, "
                          "or run without --resume to start over"),
        (dict(batch_size=2), "was written with batch_size=4, this run has batch_size=2; resume with --batch-size 4"),
        (dict(trainable="lora"), "was written with trainable='all', this run has trainable='lora'"),
        (dict(seed=3), "was written with seed=0, this run has seed=3; resume with --seed 0"),
        (dict(scale_step="relative"), "was written with scale_step='absolute', this run has scale_step='relative'"),
        (dict(recipe="int2"), "was written with recipe 'int3', this run has recipe 'int2'; resume with the same --recipe"),
        (dict(recipe=mlxqat.recipes.get("int3", learn_scales=True)),
         "was written with recipe 'int3' with learn_scales=False (now True)"),
        (dict(steps=1), f"--steps 1 is below the step of checkpoint {ckpt} (2); use --steps 2 or more"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError) as e:
            _run(tmp_path, resume=True, **kw)
        assert message in str(e.value), (kw, str(e.value))
        assert str(e.value).startswith("--steps" if "steps" in kw else f"checkpoint {ckpt} was written with")
    assert _run(tmp_path, resume=True, steps=6)["resumed_from"] == 2  # the same settings (and more steps) resume


def test_damaged_checkpoint_or_latest_json_names_the_file_and_the_fix(tmp_path):
    _run(tmp_path)
    ckpts = tmp_path / "checkpoints"
    weights = ckpts / "step_0000002" / "trainable.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    fix = f"delete {ckpts} to start over, or run without --resume"
    with pytest.raises(ValueError, match=r"^checkpoint .*step_0000002 is damaged, its files do not match its manifest "
                                         r"\(.*trainable\.safetensors: content changed.*\); " + re.escape(fix)):
        _run(tmp_path, resume=True)
    weights.write_bytes(good)
    latest = ckpts / "latest.json"
    for text, message in [
        ("{", r"latest\.json is damaged \(JSONDecodeError: "),
        ("[]", r"latest\.json is damaged \(TypeError: "),
        ('{"checkpoint": "step_0000009"}', r"latest\.json names step_0000009, but .*step_0000009 does not exist"),
        ('{"checkpoint": "../../etc"}', r"latest\.json names '\.\./\.\./etc', not a checkpoint directory"),
    ]:
        latest.write_text(text)
        with pytest.raises(ValueError, match=f"^{re.escape(str(ckpts))}/{message}.*{re.escape(fix)}$"):
            _run(tmp_path, resume=True)
    latest.write_text('{"checkpoint": "step_0000002", "step": 2}')
    (ckpts / "step_0000002" / "mlxqat.json").unlink()
    with pytest.raises(ValueError, match=r"^checkpoint .*step_0000002 is incomplete \(.*mlxqat\.json does not exist"):
        _run(tmp_path, resume=True)


def test_keep_checkpoints_deletes_only_our_older_checkpoints(tmp_path):
    from mlxqat.storage.destinations import work_dir

    work_dir(tmp_path)  # a work directory mlxqat made, where someone then put other things
    ckpts = tmp_path / "checkpoints"
    foreign = ckpts / "step_0000000"  # the right name, but not written by mlxqat
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    (ckpts / "step_best").mkdir()
    _run(tmp_path, steps=8, checkpoint_every=1, keep_checkpoints=3)
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "latest.json", "step_0000000", "step_0000005", "step_0000006", "step_0000007", "step_best"]
    assert (foreign / "notes.txt").read_text() == "mine"
    assert json.loads((ckpts / "latest.json").read_text())["checkpoint"] == "step_0000007"
    everything = tmp_path / "all"
    _run(everything, steps=5, checkpoint_every=1, keep_checkpoints=0)
    assert len(list((everything / "checkpoints").glob("step_*"))) == 4


def test_a_users_folder_is_never_a_work_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"folder holding files mlxqat did not write \(notes\.txt\)"):
        _run(tmp_path, steps=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_resumed_log_has_each_step_once(tmp_path):
    _run(tmp_path, steps=5, checkpoint_every=3)  # checkpoint at 3, log records 1..5
    log = tmp_path / "train_log.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 6, "lo')  # a record cut off by a kill
    _run(tmp_path, steps=5, checkpoint_every=3, resume=True)  # steps 4 and 5 run again
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
