"""Ordering a plan's tasks, and summing their bytes, over arrays of their keys.

A plan at scale has a million tasks: one sort over key arrays orders them all, where
a sort per sender with a Python key per task took seconds; buckets and the statistics
sum the same arrays as integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .boxes import Box
from .meta import SourceParam
from .plan import DATA, SCALE, Task

# A piece's part: (position in the shard group, source box, destination box, owned scale
# blocks and their destination, data bytes, scale bytes). It becomes a data task, and a
# scale task when it owns scale blocks.
Part = tuple[int, Box, Box, "Box | None", "Box | None", int, int]


class Assigned(NamedTuple):
    """One piece given to a shard group: what its tasks share, and its parts.

    The tasks themselves are made once their bucket and seq are known (``order_tasks``):
    a million tasks at scale, each built once and never updated.
    """

    group: tuple[int, ...]  # the shard group that sends it; a part's sender is group[position]
    receiver: int
    src: str
    dst: str
    scale_dst: str | None
    fmt: str
    parts: list[Part]


@dataclass(frozen=True, eq=False)
class TaskColumns:
    """Every task's sort keys and byte counts as arrays, in assignment order.

    A million tasks: ordering, buckets and statistics work on these, not on a Python
    key per task. Replicas share a piece's parts list, so its per-task arrays are made once.
    """

    counts: np.ndarray  # tasks per assigned piece
    sender: np.ndarray
    receiver: np.ndarray
    name: np.ndarray  # the param's place in name order
    kind: np.ndarray  # 0 data, 1 scale: "data" sorts first
    nbytes: np.ndarray
    read: np.ndarray  # source bytes a task reads: FP8 payloads are one byte per source element

    @staticmethod
    def of(raw: list[Assigned], by_name: dict[str, SourceParam]) -> "TaskColumns":
        names = {name: i for i, name in enumerate(sorted({a.src for a in raw if a.parts}))}
        # Distinct parts lists (replicas share them), (param, format) pairs and shard groups,
        # each numbered once; a piece is then four small ints.
        lists: dict[int, int] = {}  # id(parts) -> its number; ids stay valid, raw holds every list
        tables: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        params: dict[tuple[str, str], int] = {}
        groups: dict[int, int] = {}  # id(group) -> its number
        group_ranks: list[tuple[int, ...]] = []
        rows = []
        for a in raw:
            t = lists.get(id(a.parts))
            if t is None:
                t = lists[id(a.parts)] = len(tables)
                tables.append(_part_arrays(a.parts))
            p = params.setdefault((a.src, a.fmt), len(params))
            g = groups.get(id(a.group))
            if g is None:
                g = groups[id(a.group)] = len(group_ranks)
                group_ranks.append(a.group)
            rows.append((t, p, g, a.receiver))
        empty = np.zeros(0, dtype=np.int64)
        if not raw:
            return TaskColumns(empty, empty, empty, empty, empty, empty, empty)
        t, p, g, receiver = np.array(rows, dtype=np.int64).T
        # Each piece's tasks are rows start[t] .. start[t] + count[t] of the parts tables.
        pos, kind, nbytes = (np.concatenate(col) for col in zip(*tables))
        table_counts = np.array([len(table[0]) for table in tables], dtype=np.int64)
        table_starts = np.cumsum(table_counts) - table_counts
        counts = table_counts[t]
        first = np.cumsum(counts) - counts  # each piece's first task
        row = np.arange(int(counts.sum())) + np.repeat(table_starts[t] - first, counts)
        width = max(len(ranks) for ranks in group_ranks)
        ranks = np.array([r + (-1,) * (width - len(r)) for r in group_ranks], dtype=np.int64)  # [group, position]
        param_name = np.array([names.get(src, -1) for src, _ in params], dtype=np.int64)
        param_elem = np.array([by_name[src].dtype.itemsize if fmt != "none" else 1 for src, fmt in params],
                              dtype=np.int64)
        per_task_param = np.repeat(p, counts)
        kind, nbytes = kind[row], nbytes[row]
        return TaskColumns(counts, ranks[np.repeat(g, counts), pos[row]], np.repeat(receiver, counts),
                           param_name[per_task_param], kind, nbytes, nbytes * param_elem[per_task_param] * (1 - kind))


def _part_arrays(parts: list[Part]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Position, kind and bytes of each task that ``parts`` make, in the order they are made."""
    rows = []
    for i, _, _, owned, _, data_bytes, scale_bytes in parts:
        rows.append((i, 0, data_bytes))
        if owned is not None:
            rows.append((i, 1, scale_bytes))
    return tuple(np.array(rows, dtype=np.int64).reshape(-1, 3).T)


def order_tasks(raw: list[Assigned], cols: TaskColumns, piece_bucket: np.ndarray
                ) -> tuple[dict[int, list[Task]], dict[int, list[Task]]]:
    """Per sender: bucket order, then large tasks first; seq numbers each (sender, receiver) pair.

    One lexicographic sort over the key arrays, not a sort per sender with a Python key
    per task. Ties keep the assignment's order, as a stable sort would. Each task is
    then made once, with its bucket and seq.
    """
    n = len(cols.sender)
    if not n:
        return {}, {}
    bucket = np.repeat(piece_bucket, cols.counts)
    order = np.lexsort((np.arange(n), cols.kind, cols.name, cols.receiver, -cols.nbytes, bucket, cols.sender))
    sender, receiver = cols.sender[order], cols.receiver[order]
    seq = np.empty(n, dtype=np.int64)
    seq[order] = _pair_seq(sender, receiver)
    flat = _make_tasks(raw, piece_bucket.tolist(), seq.tolist())
    ordered = [flat[i] for i in order.tolist()]
    tasks = {int(sender[a]): ordered[a:b] for a, b in _runs(sender)}
    by_receiver = np.argsort(receiver, kind="stable")
    runs = _runs(receiver[by_receiver])
    first_seen = sorted(runs, key=lambda run: by_receiver[run[0]])  # receivers as a sender-by-sender walk meets them
    arrivals = {int(receiver[by_receiver[a]]): [ordered[i] for i in by_receiver[a:b].tolist()] for a, b in first_seen}
    return tasks, arrivals


def _make_tasks(raw: list[Assigned], piece_bucket: list[int], seq: list[int]) -> list[Task]:
    """Every piece's tasks in assignment order: per part its data, then its scales if it owns any."""
    flat: list[Task] = []
    append, k = flat.append, 0
    for (group, r, src, dst, scale_dst, fmt, parts), b in zip(raw, piece_bucket):
        for i, inter, dst_box, owned, owned_dst, data_bytes, scale_bytes in parts:
            append(Task(group[i], r, src, inter, dst, dst_box, DATA, fmt, data_bytes, b, seq[k]))
            k += 1
            if owned is not None:
                append(Task(group[i], r, src, owned, scale_dst, owned_dst, SCALE, fmt, scale_bytes, b, seq[k]))
                k += 1
    return flat


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
