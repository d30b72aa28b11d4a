"""The CUDA IPC sender's setup, on CPU: it waits for each receiver's export to it, and a
receiver that failed instead (its error ack) ends that wait at once, with its reason,
instead of after the whole timeout. (Opening exports needs GPUs: tests/test_gpu_sync.py.)"""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from fsdp_sync.boxes import Box
from fsdp_sync.control import ControlPlane, ack_key
from fsdp_sync.errors import SyncError, SyncTimeout
from fsdp_sync.meta import LayoutSpec, ReceiverMeta
from fsdp_sync.plan import SenderPlan, Task
from fsdp_sync.transport.cuda_ipc import CudaIpcSend


def _plan() -> SenderPlan:
    box = Box.full((4, 4))
    task = Task(0, 1, "w", box, "w", box, "data", "none", 32, bucket=0, seq=0)
    return SenderPlan("fp", "direct", 0, 1, 2, [task], [], [], {}, [], "cuda_ipc")


def _receivers() -> dict[int, ReceiverMeta]:
    return {r: ReceiverMeta(r, "host", {}, LayoutSpec("identity"), "none") for r in range(2)}


def test_a_receivers_failure_ends_the_wait_for_its_export():
    control = ControlPlane(dist.HashStore(), "job", timeout_s=30.0)
    seq = 3
    control.record_failure(seq)
    control.set(ack_key(seq, 0), "ok")  # another receiver's ack is no error
    control.set(ack_key(seq, 1), "receiver 1: RuntimeError('cannot export its buffers')")
    started = time.monotonic()
    with pytest.raises(SyncError, match="cannot export its buffers"):
        CudaIpcSend(control, _plan(), _receivers(), None, "host", generation=0,
                    abort=lambda: control.failure_in(seq, [ack_key(seq, r) for r in range(2)]))
    assert time.monotonic() - started < 5.0


def test_without_a_failure_it_names_the_receiver_it_waits_for():
    control = ControlPlane(dist.HashStore(), "job", timeout_s=0.3)
    with pytest.raises(SyncTimeout, match=r"receivers \[1\] to export their buffers to sender 0"):
        CudaIpcSend(control, _plan(), _receivers(), None, "host", generation=0)
