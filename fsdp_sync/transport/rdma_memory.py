"""Which memory to register for RDMA: whole allocator segments, and GPU memory as dma-buf.

Registering is slow (the kernel pins and maps every page) and NICs hold a limited
number of regions, so one region per tensor does not scale to 1,000s of tensors.
The tensors of a model live in a few large allocations: a CPU tensor in its
storage, a CUDA tensor in a caching-allocator segment. Registering those whole,
once per plan, covers every tensor with a handful of regions.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import SyncError

_CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD = 1
_CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED = 124


@dataclass(frozen=True, slots=True)
class Segment:
    """One allocation to register: ``length`` bytes at ``base`` on ``device``."""

    base: int
    length: int
    device: torch.device


def check_destinations(tensors: dict[str, torch.Tensor]) -> None:
    """RDMA writes row-major runs at computed addresses: destinations must be dense."""
    bad = [name for name, t in tensors.items() if not t.is_contiguous()]
    if bad:
        raise ValueError(f"transport='rdma' writes into contiguous tensors only; not contiguous: {bad} "
                         "(call .contiguous() on them, or use transport='gloo'/'nccl')")
    devices = {t.device for t in tensors.values() if t.numel()}
    if len(devices) > 1:
        raise ValueError(f"transport='rdma' registers one device's memory per receiver; got {sorted(map(str, devices))}")


def segments_for(tensors: Iterable[torch.Tensor]) -> list[Segment]:
    """The distinct allocations holding ``tensors``' bytes (empty tensors hold none)."""
    tensors = [t for t in tensors if t.numel()]
    cuda = [t for t in tensors if t.device.type == "cuda"]
    found: dict[tuple[int, torch.device], Segment] = {}
    for t in tensors:
        if t.device.type == "cpu":
            storage = t.untyped_storage()
            seg = Segment(storage.data_ptr(), storage.nbytes(), t.device)
            found[(seg.base, seg.device)] = seg
    if cuda:
        table = cuda_segments()
        for t in cuda:
            seg = containing(table, t.data_ptr(), t.numel() * t.element_size(), t.device)
            found[(seg.base, seg.device)] = seg
    unsupported = {t.device.type for t in tensors} - {"cpu", "cuda"}
    if unsupported:
        raise ValueError(f"transport='rdma' registers CPU or CUDA memory, not {sorted(unsupported)}")
    return sorted(found.values(), key=lambda s: (str(s.device), s.base))


def cuda_segments() -> list[Segment]:
    """Every segment of PyTorch's CUDA caching allocator, from its memory snapshot."""
    if "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower():
        raise SyncError("transport='rdma' registers whole allocator segments, which "
                        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True grows and unmaps; turn it off for RDMA")
    return [Segment(s["address"], s["total_size"], torch.device("cuda", s["device"]))
            for s in torch.cuda.memory_snapshot()]


def containing(segments: list[Segment], addr: int, nbytes: int, device: torch.device) -> Segment:
    """The segment on ``device`` holding ``[addr, addr + nbytes)``, or a SyncError."""
    for seg in segments:
        if seg.device == device and seg.base <= addr and addr + nbytes <= seg.base + seg.length:
            return seg
    raise SyncError(f"rdma: memory at {addr:#x} (+{nbytes} bytes) on {device} is in no PyTorch caching-allocator "
                    "segment (allocated by another allocator?); allocate destination tensors with torch")


def dmabuf_fd(segment: Segment) -> int:
    """A dma-buf file descriptor for a whole CUDA segment (the caller closes it).

    The NIC reaches GPU memory through this fd (DmaBufMR), which needs no extra
    kernel module, unlike nvidia-peermem.
    """
    cuda = _libcuda()
    index = segment.device.index
    supported = ctypes.c_int(0)
    device = ctypes.c_int(0)
    _check(cuda, cuda.cuDeviceGet(ctypes.byref(device), index), "cuDeviceGet")
    _check(cuda, cuda.cuDeviceGetAttribute(ctypes.byref(supported), _CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED, device),
           "cuDeviceGetAttribute")
    if not supported.value:
        raise SyncError(f"rdma: GPU {index} cannot export dma-buf (needs an NVIDIA driver >= 515 with the open "
                        "kernel modules)")
    with torch.cuda.device(index):
        torch.cuda.synchronize()  # binds the primary context to this thread for the driver call
        fd = ctypes.c_int(-1)
        _check(cuda, cuda.cuMemGetHandleForAddressRange(ctypes.byref(fd), ctypes.c_uint64(segment.base),
                                                        ctypes.c_size_t(segment.length),
                                                        _CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, ctypes.c_ulonglong(0)),
               f"cuMemGetHandleForAddressRange({segment.base:#x}, {segment.length})")
    return fd.value


def peermem_loaded() -> bool:
    """nvidia-peermem lets ibv_reg_mr take GPU addresses directly (the older path)."""
    return os.path.isdir("/sys/module/nvidia_peermem")


def _libcuda() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise SyncError(f"rdma: cannot load the CUDA driver (libcuda.so.1) to export GPU memory: {e}") from e


def _check(cuda: ctypes.CDLL, result: int, call: str) -> None:
    if result:
        name = ctypes.c_char_p()
        cuda.cuGetErrorName(result, ctypes.byref(name))
        raise SyncError(f"rdma: {call} failed with {(name.value or b'?').decode()} ({result})")
