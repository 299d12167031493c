"""mlxqat: quantization-aware training for MLX language models.

    import mlxqat
    mlxqat.prepare(model, "int4")     # fake-quant layers swapped in place
    ...                               # train (mlxqat.train)
    mlxqat.convert(model)             # real quantized layers, same numbers
    mlxqat.save(model, tokenizer, "out/")   # mlx_lm.load("out/") opens it
"""

from . import quant, recipes
from ._version import __version__
from .convert import calibrate, convert, dequantize, prepare, use_kernel
from .layers import ActQuantizedLinear, FakeQuantEmbedding, FakeQuantLinear
from .recipes import LayerSpec, Recipe
from .storage.load import load, verify
from .storage.manifest import IntegrityError
from .storage.save import save
from .training.args import TrainingArgs
from .training.finetune import finetune
from .training.loop import train

__all__ = [
    "__version__",
    "ActQuantizedLinear",
    "FakeQuantEmbedding",
    "FakeQuantLinear",
    "IntegrityError",
    "LayerSpec",
    "Recipe",
    "TrainingArgs",
    "calibrate",
    "convert",
    "dequantize",
    "finetune",
    "load",
    "prepare",
    "quant",
    "recipes",
    "save",
    "train",
    "use_kernel",
    "verify",
]
