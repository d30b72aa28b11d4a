"""The planner: a pure function from all metadata to a validated plan.

No collectives and no tensors: it runs on one CPU for hundreds of ranks. It checks
every input first (names, shapes, dtypes, FP8 block alignment) and refuses the whole
plan with one message listing each offending tensor. Then it assigns every piece of
every destination to senders, balancing estimated link time (fewest bytes so far,
same host preferred through the faster link), and finally proves that every
destination element is written exactly once.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .boxes import Box, check_exact_cover
from .config import LinkModel
from .errors import PlanError
from .layouts import Layout, Piece, make_layout
from .meta import SUPPORTED_DTYPES, ReceiverMeta, SourceParam
from .plan import Bucket, Plan, PlanStats, Task, fingerprint
from .quant import QuantFormat, get_quant_format, scale_name
from .sharding import ShardGroup
from .task_order import Assigned, Part, TaskColumns, order_tasks, sums

_MAX_LISTED_ERRORS = 40
# Planning that leaves more new objects than this ends with a full collection (``_collected_once``).
_FULL_COLLECTION_AFTER = 100_000


class _Job(NamedTuple):
    """A checked piece with its receiver and quant format.

    A tuple: replicas copy a class's jobs with their own receiver (99 k at Kimi-K2 scale),
    and a frozen dataclass builds each field through ``object.__setattr__``.
    """

    receiver: int
    piece: Piece
    fmt: QuantFormat
    block: tuple[int, ...] | None
    scale_dst: str | None


def build_plan(sources: list[SourceParam], receivers: list[ReceiverMeta], *, sender_hosts: list[str],
               mode: str, links: LinkModel, watermark_bytes: int, sender_devices: list[str] | None = None) -> Plan:
    """Check all metadata, assign every destination box to senders, validate, fingerprint.

    ``sender_devices`` (e.g. GPU UUIDs) lets the planner see colocated pairs: bytes between
    a sender and a receiver on one device move at memory speed, not over a link.
    """
    started = time.perf_counter()
    with _collected_once():
        plan = _plan(sources, receivers, sender_hosts=sender_hosts, mode=mode, links=links,
                     watermark_bytes=watermark_bytes, sender_devices=sender_devices)
    plan.stats.plan_s = time.perf_counter() - started  # the collection included
    plan.fingerprint = fingerprint(sources, receivers, sender_hosts, sender_devices, mode, links, watermark_bytes)
    return plan


@contextlib.contextmanager
def _collected_once() -> Iterator[None]:
    """Run the cyclic garbage collector once after planning, not over and over during it.

    A plan is millions of small acyclic objects (tasks, boxes, lists). While they pile up,
    the collector would scan the growing heap again and again (a dozen full collections at
    Kimi-K2 scale) to find no cycle. After a large plan, one full collection moves them to
    the oldest generation, so their cost is paid here, once, not left to the caller; after
    a small one, the usual collector carries on (a full collection costs ~0.1 s of a heap
    with torch imported, more than planning a small model).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            young = gc.get_count()[0]  # objects allocated and not freed while paused
            gc.enable()
            if young > _FULL_COLLECTION_AFTER:
                gc.collect()


def _plan(sources: list[SourceParam], receivers: list[ReceiverMeta], *, sender_hosts: list[str], mode: str,
          links: LinkModel, watermark_bytes: int, sender_devices: list[str] | None) -> Plan:
    jobs, layouts = _check_and_map(sources, receivers)
    by_name = {s.name: s for s in sources}
    places = _Places(sender_hosts, sender_devices, receivers)
    assigner = _Assigner(places, links)
    if mode == "direct":
        raw = assigner.direct(jobs, by_name)
    elif mode == "reconstruct":
        raw = assigner.reconstruct(jobs, by_name)
    else:
        raise ValueError(f"unknown mode {mode!r}; valid: ['direct', 'reconstruct']")
    cols = TaskColumns.of(raw, by_name)
    buckets, piece_bucket = _make_buckets(raw, cols, by_name, mode, watermark_bytes)
    tasks, arrivals = order_tasks(raw, cols, piece_bucket)
    _validate_cover(arrivals, receivers, layouts, by_name)
    fmt_of = {s.name: "none" for s in sources}
    for job in jobs:
        if job.fmt.is_quantized:
            fmt_of[job.piece.src] = job.fmt.name
    stats = _stats(tasks, arrivals, cols, buckets, by_name, places, links, mode)
    return Plan(mode, len(sender_hosts), len(receivers), tasks, arrivals, buckets, fmt_of, stats,
                groups=sorted({b.group for b in buckets}), gated=frozenset(r.rank for r in receivers if r.gated))


def _check_and_map(sources: list[SourceParam], receivers: list[ReceiverMeta]) -> tuple[list[_Job], dict[int, Layout]]:
    errors: list[str] = []
    for s in sources:
        if s.dtype not in SUPPORTED_DTYPES:
            errors.append(f"source parameter {s.name!r} has unsupported dtype {s.dtype} "
                          f"(supported: {[str(d) for d in SUPPORTED_DTYPES]})")
    ranks = sorted(r.rank for r in receivers)
    if ranks != list(range(len(receivers))):
        errors.append(f"receiver ranks must be 0..{len(receivers) - 1}, got {ranks}")
    jobs: list[_Job] = []
    layouts: dict[int, Layout] = {}
    # Replicas repeat the same layout and tensors: map each such class once, then relabel.
    mapped: dict[tuple, tuple[int, list[_Job]]] = {}
    for recv in receivers:
        # The tensors as plain tuples: they hash and compare in C, where a DestTensor's
        # generated __hash__ and __eq__ are Python calls, one per tensor of every receiver.
        tensors = tuple((n, d.name, d.shape, d.dtype) for n, d in recv.tensors.items())
        key = (recv.layout.name, repr(sorted(recv.layout.kwargs.items())), recv.quant, tensors)
        if key in mapped:
            first, template = mapped[key]
            layouts[recv.rank] = layouts[first]
            jobs.extend(_Job(recv.rank, j.piece, j.fmt, j.block, j.scale_dst) for j in template)
            continue
        before = len(errors)
        mine = _map_receiver(recv, sources, errors, layouts)
        if len(errors) == before:  # a class with errors is mapped per receiver, so each is named
            mapped[key] = (recv.rank, mine)
        jobs.extend(mine)
    _check_one_format_per_param(jobs, errors)
    if errors:
        more = f"\n... and {len(errors) - _MAX_LISTED_ERRORS} more" if len(errors) > _MAX_LISTED_ERRORS else ""
        raise PlanError("plan refused before any byte moved:\n  " + "\n  ".join(errors[:_MAX_LISTED_ERRORS]) + more)
    return jobs, layouts


def _check_one_format_per_param(jobs: list[_Job], errors: list[str]) -> None:
    """A sender computes one scale grid per parameter, so its FP8 receivers must agree on the format
    (receivers that take it unquantized may sit beside them)."""
    formats: dict[str, dict[str, int]] = defaultdict(dict)
    for job in jobs:
        if job.fmt.is_quantized:
            formats[job.piece.src].setdefault(job.fmt.name, job.receiver)
    for name, seen in formats.items():
        if len(seen) > 1:
            who = ", ".join(f"{fmt} (receiver {r})" for fmt, r in sorted(seen.items()))
            errors.append(f"source parameter {name!r} is asked for in several FP8 formats: {who}; "
                          "use one quant format for every receiver")


def _map_receiver(recv: ReceiverMeta, sources: list[SourceParam], errors: list[str],
                  layouts: dict[int, Layout]) -> list[_Job]:
    r = recv.rank
    try:
        layout = layouts[r] = make_layout(recv.layout)
        fmt = get_quant_format(recv.quant)
    except (ValueError, TypeError) as e:
        errors.append(f"receiver {r}: {e}")
        return []
    jobs: list[_Job] = []
    targeted: set[str] = set()
    for src in sources:
        try:
            pieces = layout.pieces(src)
        except ValueError as e:
            errors.append(f"receiver {r}: {e}")
            continue
        for piece in pieces:
            dest = recv.tensors.get(piece.dst)
            if dest is None:
                errors.append(f"receiver {r} has no tensor {piece.dst!r} for source parameter {src.name!r}")
                continue
            targeted.add(piece.dst)
            if dest.dtype == torch.float8_e4m3fn:
                targeted.add(scale_name(piece.dst))  # a refused piece's scale is no second problem
            if len(dest.shape) != len(src.shape):
                errors.append(f"receiver {r} tensor {piece.dst!r}: shape {dest.shape} does not match "
                              f"source {src.name!r} shape {src.shape}")
                continue
            if not Box.full(dest.shape).contains(piece.dst_box):
                errors.append(f"receiver {r} tensor {piece.dst!r}: destination too small, shape {dest.shape} "
                              f"but source {src.name!r} writes {piece.dst_box}")
                continue
            job = _quant_job(r, piece, src, dest.dtype, fmt, recv, errors)
            if job is not None:
                jobs.append(job)
                if job.scale_dst:
                    targeted.add(job.scale_dst)
    for name in sorted(set(recv.tensors) - targeted - set(getattr(layout, "unwritten", lambda: {})())):
        errors.append(f"receiver {r} tensor {name!r} has no source parameter on the trainer")
    return jobs


def _quant_job(r: int, piece: Piece, src: SourceParam, dst_dtype: torch.dtype, fmt: QuantFormat,
               recv: ReceiverMeta, errors: list[str]) -> _Job | None:
    if dst_dtype != torch.float8_e4m3fn:
        if dst_dtype != src.dtype:
            errors.append(f"receiver {r} tensor {piece.dst!r}: dtype {dst_dtype} does not match source "
                          f"{src.name!r} dtype {src.dtype}")
            return None
        return _Job(r, piece, get_quant_format("none"), None, None)
    if not fmt.is_quantized:
        errors.append(f"receiver {r} tensor {piece.dst!r} is float8 but the receiver's quant is 'none'")
        return None
    try:
        block = fmt.block_shape(src.shape)
    except ValueError as e:
        errors.append(f"receiver {r} tensor {piece.dst!r}: {e}")
        return None
    dest_shape = recv.tensors[piece.dst].shape
    sname = scale_name(piece.dst)
    scale = recv.tensors.get(sname)
    want = fmt.scale_shape(dest_shape)
    if scale is None or scale.shape != want or scale.dtype != torch.float32:
        got = "missing" if scale is None else f"{scale.dtype} {scale.shape}"
        errors.append(f"receiver {r} tensor {piece.dst!r}: {fmt.name} needs a float32 scale tensor "
                      f"{sname!r} of shape {want}, got {got}")
        return None
    for d, b in enumerate(block):
        if b >= src.shape[d]:
            continue  # one block spans the dim: every slice shares its scale
        s, dbox = piece.src_box, piece.dst_box
        ok = (s.offsets[d] % b == 0 and dbox.offsets[d] % b == 0
              and (s.ends[d] % b == 0 or (s.ends[d] == src.shape[d] and dbox.ends[d] == dest_shape[d])))
        if not ok:
            errors.append(f"receiver {r} tensor {piece.dst!r}: FP8 block of {b} misaligned with the slice "
                          f"[{s.offsets[d]}:{s.ends[d]}) of {src.name!r} dim {d} (slices must start and end "
                          f"on multiples of {b})")
            return None
    return _Job(r, piece, fmt, block, sname)


class _Places:
    """Where each rank is: host ids and device ids, so a pair is same-device, same-host or remote."""

    def __init__(self, sender_hosts: list[str], sender_devices: list[str] | None, receivers: list[ReceiverMeta]):
        hosts = {h: i for i, h in enumerate(sorted(set(sender_hosts) | {r.host for r in receivers}))}
        self.sender_host = np.array([hosts[h] for h in sender_hosts])
        self.recv_host = {r.rank: hosts[r.host] for r in receivers}
        # A rank without a known device is alone on its device.
        devs = [f"{h}/{d}" if d else f"sender{i}" for i, (h, d) in
                enumerate(zip(sender_hosts, sender_devices or [""] * len(sender_hosts)))]
        rdevs = {r.rank: f"{r.host}/{r.device}" if r.device else f"receiver{r.rank}" for r in receivers}
        ids = {d: i for i, d in enumerate(sorted(set(devs) | set(rdevs.values())))}
        self.sender_dev = np.array([ids[d] for d in devs])
        self.recv_dev = {r: ids[d] for r, d in rdevs.items()}

    def kind(self, sender: int, receiver: int) -> str:
        if self.sender_dev[sender] == self.recv_dev[receiver]:
            return "device"
        return "host" if self.sender_host[sender] == self.recv_host[receiver] else "remote"


# The rank matrix of the positions holding parts, their data bytes, the parts, and the
# seconds each candidate would take, per speed class of the receiver.
_Split = tuple[np.ndarray, np.ndarray, list[Part], dict[int, np.ndarray]]


class _Assigner:
    """Greedy sender choice: the candidate whose link would finish earliest."""

    def __init__(self, places: _Places, links: LinkModel):
        self.places = places
        self.load_s = np.zeros(len(places.sender_host))
        self.intra = links.intra_host_gbps * 1e9
        self.inter = links.inter_host_gbps * 1e9
        self.local = links.hbm_gbps * 1e9 / 2  # a copy within one device reads and writes
        # Each sender's speed to each receiver, once: a choice then reads one row. Receivers
        # with equal rows (all remote, say) share a speed class, and so a piece's seconds.
        self.speed = {r: self._speeds(r) for r in places.recv_host}
        classes: dict[bytes, int] = {}
        self.speed_class = {r: classes.setdefault(row.tobytes(), len(classes)) for r, row in self.speed.items()}

    def _speeds(self, receiver: int) -> np.ndarray:
        p = self.places
        same_host = p.sender_host == p.recv_host[receiver]
        same_dev = p.sender_dev == p.recv_dev[receiver]
        return np.where(same_dev, self.local, np.where(same_host, self.intra, self.inter))

    def _seconds(self, senders: np.ndarray, receiver: int, nbytes: np.ndarray) -> np.ndarray:
        return nbytes / self.speed[receiver][senders]

    def direct(self, jobs: list[_Job], by_name: dict[str, SourceParam]) -> list[Assigned]:
        """Each piece goes to one shard group, split along the boxes its ranks hold.

        The group is the one whose busiest involved rank would finish first.
        """
        out: list[Assigned] = []
        # Per (param, piece, block): the parts the shard groups hold, their box arithmetic
        # and byte counts, computed once; replicas repeat the same pieces at scale.
        splits: dict[tuple, _Split] = {}
        regular: dict[str, _Regular | None] = {}
        for job in sorted(jobs, key=lambda j: -j.piece.src_box.numel()):
            src = by_name[job.piece.src]
            if src.name not in regular:
                regular[src.name] = _Regular.of(src)
            elem = 1 if job.fmt.is_quantized else src.dtype.itemsize
            shards = regular[src.name]
            piece = job.piece
            if shards is None:
                chosen, irregular = self._best_irregular(src, job, elem)
                out.append(_assigned(chosen.ranks, job, _parts(piece, job.block, elem, irregular)))
                continue
            sb, db = piece.src_box, piece.dst_box  # plain tuples hash in C, a Box's hash is Python
            key = (src.name, sb.offsets, sb.sizes, db.offsets, db.sizes, job.block, elem)
            split = splits.get(key)
            if split is None:
                split = splits[key] = shards.split(piece, job.block, elem)
            ranks, nbytes, parts, seconds_of = split
            seconds = seconds_of.get(self.speed_class[job.receiver])
            if seconds is None:
                seconds = seconds_of[self.speed_class[job.receiver]] = self._seconds(ranks, job.receiver, nbytes)
            best = int((self.load_s[ranks] + seconds).max(axis=1).argmin()) if len(ranks) > 1 else 0
            self.load_s[ranks[best]] += seconds[best]
            group = src.groups[best].ranks
            out.append(_assigned(group, job, parts))
        return out

    def _best_irregular(self, src: SourceParam, job: _Job, elem: int) -> tuple[ShardGroup, list[tuple[int, Box]]]:
        """The same choice for params whose shard groups hold differently shaped boxes."""
        best = None
        for group in src.groups:
            parts = [(i, inter) for i, box in enumerate(group.boxes)
                     if (inter := box.intersect(job.piece.src_box)) is not None]
            ranks = np.array([group.ranks[i] for i, _ in parts], dtype=np.int64)
            seconds = self._seconds(ranks, job.receiver, np.array([b.numel() * elem for _, b in parts], dtype=float))
            cost = float((self.load_s[ranks] + seconds).max()) if len(parts) else 0.0
            if best is None or cost < best[0]:
                best = (cost, group, parts, ranks, seconds)
        _, group, parts, ranks, seconds = best
        self.load_s[ranks] += seconds
        return group, parts

    def reconstruct(self, jobs: list[_Job], by_name: dict[str, SourceParam]) -> list[Assigned]:
        """Each param goes to one shard group; each of its pieces to that group's least-loaded rank."""
        out: list[Assigned] = []
        per_param: dict[str, list[_Job]] = defaultdict(list)
        for job in jobs:
            per_param[job.piece.src].append(job)
        for name in sorted(per_param, key=lambda n: -by_name[n].nbytes):
            src = by_name[name]
            group = min(src.groups, key=lambda g: float(self.load_s[list(g.ranks)].mean()))
            ranks = np.array(group.ranks)
            for job in sorted(per_param[name], key=lambda j: -j.piece.src_box.numel()):
                elem = 1 if job.fmt.is_quantized else src.dtype.itemsize
                seconds = self._seconds(ranks, job.receiver, np.full(len(ranks), job.piece.src_box.numel() * elem,
                                                                       dtype=np.float64))
                best = int(np.argmin(self.load_s[ranks] + seconds))
                self.load_s[ranks[best]] += seconds[best]
                out.append(_assigned(group.ranks, job, _parts(job.piece, job.block, elem, [(best, job.piece.src_box)])))
        return out


@dataclass(frozen=True, eq=False)
class _Regular:
    """A param whose shard groups all hold the same boxes: its rank matrix, and those boxes as arrays."""

    matrix: np.ndarray  # [group, position] -> rank
    lo: np.ndarray  # [position, dim] box offsets
    hi: np.ndarray  # [position, dim] box ends

    @staticmethod
    def of(src: SourceParam) -> "_Regular | None":
        boxes = src.groups[0].boxes
        if any(g.boxes != boxes for g in src.groups):
            return None
        lo = np.array([b.offsets for b in boxes], dtype=np.int64).reshape(len(boxes), len(src.shape))
        hi = lo + np.array([b.sizes for b in boxes], dtype=np.int64).reshape(lo.shape)
        return _Regular(np.array([g.ranks for g in src.groups]), lo, hi)

    def intersections(self, box: Box) -> list[tuple[int, Box]]:
        """(position, common box) for each position whose box shares an element with ``box``:
        ``Box.intersect`` over all positions at once."""
        lo = np.maximum(self.lo, np.array(box.offsets, dtype=np.int64))
        hi = np.minimum(self.hi, np.array(box.ends, dtype=np.int64))
        hit = np.flatnonzero((hi > lo).all(axis=1))
        return [(i, Box(tuple(o), tuple(e - a for a, e in zip(o, end))))
                for i, o, end in zip(hit.tolist(), lo[hit].tolist(), hi[hit].tolist())]

    def split(self, piece: Piece, block: tuple[int, ...] | None, elem: int) -> _Split:
        """A piece's parts, the ranks that could send each (one row per shard group) and their bytes."""
        parts = _parts(piece, block, elem, self.intersections(piece.src_box))
        return (self.matrix[:, [p[0] for p in parts]], np.array([p[5] for p in parts], dtype=np.float64)[None, :],
                parts, {})


def _parts(piece: Piece, block: tuple[int, ...] | None, elem: int, hits: list[tuple[int, Box]]) -> list[Part]:
    """The parts of a piece that ``hits`` cut it into: (position, source box) each."""
    shifts = _shifts(piece, block)  # once per piece, not per part
    out = []
    for i, inter in hits:
        dst, owned, owned_dst = _geometry(piece, inter, block, shifts)
        out.append((i, inter, dst, owned, owned_dst, inter.numel() * elem, owned.numel() * 4 if owned else 0))
    return out


def _assigned(group: tuple[int, ...], job: _Job, parts: list[Part]) -> Assigned:
    return Assigned(group, job.receiver, job.piece.src, job.piece.dst, job.scale_dst, job.fmt.name, parts)


def _shifts(piece: Piece, block: tuple[int, ...] | None) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """How a piece moves from source to destination coordinates: in elements, and in scale blocks."""
    delta = tuple(d - s for d, s in zip(piece.dst_box.offsets, piece.src_box.offsets))
    if block is None:
        return delta, None
    s_grid, d_grid = piece.src_box.to_blocks(block), piece.dst_box.to_blocks(block)
    return delta, tuple(d - s for d, s in zip(d_grid.offsets, s_grid.offsets))


def _geometry(piece: Piece, part: Box, block: tuple[int, ...] | None,
              shifts: tuple[tuple[int, ...], tuple[int, ...] | None]) -> tuple[Box, Box | None, Box | None]:
    """Where ``part`` of a piece lands, and the scale blocks it owns (source and destination grid boxes)."""
    delta, grid_shift = shifts
    if block is None:
        return part.shift(delta), None, None
    owned = part.owned_blocks(piece.src_box, block)
    if owned.is_empty():
        return part.shift(delta), None, None
    return part.shift(delta), owned, owned.shift(grid_shift)


def _make_buckets(raw: list[Assigned], cols: TaskColumns, by_name: dict[str, SourceParam], mode: str,
                  watermark_bytes: int) -> tuple[list[Bucket], np.ndarray]:
    """Pack each group's params into buckets of at most half the watermark, then interleave groups.

    Half, so one bucket can be packed while the previous one is in transfer. A param
    larger than that gets a bucket of its own. Returns the buckets and each piece's bucket.
    """
    keys: dict[tuple, int] = {}  # (group, param) of pieces with tasks -> its id
    fp8: list[bool] = []
    piece_key = []
    for a in raw:
        i = keys.setdefault((a.group, a.src), len(keys)) if a.parts else -1  # one piece: one param, one format
        if i == len(fp8):
            fp8.append(False)
        if i >= 0 and a.fmt != "none":
            fp8[i] = True
        piece_key.append(i)
    # The bytes of each (group, param) on its busiest rank, summed as integers over its tasks.
    busiest = np.zeros(len(keys), dtype=np.int64)
    if len(cols.sender):
        width = int(cols.sender.max()) + 1
        key_rank, where = np.unique(np.repeat(piece_key, cols.counts) * width + cols.sender, return_inverse=True)
        per_rank = np.zeros(len(key_rank), dtype=np.int64)
        np.add.at(per_rank, where, cols.nbytes)
        np.maximum.at(busiest, key_rank // width, per_rank)
    per_group: dict[tuple[int, ...], dict[str, tuple[int, bool]]] = defaultdict(dict)
    for ((group, src), i), most in zip(keys.items(), busiest.tolist()):
        # Reconstruct holds the flat send buffer (1/G), the gathered flat buffer and the
        # unpacked full tensor at once; a shard group of one rank already holds it whole.
        # Whole bytes (rounded up): a Bucket's nbytes is an int, and the control plane checks it.
        g = len(group)
        held = -(-by_name[src].nbytes * (2 * g + 1) // g) if mode == "reconstruct" and g > 1 else 0
        per_group[group][src] = (held + most, fp8[i])
    cap = max(1, watermark_bytes // 2)
    lists = []
    for group in sorted(per_group):
        params = sorted(per_group[group].items(), key=lambda kv: (-kv[1][0], kv[0]))
        buckets, current, size = [], [], 0
        for name, (nbytes, quantized) in params:
            if current and size + nbytes > cap:
                buckets.append((current, size))
                current, size = [], 0
            current.append((name, quantized))
            size += nbytes
        if current:
            buckets.append((current, size))
        lists.append((group, buckets))
    ordered: list[Bucket] = []
    bucket_of: dict[tuple, int] = {}  # (group, param) -> bucket
    for i in range(max((len(b) for _, b in lists), default=0)):
        for group, buckets in lists:
            if i < len(buckets):
                members, size = buckets[i]
                index = len(ordered)
                ordered.append(Bucket(index, group, tuple(n for n, _ in members),
                                      tuple(n for n, q in members if q), size))
                for name, _ in members:
                    bucket_of[(group, name)] = index
    key_bucket = np.array([bucket_of[key] for key in keys] + [-1], dtype=np.int64)  # [-1]: a piece without tasks
    return ordered, key_bucket[np.array(piece_key, dtype=np.int64)]


def _validate_cover(arrivals: dict[int, list[Task]], receivers: list[ReceiverMeta], layouts: dict[int, Layout],
                    by_name: dict[str, SourceParam]) -> None:
    """Prove that every destination element is written exactly once and inside its bounds.

    A layout may declare boxes that no source fills (vocab padding rows); they count as
    covered, and nothing may write them. A failure names both shapes: the destination's
    and those of the sources that write it (most often, one of them is simply wrong).
    """
    problems = []
    # Replicas receive the very same box objects (a piece's split is computed once), so a
    # cover proven for one set of boxes holds for every tensor of that shape given the same
    # set. Keyed by the boxes' ids, kept valid by holding the proven boxes (a layout's
    # unwritten boxes are new per receiver); only proofs are kept, so a failure is always
    # checked, and named, on its own.
    proven: dict[tuple, list[Box]] = {}
    for recv in receivers:
        boxes: dict[str, list[Box]] = defaultdict(list)
        unwritten = getattr(layouts[recv.rank], "unwritten", None)
        for name, extra in (unwritten() if unwritten else {}).items():
            boxes[name].extend(extra)
        mine = arrivals.get(recv.rank, [])
        for t in mine:
            boxes[t.dst].append(t.dst_box)
        for name, dest in recv.tensors.items():
            given = boxes.get(name, [])
            key = (tuple(dest.shape), *sorted(map(id, given)))
            if key in proven:
                continue
            why = check_exact_cover(given, dest.shape)
            if why is None:
                proven[key] = given
                continue
            writers = {t.src for t in mine if t.dst == name}  # only for the message
            srcs = ", ".join(f"{s!r} {tuple(by_name[s].shape)}" for s in sorted(writers) if s in by_name)
            problems.append(f"receiver {recv.rank} tensor {name!r} of shape {tuple(dest.shape)}: {why}"
                            + (f" (written from {srcs})" if srcs else ""))
    if problems:
        raise PlanError("plan does not cover every destination element exactly once:\n  " + "\n  ".join(problems[:40]))


def _stats(tasks: dict[int, list[Task]], arrivals: dict[int, list[Task]], cols: TaskColumns, buckets: list[Bucket],
           by_name: dict[str, SourceParam], places: _Places, links: LinkModel, mode: str) -> PlanStats:
    """Bytes per rank and the plan's floor: the busiest link or device memory, at its bandwidth.

    Per device: NVLink out and in, NIC out and in, and HBM (sources read, packed bytes
    written, received bytes written; a same-device write counts once). Byte counts are
    summed as integers: the loads they add to stay exact.
    """
    intra, inter, hbm = links.intra_host_gbps * 1e9, links.inter_host_gbps * 1e9, links.hbm_gbps * 1e9
    sent, received = sums(cols.sender, cols.nbytes), sums(cols.receiver, cols.nbytes)
    per_sender = {s: sent[s] for s in tasks}
    per_recv = {r: received[r] for r in arrivals}
    load: dict[tuple[str, int], float] = defaultdict(float)
    for s, read in sums(cols.sender, cols.read).items():
        load[("hbm", int(places.sender_dev[s]))] += read
    num_receivers = int(cols.receiver.max()) + 1 if len(cols.receiver) else 1
    for pair, nbytes in sums(cols.sender * num_receivers + cols.receiver, cols.nbytes).items():
        s, r = divmod(pair, num_receivers)
        sdev = int(places.sender_dev[s])
        load[("hbm", sdev)] += nbytes
        kind = places.kind(s, r)
        if kind != "device":
            rdev = places.recv_dev[r]
            load[("hbm", rdev)] += nbytes
            link = "nvlink" if kind == "host" else "nic"
            load[(link + "_out", sdev)] += nbytes
            load[(link + "_in", rdev)] += nbytes
    if mode == "reconstruct":
        for b in buckets:
            if len(b.group) > 1:
                one_host = len({int(places.sender_host[r]) for r in b.group}) == 1
                nbytes = sum(by_name[n].nbytes for n in b.params) * (len(b.group) - 1) / len(b.group)
                for r in b.group:
                    load[("nvlink_in" if one_host else "nic_in", int(places.sender_dev[r]))] += nbytes
                    load[("hbm", int(places.sender_dev[r]))] += nbytes
    speed = {"hbm": hbm, "nvlink_out": intra, "nvlink_in": intra, "nic_out": inter, "nic_in": inter}
    floor = max((v / speed[k] for (k, _), v in load.items()), default=0.0)
    return PlanStats(floor, sum(per_sender.values()), per_sender, per_recv, 0.0,
                     sum(len(ts) for ts in tasks.values()))
