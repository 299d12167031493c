"""What trains and how fast: the trainable set of each mode, AdamW with low-precision moments, the
per-group optimizer of weights / scales / LoRA, and the learning-rate schedules."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from ..layers import FakeQuantEmbedding, FakeQuantLinear, freeze_codes, weight_released
from ..lora import QALoRALinear, apply_lora
from .args import TrainingArgs


def lr_schedule(peak: float, args: TrainingArgs) -> Callable:
    """Warmup then cosine / linear decay to ``min_lr_ratio * peak`` (or constant)."""
    decay_steps = max(1, args.steps - args.warmup_steps)
    end = peak * args.min_lr_ratio
    if args.schedule == "cosine":
        main = optim.cosine_decay(peak, decay_steps, end)
    elif args.schedule == "linear":
        main = optim.linear_schedule(peak, end, decay_steps)
    else:
        main = _constant(peak)
    if args.warmup_steps <= 0:
        return main
    warm = optim.linear_schedule(peak / args.warmup_steps, peak, args.warmup_steps - 1) if args.warmup_steps > 1 else _constant(peak)
    return optim.join_schedules([warm, main], [args.warmup_steps])


def _constant(value: float) -> Callable:
    """A schedule that stays at ``value``; an array, as MLX's optimizers expect of a schedule."""
    return lambda _: mx.array(value, dtype=mx.float32)


def set_trainable(student: nn.Module, args: TrainingArgs) -> None:
    """Freeze/unfreeze the student for ``args.trainable``."""
    if args.trainable == "lora":
        if not any(isinstance(m, QALoRALinear) for _, m in student.named_modules()):
            apply_lora(student, args.lora_rank, args.lora_scale, seed=args.seed)
        return
    if args.trainable == "quantized":
        student.freeze()
        layers = [(name, m) for name, m in student.named_modules() if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding))]
        released = [name for name, m in layers if weight_released(m)]
        if released:
            raise ValueError(f"{len(released)} layers (e.g. {released[0]}) have frozen codes and no float weights; "
                             "train them with trainable='scales'")
        for _, m in layers:
            m.unfreeze(keys=[k for k in ("weight", "scales", "biases") if k in m], recurse=False)
        return
    if args.trainable == "all":

        released = [name for name, m in student.named_modules() if weight_released(m)]
        if released:
            raise ValueError(f"{len(released)} layers (e.g. {released[0]}) have frozen codes and no float weights "
                             "left (block-wise QAT or scales-only training released them); train them with "
                             "trainable='scales'")
        student.unfreeze()
        return
    student.freeze()
    n = 0
    for _, m in student.named_modules():
        if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding)) and m.spec.learn_scales:
            freeze_codes(m)
            m.unfreeze(keys=["scales", "biases"], recurse=False)
            n += 1
    if n == 0:
        raise ValueError(
            "trainable='scales' needs learned scales: prepare with a recipe that has "
            "learn_scales=True (e.g. recipes.get('int4', learn_scales=True))"
        )


def _is_scale(path: str, _g=None) -> bool:
    return path.endswith(".scales") or path.endswith(".biases")


def _is_lora(path: str, _g=None) -> bool:
    return path.endswith(".lora_a") or path.endswith(".lora_b")


def stochastic_round(x: mx.array, dtype, key: mx.array) -> mx.array:
    """``x`` (float32) rounded to bfloat16 up or down at random, with the probability that makes
    the result's expectation ``x``: updates smaller than bfloat16's spacing survive on average."""
    if dtype != mx.bfloat16:
        return x.astype(dtype)
    noise = mx.random.randint(0, 1 << 16, x.shape, dtype=mx.uint32, key=key)
    bits = (x.astype(mx.float32).view(mx.uint32) + noise) & 0xFFFF0000  # bfloat16 is float32's top half
    return bits.view(mx.float32).astype(mx.bfloat16)


class LowPrecisionAdamW(optim.AdamW):
    """AdamW whose moments are stored in ``state_dtype``; each update is computed in float32.

    With bfloat16 the moments take half the memory. Storing them rounds stochastically
    (:func:`stochastic_round`): the second moment moves by 0.1% a step (``beta2 = 0.999``),
    below bfloat16's resolution, and round-to-nearest would freeze it. The random bits are
    a function of ``(seed, step, parameter order)``, so a resumed run rounds as an
    uninterrupted one would.
    """

    def __init__(self, *args, state_dtype=mx.bfloat16, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.state_dtype, self.seed = state_dtype, seed
        self._key = None

    def init_single(self, parameter: mx.array, state: dict):
        state["m"] = mx.zeros(parameter.shape, self.state_dtype)
        state["v"] = mx.zeros(parameter.shape, self.state_dtype)

    def apply_gradients(self, gradients: dict, parameters: dict):
        self._key = mx.random.key(self.seed * 1_000_003 + int(self.step.item()))
        return super().apply_gradients(gradients, parameters)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        b1, b2 = self.betas
        self._key, km, kv = mx.random.split(self._key, 3)
        m = state["m"] = stochastic_round(b1 * state["m"].astype(mx.float32) + (1 - b1) * gradient,
                                          self.state_dtype, km)
        v = state["v"] = stochastic_round(b2 * state["v"].astype(mx.float32) + (1 - b2) * mx.square(gradient),
                                          self.state_dtype, kv)
        # AdamW's update of the stored moments: their float32 forms are freed as soon as they are rounded
        dt = gradient.dtype
        m, v = m.astype(dt), v.astype(dt)
        lr = self.learning_rate.astype(dt)
        parameter = parameter * (1 - lr * self.weight_decay)
        if self.bias_correction:
            c1 = (lr / (1 - b1**self.step)).astype(dt)
            c2 = mx.rsqrt(1 - b2**self.step).astype(dt)
            return parameter - c1 * m / (mx.sqrt(v) * c2 + self.eps)
        return parameter - lr * m / (mx.sqrt(v) + self.eps)


def relative_steps(optimizer: optim.Optimizer) -> optim.Optimizer:
    """``optimizer`` (an instance) with each update of a ``scales`` / ``biases`` tensor multiplied by the
    magnitude of its group's scale, ``|scales|``, before it is applied: its learning rate becomes a fraction
    of each group's quantization step (a multiplicative step for the scales, as if ``log |scale|`` trained),
    whatever the layer's or format's scale size; a group whose scale is 0 moves by the layer's mean scale. The magnitudes are read from the parameters at every step,
    so the optimizer's state and checkpoints are those of the plain optimizer."""
    step = optimizer.apply_gradients

    def apply_gradients(gradients: dict, parameters: dict):
        new = step(gradients, parameters)
        old = dict(tree_flatten(parameters))
        out = []
        for k, v in tree_flatten(new):
            group = k.rsplit(".", 1)[0] + ".scales"
            if _is_scale(k) and group in old:
                size = mx.abs(old[group]).astype(v.dtype)
                size = mx.where(size > 0, size, mx.mean(size))  # a zero scale's group moves at the layer's mean
                v = old[k] + size * (v - old[k])
            out.append((k, v))
        return tree_unflatten(out)

    optimizer.apply_gradients = apply_gradients
    return optimizer


class QATOptimizer(optim.MultiOptimizer):
    """AdamW with its own warmup and decay (:func:`lr_schedule`) for each kind of trained parameter.

    The parts are named: ``scales`` (learned scales and biases, ``args.scale_lr``),
    ``lora`` (adapters, ``args.lora_learning_rate``) and ``weights`` (everything
    else, ``args.learning_rate``). :attr:`learning_rate` is the weights' one, the
    rate the training log reports. With ``args.scale_step == "relative"`` the scales' steps are
    relative to each group's scale (:func:`relative_steps`). Their moments are stored in
    ``args.optimizer_state_dtype`` (:class:`LowPrecisionAdamW` for bfloat16).
    """

    def __init__(self, args: TrainingArgs):
        def adamw(peak):
            kw = dict(learning_rate=lr_schedule(peak, args), weight_decay=args.weight_decay)
            if args.optimizer_state_dtype == "float32":
                return optim.AdamW(**kw)
            return LowPrecisionAdamW(**kw, state_dtype=getattr(mx, args.optimizer_state_dtype), seed=args.seed)

        # the order of the parts is the order of their states in a checkpoint
        scales = adamw(args.scale_lr)
        if args.scale_step == "relative":
            scales = relative_steps(scales)
        super().__init__([scales, adamw(args.lora_learning_rate), adamw(args.learning_rate)],
                         [_is_scale, _is_lora])
        self.scales, self.lora, self.weights = self.optimizers

    @property
    def learning_rate(self) -> mx.array:
        return self.weights.learning_rate

    @learning_rate.setter
    def learning_rate(self, value) -> None:
        for o in self.optimizers:
            o.learning_rate = value


def make_optimizer(args: TrainingArgs) -> QATOptimizer:
    """The optimizer :func:`train` uses unless it is given one."""
    return QATOptimizer(args)
