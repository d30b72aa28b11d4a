"""One-sided GPU transport over CUDA IPC: senders write straight into receivers' buffers.

Receivers export their destination tensors once (CUDA IPC handles of the caching
allocator's blocks), tagged with their GPU's UUID. A sender on the same host opens them
once per plan on the local device with that UUID (device indices differ between
processes), and the quantize kernel stores into them directly over NVLink: no staging,
no separate copy. A push is complete when the sender's stream work is done and its done
key is set; the receiver only waits for those keys.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.multiprocessing.reductions import reduce_tensor

from ..errors import SyncError
from ..meta import device_id
from ..plan import Task
from .base import MappedSend
from .shm import ShmRecv


def _refuse_expandable_segments() -> None:
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")
    if "expandable_segments:true" in conf.replace(" ", "").lower():
        raise SyncError("cuda_ipc: this process allocates with expandable_segments:True, whose memory CUDA IPC "
                        "handles cannot export; unset it in PYTORCH_CUDA_ALLOC_CONF or use transport='nccl'")


def _local_device_of(uuid: str) -> int | None:
    for i in range(torch.cuda.device_count()):
        if device_id(torch.device("cuda", i)) == uuid:
            return i
    return None


class CudaIpcSend(MappedSend):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _refuse_expandable_segments()
        here = torch.device("cuda", torch.cuda.current_device())
        for r in self.plan.receivers:
            meta = self.receivers[r]
            if meta.host != self.host:
                raise SyncError(f"cuda_ipc needs one host: sender {self.plan.rank} is on {self.host!r} but receiver "
                                f"{r} is on {meta.host!r}; use transport='nccl' or 'auto'")
            handles = meta.transport_info["ipc"]
            for name, (uuid, rebuild, args) in handles.items():
                index = _local_device_of(uuid)
                if index is None:
                    raise SyncError(f"cuda_ipc: receiver {r}'s GPU {uuid} is not visible to sender {self.plan.rank} "
                                    "(check CUDA_VISIBLE_DEVICES); use transport='nccl'")
                if index != here.index and not torch.cuda.can_device_access_peer(here, index):
                    raise SyncError(f"cuda_ipc: GPU {here} cannot access peer GPU {index}; use transport='nccl'")
                # Open the handle in this device's context (with lazy peer access): the
                # peer's memory then sits in our address space, so our kernels, Triton's
                # pointer check included, address it like local memory; stores go over NVLink.
                args = list(args)
                args[6] = here.index
                self.mapped[(r, name)] = rebuild(*args)

    def send(self, items: list[tuple[Task, torch.Tensor | None]]) -> None:
        for task, data in items:
            if data is not None:
                self.destination(task).copy_(data, non_blocking=True)
        torch.cuda.current_stream().synchronize()


class CudaIpcRecv(ShmRecv):
    """Waits for the senders' done keys exactly as the shared-memory transport does."""

    @staticmethod
    def prepare(tensors: dict[str, torch.Tensor], *, job: str, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        _refuse_expandable_segments()
        handles = {}
        for name, t in tensors.items():
            if not t.is_cuda:
                raise SyncError(f"cuda_ipc: destination {name!r} is on {t.device}; it must be a CUDA tensor")
            rebuild, args = reduce_tensor(t)
            handles[name] = (device_id(t.device), rebuild, args)
        return tensors, {"ipc": handles}
