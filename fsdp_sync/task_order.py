"""Ordering a plan's tasks, and summing their bytes, over arrays of their keys.

A plan at scale has a million tasks: one sort over key arrays orders them all, where
a sort per sender with a Python key per task took seconds, and the statistics sum the
same arrays as integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .meta import SourceParam
from .plan import SCALE, Task

# One assigned piece: the shard group that sends it, and its tasks.
Assigned = tuple[tuple[int, ...], list[Task]]


@dataclass(frozen=True, eq=False)
class TaskColumns:
    """Every task's sort keys and byte counts as arrays, in assignment order.

    A million tasks: ordering and statistics work on these, not on a Python key per task.
    """

    sender: np.ndarray
    receiver: np.ndarray
    bucket: np.ndarray
    name: np.ndarray  # the param's place in name order
    kind: np.ndarray  # 0 data, 1 scale: "data" sorts first
    nbytes: np.ndarray
    read: np.ndarray  # source bytes a task reads: FP8 payloads are one byte per source element

    @staticmethod
    def of(raw: list[Assigned], bucket_of: dict[tuple, int], by_name: dict[str, SourceParam]) -> "TaskColumns":
        flat = [task for _, tasks in raw for task in tasks]
        names = {name: i for i, name in enumerate(sorted({tasks[0].src for _, tasks in raw if tasks}))}
        per_job = [(bucket_of[(group, t.src)], t.receiver, names[t.src],
                    by_name[t.src].dtype.itemsize if t.fmt != "none" else 1)
                   for group, tasks in raw if tasks for t in tasks[:1]]  # a piece: one param, receiver, format
        counts = [len(tasks) for _, tasks in raw if tasks]
        bucket, receiver, name, elem = np.repeat(np.array(per_job, dtype=np.int64).reshape(-1, 4), counts, axis=0).T
        n = len(flat)
        sender = np.fromiter((t.sender for t in flat), np.int64, n)
        nbytes = np.fromiter((t.nbytes for t in flat), np.int64, n)
        kind = np.fromiter((t.kind == SCALE for t in flat), np.int64, n)
        return TaskColumns(sender, receiver, bucket, name, kind, nbytes, nbytes * elem * (1 - kind))


def order_tasks(raw: list[Assigned], cols: TaskColumns) -> tuple[dict[int, list[Task]], dict[int, list[Task]]]:
    """Per sender: bucket order, then large tasks first; seq numbers each (sender, receiver) pair.

    One lexicographic sort over the key arrays, not a sort per sender with a Python key
    per task. Ties keep the assignment's order, as a stable sort would.
    """
    flat = [task for _, tasks in raw for task in tasks]
    if not flat:
        return {}, {}
    order = np.lexsort((np.arange(len(flat)), cols.kind, cols.name, cols.receiver, -cols.nbytes, cols.bucket,
                        cols.sender))
    sender, receiver = cols.sender[order], cols.receiver[order]
    ordered = [flat[i] for i in order.tolist()]
    for task, b, q in zip(ordered, cols.bucket[order].tolist(), _pair_seq(sender, receiver).tolist()):
        task.bucket, task.seq = b, q
    tasks = {int(sender[a]): ordered[a:b] for a, b in _runs(sender)}
    by_receiver = np.argsort(receiver, kind="stable")
    runs = _runs(receiver[by_receiver])
    first_seen = sorted(runs, key=lambda run: by_receiver[run[0]])  # receivers as a sender-by-sender walk meets them
    arrivals = {int(receiver[by_receiver[a]]): [ordered[i] for i in by_receiver[a:b].tolist()] for a, b in first_seen}
    return tasks, arrivals


def _run_starts(values: np.ndarray) -> np.ndarray:
    """Where each run of equal values starts in an array sorted by value."""
    return np.flatnonzero(np.r_[True, values[1:] != values[:-1]])


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of equal values in a sorted array."""
    bounds = [*_run_starts(values).tolist(), len(values)]
    return list(zip(bounds[:-1], bounds[1:]))


def _pair_seq(sender: np.ndarray, receiver: np.ndarray) -> np.ndarray:
    """Each task's position among the earlier tasks of its (sender, receiver) pair."""
    pair = sender * (int(receiver.max()) + 1) + receiver
    by_pair = np.argsort(pair, kind="stable")
    starts = _run_starts(pair[by_pair])
    seq = np.empty(len(pair), dtype=np.int64)
    seq[by_pair] = np.arange(len(pair)) - np.repeat(starts, np.diff(np.r_[starts, len(pair)]))
    return seq


def sums(keys: np.ndarray, values: np.ndarray) -> dict[int, int]:
    """Exact integer sums of ``values`` per key (small non-negative ints), for each key present."""
    if not len(keys):
        return {}
    sums = np.zeros(int(keys.max()) + 1, dtype=np.int64)
    np.add.at(sums, keys, values)
    present = np.flatnonzero(np.bincount(keys))
    return dict(zip(present.tolist(), sums[present].tolist()))
