"""The quality benchmark's llama.cpp row: the q4_0 QAT model and round-to-nearest Q4_0 of the same
full-precision model, both as GGUF files, scored by llama.cpp itself (:mod:`mlxqat.gguf.llamacpp`).

Round-to-nearest is ``python -m mlxqat.export FP_DIR --format gguf --type q4_0``: the gguf
package's reference Q4_0 quantizer on every matrix, the output head at Q8_0 as recipe ``q4_0``
keeps it, so both files have the same layout. Every file is scored on the same held-out windows:
llama.cpp's log-probability of each next token (perplexity), and how often its top-1 token equals
that of the full-precision model's F32 file run by llama.cpp too.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import mlx.nn as nn
import numpy as np

from mlxqat.export import export_gguf
from mlxqat.storage.save import save
from mlxqat.kernels import use_dequantized_matmul


def _saved(model: nn.Module, tokenizer, config: dict, directory: Path) -> Path:
    use_dequantized_matmul(model, enabled=False)  # the model's own layers again, as saved
    save(model, tokenizer, directory, config=config)
    return directory


def _gguf(src: Path, qtype: str) -> Path:
    out = src.parent / f"{src.name}-{qtype}.gguf"
    export_gguf(src, out, qtype, verbose=False)
    return out


def llamacpp_rows(fp_model: nn.Module, qat_model: nn.Module, tokenizer, config: dict, windows: np.ndarray) -> dict:
    """Perplexity and top-1 agreement with full precision, in llama.cpp, of F32, RTN Q4_0 and QAT Q4_0 files."""
    import warnings

    from mlxqat.export import ExportWarning
    from mlxqat.gguf.llamacpp import LlamaCpp

    windows = np.asarray(windows)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="mlxqat-llamacpp-") as tmp:
        work = Path(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExportWarning)  # RTN re-quantizes by design
            fp, qat = _saved(fp_model, tokenizer, config, work / "fp"), _saved(qat_model, tokenizer, config, work / "qat")
            files = {"full precision (F32)": _gguf(fp, "f32"), "RTN Q4_0 (gguf reference quantizer)": _gguf(fp, "q4_0"),
                     "QAT q4_0 (mlxqat export, exact)": _gguf(qat, "q4_0")}
        fp_top1 = None
        for label, path in files.items():
            t0 = time.perf_counter()
            server = LlamaCpp(path, n_ctx=windows.shape[1] + 8)
            got = server.score(windows)
            del server
            ok = got["scored"]  # llama.cpp withholds tokens that end inside a UTF-8 character: the same in every file
            if fp_top1 is None:
                fp_top1 = got["top1"]
            rows[label] = {"ppl": math.exp(-float(got["logprobs"][ok].mean())),
                           "top1_vs_fp": float((got["top1"] == fp_top1)[ok].mean()),
                           "mb": path.stat().st_size / 1e6, "seconds": time.perf_counter() - t0}
            print(f"  llama.cpp {label:<38} ppl {rows[label]['ppl']:.4f}  top-1 = fp {100 * rows[label]['top1_vs_fp']:.2f}%  "
                  f"{rows[label]['mb']:.1f} MB", flush=True)
    return {"rows": rows, "tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
            "how": "llama.cpp (xllamacpp) log-probability of each forced next token, prefix from its prompt cache; "
                   "top-1 agreement with the F32 file's own top-1 in llama.cpp"}
