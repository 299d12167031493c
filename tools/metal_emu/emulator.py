"""Run an ``mx.fast.metal_kernel`` on a Linux CPU, from the exact source MLX generates.

How it works:

1. ``capture(spec, call)`` builds the kernel with ``mx.fast.metal_kernel(**spec)``
   and calls it with ``verbose=True, stream=mx.gpu`` inside ``mx.export_function``
   tracing. Tracing builds the graph without evaluating it, so no GPU is
   needed, and MLX prints the generated Metal source (header, signature with
   buffer and thread-attribute parameters, body, explicit instantiation). We
   read it from file descriptor 1.
2. ``MetalEmulator.build(kernels)`` writes one C++ file: ``metal_shim.h``, then
   each captured source verbatim inside its own namespace (one rewrite:
   ``threadgroup`` array declarations become ``EMU_THREADGROUP``, i.e. shared by
   the threadgroup's lanes), then a launcher per kernel that passes buffers and
   thread attributes by the parameter list MLX printed. It compiles that with
   g++ once (cached by content hash).
3. ``MetalEmulator.run(kernel, call)`` writes the inputs' bytes, runs the
   binary, and returns the outputs as ``mx.array``. Lanes of a SIMD group and of
   a threadgroup run in lockstep (see ``metal_shim.h``); buffers end at a
   protected page, and outputs start as all-ones bytes, so out-of-bounds writes
   and unwritten outputs show up.

A later kernel gets the same check by giving its ``metal_kernel`` arguments and
call arguments to ``capture`` and ``run``; nothing here knows about mlxqat.

Only the text MLX prints is compiled: on a Mac, MLX also prepends its Metal
utilities (``metal_stdlib``, ``bfloat16_t``), which the shim stands in for.

CUDA: a CPU build of MLX cannot print what ``mx.fast.cuda_kernel`` generates
(it raises "No CUDA back-end"), so ``cuda_source(spec, call)`` assembles it
the way MLX 0.32 does (mlx/backend/cuda/custom_kernel.cpp: default header, user
header, ``namespace mlx::core::cu``, a ``__global__`` function whose parameters
are the inputs (with ``_shape``/``_strides``/``_ndim`` when the body names
them) and outputs, template arguments as ``constexpr``/``using`` lines, then
the body), with ``cuda_shim.h`` in place of MLX's CUDA headers. It runs on the
same lockstep runtime, launched like CUDA (whole blocks).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

SHIM_DIR = Path(__file__).resolve().parent
_FENCE = re.compile(r"Generated source code for `(?P<name>[^`]+)`:\n```\n(?P<src>.*?)\n```", re.S)
_PARAM = re.compile(r"^\s*(?P<decl>.+?)\s+(?P<name>\w+)\s*\[\[(?P<attr>\w+)(?:\((?P<idx>\d+)\))?\]\]\s*[,)]")
_INSTANCE = re.compile(r"decltype\((?P<fn>\w+)<(?P<targs>.*)>\)\s*\w+<.*>;\s*$", re.M)
_FUNCTION = re.compile(r"\[\[kernel\]\]\s+void\s+(?P<fn>\w+)\s*\(")
# `threadgroup T name[...]` declarations (not pointers or references).
_TG_ARRAY = re.compile(r"\bthreadgroup\s+(?=[\w:<>, ]+?\s+\w+\s*\[)")
_ATTRS = {
    "thread_position_in_grid", "thread_position_in_threadgroup",
    "threadgroup_position_in_grid", "threads_per_threadgroup",
    "threadgroups_per_grid", "threads_per_grid", "grid_size",
    "thread_index_in_threadgroup", "thread_index_in_simdgroup",
    "simdgroup_index_in_threadgroup", "threads_per_simdgroup",
    "thread_execution_width", "simdgroups_per_threadgroup",
    "thread_index_in_quadgroup", "quadgroup_index_in_threadgroup",
}
_UINT_OF_SIZE = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


class EmulatorError(RuntimeError):
    """The kernel failed to compile or misbehaved when run (message says how)."""


@dataclass(frozen=True)
class Param:
    decl: str  # type as printed, e.g. "const device float*" or "uint3"
    name: str
    buffer: int | None  # buffer index, or None for a thread attribute


@dataclass(frozen=True)
class CapturedKernel:
    name: str  # host name MLX gave the instantiation
    source: str  # exactly what MLX printed (Metal) or built as MLX does (CUDA)
    params: tuple[Param, ...]
    function: str  # (template) function name, qualified for CUDA
    template_args: str | None  # e.g. "float, 64, 1"; None for a kernel without template
    dialect: str = "metal"  # or "cuda"


@contextlib.contextmanager
def _stdout_to(path: Path):
    """Redirect file descriptor 1 (where MLX's C++ code prints) to ``path``."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def parse_source(text: str) -> CapturedKernel:
    """Parse one block printed by ``metal_kernel(..., verbose=True)``."""
    match = _FENCE.search(text)
    if not match:
        raise EmulatorError(f"no generated Metal source in MLX's output:\n{text[:2000]}")
    src = match.group("src")
    params = []
    for line in src.splitlines():
        p = _PARAM.match(line)
        if p:
            idx = p.group("idx")
            if p.group("attr") == "buffer":
                params.append(Param(p.group("decl"), p.group("name"), int(idx)))
            elif p.group("attr") in _ATTRS:
                params.append(Param(p.group("decl"), p.group("name"), None))
            else:
                raise EmulatorError(f"thread attribute [[{p.group('attr')}]] is not emulated")
    inst = _INSTANCE.search(src)  # template kernels end with an explicit instantiation
    if inst:
        return CapturedKernel(match.group("name"), src, tuple(params), inst.group("fn"), inst.group("targs"))
    fn = _FUNCTION.search(src)
    if not fn:
        raise EmulatorError("no [[kernel]] function in the generated source")
    return CapturedKernel(match.group("name"), src, tuple(params), fn.group("fn"), None)


def capture(spec: dict, call: dict) -> CapturedKernel:
    """The Metal source MLX generates for ``metal_kernel(**spec)(**call)``.

    Args:
        spec: keyword arguments of ``mx.fast.metal_kernel``.
        call: keyword arguments of the kernel call (``inputs``, ``template``,
            ``grid``, ``threadgroup``, ``output_shapes``, ``output_dtypes``).
    """
    kernel = mx.fast.metal_kernel(**spec)
    rest = {k: v for k, v in call.items() if k not in ("inputs", "verbose", "stream")}

    def traced(*inputs):
        return kernel(inputs=list(inputs), verbose=True, stream=mx.gpu, **rest)

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "stdout.txt"
        with _stdout_to(log):
            mx.export_function(str(Path(tmp) / "trace.mlxfn"), traced, *call["inputs"])
        return parse_source(log.read_text())


_CUDA_TYPES = {
    mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.uint32: "uint32_t",
    mx.int32: "int32_t", mx.int64: "int64_t", mx.uint8: "uint8_t", mx.bool_: "bool",
}
# MLX's get_type_string: the dtype part of a templated kernel's name.
_TYPE_STRINGS = {
    mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.uint32: "uint32_t",
    mx.int32: "int32_t", mx.int64: "int64_t", mx.uint8: "uint8_t", mx.bool_: "bool",
}


def cuda_source(spec: dict, call: dict) -> CapturedKernel:
    """The CUDA source ``mx.fast.cuda_kernel(**spec)(**call)`` compiles, assembled
    as MLX 0.32 assembles it, with ``cuda_shim.h`` as the default header."""
    body, header = spec["source"], spec.get("header", "")
    params, lines, index = [], [], 0

    def add(decl, name):
        nonlocal index
        params.append(Param(decl, name, index))
        lines.append(f"    {decl} {name}")
        index += 1

    for name, arr in zip(spec["input_names"], call["inputs"]):
        add(f"const {_CUDA_TYPES[arr.dtype]}*", name)
        if arr.ndim > 0:
            if name + "_shape" in body:
                add("const __grid_constant__ Shape", name + "_shape")
            if name + "_strides" in body:
                add("const __grid_constant__ Strides", name + "_strides")
            if name + "_ndim" in body:
                add("const __grid_constant__ int", name + "_ndim")
    for name, dtype in zip(spec["output_names"], call["output_dtypes"]):
        add(f"{_CUDA_TYPES[dtype]}*", name)
    consts, tag = [], ""
    for tname, value in call.get("template", []):
        if isinstance(value, bool):
            consts.append(f"  constexpr bool {tname} = {str(value).lower()};")
            tag += "_t" if value else "_f"
        elif isinstance(value, int):
            consts.append(f"  constexpr int {tname} = {value};")
            tag += f"_{value}"
        else:
            consts.append(f"  using {tname} = {_CUDA_TYPES[value]};")
            tag += "_" + _TYPE_STRINGS[value]
    fn = f"custom_kernel_{spec['name']}{tag}"
    src = (
        '#include "cuda_shim.h"\n' + header
        + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
        + f"__global__ void {fn}(\n" + ",\n".join(lines) + ") {\n"
        + ("\n".join(consts) + "\n\n" if consts else "") + body + "\n}\n\n} // namespace mlx::core::cu\n"
    )
    return CapturedKernel(fn, src, tuple(params), f"mlx::core::cu::{fn}", None, dialect="cuda")


def _launcher(i: int, k: CapturedKernel) -> str:
    args = []
    for p in k.params:
        if p.buffer is None:
            args.append(f"A.{p.name}")
        elif p.decl.endswith("*"):
            args.append(f"reinterpret_cast<{p.decl}>(B[{p.buffer}])")
        else:  # by value or by reference: read it from the buffer
            args.append(f"*reinterpret_cast<{p.decl.rstrip('&').strip()}*>(B[{p.buffer}])")
    joined = ",\n      ".join(args)
    targs = f"<{k.template_args}>" if k.template_args is not None else ""
    return (
        f"namespace k{i} {{\n"
        f"static void body(emu::Lane& L) {{\n"
        f"  const emu::ThreadAttrs A(L);\n"
        f"  void* const* B = emu::dispatch().buffers.data();\n"
        f"  (void)A; (void)B;\n"
        f"  {k.function}{targs}(\n      {joined});\n"
        f"}}\n}}  // namespace k{i}\n"
    )


def program_source(kernels: list[CapturedKernel]) -> str:
    """The C++ program that runs ``kernels`` (index = position in the list)."""
    dialects = {k.dialect for k in kernels}
    if len(dialects) != 1:
        raise EmulatorError("build Metal and CUDA kernels into separate programs")
    metal = dialects == {"metal"}
    parts = ['#include "metal_shim.h"\n' if metal else '#include "cuda_shim.h"\n']
    for i, k in enumerate(kernels):
        src = _TG_ARRAY.sub("EMU_THREADGROUP ", k.source) if metal else k.source
        parts.append(f"namespace k{i} {{\n// {k.name}\n{src}\n}}  // namespace k{i}\n")
    parts.append('#include "shim_main.h"\n')
    parts += [_launcher(i, k) for i, k in enumerate(kernels)]
    bodies = ", ".join(f"k{i}::body" for i in range(len(kernels)))
    parts.append(
        f"static void (*const kBodies[])(emu::Lane&) = {{{bodies}}};\n"
        f"int main(int argc, char** argv) {{\n"
        f"  return emu::run_main(argc, argv, kBodies, {len(kernels)});\n}}\n"
    )
    return "\n".join(parts)


def _raw(a: mx.array) -> bytes:
    a = mx.contiguous(a)
    if a.dtype in (mx.float16, mx.bfloat16, mx.float32, mx.float64):
        a = a.view(_UINT_OF_SIZE[a.dtype.size])
    return np.ascontiguousarray(np.array(a)).tobytes()


class MetalEmulator:
    """Compiles captured kernels (Metal, or CUDA from ``cuda_source``) with g++
    and runs them on the CPU.

    Args:
        workdir: where the program, binary and buffers go (binaries are reused
            across instances by content hash).
        cxx: C++ compiler command.
        opt: optimization flag; ``-O1`` compiles fast and runs fast enough.
    """

    def __init__(self, workdir: str | os.PathLike, cxx: str = "g++", opt: str = "-O1"):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cxx, self.opt = cxx, opt
        self._binaries: dict[str, tuple[Path, dict[str, int]]] = {}
        self._runs = 0

    def build(self, kernels: list[CapturedKernel]) -> Path:
        """Compile ``kernels`` into one binary (skipped if already built)."""
        text = program_source(kernels)
        shim = "".join((SHIM_DIR / f).read_text() for f in ("emu_runtime.h", "metal_shim.h", "cuda_shim.h", "shim_main.h"))
        key = hashlib.sha256((text + shim + self.opt).encode()).hexdigest()[:16]
        if key in self._binaries:
            return self._binaries[key][0]
        cpp = self.workdir / f"emu_{key}.cpp"
        exe = self.workdir / f"emu_{key}"
        if not exe.exists():
            cpp.write_text(text)
            cmd = [self.cxx, "-std=c++17", self.opt, "-Wno-attributes", f"-I{SHIM_DIR}", str(cpp), "-o", str(exe)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise EmulatorError(f"g++ failed on {cpp}:\n{res.stderr[-6000:]}")
        index = {k.source: i for i, k in enumerate(kernels)}
        self._binaries[key] = (exe, index)
        return exe

    def _find(self, kernel: CapturedKernel) -> tuple[Path, int]:
        for exe, index in self._binaries.values():
            if kernel.source in index:
                return exe, index[kernel.source]
        exe = self.build([kernel])
        return exe, 0

    def run(self, kernel: CapturedKernel, call: dict, input_names: list[str], output_names: list[str],
            reverse: bool = False) -> list[mx.array]:
        """Run one launch of ``kernel`` and return its outputs.

        Args:
            kernel: from ``capture`` with the same ``call``.
            call: the kernel call arguments (inputs, grid, threadgroup,
                output_shapes, output_dtypes).
            input_names, output_names: as given to ``mx.fast.metal_kernel``.
            reverse: run lanes in reverse order between synchronization points.

        Raises:
            EmulatorError: the kernel crashed (e.g. out-of-bounds access), hit a
                divergent SIMD function or barrier, or deadlocked.
        """
        exe, which = self._find(kernel)
        self._runs += 1
        tmp = self.workdir / f"run{os.getpid()}_{self._runs}"
        tmp.mkdir()
        inputs = dict(zip(input_names, call["inputs"]))
        outputs = {n: (tuple(s), d) for n, s, d in zip(output_names, call["output_shapes"], call["output_dtypes"])}
        args, out_files = [], []
        for p in sorted((p for p in kernel.params if p.buffer is not None), key=lambda p: p.buffer):
            path = tmp / f"b{p.buffer}"
            if p.name in outputs:
                shape, dtype = outputs[p.name]
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.size
                args.append(f"o:{path}:{nbytes}")
                out_files.append((path, shape, dtype))
                continue
            if p.name in inputs:
                data = _raw(inputs[p.name])
            else:
                base, _, what = p.name.rpartition("_")
                arr = inputs[base]
                pad = 8 - arr.ndim if kernel.dialect == "cuda" else 0  # CUDA: fixed-size Shape/Strides
                if what == "shape":
                    data = np.array(list(arr.shape) + [0] * pad, dtype=np.int32).tobytes()
                elif what == "strides":
                    strides = list(np.cumprod((list(arr.shape[1:]) + [1])[::-1])[::-1])
                    data = np.array(strides + [0] * pad, dtype=np.int64).tobytes()
                elif what == "ndim":
                    data = np.array(arr.ndim, dtype=np.int32).tobytes()
                else:
                    raise EmulatorError(f"buffer {p.name!r} is neither an input nor an output")
            path.write_bytes(data)
            args.append(f"i:{path}")
        grid, tg = call["grid"], call["threadgroup"]
        flags = int(reverse) | (2 if kernel.dialect == "cuda" else 0)
        cmd = [str(exe), str(which), *map(str, grid), *map(str, tg), str(flags), str(len(args)), *args]
        res = subprocess.run(cmd, capture_output=True, text=True)
        try:
            if res.returncode != 0:
                why = res.stderr.strip() or f"exit status {res.returncode}"
                if res.returncode < 0:
                    why = f"killed by signal {-res.returncode} (out-of-bounds access?) {why}"
                raise EmulatorError(f"{kernel.name}: {why}")
            results = []
            for path, shape, dtype in out_files:
                raw = np.frombuffer(path.read_bytes(), dtype=np.dtype(f"u{dtype.size}"))
                results.append(mx.array(raw).view(dtype).reshape(shape))
            return results
        finally:
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
