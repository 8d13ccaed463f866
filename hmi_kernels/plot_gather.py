"""PLOT rows (fp16, as streamed from the store) into the packed fp32 hidden-state buffer of a batch."""
from __future__ import annotations

import torch


def gather_reference(hidden: torch.Tensor, rows: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """hidden[dest[i]] = rows[i] as fp32, in place. rows: fp16 [n, H]; dest: int64 [n]."""
    hidden[dest] = rows.to(hidden.dtype)
    return hidden


def gather_cuda(hidden: torch.Tensor, rows: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    from hmi_kernels.runtime import blocks, check_contiguous, launch
    n_rows, hidden_dim = rows.shape
    if n_rows == 0:
        return hidden
    check_contiguous(hidden=hidden, rows=rows, dest=dest)
    threads = 128
    launch("plot_gather", "plot_gather", (blocks(hidden_dim, threads), n_rows), (threads,),
           rows.view(torch.int16), dest, hidden, n_rows, hidden_dim)
    return hidden


def gather(hidden: torch.Tensor, rows: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """The kernel reads fp16 rows; rows of another dtype take the reference."""
    from hmi_kernels.dispatch import use_cuda_kernels
    if use_cuda_kernels(hidden) and rows.dtype == torch.float16:
        return gather_cuda(hidden, rows, dest)
    return gather_reference(hidden, rows, dest)
