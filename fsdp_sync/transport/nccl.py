"""Two-sided GPU transport over NCCL send/recv, for any topology.

Senders and receivers of both jobs form one NCCL group of size S + R, built from the
control-plane store under the transport's namespace (senders 0..S-1, receivers S..). Each
bucket's sends go out as one NCCL group (coalesced); a receiver posts all its receives
of a push as one group, straight into destination views where they are contiguous.
Communicators are created and every (sender, receiver) pair is exercised once when
the plan is set up, so the first push pays no connection cost.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from ..control import ControlPlane, sender_error_key
from ..copies import copy_all
from ..errors import SyncError
from ..plan import Task
from .base import RecvTransport, SendTransport


def _group(control: ControlPlane, namespace: str, rank: int, size: int, device: torch.device,
           timeout_s: float):
    if not hasattr(dist, "ProcessGroupNCCL"):
        raise SyncError("transport='nccl' needs a CUDA build of torch with NCCL; use 'gloo' on CPU")
    store = dist.PrefixStore(f"nccl/{namespace}/", control.store)
    try:
        pg = dist.ProcessGroupNCCL(store, rank, size, timedelta(seconds=timeout_s))
        if hasattr(pg, "eager_connect_single_device"):
            pg.eager_connect_single_device(device)
    except RuntimeError as e:
        raise SyncError(f"nccl transport: rank {rank} of {size} could not connect: {e}") from e
    return pg


def _coalesced(pg, device: torch.device, ops: list) -> None:
    """Issue point-to-point ops as one NCCL group, so their order across peers cannot deadlock.

    A bare ProcessGroupNCCL is a Backend, whose coalescing calls take no device argument.
    """
    pg._start_coalescing()
    works = [op() for op in ops]
    work = pg._end_coalescing()
    for w in [work] if work is not None else works:
        w.wait()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


class NcclSend(SendTransport):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        p = self.plan
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.offset = p.num_senders
        self.pg = _group(self.control, self.namespace, p.rank, p.num_senders + p.num_receivers, self.device,
                         self.config.timeout_s)
        # One byte to each receiver: creates the pair's connections now, not in the first push.
        ping = [torch.zeros(1, dtype=torch.uint8, device=self.device) for _ in p.receivers]
        _coalesced(self.pg, self.device, [lambda r=r, t=t: self.pg.send([t], self.offset + r, 0)
                                          for r, t in zip(p.receivers, ping)])
        torch.cuda.current_stream(self.device).synchronize()

    def send(self, items: list[tuple[Task, torch.Tensor | None]]) -> None:
        bufs = [(t, _bytes(d.contiguous())) for t, d in items if d is not None]
        if not bufs:
            return
        try:
            _coalesced(self.pg, self.device, [lambda t=t, b=b: self.pg.send([b], self.offset + t.receiver, 0)
                                              for t, b in bufs])
            torch.cuda.current_stream(self.device).synchronize()
        except RuntimeError as e:
            raise SyncError(f"nccl transport: sender {self.plan.rank} failed sending a bucket: {e}") from e

    def close(self) -> None:
        self.pg = None


class NcclRecv(RecvTransport):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        p = self.plan
        self.device = next(iter(self.tensors.values())).device
        torch.cuda.set_device(self.device)
        self.pg = _group(self.control, self.namespace, p.num_senders + p.rank, p.num_senders + p.num_receivers,
                         self.device, self.config.timeout_s)
        ping = [torch.zeros(1, dtype=torch.uint8, device=self.device) for _ in p.senders]
        _coalesced(self.pg, self.device, [lambda s=s, t=t: self.pg.recv([t], s, 0) for s, t in zip(p.senders, ping)])
        torch.cuda.current_stream(self.device).synchronize()

    def receive(self, seq: int, timeout_s: float) -> None:
        ops, copies = [], []
        for task in self.plan.arrivals:
            view = task.dst_box.view(self.tensors[task.dst])
            target = view if view.is_contiguous() else torch.empty(view.shape, dtype=view.dtype, device=self.device)
            if target is not view:
                copies.append((view, target))
            ops.append(lambda t=task, b=_bytes(target): self.pg.recv([b], t.sender, 0))
        try:
            _coalesced(self.pg, self.device, ops)
            copy_all(copies)
            torch.cuda.current_stream(self.device).synchronize()
        except RuntimeError as e:
            raise SyncError(f"receiver {self.plan.rank}: nccl receive of push {seq} failed: {e}") from e
        senders = self.plan.senders
        self.control.wait_done(seq, senders, timeout_s=timeout_s,
                               abort=lambda: self.control.failure_in(seq, [sender_error_key(seq, s) for s in senders]))

    def close(self) -> None:
        self.pg = None
