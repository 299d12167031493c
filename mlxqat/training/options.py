"""The settings of a QAT job as checked objects, built once from the command's flags or :func:`run`'s keywords.

    JobOptions     what ``python -m mlxqat.train`` takes: the model, recipe, data, output, evaluation
    BlockOptions   the block phase of ``--method blockwise`` (``None`` for ``--method qat``)

The training loop's own settings stay in :class:`~mlxqat.training.args.TrainingArgs`; the job
keeps the fields a user gave (``training``) so the recipe can supply its measured defaults for
the rest (:func:`~mlxqat.training.qat.qat_args`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx

from .args import TrainingArgs
from .blockwise import BLOCK_BATCH_SIZE, BLOCK_LEARNING_RATE, BLOCK_WINDOWS, STEPS_PER_BLOCK, TARGETS
from .qat import EVAL_WINDOWS, SELECT_WINDOWS

METHODS = ("qat", "blockwise")


@dataclass(frozen=True)
class BlockOptions:
    """The block phase of block-wise QAT (:func:`~mlxqat.training.blockwise.blockwise_qat`)."""

    steps_per_block: int = STEPS_PER_BLOCK  # optimizer steps per block
    block_windows: int = BLOCK_WINDOWS  # calibration windows, spread over the training windows
    block_batch_size: int = BLOCK_BATCH_SIZE  # windows per block step
    block_learning_rate: float = BLOCK_LEARNING_RATE  # peak rate of a block's weights
    block_scale_learning_rate: Optional[float] = None  # of its learned scales (None: block_learning_rate / 10)
    block_target: str = "fp"  # fp: the full-precision hidden states; same: the fp block on the quantized inputs

    def __post_init__(self):
        if self.block_target not in TARGETS:
            raise ValueError(f"--block-target {self.block_target!r}: use one of {', '.join(TARGETS)}")
        if self.block_windows < self.block_batch_size:
            raise ValueError(f"--block-windows {self.block_windows} is fewer than --block-batch-size "
                             f"{self.block_batch_size}; give more windows or a smaller block batch")

    def blockwise_kwargs(self) -> dict:
        """:func:`~mlxqat.training.blockwise.blockwise_qat`'s keyword arguments (the windows are chosen by the job)."""
        return dict(steps_per_block=self.steps_per_block, batch_size=self.block_batch_size,
                    learning_rate=self.block_learning_rate, scale_learning_rate=self.block_scale_learning_rate,
                    target=self.block_target)


BLOCK_FIELDS = tuple(f.name for f in dataclasses.fields(BlockOptions))
TRAINING_FIELDS = tuple(f.name for f in dataclasses.fields(TrainingArgs))


@dataclass(frozen=True)
class JobOptions:
    """Everything the QAT job takes (see :func:`mlxqat.training.job.run` for each field's meaning)."""

    model: Optional[str] = None
    recipe: str = "int4"
    method: str = "qat"
    data: Optional[str] = None
    out: str = "qat-out"
    resume: bool = False
    learn_scales: Optional[bool] = None
    scale_init: Optional[str] = None
    scale_dtype: Optional[str] = "float16"
    ptq_start: bool = True  # start every linear layer from its best post-training quantization (mlxqat.ptq)
    self_generate: int = 0
    eval_windows: int = EVAL_WINDOWS
    select_windows: int = SELECT_WINDOWS
    save_master: bool = True
    progress: bool = True
    callback: Optional[Callable[[dict], None]] = None
    memory_limit: Optional[float] = None
    block: Optional[BlockOptions] = None  # set exactly when method == "blockwise"
    training: dict = field(default_factory=dict)  # the TrainingArgs fields given; the recipe defaults the rest

    @classmethod
    def from_kwargs(cls, **kwargs) -> "JobOptions":
        """Split :func:`~mlxqat.training.job.run`'s keywords into the job's, the block phase's and the
        training loop's, and refuse combinations that do not apply, before any work."""
        own = {f.name for f in dataclasses.fields(cls)} - {"block", "training"}
        block = {k: kwargs.pop(k) for k in BLOCK_FIELDS if k in kwargs}
        training = {k: kwargs.pop(k) for k in TRAINING_FIELDS if k in kwargs}
        stray = sorted(set(kwargs) - own)
        if stray:
            raise TypeError(f"unexpected option {stray[0]!r}; the job takes {sorted(own | set(BLOCK_FIELDS))} "
                            f"and the TrainingArgs fields")
        method = kwargs.get("method", "qat")
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not supported; use one of {METHODS}")
        given = {k: v for k, v in block.items() if v is not None}
        if training.get("trainable") is None:
            training.pop("trainable", None)
        if method == "qat":
            if given:
                flag = "--" + next(k for k in BLOCK_FIELDS if k in given).replace("_", "-")
                raise ValueError(f"{flag} sets the block phase of --method blockwise; add --method blockwise or drop it")
            return cls(**kwargs, training=training)
        if mx.distributed.init().size() > 1:
            raise ValueError("--method blockwise runs in one process (its block phase is not data-parallel); "
                             "run it without mlx.launch, or use --method qat")
        trainable = training.setdefault("trainable", "scales")
        if trainable != "scales":
            raise ValueError(f"--method blockwise trains every weight block by block, then scales and biases end to "
                             f"end (trainable='scales'); drop --trainable {trainable}")
        return cls(**kwargs, block=BlockOptions(**given), training=training)
