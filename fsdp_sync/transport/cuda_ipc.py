"""One-sided GPU transport over CUDA IPC: senders write straight into receivers' buffers.

Receivers export their destination tensors once per plan (CUDA IPC handles of the
caching allocator's blocks), tagged with their GPU's UUID, one export for each sender
that writes to them. A sender on the same host opens its export on the local device with
that UUID (device indices differ between processes), and the quantize kernel stores into
them directly over NVLink: no staging, no separate copy. A push is complete when the
sender's stream work is done and its done key is set; the receiver only waits for those keys.

Why one export per sender: torch gives every export its own counter of the consumers
that still map it, and a freed block whose counter is not zero waits in the producer's IPC
limbo. Two senders opening one export drive its counter to -1, and the receiver's
memory never comes back (the 32B colocated benchmark ran out of memory this way).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from ..control import ControlPlane
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


@dataclass(frozen=True)
class IpcExport:
    """One CUDA IPC export of a destination tensor, as plain data for the control plane.

    The fields of torch's ``reduce_tensor`` for a CUDA tensor, less its two classes (the
    tensor's and the storage's) and its rebuild function, which the control plane must
    not carry: the sender supplies ``rebuild_cuda_tensor`` and the classes itself.
    """

    uuid: str  # the GPU's UUID: device indices differ between processes
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # of the tensor in its storage, in elements
    dtype: torch.dtype
    device: int  # the exporting process's device index (the sender opens it on its own)
    handle: bytes | None  # cudaIpcMemHandle of the allocation holding the storage
    storage_size_bytes: int
    storage_offset_bytes: int
    requires_grad: bool
    ref_counter_handle: bytes | None
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "IpcExport":
        """A new export of ``tensor``, with its own consumer counter."""
        rebuild, args = reduce_tensor(tensor)
        if rebuild is not rebuild_cuda_tensor:
            raise SyncError(f"cuda_ipc: torch exports a {tensor.device} tensor through {rebuild.__name__}, "
                            "not rebuild_cuda_tensor")
        return cls.from_args(device_id(tensor.device), args)

    @classmethod
    def from_args(cls, uuid: str, args: tuple) -> "IpcExport":
        """From ``reduce_tensor``'s arguments for ``rebuild_cuda_tensor`` (their order is torch's)."""
        (_tensor_cls, size, stride, offset, _storage_cls, dtype, device, handle, storage_size_bytes,
         storage_offset_bytes, requires_grad, ref_counter_handle, ref_counter_offset, event_handle,
         event_sync_required) = args
        return cls(uuid, tuple(int(n) for n in size), tuple(int(n) for n in stride), int(offset), dtype, int(device),
                   handle, int(storage_size_bytes), int(storage_offset_bytes), bool(requires_grad), ref_counter_handle,
                   int(ref_counter_offset), event_handle, bool(event_sync_required))

    def rebuild_args(self, device: int) -> tuple:
        """``rebuild_cuda_tensor``'s arguments, opening the export on ``device`` of this process."""
        return (torch.Tensor, torch.Size(self.size), self.stride, self.offset, torch.storage.TypedStorage, self.dtype,
                device, self.handle, self.storage_size_bytes, self.storage_offset_bytes, self.requires_grad,
                self.ref_counter_handle, self.ref_counter_offset, self.event_handle, self.event_sync_required)


def handles_key(namespace: str, receiver: int, sender: int) -> str:
    """Where receiver ``receiver`` puts the export that sender ``sender`` opens."""
    return f"ipc/{namespace}/{receiver}/to/{sender}"


def _release(exports: list[IpcExport]) -> None:
    """Give back exports this sender will not open. torch counts the consumers of each export
    and keeps the receiver's block in its IPC limbo until that count is zero; an export
    that nobody opens would hold the receiver's memory until it exits. Best effort, as
    torch's own consumer side is (the receiver may be gone)."""
    for export in exports:
        try:
            torch.storage.TypedStorage._release_ipc_counter(export.ref_counter_handle, export.ref_counter_offset,
                                                            device=export.device)
        except Exception:  # noqa: BLE001 - a gone producer leaves nothing to give back
            pass


def _exports(control: ControlPlane, key: str) -> dict[str, IpcExport]:
    exports = control.get(key, expect=dict)
    if not all(type(name) is str and type(e) is IpcExport for name, e in exports.items()):
        raise SyncError(f"cuda_ipc: control key {key} holds something other than exports by tensor name")
    return exports


def _local_device_of(uuid: str) -> int | None:
    for i in range(torch.cuda.device_count()):
        if device_id(torch.device("cuda", i)) == uuid:
            return i
    return None


class CudaIpcSend(MappedSend):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _refuse_expandable_segments()
        rank = self.plan.rank
        for r in self.plan.receivers:
            meta = self.receivers[r]
            if meta.host != self.host:
                raise SyncError(f"cuda_ipc needs one host: sender {rank} is on {self.host!r} but receiver "
                                f"{r} is on {meta.host!r}; use transport='nccl' or 'auto'")
        keys = {r: handles_key(self.namespace, r, rank) for r in self.plan.receivers}
        self._peer: dict[int, bool] = {}  # receiver -> its GPU is not ours
        exports: dict[tuple[int, str], IpcExport] = {}
        try:
            # The receivers export when they load this plan, which they do once it is
            # announced; one that fails instead records the push as failed (abort).
            self.control.wait(list(keys.values()), abort=self.abort, describe=lambda missing: f"receivers "
                              f"{sorted(r for r, k in keys.items() if k in missing)} to export their buffers "
                              f"to sender {rank}")
            for r, key in keys.items():
                exports.update({(r, name): export for name, export in _exports(self.control, key).items()})
            self._open(exports)
        except BaseException:
            try:
                for r, key in keys.items():  # exports not read yet: the wait ended early
                    if self.control.has(key) and not any(k[0] == r for k in exports):
                        exports.update({(r, name): export for name, export in _exports(self.control, key).items()})
            except Exception:  # noqa: BLE001 - the store is gone: give back what was read
                pass
            _release([export for k, export in exports.items() if k not in self.mapped])
            raise

    def _open(self, exports: dict[tuple[int, str], IpcExport]) -> None:
        here = torch.device("cuda", torch.cuda.current_device())
        for (r, name), export in exports.items():
            index = _local_device_of(export.uuid)
            if index is None:
                raise SyncError(f"cuda_ipc: receiver {r}'s GPU {export.uuid} is not visible to sender {self.plan.rank} "
                                "(check CUDA_VISIBLE_DEVICES); use transport='nccl'")
            if index != here.index and not torch.cuda.can_device_access_peer(here, index):
                raise SyncError(f"cuda_ipc: GPU {here} cannot access peer GPU {index}; use transport='nccl'")
            # Open the handle in this device's context (with lazy peer access): the
            # peer's memory then sits in our address space, so our kernels, Triton's
            # pointer check included, address it like local memory; stores go over NVLink.
            self.mapped[(r, name)] = rebuild_cuda_tensor(*export.rebuild_args(here.index))
            self._peer[r] = index != here.index

    def writes_to_peer(self, task: Task) -> bool:
        return self._peer.get(task.receiver, False)

    def send(self, items: list[tuple[Task, torch.Tensor | None]]) -> None:
        for task, data in items:
            if data is not None:
                self.destination(task).copy_(data, non_blocking=True)
        torch.cuda.current_stream().synchronize()


class CudaIpcRecv(ShmRecv):
    """Exports its buffers to each sender of the plan, then waits for the senders' done
    keys exactly as the shared-memory transport does."""

    def __init__(self, control: ControlPlane, *args, **kwargs):
        super().__init__(control, *args, **kwargs)
        for s in self.plan.senders:
            names = {t.dst for t in self.plan.arrivals if t.sender == s}
            handles = {name: IpcExport.of(self.tensors[name]) for name in sorted(names)}  # new exports, own counters
            control.set(handles_key(self.namespace, self.plan.rank, s), handles)

    @staticmethod
    def prepare(tensors: dict[str, torch.Tensor], *, job: str, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Checks only, at registration: the exports are made per plan, one per sender."""
        _refuse_expandable_segments()
        for name, t in tensors.items():
            if not t.is_cuda:
                raise SyncError(f"cuda_ipc: destination {name!r} is on {t.device}; it must be a CUDA tensor")
        return tensors, {}
