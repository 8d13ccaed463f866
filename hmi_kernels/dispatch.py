"""The one place that decides between the CUDA kernels and their PyTorch references.

The kernels run where the tensors live on a CUDA device and CuPy finds a GPU; everywhere else (CPU,
CUDA without CuPy) the reference is the path, and it is what the kernels are tested against.
"""
from __future__ import annotations

import torch

from hmi_kernels.runtime import cuda_available


def use_cuda_kernels(where: torch.Tensor | torch.device) -> bool:
    """True when work on this tensor (or device) runs the CUDA kernels."""
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    return device.type == "cuda" and cuda_available()
