"""Two-sided CPU transport over gloo, for tests and CPU-only demos.

Senders and receivers of both jobs form one gloo group of size S + R, built from the
control-plane store under the plan's fingerprint and transport generation, so a new
plan, or the push after a failed one, never meets an old group. Senders are ranks
0..S-1, receivers S..S+R-1. Messages are matched by the task's per-pair sequence
number, which both sides read from the plan.

A delta push (``fsdp_sync.delta``) sends each task as a 16-byte header (encoding,
count) under tag 2·seq and its body under 2·seq + 1; the receiver sizes the body from
the header and scatters it into the destination box.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from ..control import ControlPlane, sender_error_key
from ..delta import Encoded, apply
from ..delta_plan import lower
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

    def send(self, items: list[tuple[Task, torch.Tensor | Encoded]]) -> None:
        works = []
        for task, data in items:
            peer = self.plan.num_senders + task.receiver
            if isinstance(data, Encoded):
                header, body = data.header(), data.body.contiguous()
                works.append((task, header, self.pg.send([_as_bytes(header)], peer, 2 * task.seq)))
                if body.numel():
                    works.append((task, body, self.pg.send([body], peer, 2 * task.seq + 1)))
                continue
            buf = _as_bytes(data.contiguous())
            works.append((task, buf, self.pg.send([buf], peer, task.seq)))
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
            self._wait(seq, task, work, timeout_s)
            if target is not view:
                view.copy_(target)
        self.control.wait_done(seq, self.plan.senders, timeout_s=timeout_s)

    def receive_delta(self, seq: int, timeout_s: float, *, apply_it: bool = True) -> None:
        """A delta push: every task's header, then its body, scattered into the destination box.
        ``apply_it=False`` drains the messages and writes nothing (a refused base), so the
        senders end the push at once instead of at their timeout."""
        programs = lower(self.plan.arrivals, one_sided=False)
        headers = [torch.empty(2, dtype=torch.int64) for _ in programs]
        pending = [self.pg.recv([_as_bytes(h)], t.sender, 2 * t.seq) for t, h in zip(self.plan.arrivals, headers)]
        bodies = []
        for task, program, header, work in zip(self.plan.arrivals, programs, headers, pending):
            self._wait(seq, task, work, timeout_s)
            encoding, count = header.tolist()
            size = program.body_nbytes(encoding, count)
            body = torch.empty(size, dtype=torch.uint8)
            bodies.append((task, program, Encoded(encoding, count, body),
                           self.pg.recv([body], task.sender, 2 * task.seq + 1) if size else None))
        for task, program, encoded, work in bodies:
            if work is not None:
                self._wait(seq, task, work, timeout_s)
            if apply_it:
                apply(program, encoded, task.dst_box.view(self.tensors[task.dst]))
        self.control.wait_done(seq, self.plan.senders, timeout_s=timeout_s)

    def _wait(self, seq: int, task: Task, work, timeout_s: float) -> None:
        try:
            # A sender that failed (and closed its pairs) says why: more use than gloo's "connection closed".
            work.wait(timedelta(seconds=timeout_s))
        except RuntimeError as e:
            cause = self.control.failure_in(seq, [sender_error_key(seq, s) for s in self.plan.senders])
            raise SyncError(f"receiver {self.plan.rank}: receiving {task.dst!r} from sender {task.sender} "
                            f"in push {seq} failed: {cause or e}") from e

    def close(self) -> None:
        self.pg = None
