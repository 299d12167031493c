"""Training: QAT by distillation, end to end or block by block, fine-tuning a quantized model, and what they need.

    args.py         TrainingArgs, every field a checked --flag of `python -m mlxqat.train`
    losses.py       KL to the teacher (forward / reverse, temperature), cross-entropy, chunked through the head
    optim.py        what trains in each mode, AdamW with low-precision moments, learning-rate schedules
    checkpoints.py  atomic checkpoints and what a resumed run must share with them
    loop.py         train(): the loop (accumulation, data parallelism, logging, checkpoints)
    teacher.py      the teacher: live, or its top-k logits cached on disk
    qat.py          quantize_qat(): prepare, train, pick the best step (what the job and the benchmarks run)
    blockwise.py    block-wise QAT (EfficientQAT's block phase)
    memory.py       the memory model: a run's peak estimated before it starts
    job.py          `python -m mlxqat.train`: load, baselines, QAT, table, save
    finetune.py     `python -m mlxqat.finetune`: a quantized model trained on a task's completions, saved as it came
"""

from .args import TrainingArgs
from .loop import train

__all__ = ["TrainingArgs", "train"]
