"""QAT as the product runs it: the recipe's measured defaults, training, and the best step kept.

:func:`quantize_qat` is the one QAT pipeline: ``python -m mlxqat.train`` calls
it, and so does ``benchmarks/quality.py``, so the figures the benchmark reports
are the ones a user gets. It prepares the student with the recipe's QAT form
(:meth:`Recipe.for_qat`: learned scales from a clip search where the format
keeps them; with ``ptq_start``, each linear layer set to its best post-training
quantization by :func:`mlxqat.ptq.ptq_start`), fills the learning rates and
warmup the recipe's bit width measured best at (:meth:`Recipe.qat_defaults`),
trains, and, given selection
windows, keeps the parameters of the step with the lowest KL to the teacher on
them (step 0, the starting point, included: QAT never returns a model worse on
them than the one it started from).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .. import ptq, quant
from .. import recipes as recipes_mod
from ..convert import prepare_calibrated, recipe_of
from ..data import spread
from ..evaluate import EVAL_LOGIT_BYTES, evaluate
from ..head import split_head
from ..layers import is_fake_quant, untie_weights
from ..storage.destinations import work_dir
from .args import TrainingArgs
from .checkpoints import TEACHER_CACHE, recipe_difference
from .loop import prefill_teacher_targets, train
from .teacher import CachedTeacher, HiddenStateTeacher, TeacherTargets

# TrainingArgs fields that default to the recipe's measured values when not given
RECIPE_DEFAULTED = ("learning_rate", "scale_learning_rate", "warmup_steps")
# held-out windows the best step is picked on, by KL to the teacher at every log record (log_every steps),
# set aside (mlxqat.data.split_selection) from the validation windows of the job's before/after table
SELECT_WINDOWS = 16
EVAL_WINDOWS = 128
# calibration windows of the PTQ start (mlxqat.ptq.ptq_start), spread over the training windows
PTQ_WINDOWS = 32


def qat_args(recipe, **overrides) -> TrainingArgs:
    """:class:`TrainingArgs` with the recipe's QAT defaults for any of :data:`RECIPE_DEFAULTED` not given
    (or given as ``None``); with ``trainable="scales"`` the scales' rate is the recipe's scales-only one."""
    recipe = recipes_mod.get(recipe)
    defaults = recipe.qat_defaults()
    kw = {k: v for k, v in overrides.items() if v is not None or k not in RECIPE_DEFAULTED}
    if kw.get("trainable") == "scales" and defaults.scales_only_learning_rate is not None:
        kw.setdefault("scale_learning_rate", defaults.scales_only_learning_rate)
    if "learning_rate" in kw and "scale_learning_rate" not in kw:
        kw["scale_learning_rate"] = None  # follows the given learning rate (TrainingArgs.scale_lr)
    for name in RECIPE_DEFAULTED:
        kw.setdefault(name, getattr(defaults, name))
    return TrainingArgs(**kw)


class BestStep:
    """A training callback: KL to the teacher on held-out windows at every log record; keeps the best.

    The teacher's logits on the windows are the same at every check: when they take at most
    :data:`~mlxqat.evaluate.EVAL_LOGIT_BYTES` (one evaluation batch's worth), they are computed at the
    first check and kept (:class:`~mlxqat.training.teacher.CachedTeacher`, whole batches, so the same
    numbers). The student's fake-quant weights are quantized once per check (:func:`~mlxqat.evaluate.evaluate`).
    """

    def __init__(self, model: nn.Module, windows: np.ndarray, teacher, then: Optional[Callable] = None):
        self.model, self.windows, self.teacher, self.then = model, windows, teacher, then
        vocab = getattr(getattr(model, "args", None), "vocab_size", None)
        shape = np.shape(windows)
        if (isinstance(vocab, int) and not isinstance(teacher, CachedTeacher)
                and shape[0] * (shape[1] - 1) * vocab * 4 <= EVAL_LOGIT_BYTES):
            self.teacher = CachedTeacher(teacher, max_bytes=EVAL_LOGIT_BYTES)  # every row fits: kept whole
        self.history: List[Tuple[int, float]] = []
        self.best: Optional[Tuple[float, int, dict]] = None
        self.check(0)

    def check(self, step: int) -> None:
        self.model.eval()
        kl = evaluate(self.model, self.windows, self.teacher)["kl"]
        self.model.train()
        self.history.append((step, kl))
        if self.best is None or kl < self.best[0]:
            self.best = (kl, step, dict(tree_flatten(self.model.trainable_parameters())))

    def __call__(self, record: dict) -> None:
        self.check(record["step"])
        if self.then is not None:
            self.then(dict(record, select_kl=self.history[-1][1]))

    def restore(self) -> int:
        """Put the best parameters back into the model; returns their step."""
        self.model.update(tree_unflatten(list(self.best[2].items())), strict=False)
        return self.best[1]


def quantize_qat(
    student: nn.Module,
    teacher,
    train_windows: np.ndarray,
    recipe="int4",
    *,
    select_windows: Optional[np.ndarray] = None,
    learn_scales: Optional[bool] = None,
    scale_init: Optional[str] = None,
    out_dir=None,
    resume: bool = False,
    progress: bool = True,
    callback: Optional[Callable[[dict], None]] = None,
    scale_dtype: Optional[str] = None,
    ptq_start: bool = True,
    ptq_windows: int = PTQ_WINDOWS,
    **training_kwargs,
) -> dict:
    """Prepare ``student`` with ``recipe``'s QAT form and train it towards ``teacher`` (not converted).

    Args:
        student: the full-precision model to quantize (float32 recommended on CPU), or one already
            prepared with the recipe this call trains (e.g. by :func:`mlxqat.training.blockwise.blockwise_qat`).
        teacher: the frozen full-precision model (or any callable giving its logits).
        train_windows: token windows ``(n, seq_len + 1)``.
        recipe: a recipe name or :class:`~mlxqat.recipes.Recipe`.
        select_windows: held-out windows to pick the best step on (KL to the teacher,
            checked at every ``log_every`` steps and at step 0); ``None``: keep the last step.
        learn_scales, scale_init: override :meth:`Recipe.for_qat`'s choice.
        out_dir, resume, progress, callback: as :func:`mlxqat.training.loop.train`.
        scale_dtype: the dtype scales and biases are stored in (``"float16"``: what a saved
            model holds): derived scales are rounded to its values as they are computed, learned
            ones after training, so saving loses nothing; ``None``: leave them in the compute dtype.
        ptq_start: start each fake-quant linear layer from the best post-training quantization of it
            (:func:`mlxqat.ptq.ptq_start`: round-to-nearest, clip searches and GPTQ, whichever has the
            lowest output error on calibration inputs) instead of the recipe's round-to-nearest start.
        ptq_windows: how many training windows (spread over them) calibrate the PTQ start.
        training_kwargs: :class:`~mlxqat.training.args.TrainingArgs` fields; learning rates and
            warmup default to :meth:`Recipe.qat_defaults` (see :func:`qat_args`).

    Returns:
        The training summary, plus ``recipe`` (what was trained), ``args``,
        ``best_step`` and ``selection_kl`` (``[(step, kl)]``) when selecting, and ``ptq``
        (:func:`mlxqat.ptq.ptq_start`'s report) with ``ptq_start``.
    """
    trained, args, ptq_report = _prepare_qat(student, train_windows, recipe, learn_scales=learn_scales,
                                             scale_init=scale_init, scale_dtype=scale_dtype, ptq_start=ptq_start,
                                             ptq_windows=ptq_windows, progress=progress, **training_kwargs)
    selector = BestStep(student, select_windows, teacher, callback) if select_windows is not None else None
    summary = train(student, teacher, train_windows, None, args, out_dir=out_dir, resume=resume,
                    progress=progress, callback=selector or callback)
    summary.update(recipe=trained.to_dict(), args=dataclasses.asdict(args))
    if ptq_report is not None:
        summary["ptq"] = ptq_report
    if selector is not None:
        summary["best_step"] = selector.restore()
        summary["selection_kl"] = selector.history
    if scale_dtype is not None:
        snap_learned_scales(student, scale_dtype)
    return summary


def shared_student(teacher: nn.Module, config: dict) -> nn.Module:
    """A second model of ``teacher``'s architecture (mlx-lm ``config``) holding the very same
    weight arrays: the student starts as the teacher without a copy. MLX arrays never change in
    place, so training gives the student new arrays for what it changes, and whatever it leaves
    (norms, blocks not trained yet, weights whose codes are frozen) stays shared with the teacher."""
    # lazy: mlx_lm imports transformers (about 1 s); `import mlxqat` does not need it
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    student = model_class(args_class.from_dict(config))  # its own initial weights are never computed
    weights = dict(tree_flatten(teacher.parameters()))
    if hasattr(student, "sanitize"):  # as mlx-lm's loader does: e.g. a tied Gemma 3 head drops its lm_head
        weights = student.sanitize(weights)
    student.load_weights(list(weights.items()), strict=True)  # the same arrays; every one, in its place
    student.unfreeze()
    return student


def prepare_student(student: nn.Module, recipe, windows: np.ndarray) -> nn.Module:
    """:func:`~mlxqat.convert.prepare_calibrated` ``student`` with ``recipe``, or, when it already has
    fake-quant layers, check that they are that recipe's and leave them (their training kept).

    Raises:
        ValueError: the student was prepared with another recipe.
    """
    if not any(is_fake_quant(m) for _, m in student.named_modules()):
        return prepare_calibrated(student, recipe, windows)

    have = recipe_of(student)
    if have is None or have.to_dict() != recipe.to_dict():
        what = recipe_difference(have.to_dict(), recipe.to_dict()) if have is not None else "no recipe"
        raise ValueError(f"the student is already prepared, with {what}; pass the full-precision model, "
                         "or prepare it with the recipe this run trains")
    return student


def prepare_qat(student: nn.Module, train_windows: np.ndarray, recipe="int4", *, learn_scales: Optional[bool] = None,
                scale_init: Optional[str] = None, scale_dtype: Optional[str] = None, ptq_start: bool = True,
                ptq_windows: int = PTQ_WINDOWS, **training_kwargs) -> Tuple["recipes_mod.Recipe", TrainingArgs]:
    """The student as :func:`quantize_qat` trains it, in place: the recipe's QAT form, calibrated, started
    from the best post-training quantization with ``ptq_start``, and untied.

    Arguments as :func:`quantize_qat`'s. Returns ``(recipe, args)``: the recipe the student
    was prepared with and the :class:`~mlxqat.training.args.TrainingArgs` to train it with.
    """
    trained, args, _ = _prepare_qat(student, train_windows, recipe, learn_scales=learn_scales, scale_init=scale_init,
                                    scale_dtype=scale_dtype, ptq_start=ptq_start, ptq_windows=ptq_windows,
                                    **training_kwargs)
    return trained, args


def _prepare_qat(student: nn.Module, train_windows: np.ndarray, recipe, *, learn_scales, scale_init, scale_dtype,
                 ptq_start: bool, ptq_windows: int, progress: bool = False,
                 **training_kwargs) -> Tuple["recipes_mod.Recipe", TrainingArgs, Optional[dict]]:
    """:func:`prepare_qat`, also returning :func:`mlxqat.ptq.ptq_start`'s report (``None`` without ``ptq_start``)."""
    if ptq_start and not (isinstance(ptq_windows, int) and ptq_windows >= 1):
        raise ValueError(f"ptq_windows={ptq_windows!r}: give the number of calibration windows, e.g. {PTQ_WINDOWS}")
    base = recipes_mod.get(recipe)
    if scale_dtype is not None:
        base = base.with_options(scale_dtype=scale_dtype)
    args = qat_args(base, **training_kwargs)
    trained = base.for_qat(args.trainable, learn_scales, scale_init)
    fresh = not any(is_fake_quant(m) for _, m in student.named_modules())
    prepare_student(student, trained, train_windows)
    report = None
    if ptq_start and fresh:
        report = ptq.ptq_start(student, spread(np.asarray(train_windows), ptq_windows), progress=progress)
    elif ptq_start:  # its layers were prepared (and trained, block-wise) before: they are the start
        report = {"skipped": "the student was prepared before; its layers keep their state"}
    if args.trainable == "all" and args.quant_delay == 0:
        untie_weights(student)  # same codes; the first update does not flip every boundary weight at once
    return trained, args, report


def release_teacher(teacher, train_windows: np.ndarray, kept_windows: Optional[np.ndarray], args: TrainingArgs,
                    out_dir, *, progress: bool = True):
    """The teacher as training with cached top-k targets needs it: everything else of it can be freed.

    Fills the top-k cache under ``out_dir`` (where :func:`mlxqat.training.loop.train` reads it) for every
    micro-batch of ``args.steps`` steps (:func:`~mlxqat.training.loop.prefill_teacher_targets`), then
    returns a :class:`~mlxqat.training.teacher.HiddenStateTeacher` holding the teacher's final hidden states
    on ``kept_windows`` (selection / evaluation windows, which still need its logits) and its head.
    Once the caller drops its own reference to ``teacher``, the teacher's body is freed for the
    whole of training. A teacher that does not split into body and head
    (:func:`mlxqat.head.split_head`) is returned as it is.

    Raises:
        ValueError: ``args.teacher_top_k`` is 0 (live targets need the whole teacher).
    """
    if not args.teacher_top_k:
        raise ValueError("release_teacher needs cached targets: set teacher_top_k (e.g. 64)")
    if split_head(teacher) is None:
        return teacher
    work = work_dir(out_dir)
    if progress:
        print(f"caching the teacher's top-{args.teacher_top_k} logits for {args.steps} steps ...", flush=True)
    targets = TeacherTargets(teacher, args.teacher_top_k, work / TEACHER_CACHE, chunk=args.loss_chunk)
    group = mx.distributed.init()  # each process caches the micro-batches it trains on
    prefill_teacher_targets(targets, train_windows, args, rank=group.rank(), world=group.size(), progress=progress)
    kept = kept_windows if kept_windows is not None else np.zeros((0, args.seq_len + 1), np.int32)
    return HiddenStateTeacher(teacher, kept)


def snap_learned_scales(model: nn.Module, dtype: str) -> None:
    """Round every learned scale/bias to ``dtype`` values (:func:`mlxqat.quant.snap_to`), in place."""
    dt = getattr(mx, dtype)
    for _, m in model.named_modules():  # K-quant scales are on their own grid (float32), not snapped
        if is_fake_quant(m) and m.spec.learn_scales and "scales" in m and m.spec.mode != "kquant":
            m.scales, m.biases = quant.snap_to(dt, m.scales), quant.snap_to(dt, m.biases)
