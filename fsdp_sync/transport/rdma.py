"""One-sided transport over RDMA (pyverbs): senders WRITE straight into receivers' tensors.

When a plan is first seen, each receiver registers the allocator segments that hold
its destination tensors (dma-buf for GPU memory), and each sender registers two
staging slots; every (sender, receiver) pair gets an RC queue pair, connected with
data exchanged through the control-plane store. All of that lives as long as the
plan. A push then replays a precomputed schedule: per bucket, copy the payloads into
a staging slot and post chained RDMA WRITEs in plan order, signalled every N and
bounded in flight. The last write to each receiver carries the push number as
immediate data; a receiver counts those and lands the push once every sender's has
arrived. The receiver's CPU never touches the bytes.

See docs/rdma.md for running it on a cluster.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import torch
from pyverbs.pyverbs_error import PyverbsError

from ..control import sender_error_key
from ..errors import SyncError, SyncTimeout
from ..plan import Task
from .base import RecvTransport, SendTransport
from .rdma_discovery import RdmaOptions, require_rdma, select_port
from .rdma_exchange import (RECV, SEND, Endpoint, connected_key, open_push, publish, report_setup_error,
                            setup_error_key, wait_connected, wait_endpoints)
from .rdma_memory import check_destinations, segments_for
from .rdma_verbs import (Nic, Registration, connect, new_psn, poll, recv_request, send_chain, set_imm,
                         status_text)
from .rdma_wr import (NUM_SLOTS, Arrivals, RegionTable, RemoteTensor, SendWindow, build_schedule, fill_slot,
                      imm_of)

log = logging.getLogger(__name__)
RECV_DEPTH = 16  # receives posted per QP: a sender may run this many pushes ahead before it waits
_MAX_PAUSE_S = 1e-3
_ERROR_CHECK_S = 0.05


class _Verbs:
    """The plan-lifetime verbs objects of one side, closed in the order the NIC needs."""

    def __init__(self) -> None:
        self.cq = None
        self.qps: dict[int, Any] = {}
        self.registrations: list[Registration] = []
        self.buffers: list = []

    def close(self) -> None:
        # QPs first: once they are gone the NIC reads and writes no registered byte.
        for obj in [*self.qps.values(), self.cq, *self.registrations, *self.buffers]:
            if obj is None:
                continue
            try:
                obj.close()
            except PyverbsError as exc:  # teardown goes on; the process may be exiting anyway
                log.warning("fsdp_sync rdma: closing %s failed: %s", type(obj).__name__, exc)
        self.qps, self.cq, self.registrations, self.buffers = {}, None, [], []


def _setup_or_report(side: RecvTransport | SendTransport, role: str, setup: Callable[[], None]) -> None:
    """Run ``setup``; on any failure tell the peers (so they stop waiting), release, re-raise."""
    try:
        setup()
    except BaseException as exc:
        report_setup_error(side.control, side.namespace, role, side.plan.rank, f"{type(exc).__name__}: {exc}")
        side.close()
        if isinstance(exc, PyverbsError):  # a verb failed (creating a CQ or QP, posting): say where
            raise SyncError(f"rdma {role} setup on rank {side.plan.rank} failed: {exc}") from exc
        raise


def _poll_until(done: Callable[[], bool], step: Callable[[], bool], *, deadline: float,
                on_timeout: Callable[[], SyncError], check: Callable[[], None] = lambda: None) -> None:
    """Poll with a short backoff until ``done()``; ``step()`` says whether it made progress."""
    pause, next_check = 0.0, 0.0
    while not done():
        if step():
            pause = 0.0
            continue
        now = time.monotonic()
        if now >= next_check:
            check()
            next_check = now + _ERROR_CHECK_S
        if now > deadline:
            raise on_timeout()
        time.sleep(pause)
        pause = min(max(2 * pause, 1e-5), _MAX_PAUSE_S)


def _sender_device() -> torch.device:
    # A GPU trainer has initialized CUDA by the time it pushes; a CPU one never does.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class RdmaSend(SendTransport):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.verbs = _Verbs()
        self._broken: str | None = None
        self._seq: int | None = None  # the push being posted, found in the store (see open_push)
        self._open = False
        self._position = -1
        _setup_or_report(self, SEND, self._setup)

    def _setup(self) -> None:
        require_rdma()
        p, options, device = self.plan, RdmaOptions.from_env(), _sender_device()
        port = select_port(device, options)
        log.info("fsdp_sync rdma: sender %d (%s) uses %s:%d (%s, GID index %d)", p.rank, device, port.device,
                 port.port, port.link_layer, port.gid_index)
        nic = Nic.get(port)
        max_outstanding = min(options.max_outstanding, port.max_qp_wr)
        signal_every = min(options.signal_every, max_outstanding)
        v = self.verbs
        v.cq = nic.cq(len(p.receivers) * max_outstanding + 1)
        v.qps = {r: nic.qp(v.cq, max_send_wr=max_outstanding, max_recv_wr=1) for r in p.receivers}
        psns = {r: new_psn() for r in p.receivers}
        publish(self.control, self.namespace, SEND,
                Endpoint(p.rank, f"{port.device}:{port.port}@{self.host}", port.link_layer,
                         {r: nic.endpoint(qp, psns[r]) for r, qp in v.qps.items()}))
        peers = wait_endpoints(self.control, self.namespace, RECV, p.receivers, timeout_s=self.config.timeout_s)
        for r, peer in peers.items():
            if peer.link_layer != port.link_layer:
                raise SyncError(f"rdma: sender {p.rank} uses {port.link_layer} ({port.device}) but receiver {r} "
                                f"uses {peer.link_layer} ({peer.nic}); both ends need the same fabric")
            connect(v.qps[r], port, psns[r], peer.qps[p.rank], options)
        targets = {(r, name): t for r, peer in peers.items() for name, t in peer.tensors.items()}
        self.schedule = build_schedule(p.tasks, [b.index for b in p.buckets], targets,
                                       {r: RegionTable(peer.regions) for r, peer in peers.items()},
                                       signal_every=signal_every,
                                       max_wr_bytes=min(options.max_wr_bytes, port.max_msg_bytes))
        # Two staging slots, registered once: one bucket is copied in while the last is on the wire.
        slot = self.schedule.slot_bytes
        self.staging = torch.empty(max(NUM_SLOTS * slot, 1), dtype=torch.uint8, device=device)
        (segment,) = segments_for([self.staging])
        reg = nic.register(segment, options, access=0)  # the NIC only reads staging
        v.registrations.append(reg)
        base = reg.region.nic_addr(self.staging.data_ptr())
        self.chains = [send_chain(b, base + b.slot * slot, reg.mr.lkey) for b in self.schedule.batches]
        self.finals = [self.chains[b.id][-1] for b in self.schedule.finals().values()]
        self.window = SendWindow(max_outstanding, signal_every=signal_every)
        self.receiver_of = {qp.qp_num: r for r, qp in v.qps.items()}
        self.index_of = {(t.receiver, t.seq): i for i, t in enumerate(p.tasks)}
        self.dtype_of = [self.receivers[t.receiver].tensors[t.dst].dtype for t in p.tasks]
        self.position_of = {b: i for i, b in enumerate(self.schedule.order)}
        wait_connected(self.control, self.namespace, p.receivers, timeout_s=self.config.timeout_s)

    def send(self, items: list[tuple[Task, torch.Tensor | None]]) -> None:
        if not items:
            return
        self._guard(lambda: self._send(items))

    def finish(self) -> None:
        self._guard(lambda: self._wait(self.window.idle, "the receivers to acknowledge the push's last writes"))
        self._open = False

    def close(self) -> None:
        self.verbs.close()
        self.chains, self.finals = [], []

    # -- internals -----------------------------------------------------------------------
    def _guard(self, work: Callable[[], None]) -> None:
        if self._broken:
            raise SyncError(f"{self._broken} (the transport stays failed; recreate the WeightSender)")
        try:
            work()
        except SyncError as exc:
            self._broken = str(exc)
            raise

    def _send(self, items: list[tuple[Task, torch.Tensor | None]]) -> None:
        bucket = items[0][0].bucket
        position = self.position_of[bucket]
        if not self._open or position <= self._position:
            self._begin()  # a new push (the last one finished, or failed before its end)
        self._position = position
        writes = self.schedule.buckets[bucket]
        payloads = []
        for task, data in items:
            assert data is not None, "rdma gives the packer no destination, so every payload is staged"
            i = self.index_of[(task.receiver, task.seq)]
            if data.dtype != self.dtype_of[i] or tuple(data.shape) != task.dst_box.sizes:
                raise SyncError(f"rdma: payload for {task.dst!r} is {data.dtype} {tuple(data.shape)}, receiver "
                                f"{task.receiver} expects {self.dtype_of[i]} {task.dst_box.sizes}")
            payloads.append((i, data))
        self._wait(lambda: self.window.slot_free(writes.slot), f"staging slot {writes.slot} to be free")
        fill_slot(self.staging, self.schedule, bucket, payloads)
        if self.staging.is_cuda:
            torch.cuda.current_stream(self.staging.device).synchronize()  # the NIC reads what the copies wrote
        for batch in writes.batches:
            self._wait(lambda b=batch: self.window.has_room(b), f"room for writes to receiver {batch.receiver}")
            try:
                self.verbs.qps[batch.receiver].post_send(self.chains[batch.id][0])
            except PyverbsError as exc:
                raise SyncError(f"rdma sender {self.plan.rank}: posting writes to receiver {batch.receiver} "
                                f"failed: {exc}") from exc
            self.window.posted(batch)

    def _begin(self) -> None:
        self._seq = open_push(self.control, self.plan.rank, after=self._seq)
        for wr in self.finals:
            set_imm(wr, imm_of(self._seq))  # posting copies the request, so changing it now is safe
        self._open, self._position = True, -1

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        timeout = self.config.timeout_s
        _poll_until(done, self._reap, deadline=time.monotonic() + timeout,
                    on_timeout=lambda: SyncTimeout(f"rdma sender {self.plan.rank}: timed out after {timeout:.1f}s "
                                                   f"waiting for {what} in push {self._seq}"))

    def _reap(self) -> bool:
        completions = poll(self.verbs.cq)
        for c in completions:
            receiver = self.receiver_of.get(c.qp_num)
            if c.status:
                batch = self.schedule.batches[c.wr_id] if c.wr_id < len(self.schedule.batches) else None
                what = f"{self.plan.tasks[batch.writes[0].task].dst!r}" if batch else "a bucket"
                raise SyncError(f"rdma sender {self.plan.rank}: writing {what} to receiver {receiver} in push "
                                f"{self._seq} failed: {status_text(c.status)}")
            self.window.completed(receiver, c.wr_id)
        return bool(completions)


class RdmaRecv(RecvTransport):
    @staticmethod
    def prepare(tensors: dict[str, torch.Tensor], *, job: str, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        require_rdma()  # fail when the receiver starts, not at its first push
        check_destinations(tensors)
        return tensors, {}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.verbs = _Verbs()
        self._broken: str | None = None
        _setup_or_report(self, RECV, self._setup)

    def _setup(self) -> None:
        require_rdma()
        check_destinations(self.tensors)
        p, options = self.plan, RdmaOptions.from_env()
        device = next((t.device for t in self.tensors.values() if t.numel()), torch.device("cpu"))
        port = select_port(device, options)
        log.info("fsdp_sync rdma: receiver %d (%s) uses %s:%d (%s, GID index %d)", p.rank, device, port.device,
                 port.port, port.link_layer, port.gid_index)
        nic = Nic.get(port)
        v = self.verbs
        # Whole segments, once per plan: a handful of regions however many tensors there are.
        v.registrations = [nic.register(seg, options) for seg in segments_for(self.tensors.values())]
        buffer = nic.buffer(64)
        v.buffers.append(buffer)
        v.cq = nic.cq(len(p.senders) * RECV_DEPTH + 1)
        v.qps = {s: nic.qp(v.cq, max_send_wr=1, max_recv_wr=RECV_DEPTH) for s in p.senders}
        psns = {s: new_psn() for s in p.senders}
        tensors = {name: RemoteTensor(t.data_ptr(), tuple(t.shape), t.element_size()) for name, t in self.tensors.items()}
        publish(self.control, self.namespace, RECV,
                Endpoint(p.rank, f"{port.device}:{port.port}@{os.uname().nodename}", port.link_layer,
                         {s: nic.endpoint(qp, psns[s]) for s, qp in v.qps.items()},
                         tuple(r.region for r in v.registrations), tensors))
        peers = wait_endpoints(self.control, self.namespace, SEND, p.senders, timeout_s=self.config.timeout_s)
        self.requests = {s: recv_request(buffer, s) for s in p.senders}
        for s, peer in peers.items():
            connect(v.qps[s], port, psns[s], peer.qps[p.rank], options)
            for _ in range(RECV_DEPTH):
                v.qps[s].post_recv(self.requests[s])
        self.sender_of = {qp.qp_num: s for s, qp in v.qps.items()}
        self.arrivals = Arrivals(p.senders)
        self.control.set(connected_key(self.namespace, p.rank), True)

    def receive(self, seq: int, timeout_s: float) -> None:
        if self._broken:
            raise SyncError(f"{self._broken} (this transport stays failed; the next push builds a new one)")
        p = self.plan

        def check() -> None:
            missing = self.arrivals.missing(seq)
            reason = self.control.first_error([sender_error_key(seq, s) for s in missing] +
                                              [setup_error_key(self.namespace, SEND, s) for s in missing])
            if reason:
                raise SyncError(f"receiver {p.rank}: push {seq} failed: {reason}")

        _poll_until(lambda: not self.arrivals.missing(seq), lambda: self._reap(seq),
                    deadline=time.monotonic() + timeout_s, check=check,
                    on_timeout=lambda: SyncTimeout(f"receiver {p.rank}: timed out after {timeout_s:.1f}s waiting for "
                                                   f"senders {self.arrivals.missing(seq)} to finish push {seq} "
                                                   "over rdma"))

    def close(self) -> None:
        self.verbs.close()

    def _reap(self, seq: int) -> bool:
        completions = poll(self.verbs.cq)
        for c in completions:
            sender = self.sender_of[c.qp_num]
            if c.status:
                self._broken = (f"receiver {self.plan.rank}: the connection from sender {sender} failed in push "
                                f"{seq}: {status_text(c.status)}")
                raise SyncError(self._broken)
            try:
                self.verbs.qps[sender].post_recv(self.requests[sender])
            except PyverbsError as exc:
                self._broken = f"receiver {self.plan.rank}: reposting a receive for sender {sender} failed: {exc}"
                raise SyncError(self._broken) from exc
            self.arrivals.record(sender, c.imm, seq)
        return bool(completions)
