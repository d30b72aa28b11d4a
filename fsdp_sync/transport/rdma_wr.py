"""The RDMA work-request schedule of one sender: plain data, built once per plan, replayed.

Every task becomes one RDMA WRITE per contiguous run of its destination box: a row
range of a contiguous tensor is one run, a column slice is one run per row. Writes to
one receiver keep plan order and are cut into batches that end in a signalled write,
so a completion arrives every ``signal_every`` writes and the sender can bound the
writes in flight per queue pair. The last write to each receiver is a WRITE WITH IMM
carrying the push number: an RC queue pair places it after every earlier write, so
its arrival tells the receiver that all of this sender's bytes landed.

Nothing here needs pyverbs or an RDMA device, so the address arithmetic is testable
on any CPU.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import torch

from ..boxes import Box
from ..errors import SyncError
from ..plan import Task

STAGING_ALIGN = 256  # bytes; every task's payload starts on this boundary in a staging slot
NUM_SLOTS = 2  # staging slots: one bucket is copied in while the previous one is on the wire
IMM_MASK = 0xFFFFFFFF  # immediate data is 32 bits


@dataclass(frozen=True, slots=True)
class Region:
    """``length`` registered bytes at virtual address ``base``, which the NIC knows as ``iova``.

    Work requests, local and remote, address a region in its iova space: that is
    ``base`` for memory registered by address, and the dma-buf offset (here 0) for a
    dma-buf registration.
    """

    base: int
    length: int
    rkey: int
    iova: int

    def nic_addr(self, addr: int) -> int:
        """The address a work request uses for the byte at virtual address ``addr``."""
        return self.iova + (addr - self.base)


@dataclass(frozen=True, slots=True)
class RemoteTensor:
    """A destination tensor as a sender needs it: where it lives in the receiver's memory."""

    addr: int  # the receiver's data_ptr
    shape: tuple[int, ...]
    itemsize: int


class RegionTable:
    """Registered regions of one receiver, looked up by local address."""

    def __init__(self, regions: Sequence[Region]):
        self.regions = sorted(regions, key=lambda r: r.base)
        self._bases = [r.base for r in self.regions]

    def locate(self, addr: int, nbytes: int) -> Region:
        """The region holding ``[addr, addr + nbytes)`` whole, or a SyncError."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            region = self.regions[i]
            if addr + nbytes <= region.base + region.length:
                return region
        raise SyncError(f"rdma: bytes [{addr:#x}, {addr + nbytes:#x}) are not inside one registered region")


@dataclass(frozen=True, slots=True)
class Write:
    """One RDMA WRITE: ``length`` bytes at ``offset`` of a staging slot to ``remote_addr``."""

    task: int  # index in the sender's task list
    receiver: int
    offset: int
    length: int
    remote_addr: int
    rkey: int
    signaled: bool
    final: bool  # WRITE WITH IMM: the receiver's completion for this push


@dataclass(frozen=True, slots=True)
class Batch:
    """Writes to one receiver posted as one chain; only the last is signalled."""

    id: int
    receiver: int
    slot: int
    writes: tuple[Write, ...]


@dataclass(frozen=True)
class BucketWrites:
    """What one bucket posts: where each task's payload sits in its slot, and the batches."""

    bucket: int
    slot: int
    offsets: dict[int, int]  # task index -> byte offset in the slot
    batches: tuple[Batch, ...]  # in posting order


@dataclass(frozen=True)
class Schedule:
    buckets: dict[int, BucketWrites]  # by bucket index, only buckets with tasks
    order: tuple[int, ...]  # bucket indices in pipeline order
    slot_bytes: int
    batches: tuple[Batch, ...]  # every batch, indexed by Batch.id

    def finals(self) -> dict[int, Batch]:
        """Per receiver, the batch that ends with its WRITE WITH IMM."""
        return {b.receiver: b for b in self.batches if b.writes[-1].final}


def contiguous_runs(box: Box, shape: Sequence[int]) -> tuple[int, list[int]]:
    """(elements per run, element offset of each run) of ``box`` in a row-major tensor of ``shape``.

    A run extends over every trailing dim the box covers whole, plus the first dim
    it does not; the dims before that enumerate the runs.
    """
    shape = tuple(shape)
    if box.is_empty():
        return 0, []
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    split = len(shape) - 1
    while split > 0 and box.sizes[split] == shape[split]:
        split -= 1
    if split < 0:  # a 0-d tensor is one element
        return 1, [0]
    run = math.prod(box.sizes[split:])
    base = box.offsets[split] * strides[split]  # the dims after split are covered whole, from 0
    outer = [range(o, o + s) for o, s in zip(box.offsets[:split], box.sizes[:split])]
    starts = [base + sum(i * strides[d] for d, i in enumerate(index)) for index in itertools.product(*outer)]
    return run, starts


def build_schedule(tasks: Sequence[Task], bucket_order: Sequence[int], targets: dict[tuple[int, str], RemoteTensor],
                   regions: dict[int, RegionTable], *, signal_every: int, max_wr_bytes: int) -> Schedule:
    """The writes of ``tasks`` (one sender's, in plan order), per bucket in ``bucket_order``.

    ``targets[(receiver, name)]`` and ``regions[receiver]`` come from the receivers'
    registrations; every write is checked to fall inside its tensor and inside one
    registered region, so a bad address fails here, not as a remote access error.
    """
    if signal_every < 1:
        raise ValueError(f"signal_every must be >= 1, got {signal_every}")
    if max_wr_bytes < 1:
        raise ValueError(f"max_wr_bytes must be >= 1, got {max_wr_bytes}")
    by_bucket: dict[int, list[int]] = {}
    for i, t in enumerate(tasks):
        by_bucket.setdefault(t.bucket, []).append(i)
    order = tuple(b for b in bucket_order if b in by_bucket)
    assert set(order) == set(by_bucket), f"tasks of buckets {sorted(set(by_bucket) - set(order))} never run"
    # The pipeline posts bucket by bucket: the last task posted to a receiver carries the IMM.
    last_of = {tasks[i].receiver: i for b in order for i in by_bucket[b]}

    count: dict[int, int] = {}  # writes so far per receiver, for signal_every
    buckets: dict[int, BucketWrites] = {}
    batches: list[Batch] = []
    slot_bytes = 0
    for position, b in enumerate(order):
        slot = position % NUM_SLOTS
        offsets, cursor = {}, 0
        per_receiver: dict[int, list[Write]] = {}
        for i in by_bucket[b]:
            task = tasks[i]
            offsets[i] = cursor
            writes = _task_writes(i, task, cursor, targets, regions, max_wr_bytes)
            cursor += -(-task.nbytes // STAGING_ALIGN) * STAGING_ALIGN
            per_receiver.setdefault(task.receiver, []).extend(writes)
        slot_bytes = max(slot_bytes, cursor)
        # Signal every N writes per receiver, and the last one of the bucket, which frees its slot.
        pending: list[tuple[int, list[Write]]] = []
        for r, writes in per_receiver.items():
            chain: list[Write] = []
            for k, w in enumerate(writes):
                n = count.get(r, 0) + 1
                count[r] = n
                final = w.task == last_of[r] and k == len(writes) - 1
                signaled = final or k == len(writes) - 1 or n % signal_every == 0
                chain.append(Write(w.task, r, w.offset, w.length, w.remote_addr, w.rkey, signaled, final))
                if signaled:
                    pending.append((chain[0].task, chain))
                    chain = []
        # Post in plan order: a batch goes when its first task comes up (a stable sort keeps
        # each receiver's batches in order, which its queue pair completes them in).
        ordered = []
        for _, chain in sorted(pending, key=lambda p: p[0]):
            batch = Batch(len(batches), chain[0].receiver, slot, tuple(chain))
            batches.append(batch)
            ordered.append(batch)
        buckets[b] = BucketWrites(b, slot, offsets, tuple(ordered))
    return Schedule(buckets, order, slot_bytes, tuple(batches))


def _task_writes(index: int, task: Task, offset: int, targets: dict[tuple[int, str], RemoteTensor],
                 regions: dict[int, RegionTable], max_wr_bytes: int) -> list[Write]:
    try:
        target = targets[(task.receiver, task.dst)]
    except KeyError:
        raise SyncError(f"rdma: receiver {task.receiver} registered no tensor {task.dst!r}") from None
    if not Box.full(target.shape).contains(task.dst_box):
        raise SyncError(f"rdma: {task.dst_box} is outside {task.dst!r} {target.shape} on receiver {task.receiver}")
    if task.dst_box.numel() * target.itemsize != task.nbytes:
        raise SyncError(f"rdma: task for {task.dst!r} moves {task.nbytes} bytes but its box holds "
                        f"{task.dst_box.numel() * target.itemsize}")
    run, starts = contiguous_runs(task.dst_box, target.shape)
    run_bytes = run * target.itemsize
    table = regions[task.receiver]
    writes = []
    for k, start in enumerate(starts):
        addr = target.addr + start * target.itemsize
        region = table.locate(addr, run_bytes)
        for chunk in range(0, run_bytes, max_wr_bytes):
            length = min(max_wr_bytes, run_bytes - chunk)
            writes.append(Write(index, task.receiver, offset + k * run_bytes + chunk, length,
                                region.nic_addr(addr + chunk), region.rkey, False, False))
    return writes


def fill_slot(staging: torch.Tensor, schedule: Schedule, bucket: int, payloads: Sequence[tuple[int, torch.Tensor]]) -> None:
    """Copy each (task index, payload) into ``bucket``'s staging slot, where its writes read it.

    A payload lands dense and row-major, whatever its strides: the writes of a task
    read consecutive runs of it.
    """
    writes = schedule.buckets[bucket]
    start = writes.slot * schedule.slot_bytes
    for i, data in payloads:
        offset = start + writes.offsets[i]
        staging[offset:offset + data.numel() * data.element_size()].view(data.dtype).view(data.shape).copy_(data)


class SendWindow:
    """Writes in flight per queue pair, and which staging slot each signalled batch still reads.

    An RC queue pair completes its work in order, so each signalled completion retires
    its whole batch and everything before it: a FIFO of posted batches per receiver
    is the whole bookkeeping.
    """

    def __init__(self, max_outstanding: int, *, signal_every: int):
        if max_outstanding < signal_every:
            raise ValueError(f"max_outstanding ({max_outstanding}) must be >= signal_every ({signal_every}): "
                             "a whole batch must fit in flight")
        self.max_outstanding = max_outstanding
        self.in_flight: dict[int, int] = {}
        self._posted: dict[int, deque[Batch]] = {}
        self._slot_readers = [0] * NUM_SLOTS

    def has_room(self, batch: Batch) -> bool:
        return self.in_flight.get(batch.receiver, 0) + len(batch.writes) <= self.max_outstanding

    def posted(self, batch: Batch) -> None:
        assert self.has_room(batch), "posted a batch without room"
        self.in_flight[batch.receiver] = self.in_flight.get(batch.receiver, 0) + len(batch.writes)
        self._posted.setdefault(batch.receiver, deque()).append(batch)
        self._slot_readers[batch.slot] += 1

    def completed(self, receiver: int, batch_id: int) -> None:
        """A signalled completion from ``receiver``'s queue pair, for batch ``batch_id``."""
        head = self._posted[receiver].popleft()
        assert head.id == batch_id, f"completion for batch {batch_id} but batch {head.id} was posted first"
        self.in_flight[receiver] -= len(head.writes)
        self._slot_readers[head.slot] -= 1

    def slot_free(self, slot: int) -> bool:
        return self._slot_readers[slot] == 0

    def idle(self) -> bool:
        return not any(self.in_flight.values())


def imm_of(seq: int) -> int:
    """The immediate data that announces push ``seq`` (the low 32 bits; see ``unwrap_imm``)."""
    return seq & IMM_MASK


def unwrap_imm(imm: int, near: int) -> int:
    """The push number whose low 32 bits are ``imm`` and that is closest to ``near``."""
    delta = (imm - near) & IMM_MASK
    return near + delta - (1 << 32) if delta >= 1 << 31 else near + delta


class Arrivals:
    """The newest push whose WRITE WITH IMM arrived, per sender, at one receiver.

    A sender may finish push n + 1 before the receiver waits for it, and a late
    immediate from a push the receiver gave up on must not count for a newer one, so
    each arrival is recorded as a full push number and compared, not counted.
    """

    def __init__(self, senders: Sequence[int]):
        self.landed: dict[int, int] = {s: 0 for s in senders}

    def record(self, sender: int, imm: int, seq: int) -> None:
        self.landed[sender] = max(self.landed[sender], unwrap_imm(imm, seq))

    def missing(self, seq: int) -> list[int]:
        return sorted(s for s, n in self.landed.items() if n < seq)
