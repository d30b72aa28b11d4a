"""One-sided CPU transport through shared memory: the CPU analogue of CUDA IPC.

At registration a receiver moves its destination tensors into files under /dev/shm
and publishes their paths. Senders on the same host map those files once per plan and
copy straight into them; the receiver takes no part until the senders' done keys say
a push is complete.
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Any

import torch

from ..control import sender_error_key
from ..errors import SyncError
from ..plan import Task
from .base import MappedSend, RecvTransport

SHM_ROOT = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"


def _map(path: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    return raw.view(dtype).view(shape)


class ShmSend(MappedSend):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for r in self.plan.receivers:
            meta = self.receivers[r]
            if meta.host != self.host:
                raise SyncError(f"shm transport needs one host: sender {self.plan.rank} is on {self.host!r} but "
                                f"receiver {r} is on {meta.host!r}; use transport='gloo' across hosts")
            for name, (path, dtype, shape) in _files(meta).items():
                if not os.path.exists(path) and math.prod(shape) * dtype.itemsize:
                    raise SyncError(f"shm transport: receiver {r} tensor {name!r} file {path} is missing "
                                    "(did the receiver exit?)")
                self.mapped[(r, name)] = _map(path, dtype, shape)

    def send(self, items: list[tuple[Task, torch.Tensor | None]]) -> None:
        for task, data in items:
            if data is not None:
                self.destination(task).copy_(data)


class ShmRecv(RecvTransport):
    @staticmethod
    def prepare(tensors: dict[str, torch.Tensor], *, job: str, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        folder = os.path.join(SHM_ROOT, f"fsdp_sync-{job}-{os.getpid()}-r{rank}")
        os.makedirs(folder, exist_ok=True)
        shared, files = {}, {}
        for i, (name, t) in enumerate(tensors.items()):
            path = os.path.join(folder, f"{i}.bin")
            if os.path.exists(path):
                os.unlink(path)
            mapped = _map(path, t.dtype, tuple(t.shape))
            mapped.copy_(t.detach())
            shared[name] = mapped
            files[name] = (path, t.dtype, tuple(t.shape))
        return shared, {"files": files, "folder": folder}

    def receive(self, seq: int, timeout_s: float) -> None:
        senders = self.plan.senders
        self.control.wait_done(seq, senders, timeout_s=timeout_s,
                               abort=lambda: self.control.failure_in(seq, [sender_error_key(seq, s) for s in senders]))


def _files(meta) -> dict[str, tuple[str, torch.dtype, tuple[int, ...]]]:
    """A receiver's shared-memory files, checked: each a file in a folder that ``prepare`` makes.

    Senders write weights into these paths, so a registration must not be able to point
    them at any other file (without a secret, anyone reaching the store can register)."""
    root = os.path.realpath(SHM_ROOT)
    files = meta.transport_info.get("files") if isinstance(meta.transport_info, dict) else None
    if not isinstance(files, dict):
        raise SyncError(f"shm transport: receiver {meta.rank} registered no shared-memory files")
    for name, entry in files.items():
        ok = (isinstance(entry, tuple) and len(entry) == 3 and isinstance(entry[0], str)
              and isinstance(entry[1], torch.dtype) and isinstance(entry[2], tuple)
              and all(type(n) is int and n >= 0 for n in entry[2]))
        folder = os.path.dirname(os.path.realpath(entry[0])) if ok else ""
        if not ok or os.path.dirname(folder) != root or not os.path.basename(folder).startswith("fsdp_sync-"):
            raise SyncError(f"shm transport: receiver {meta.rank} registered {name!r} at {entry!r:.120}, which is "
                            f"not a (file under {root}/fsdp_sync-*, dtype, shape) entry; refused")
    return files


def remove_files(info: dict[str, Any]) -> None:
    """Delete a receiver's shared-memory files (mappings stay valid until unmapped)."""
    folder = info.get("folder")
    if folder:
        shutil.rmtree(folder, ignore_errors=True)

