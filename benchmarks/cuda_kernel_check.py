"""Check and benchmark the CUDA twin of the int4 kernel on an NVIDIA GPU.

On a machine with an NVIDIA GPU:

    python benchmarks/cuda_kernel_check.py --install     # pip install "mlx[cuda13]", then run
    python benchmarks/cuda_kernel_check.py               # MLX's CUDA build already installed

It (1) compares the CUDA source MLX generates for our kernel with the one
``tools/metal_emu`` assembles for CPU emulation, (2) runs the correctness grid
(dtypes x group sizes x decode/prefill rows x shapes) through
``int4_matmul(backend="cuda")`` against ``mx.quantized_matmul`` with the
tolerance of ``mlxqat.kernels.check``, and (3) times our kernel, MLX's
``quantized_matmul`` and a dense float16 matmul on 0.5B-8B model shapes,
reporting GB/s against the card's measured copy bandwidth. Results go to
benchmarks/results/kernels_cuda.json.

Without a GPU, ``--emulate`` runs step (2) on the CPU through the emulator
(the CUDA source run by ``cuda_shim.h``); CI never depends on this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from metal_emu.grid import DTYPES, make_problem, normalized_body, run_grid  # noqa: E402  (tools/, not installed)
from mlxqat.kernels import int4_matmul, source  # noqa: E402

def compare_generated_source() -> bool:
    """Print whether MLX's generated CUDA source equals the emulator's assembly,
    for every activation dtype and both variants (decode, prefill)."""
    import contextlib
    import difflib
    import io
    import tempfile

    from metal_emu.emulator import _FENCE, _stdout_to, cuda_source

    all_same = True
    for dtype in DTYPES:
        for m in (3, 40):
            x, wq, s, b = make_problem(dtype, 64, m, 36, 320)
            plan = source.launch(x, wq, s, b, 64)
            spec = source.kernel_spec(plan.variant, "cuda")
            kernel = mx.fast.cuda_kernel(**spec)
            with tempfile.TemporaryDirectory() as tmp:
                log = Path(tmp) / "out.txt"
                with _stdout_to(log), contextlib.redirect_stdout(io.StringIO()):
                    mx.eval(kernel(**plan.call, verbose=True))
                printed = _FENCE.search(log.read_text())
            if not printed:
                print("MLX printed no CUDA source; cannot compare")
                return False
            mlx_src = normalized_body(printed.group("src"))
            emu_src = normalized_body(cuda_source(spec, plan.call).source)
            if mlx_src != emu_src:
                all_same = False
                print(f"{dtype} {plan.variant}: MLX's generated CUDA source DIFFERS from the emulator's assembly")
                diff = difflib.unified_diff(emu_src.splitlines(), mlx_src.splitlines(), "emulator", "mlx",
                                            lineterm="", n=1)
                print("\n".join(list(diff)[:60]))
    if all_same:
        print("MLX's generated CUDA source matches the emulator's assembly (3 dtypes x decode/prefill)")
    return all_same


def timed(fn, reps: int) -> float:
    mx.eval(fn())
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    return (time.perf_counter() - t) / reps


def copy_bandwidth_gbs() -> float:
    """Achievable device bandwidth: read + write of a 1 GiB array."""
    a = mx.zeros((1 << 28,), dtype=mx.float32)
    mx.eval(a)
    t = timed(lambda: a + 1.0, 20)
    return 2 * a.nbytes / t / 1e9


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "unknown NVIDIA GPU"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown NVIDIA GPU"


def benchmark(quick: bool, group_size: int = 64) -> list[dict]:
    from kernel_speed import QUICK_SHAPES, SHAPES, quantized_bytes  # benchmarks/kernel_speed.py

    rows = [1, 2, 4, 8, 512]
    results = []
    dt = mx.float16
    print("| model | proj | K | N | M | mlxqat us | MLX qmm us | dense fp16 us | mlxqat GB/s | MLX GB/s "
          "| dense GB/s | speedup vs MLX |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, proj, k, n in QUICK_SHAPES if quick else SHAPES:
        mx.random.seed(0)
        w = (mx.random.normal((n, k)) * 0.02).astype(dt)
        wq, s, b = mx.quantize(w, group_size, 4)
        mx.eval(w, wq, s, b)
        for m in rows:
            x = mx.random.normal((m, k)).astype(dt)
            io = (m * k + m * n) * 2
            reps = 20 if m > 8 else 100
            t_ours = timed(lambda: int4_matmul(x, wq, s, b, group_size, backend="cuda"), reps)
            t_mlx = timed(lambda: mx.quantized_matmul(x, wq, s, b, group_size=group_size, bits=4), reps)
            t_dense = timed(lambda: x @ w.T, reps)
            qb = quantized_bytes(n, k, group_size, 2) + io
            r = dict(model=model, proj=proj, K=k, N=n, M=m, t_ours_us=1e6 * t_ours, t_mlx_us=1e6 * t_mlx,
                     t_dense_us=1e6 * t_dense, gbs_ours=qb / t_ours / 1e9, gbs_mlx=qb / t_mlx / 1e9,
                     gbs_dense=(n * k * 2 + io) / t_dense / 1e9, speedup_vs_mlx=t_mlx / t_ours)
            results.append(r)
            print(f"| {model} | {proj} | {k} | {n} | {m} | {r['t_ours_us']:.1f} | {r['t_mlx_us']:.1f} "
                  f"| {r['t_dense_us']:.1f} | {r['gbs_ours']:.0f} | {r['gbs_mlx']:.0f} | {r['gbs_dense']:.0f} "
                  f"| {r['speedup_vs_mlx']:.2f}x |", flush=True)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--install", action="store_true",
                    help='pip install "mlx[cuda13]" (or --cuda-extra) into this interpreter, then run')
    ap.add_argument("--cuda-extra", default="cuda13", help="mlx extra to install: cuda13 or cuda12")
    ap.add_argument("--quick", action="store_true", help="smaller grid and fewer shapes")
    ap.add_argument("--emulate", action="store_true", help="no GPU: run the grid's CUDA source in the CPU emulator")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernels_cuda.json"))
    args = ap.parse_args()

    if args.install:
        subprocess.run([sys.executable, "-m", "pip", "install", "-U", f"mlx[{args.cuda_extra}]"], check=True)
        argv = [a for a in sys.argv[1:] if a != "--install"]
        os.execv(sys.executable, [sys.executable, __file__, *argv])

    cuda = getattr(mx, "cuda", None)
    has_gpu = cuda is not None and cuda.is_available()
    if not has_gpu and not args.emulate:
        sys.exit("No CUDA device in this MLX build: run with --install on an NVIDIA machine, "
                 "or with --emulate to check the CUDA source on the CPU.")
    backend = "cuda" if has_gpu else "emulated-cuda"
    print(f"backend: {backend}" + ("" if has_gpu else " (CPU emulation; nothing here ran on a GPU)"))
    report = dict(meta=dict(backend=backend, mlx=mx.__version__, machine=platform.machine()))
    if has_gpu:
        report["meta"]["gpu"] = gpu_name()
        report["source_matches_emulator"] = compare_generated_source()
    grid = run_grid(backend, args.quick)
    bad = [r for r in grid if not r["ok"]]
    print(f"correctness grid: {len(grid) - len(bad)}/{len(grid)} cases within tolerance"
          + (f"; worst {max(r['error_ratio'] for r in grid):.2f}x" if grid else ""))
    for r in bad:
        print("  FAIL", r)
    report["grid"] = grid
    if has_gpu:
        bw = copy_bandwidth_gbs()
        report["meta"]["copy_bandwidth_gbs"] = bw
        print(f"\n{report['meta']['gpu']}: measured copy bandwidth {bw:.0f} GB/s\n")
        report["benchmark"] = benchmark(args.quick)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
