"""Where the code avoids host-device synchronizations, the one place it asks which device it is on.

On CUDA, reading a device tensor on the host (`.item()`, `.tolist()`, `bool()`, a boolean-mask index) waits
until the GPU has run everything queued before it, and so does a copy from pageable host memory to the GPU;
on the CPU neither costs anything. A branch that is cheaper on the CPU but would wait on a GPU asks
`waits_for_host_reads` (the tests patch it to run the CUDA branches on the CPU).
"""
from __future__ import annotations

import torch


def waits_for_host_reads(device: torch.device | str) -> bool:
    """Whether a host read of a tensor on `device`, or a copy to it from pageable memory, waits for it (CUDA)."""
    return torch.device(device).type == "cuda"


def to_device(tensor: torch.Tensor, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
    """`tensor.to(device, non_blocking=non_blocking)`; a host tensor bound for CUDA goes through pinned memory
    without blocking the host (the copy is queued like a kernel; the pinned buffer is held until it has run)."""
    if tensor.device.type == "cpu" and waits_for_host_reads(device):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, non_blocking=non_blocking)
