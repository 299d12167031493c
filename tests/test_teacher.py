"""mlxqat.training.teacher: top-k targets (live, in memory, on disk) and the per-window logits cache."""

import mlx.core as mx
import numpy as np
import pytest

import tiny
from mlxqat.training.teacher import CachedTeacher, TeacherTargets, top_k_logits


class Counting:
    """A model wrapper that counts the rows it computes."""

    def __init__(self, model):
        self.model, self.rows = model, 0

    def __call__(self, x):
        self.rows += x.shape[0]
        return self.model(x)


@pytest.fixture(scope="module")
def model():
    m, _ = tiny.make_model("llama", seed=1)
    return m


def _inputs(seed=0, batch=2, length=12):
    return mx.array(np.random.default_rng(seed).integers(0, tiny.VOCAB, (batch, length)), dtype=mx.int32)


def test_trainer_uses_the_teacher_module():
    assert TeacherTargets is TeacherTargets


@pytest.mark.parametrize("k", [1, 5, 64])
def test_top_k_logits_are_the_largest(k):
    logits = mx.random.normal((3, 7, 100), key=mx.random.key(k))
    vals, ids = top_k_logits(logits, k)
    assert vals.shape == ids.shape == (3, 7, k) and ids.dtype == mx.int32
    ref = np.sort(np.array(logits), axis=-1)[..., ::-1][..., :k]
    assert np.array_equal(np.sort(np.array(vals), axis=-1)[..., ::-1], ref)
    assert np.array_equal(np.take_along_axis(np.array(logits), np.array(ids), -1), np.array(vals))
    assert all(len(set(row)) == k for row in np.array(ids).reshape(-1, k).tolist())  # no token twice


@pytest.mark.parametrize("k", [0, 101])
def test_top_k_out_of_range_is_refused(k):
    with pytest.raises(ValueError, match=f"top_k={k} must be between 1 and the vocabulary size 100"):
        top_k_logits(mx.zeros((1, 2, 100)), k)


def test_live_targets_are_the_teacher_logits(model):
    x = _inputs()
    got = TeacherTargets(model)("step", x)
    assert mx.array_equal(got, model(x)).item()


def test_cached_top_k_equals_live_top_k_and_skips_the_teacher(model, tmp_path):
    x, k = _inputs(1), 16
    live_vals, live_ids = top_k_logits(model(x), k)
    counted = Counting(model)
    targets = TeacherTargets(counted, top_k=k, cache_dir=tmp_path / "cache")
    vals, ids = targets("00000003-0-0", x)
    assert mx.array_equal(vals, live_vals).item() and mx.array_equal(ids, live_ids).item()
    assert counted.rows == 2 and (tmp_path / "cache" / "00000003-0-0.safetensors").exists()
    assert not list((tmp_path / "cache").glob(".*tmp*"))  # written atomically, nothing left behind
    targets("00000003-0-0", x)
    assert counted.rows == 2  # from memory
    # a new run (resume, next epoch) reads the file: same numbers, no teacher
    again = TeacherTargets(Counting(model), top_k=k, cache_dir=tmp_path / "cache")
    v2, i2 = again("00000003-0-0", x)
    assert again.teacher.rows == 0
    assert mx.array_equal(v2, live_vals).item() and mx.array_equal(i2, live_ids).item()


def test_cached_teacher_equals_the_model_and_runs_each_window_once(model):
    counted = Counting(model)
    teacher = CachedTeacher(counted)
    windows = np.array(_inputs(2, batch=5, length=9))  # (5, 9): 8 input tokens each
    teacher.prefill(windows, batch_size=2)
    assert counted.rows == 5 and teacher.calls == 3 and teacher.bytes == 5 * 8 * tiny.VOCAB * 4
    # what the model gives each row in the batch it was computed in (BLAS sums depend on the batch)
    want = mx.concatenate([model(mx.array(windows[i : i + 2, :-1])) for i in range(0, 5, 2)])
    got = teacher(mx.array(windows[[4, 0, 2], :-1]))
    assert counted.rows == 5  # all cached
    assert got.dtype == mx.float32 and mx.array_equal(got, want[mx.array([4, 0, 2])]).item()
    new = _inputs(3, batch=1, length=8)
    got = teacher(mx.concatenate([mx.array(windows[[1], :-1]), new]))
    assert counted.rows == 6  # only the new row ran
    assert mx.array_equal(got[0], want[1]).item() and mx.array_equal(got[1], model(new)[0]).item()
    assert teacher.freeze() is teacher


def test_cached_teacher_over_its_budget_recomputes(model):
    counted = Counting(model)
    teacher = CachedTeacher(counted, max_bytes=8 * tiny.VOCAB * 4)  # room for one row of 8 tokens
    x = _inputs(4, batch=2, length=8)
    first = teacher(x)
    second = teacher(x)
    assert counted.rows == 3  # row 0 kept, row 1 computed twice
    assert mx.array_equal(first[0], second[0]).item() and teacher.bytes == 8 * tiny.VOCAB * 4
    assert mx.allclose(first[1], second[1], atol=1e-5).item()


def test_training_with_a_cached_teacher_matches_the_live_teacher(model, tokenizer):
    """The trainer reads a CachedTeacher exactly as the model it wraps: same losses."""
    import mlxqat

    windows = np.random.default_rng(5).integers(0, tiny.VOCAB, (8, 17))
    args = mlxqat.TrainingArgs(steps=3, batch_size=2, seq_len=16, warmup_steps=0, log_every=1)
    losses = []
    for teacher in (model, CachedTeacher(model)):
        student, _ = tiny.make_model("llama", seed=1)
        mlxqat.prepare(student, "int4")
        losses.append(mlxqat.train(student, teacher, windows, None, args, progress=False)["losses"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-7)
