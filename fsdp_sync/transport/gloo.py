"""Two-sided CPU transport over gloo, for tests and CPU-only demos.

Senders and receivers of both jobs form one gloo group of size S + R, built from the
control-plane store under the plan's fingerprint and transport generation, so a new
plan, or the push after a failed one, never meets an old group. Senders are ranks
0..S-1, receivers S..S+R-1. Messages are matched by the task's per-pair sequence
number, which both sides read from the plan.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from ..control import ControlPlane, sender_error_key
from ..errors import SyncError
from ..plan import Task
from .base import RecvTransport, SendTransport


def _group(control: ControlPlane, namespace: str, rank: int, size: int, timeout_s: float) -> dist.ProcessGroup:
    store = dist.PrefixStore(f"gloo/{namespace}/", control.store)
    try:
        return dist.ProcessGroupGloo(store, rank, size, timedelta(seconds=timeout_s))
    except RuntimeError as e:
        raise SyncError(f"gloo transport: rank {rank} of {size} could not connect to its peers: {e}") from e


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


class GlooSend(SendTransport):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        p = self.plan
        self.pg = _group(self.control, self.namespace, p.rank, p.num_senders + p.num_receivers, self.config.timeout_s)

    def send(self, items: list[tuple[Task, torch.Tensor]]) -> None:
        works = []
        for task, data in items:
            buf = _as_bytes(data.contiguous())
            works.append((task, buf, self.pg.send([buf], self.plan.num_senders + task.receiver, task.seq)))
        for task, _buf, work in works:
            try:
                work.wait(timedelta(seconds=self.config.timeout_s))
            except RuntimeError as e:
                raise SyncError(f"gloo transport: sending {task.dst!r} to receiver {task.receiver} failed: {e}") from e

    def close(self) -> None:
        self.pg = None


class GlooRecv(RecvTransport):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        p = self.plan
        self.pg = _group(self.control, self.namespace, p.num_senders + p.rank, p.num_senders + p.num_receivers,
                         self.config.timeout_s)

    def receive(self, seq: int, timeout_s: float) -> None:
        pending = []
        for task in self.plan.arrivals:
            view = task.dst_box.view(self.tensors[task.dst])
            # Contiguous boxes (row ranges) land in place; others go through a small buffer.
            target = view if view.is_contiguous() else torch.empty(view.shape, dtype=view.dtype)
            buf = _as_bytes(target)
            pending.append((task, view, target, self.pg.recv([buf], task.sender, task.seq)))
        for task, view, target, work in pending:
            try:
                work.wait(timedelta(seconds=timeout_s))
            except RuntimeError as e:
                # A sender that failed (and closed its pairs) says why: more use than gloo's "connection closed".
                cause = self.control.failure_in(seq, [sender_error_key(seq, s) for s in self.plan.senders])
                raise SyncError(f"receiver {self.plan.rank}: receiving {task.dst!r} from sender {task.sender} "
                                f"in push {seq} failed: {cause or e}") from e
            if target is not view:
                view.copy_(target)
        self.control.wait_done(seq, self.plan.senders, timeout_s=timeout_s)

    def close(self) -> None:
        self.pg = None
