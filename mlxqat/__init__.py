"""mlxqat: quantization-aware training for MLX language models.

    import mlxqat
    mlxqat.prepare(model, "int4")     # fake-quant layers swapped in place
    ...                               # train (mlxqat.train)
    mlxqat.convert(model)             # real quantized layers, same numbers
    mlxqat.save(model, tokenizer, "out/")   # mlx_lm.load("out/") opens it
"""

__version__ = "0.1.0"

from . import quant, recipes  # noqa: E402
from .convert import calibrate, convert, dequantize, prepare, use_kernel  # noqa: E402
from .io import IntegrityError, load, save, verify  # noqa: E402
from .layers import ActQuantizedLinear, FakeQuantEmbedding, FakeQuantLinear  # noqa: E402
from .recipes import LayerSpec, Recipe  # noqa: E402
from .trainer import TrainingArgs, train  # noqa: E402

__all__ = [
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
    "load",
    "prepare",
    "quant",
    "recipes",
    "save",
    "train",
    "use_kernel",
    "verify",
]
