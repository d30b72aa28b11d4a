"""``transport="auto"``: the fastest transport the plan's placement allows.

All ranks on one host: one-sided writes (CUDA IPC on GPU, shared memory on CPU).
Across hosts: RDMA where the controller sees an active RDMA port, else NCCL (gloo on
CPU), said once in the log. The controller decides once per plan and the plan carries
the choice, so every rank of both jobs uses the same transport.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..meta import ReceiverMeta
from .cuda_ipc import CudaIpcRecv
from .shm import ShmRecv

log = logging.getLogger(__name__)
_said: set[str] = set()


def resolve(sender_hosts: list[str], receivers: list[ReceiverMeta]) -> str:
    on_gpu = all(r.device for r in receivers)
    if len(set(sender_hosts) | {r.host for r in receivers}) == 1:
        choice, why = ("cuda_ipc" if on_gpu else "shm"), "every rank is on one host"
    elif not on_gpu:
        choice, why = "gloo", "ranks span hosts and the receivers hold CPU tensors"
    else:
        from .rdma_discovery import rdma_available

        ok, reason = rdma_available()
        choice, why = ("rdma", f"ranks span hosts; RDMA ports: {reason}") if ok else (
            "nccl", f"ranks span hosts and RDMA is not usable ({reason}); falling back to NCCL")
    message = f"fsdp_sync: transport='auto' chose {choice!r}: {why}"
    if message not in _said:
        _said.add(message)
        log.warning(message)
    return choice


def prepare(tensors: dict[str, torch.Tensor], *, job: str, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Make receiver tensors reachable for whichever transport the plan will choose.

    GPU tensors are only checked here (the CUDA IPC exports are made per plan, one per
    sender, if the plan chooses cuda_ipc); CPU tensors move to shared memory, which the
    two-sided transports do not mind, so a receiver registers once for every choice.
    """
    if all(t.is_cuda for t in tensors.values()):
        return CudaIpcRecv.prepare(tensors, job=job, rank=rank)
    return ShmRecv.prepare(tensors, job=job, rank=rank)
