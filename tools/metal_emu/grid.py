"""The int4 kernel's correctness grid (dtypes x group sizes x rows x shapes), run on an NVIDIA GPU
(``backend="cuda"``) or, without one, on the CPU through the emulator (``"emulated-cuda"``).

Used by ``benchmarks/cuda_kernel_check.py`` on a GPU machine and by ``tests/test_metal_emulation.py``.
"""

from __future__ import annotations

import tempfile

import mlx.core as mx

from mlxqat.kernels import int4_matmul, source
from mlxqat.kernels.check import error_ratio

from .emulator import MetalEmulator, cuda_source

DTYPES = ["float16", "bfloat16", "float32"]
GROUPS = [32, 64, 128]
ROWS = [1, 2, 3, 5, 8, 9, 40, 512]
QUICK_ROWS = [1, 5, 40]


def grid_cases(quick: bool, rows=None):
    """(dtype, group_size, M, N, K) of the correctness grid: N not a multiple
    of a threadgroup's outputs; K short, long with a partial last pass, and
    real model widths."""
    for dtype in DTYPES:
        for g in GROUPS:
            shapes = [(36, 5 * g), (20, g * (2048 // g + 1))] + ([] if quick else [(4096, 4096), (896, 4864)])
            for m in rows or (QUICK_ROWS if quick else ROWS):
                for n, k in shapes:
                    yield dtype, g, m, n, k


def make_problem(dtype: str, g: int, m: int, n: int, k: int, seed: int = 0):
    mx.random.seed(seed)
    dt = getattr(mx, dtype)
    wq, s, b = mx.quantize(mx.random.normal((n, k)) * 0.05, g, 4)
    x = mx.random.normal((m, k)).astype(dt)
    return x, wq, s.astype(dt), b.astype(dt)


def run_grid(backend: str, quick: bool, emulator=None, rows=None) -> list[dict]:
    """Run the grid on ``backend`` ("cuda", or "emulated-cuda" on the CPU);
    one record per case with its error ratio (<= 1 passes).

    Args:
        emulator: a ``metal_emu.emulator.MetalEmulator`` to reuse (emulation only).
        rows: values of M to run instead of the default list.
    """
    cases = [(c, make_problem(*c)) for c in grid_cases(quick, rows)]
    outputs = []
    if backend == "cuda":
        for (dtype, g, m, n, k), (x, wq, s, b) in cases:
            outputs.append(int4_matmul(x, wq, s, b, g, backend="cuda"))
    elif backend == "emulated-cuda":
        emu = emulator or MetalEmulator(tempfile.mkdtemp(prefix="cuda_emu_"))
        launches = []
        for (dtype, g, m, n, k), (x, wq, s, b) in cases:
            plan = source.launch(x, wq, s, b, g)
            spec = source.kernel_spec(plan.variant, "cuda")
            launches.append((cuda_source(spec, plan.call), plan, spec))
        if emulator is None:  # compile every kernel in one g++ run
            emu.build(list({k.source: k for k, _, _ in launches}.values()))
        for kernel, plan, spec in launches:
            outputs.append(emu.run(kernel, plan.call, spec["input_names"], spec["output_names"])[0])
    else:
        raise ValueError(f"backend={backend!r}; use 'cuda' or 'emulated-cuda'")
    records = []
    for ((dtype, g, m, n, k), (x, wq, s, b)), y in zip(cases, outputs):
        record = dict(dtype=dtype, group_size=g, M=m, N=n, K=k)
        try:
            ratio = error_ratio(y, x, wq, s, b, g)
            record.update(error_ratio=ratio, ok=ratio <= 1.0)
        except RuntimeError as e:  # a launch or compile failure fails this case, not the run
            record.update(error_ratio=float("inf"), ok=False, error=str(e))
            print(f"  ERROR {dtype} g{g} M={m} N={n} K={k}: {e}", flush=True)
        records.append(record)
    return records


def normalized_body(src: str) -> str:
    """The part of a CUDA kernel source from our prelude on, whitespace-trimmed
    per line: MLX's default header (its CUDA includes) and the emulator's
    (cuda_shim.h) differ by design, the rest must not."""
    start = src.index("// mlxqat int4 matmul, CUDA build")
    return "\n".join(line.rstrip() for line in src[start:].strip().splitlines())


