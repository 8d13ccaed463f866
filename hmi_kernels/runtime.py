"""The CUDA sources in hmi_kernels/cuda/: compiled by NVRTC through CuPy on a CUDA machine, launched on
PyTorch's current stream with PyTorch tensors (shared through DLPack, no copies).

`compile_ptx` runs NVRTC alone (no GPU needed), so CI can prove every kernel compiles.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

SOURCES = Path(__file__).resolve().parent / "cuda"
KERNELS = {
    "lora": ("lora_shrink", "lora_expand"),
    "plot_gather": ("plot_gather",),
    "tenant_head": ("tenant_head",),
}
NVRTC_OPTIONS = ("--std=c++14",)


def source(module: str) -> str:
    return (SOURCES / f"{module}.cu").read_text(encoding="utf-8")


@functools.cache
def cuda_available() -> bool:
    """CuPy imports without a GPU (its wheel is in the dev extra); only use it where CUDA really runs."""
    try:
        import cupy
        return bool(cupy.cuda.is_available()) and torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device: the PyTorch path serves
        return False


def compile_ptx(module: str, arch: str = "compute_90") -> str:
    """PTX of one source file; raises RuntimeError with NVRTC's log when it does not compile."""
    from cupy.cuda import nvrtc
    program = nvrtc.createProgram(source(module), f"{module}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(program, [f"--gpu-architecture={arch}", *NVRTC_OPTIONS])
        except nvrtc.NVRTCError as error:
            log = nvrtc.getProgramLog(program)
            raise RuntimeError(f"{module}.cu does not compile for {arch}:\n{log}") from error
        ptx = nvrtc.getPTX(program)
    finally:
        nvrtc.destroyProgram(program)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


@functools.cache
def kernel(module: str, function: str):
    import cupy
    return cupy.RawModule(code=source(module), options=NVRTC_OPTIONS).get_function(function)


def launch(module: str, function: str, grid: tuple[int, ...], block: tuple[int, ...], *args) -> None:
    """Tensors go as CuPy views, Python ints as C ints; runs on PyTorch's current stream."""
    import cupy
    converted = [cupy.from_dlpack(a) if isinstance(a, torch.Tensor) else np.int32(a) if isinstance(a, int) else a
                 for a in args]
    with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        kernel(module, function)(grid, block, tuple(converted))


def blocks(total: int, per_block: int) -> int:
    return (total + per_block - 1) // per_block


def check_contiguous(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the CUDA kernels")
