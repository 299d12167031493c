"""Benchmark: mlxqat's int4 matmul vs MLX's quantized_matmul vs a dense matmul.

Shapes are the projections of 0.5B-8B models at decode (M = 1..8 rows) and
prefill (M = 512; 128 with --quick) sizes. On a Mac it measures the Metal kernel; anywhere else
it measures what ``int4_matmul`` runs there (the CPU path) and says so. It
also measures the CPU path's crossover between ``mx.quantized_matmul`` and
dequantize + matmul, which sets ``CPU_QMM_MAX_ROWS``.

    python benchmarks/kernel_speed.py --quick      # under 2 minutes on 2 cores
    python benchmarks/kernel_speed.py              # all shapes

Prints a markdown table and writes JSON (benchmarks/results/kernels_<device>.json).
On Linux run it with Debian's OpenBLAS preloaded (tools/with-blas).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx

from mlxqat.kernels import int4 as int4_mod
from mlxqat.kernels import int4_matmul

# (model, projection, K, N): y = x @ W.T with W (N, K)
SHAPES = [
    ("qwen2.5-0.5b", "qkvo", 896, 896),
    ("qwen2.5-0.5b", "gate/up", 896, 4864),
    ("qwen2.5-0.5b", "down", 4864, 896),
    ("llama-3.2-1b", "qo", 2048, 2048),
    ("llama-3.2-1b", "gate/up", 2048, 8192),
    ("llama-3.2-1b", "down", 8192, 2048),
    ("llama-3.2-3b", "gate/up", 3072, 8192),
    ("llama-3.1-8b", "qo", 4096, 4096),
    ("llama-3.1-8b", "gate/up", 4096, 14336),
    ("llama-3.1-8b", "down", 14336, 4096),
]
QUICK_SHAPES = [SHAPES[1], SHAPES[2], SHAPES[4], SHAPES[7]]
ROWS = [1, 2, 4, 8, 512]
QUICK_ROWS = [1, 4, 8, 128]
CROSSOVER_ROWS = [1, 2, 3, 4, 6, 8]


def timed(fn, reps: int, slow: float = 0.5) -> float:
    """Median seconds of ``mx.eval(fn())`` after one warm-up call; a call
    slower than ``slow`` seconds is timed once (MLX's CPU qmm at prefill)."""
    t = time.perf_counter()
    mx.eval(fn())
    first = time.perf_counter() - t
    if first > slow:
        return first
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def quantized_bytes(n, k, group_size, itemsize):
    return n * k // 2 + 2 * n * (k // group_size) * itemsize


def bench_shape(k, n, m, group_size, dtype, reps):
    mx.random.seed(0)
    w = (mx.random.normal((n, k)) * 0.02).astype(dtype)
    wq, s, b = mx.quantize(w, group_size, 4)
    x = mx.random.normal((m, k)).astype(dtype)
    mx.eval(w, wq, s, b, x)
    io = (m * k + m * n) * dtype.size
    qbytes = quantized_bytes(n, k, group_size, dtype.size) + io
    dbytes = n * k * dtype.size + io
    t_ours = timed(lambda: int4_matmul(x, wq, s, b, group_size), reps)
    t_mlx = timed(lambda: mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=group_size, bits=4), reps)
    t_dense = timed(lambda: x @ w.T, reps)
    return dict(t_ours_ms=1e3 * t_ours, t_mlx_ms=1e3 * t_mlx, t_dense_ms=1e3 * t_dense,
                gbs_ours=qbytes / t_ours / 1e9, gbs_mlx=qbytes / t_mlx / 1e9, gbs_dense=dbytes / t_dense / 1e9,
                speedup_vs_mlx=t_mlx / t_ours)


def cpu_crossover(shapes, group_size, reps):
    """Per shape: time of both CPU variants over M, and the first M where
    dequantize + matmul wins."""
    out = []
    for model, proj, k, n in shapes:
        mx.random.seed(0)
        wq, s, b = mx.quantize(mx.random.normal((n, k)) * 0.02, group_size, 4)
        mx.eval(wq, s, b)
        rows = []
        for m in CROSSOVER_ROWS:
            x = mx.random.normal((m, k))
            mx.eval(x)
            few = timed(lambda: int4_mod.cpu_few_rows(x, wq, s, b, group_size), reps)
            many = timed(lambda: int4_mod.cpu_many_rows(x, wq, s, b, group_size), reps)
            rows.append(dict(m=m, quantized_matmul_ms=1e3 * few, dequantize_matmul_ms=1e3 * many))
        wins = [r["m"] for r in rows if r["dequantize_matmul_ms"] < r["quantized_matmul_ms"]]
        out.append(dict(model=model, proj=proj, K=k, N=n, by_rows=rows, crossover_m=min(wins) if wins else None))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 shapes, M in 1/4/8/128, 3 repetitions")
    ap.add_argument("--group-size", type=int, default=64, help="quantization group size (32, 64, 128)")
    ap.add_argument("--dtype", default=None,
                    help="activation dtype; default float16 on a GPU, float32 on CPU (MLX's CPU fp16 path is slow)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_<device>.json)")
    args = ap.parse_args()

    backend = int4_mod.gpu_backend() or "cpu"
    dtype = getattr(mx, args.dtype or ("float32" if backend == "cpu" else "float16"))
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rows = QUICK_ROWS if args.quick else ROWS
    reps = 3 if args.quick else 10
    if backend == "cpu":
        print("No Metal or CUDA device: measuring int4_matmul's CPU path (mx.quantized_matmul for M <= "
              f"{int4_mod.CPU_QMM_MAX_ROWS}, chunked dequantize + BLAS above), not the GPU kernel.\n")

    results = []
    print(f"| model | proj | K | N | M | mlxqat ms | MLX qmm ms | dense ms | mlxqat GB/s | MLX GB/s "
          f"| dense GB/s | speedup vs MLX |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, proj, k, n in shapes:
        for m in rows:
            r = bench_shape(k, n, m, args.group_size, dtype, reps)
            r.update(model=model, proj=proj, K=k, N=n, M=m)
            results.append(r)
            print(f"| {model} | {proj} | {k} | {n} | {m} | {r['t_ours_ms']:.2f} | {r['t_mlx_ms']:.2f} "
                  f"| {r['t_dense_ms']:.2f} | {r['gbs_ours']:.1f} | {r['gbs_mlx']:.1f} | {r['gbs_dense']:.1f} "
                  f"| {r['speedup_vs_mlx']:.2f}x |", flush=True)

    crossover = None
    if backend == "cpu":
        crossover = cpu_crossover(shapes, args.group_size, reps)
        print("\nCPU path crossover (float32; ms for quantized_matmul / dequantize+matmul):\n")
        print("| model | proj | " + " | ".join(f"M={m}" for m in CROSSOVER_ROWS) + " | dequantize wins from |")
        print("|---|---|" + "---|" * len(CROSSOVER_ROWS) + "---|")
        for c in crossover:
            cells = " | ".join(f"{r['quantized_matmul_ms']:.1f} / {r['dequantize_matmul_ms']:.1f}" for r in c["by_rows"])
            print(f"| {c['model']} | {c['proj']} | {cells} | M={c['crossover_m']} |")

    device = "cpu" if backend == "cpu" else backend
    path = Path(args.out) if args.out else Path(__file__).parent / "results" / f"kernels_{device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(backend=backend, dtype=str(dtype), group_size=args.group_size, quick=args.quick, reps=reps,
                mlx=mx.__version__, machine=platform.machine(), system=platform.system(),
                cpu_qmm_max_rows=int4_mod.CPU_QMM_MAX_ROWS,
                note=("CPU fallback path measured (no GPU); GB/s counts packed weights + scales/biases + x + y"
                      if backend == "cpu" else "GPU kernel measured"))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(meta=meta, results=results, cpu_crossover=crossover), indent=1))
    tmp.replace(path)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
