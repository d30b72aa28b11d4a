"""The plan: a static schedule computed once from all metadata and replayed every push.

These are the plan's data types and its per-rank views; ``planner`` builds them.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field

from .boxes import Box

DATA = "data"
SCALE = "scale"


@dataclass(slots=True)
class Task:
    """Move ``src_box`` of ``src`` (quantized to ``fmt``) into ``dst_box`` of ``dst``.

    For ``kind == "scale"`` the boxes are in scale-grid coordinates and ``dst`` is the
    scale tensor. ``seq`` orders the tasks of one (sender, receiver) pair: both sides
    use it to match two-sided messages.
    """

    sender: int
    receiver: int
    src: str
    src_box: Box
    dst: str
    dst_box: Box
    kind: str
    fmt: str
    nbytes: int
    bucket: int = -1  # set by the planner once buckets are known
    seq: int = -1


@dataclass(frozen=True, slots=True)
class Bucket:
    """Params that one shard group gathers (reconstruct) or amax-reduces (direct) together."""

    index: int
    group: tuple[int, ...]
    params: tuple[str, ...]
    quantized: tuple[str, ...]  # the subset that needs a scale grid
    nbytes: int  # temporary bytes this bucket holds on one of its ranks


@dataclass
class PlanStats:
    floor_s: float
    bytes_total: int
    bytes_per_sender: dict[int, int]
    bytes_per_receiver: dict[int, int]
    plan_s: float
    num_tasks: int


@dataclass
class Plan:
    mode: str
    num_senders: int
    num_receivers: int
    tasks: dict[int, list[Task]]  # per sender, in execution order
    arrivals: dict[int, list[Task]]  # per receiver
    buckets: list[Bucket]  # global order; every rank runs its own in this order
    fmt_of: dict[str, str]  # quant format per source param ("none" if never quantized)
    stats: PlanStats
    fingerprint: str = ""
    groups: list[tuple[int, ...]] = field(default_factory=list)  # distinct shard groups, sorted
    gated: frozenset[int] = frozenset()  # receivers that must say "ready" before a push writes
    transport: str = ""  # the transport every rank uses for this plan (resolves "auto")
    # Receivers are planned as slots 0..num_receivers-1; slot i is registered rank
    # receiver_ranks[i] (empty: the same number). Slots differ from ranks once a dead
    # receiver was dropped: transports number their peers by slot, control keys by rank.
    receiver_ranks: tuple[int, ...] = ()

    def for_sender(self, rank: int) -> "SenderPlan":
        mine = [b for b in self.buckets if rank in b.group]
        tasks = self.tasks.get(rank, [])
        gated = sorted(self.gated & {t.receiver for t in tasks})
        return SenderPlan(self.fingerprint, self.mode, rank, self.num_senders, self.num_receivers,
                          tasks, mine, self.groups, self.fmt_of, gated, self.transport, self.receiver_ranks)

    def for_receiver(self, rank: int) -> "ReceiverPlan":
        arrivals = self.arrivals.get(rank, [])
        senders = sorted({t.sender for t in arrivals})
        return ReceiverPlan(self.fingerprint, rank, self.num_senders, self.num_receivers, arrivals, senders,
                            self.transport)

    def registered_rank(self, slot: int) -> int:
        return self.receiver_ranks[slot] if self.receiver_ranks else slot


@dataclass
class SenderPlan:
    """What one sender needs of the plan."""

    fingerprint: str
    mode: str
    rank: int
    num_senders: int
    num_receivers: int
    tasks: list[Task]
    buckets: list[Bucket]
    groups: list[tuple[int, ...]]
    fmt_of: dict[str, str]
    gated: list[int]  # of this sender's receivers, those to wait for before writing
    transport: str
    receiver_ranks: tuple[int, ...] = ()  # slot -> registered rank, as in Plan

    @property
    def receivers(self) -> list[int]:
        return sorted({t.receiver for t in self.tasks})

    def registered_rank(self, slot: int) -> int:
        return self.receiver_ranks[slot] if self.receiver_ranks else slot


@dataclass
class ReceiverPlan:
    """What one receiver needs of the plan: its expected arrivals and their senders."""

    fingerprint: str
    rank: int
    num_senders: int
    num_receivers: int
    arrivals: list[Task]
    senders: list[int]
    transport: str


def fingerprint(*parts: object) -> str:
    """A stable digest of the planner's inputs: equal inputs, equal plan."""
    return hashlib.sha256(pickle.dumps(parts, protocol=4)).hexdigest()[:24]
