"""The Metal kernel (and its CUDA twin), checked without a Mac or a GPU.

MLX prints the exact Metal source of our kernel (``tools/metal_emu``); g++
compiles it with ``metal_shim.h``; the lanes run in lockstep on the CPU; the
result must match ``mx.quantized_matmul`` within the tolerance of
``mlxqat.kernels.check`` (one output ulp: 2**-10 float16, 2**-7 bfloat16, 0
float32; plus 1e-5 of sum |x||W| for float32 summation order). The CUDA
source, assembled as MLX assembles it, runs the same way with ``cuda_shim.h``.
"""

import dataclasses
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from metal_emu.emulator import EmulatorError, MetalEmulator, capture, cuda_source  # noqa: E402
from metal_emu.grid import normalized_body, run_grid  # noqa: E402

from mlxqat.kernels import source  # noqa: E402
from mlxqat.kernels.check import error_ratio  # noqa: E402

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
GROUPS = [32, 64, 128]
ROWS = [1, 2, 3, 5, 8, 9, 40]  # decode kernel with MR = 1, 2, 4, 8; prefill above 8


def shapes(group_size):
    """(N, K): N not a multiple of the 8 or 32 outputs a threadgroup computes;
    K not a multiple of 512, once short (one pass of the lanes) and once long
    (three passes, the last partial)."""
    return [(36, 5 * group_size), (20, group_size * (2048 // group_size + 1))]


def problem(m, n, k, group_size, dtype, seed=0):
    mx.random.seed(seed)
    wq, s, b = mx.quantize(mx.random.normal((n, k)) * 0.05, group_size, 4)
    x = mx.random.normal((m, k)).astype(dtype)
    return x, wq, s.astype(dtype), b.astype(dtype)


def captured(x, wq, s, b, group_size):
    plan = source.launch(x, wq, s, b, group_size)
    spec = source.kernel_spec(plan.variant, "metal")
    return plan, spec, capture(spec, plan.call)


def emulate(emu, x, wq, s, b, group_size, mutate=None, reverse=False):
    plan, spec, kernel = captured(x, wq, s, b, group_size)
    if mutate:
        old, new = mutate
        assert old in kernel.source, f"mutation target {old!r} not in the kernel source"
        kernel = dataclasses.replace(kernel, source=kernel.source.replace(old, new, 1))
    return emu.run(kernel, plan.call, spec["input_names"], spec["output_names"], reverse=reverse)[0]


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    """One emulator per session, with every kernel of the grid compiled at once."""
    e = MetalEmulator(tmp_path_factory.mktemp("metal_emu"))
    kernels = {}
    for dtype in DTYPES:
        for g in GROUPS:
            for m in ROWS:
                n, k = shapes(g)[0]
                kernel = captured(*problem(m, n, k, g, dtype), g)[2]
                kernels[kernel.source] = kernel
    e.build(list(kernels.values()))
    return e


CUDA_ROWS = [3, 40]


@pytest.fixture(scope="session")
def cuda_emu(tmp_path_factory):
    e = MetalEmulator(tmp_path_factory.mktemp("cuda_emu"))
    kernels = {}
    for dtype in DTYPES:
        for g in GROUPS:
            for m in CUDA_ROWS:
                x, wq, s, b = problem(m, *shapes(g)[0], g, dtype)
                plan = source.launch(x, wq, s, b, g)
                kernel = cuda_source(source.kernel_spec(plan.variant, "cuda"), plan.call)
                kernels[kernel.source] = kernel
    e.build(list(kernels.values()))
    return e


def test_captured_source_is_mlx_generated_metal_with_our_body():
    x, wq, s, b = problem(3, 36, 160, 32, mx.float16)
    plan, spec, kernel = captured(x, wq, s, b, 32)
    assert plan.variant == "decode"
    assert source.DECODE_BODY.strip() in kernel.source  # compiled verbatim
    assert "[[kernel]] void custom_kernel_mlxqat_int4_decode" in kernel.source
    assert kernel.template_args == "float16_t, 32, 4"
    names = [p.name for p in kernel.params]
    assert names[:7] == ["x", "x_shape", "w", "w_shape", "scales", "biases", "y"]
    assert {"thread_index_in_simdgroup", "simdgroup_index_in_threadgroup",
            "threadgroup_position_in_grid"} <= set(names)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_metal_kernel_matches_quantized_matmul(emu, dtype, group_size, m):
    for n, k in shapes(group_size):
        x, wq, s, b = problem(m, n, k, group_size, dtype)
        y = emulate(emu, x, wq, s, b, group_size)
        assert y.dtype == dtype and y.shape == (m, n)
        ratio = error_ratio(y, x, wq, s, b, group_size)
        assert ratio <= 1.0, f"M={m} N={n} K={k}: error {ratio:.2f} x tolerance"


@pytest.mark.parametrize("m", CUDA_ROWS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_cuda_twin_matches_quantized_matmul(cuda_emu, dtype, group_size, m):
    for n, k in shapes(group_size):
        x, wq, s, b = problem(m, n, k, group_size, dtype)
        plan = source.launch(x, wq, s, b, group_size)
        spec = source.kernel_spec(plan.variant, "cuda")
        (y,) = cuda_emu.run(cuda_source(spec, plan.call), plan.call, spec["input_names"], spec["output_names"])
        ratio = error_ratio(y, x, wq, s, b, group_size)
        assert ratio <= 1.0, f"CUDA M={m} N={n} K={k}: error {ratio:.2f} x tolerance"


def test_cuda_check_script_runs_its_grid_on_the_emulator(cuda_emu):
    # The grid benchmarks/cuda_kernel_check.py runs on NVIDIA machines, here on the emulator.
    records = run_grid("emulated-cuda", quick=True, emulator=cuda_emu, rows=CUDA_ROWS)
    assert len(records) == 3 * 3 * 2 * 2 and all(r["ok"] for r in records)
    x, wq, s, b = problem(3, 36, 320, 64, mx.float16)
    plan = source.launch(x, wq, s, b, 64)
    ours = cuda_source(source.kernel_spec(plan.variant, "cuda"), plan.call).source
    as_mlx = ours.replace('#include "cuda_shim.h"', '#include "mlx/backend/cuda/device/utils.cuh"\n'
                          '#include <cooperative_groups.h>\n#define inf cuda::std::numeric_limits<float>::infinity()')
    assert normalized_body(as_mlx) == normalized_body(ours)
    assert normalized_body(ours.replace("(4 * i)", "(4 * i + 1)")) != normalized_body(ours)


@pytest.mark.parametrize("m", [5, 40])
def test_lane_order_does_not_matter(emu, m):
    # Reversing the lanes between synchronization points exposes a missing
    # barrier or a read of another lane's result before it was written.
    x, wq, s, b = problem(m, 36, 320, 64, mx.float32)
    fwd = emulate(emu, x, wq, s, b, 64)
    rev = emulate(emu, x, wq, s, b, 64, reverse=True)
    assert mx.array_equal(fwd, rev).item()


@pytest.mark.parametrize("m", [3, 40])
def test_off_by_one_in_unpacking_is_caught(emu, m):
    x, wq, s, b = problem(m, 36, 320, 64, mx.float16)
    good = emulate(emu, x, wq, s, b, 64)
    broken = emulate(emu, x, wq, s, b, 64, mutate=("(word >> (4 * i))", "(word >> (4 * (i + 1)))"))
    assert error_ratio(good, x, wq, s, b, 64) <= 1.0
    assert error_ratio(broken, x, wq, s, b, 64) > 100.0


def test_missing_barrier_is_caught(emu):
    x, wq, s, b = problem(40, 36, 320, 64, mx.float32)
    barrier = "threadgroup_barrier(mem_flags::mem_threadgroup);"
    broken = emulate(emu, x, wq, s, b, 64, mutate=(barrier, ""))
    assert error_ratio(broken, x, wq, s, b, 64) > 100.0


def test_emulated_lm_head_gives_the_same_greedy_tokens(emu):
    from test_kernels import tiny_llama

    model = tiny_llama(tie=False)
    head = model.lm_head  # nn.QuantizedLinear 64 -> 256, group 64
    prompt = [1, 17, 42, 99, 5, 203, 64, 7, 150, 33, 12]
    h = model.model(mx.array([prompt]))[0]  # (11, 64) hidden states entering the head
    want = head(h)
    args = (head.weight, head.scales, head.biases, head.group_size)
    prefill = emulate(emu, h, *args)  # M = 11: prefill kernel
    decode = emulate(emu, h[-1:], *args)  # M = 1: decode kernel
    for y, xin in ((prefill, h), (decode, h[-1:])):
        assert error_ratio(y, xin, *args) <= 1.0
    assert np.array_equal(np.argmax(np.array(prefill), -1), np.argmax(np.array(want), -1))
    assert int(mx.argmax(decode[0]).item()) == int(mx.argmax(want[-1]).item())


# ------------------------------------------ the shim itself (any kernel) --

SHIM_PROBE = """
    uint gid = thread_position_in_grid.x;
    uint tid = thread_index_in_threadgroup;
    threadgroup float vals[64];
    float v = inp[gid];
    vals[tid] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[gid * 6 + 0] = simd_shuffle_down(v, 3);
    out[gid * 6 + 1] = simd_shuffle_xor(v, 5);
    out[gid * 6 + 2] = simd_prefix_exclusive_sum(v);
    out[gid * 6 + 3] = simd_max(v);
    out[gid * 6 + 4] = vals[(tid + 1) % threads_per_threadgroup.x];
    out[gid * 6 + 5] = float(simdgroup_index_in_threadgroup * 100 + thread_index_in_simdgroup);
"""


def run_probe(emu, body, n=96, tg=64):
    spec = dict(name="probe", input_names=["inp"], output_names=["out"], source=body)
    inp = mx.arange(n, dtype=mx.float32) * 0.5 - 7.0
    call = dict(inputs=[inp], grid=(n, 1, 1), threadgroup=(tg, 1, 1), output_shapes=[(n * 6,)],
                output_dtypes=[mx.float32])
    return np.array(emu.run(capture(spec, call), call, ["inp"], ["out"])[0]).reshape(n, 6), np.array(inp)


def test_shim_simd_functions_barrier_and_edge_threadgroup(emu):
    # 96 threads in threadgroups of 64: the second one has 32 threads.
    out, v = run_probe(emu, SHIM_PROBE)
    for gid in range(96):
        lane, base = gid % 32, gid - gid % 32
        group_start, group_size = (0, 64) if gid < 64 else (64, 32)
        tid = gid - group_start
        assert out[gid, 0] == (v[gid + 3] if lane + 3 < 32 else v[gid])
        assert out[gid, 1] == v[base + (lane ^ 5)]
        assert out[gid, 2] == pytest.approx(v[base:gid].sum())
        assert out[gid, 3] == v[base:base + 32].max()
        assert out[gid, 4] == v[group_start + (tid + 1) % group_size]
        assert out[gid, 5] == (tid // 32) * 100 + lane


def test_shim_reports_divergent_simd_function(emu):
    body = """
    float v = inp[thread_position_in_grid.x];
    if (thread_index_in_simdgroup < 16) { v = simd_sum(v); }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[thread_position_in_grid.x] = v;
    """
    with pytest.raises(EmulatorError, match="other lanes of its SIMD group wait at a barrier"):
        run_probe(emu, body)


def test_shim_reports_out_of_bounds_write(emu):
    body = "out[thread_position_in_grid.x * 6 + 6] = inp[thread_position_in_grid.x];"
    with pytest.raises(EmulatorError, match="signal"):
        run_probe(emu, body)
