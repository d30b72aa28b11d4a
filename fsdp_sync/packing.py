"""Turn one bucket of local shards into packed task payloads, in either mode.

* direct: each rank quantizes only the rows it holds. Blocks that straddle a shard
  boundary get their scale from one all-reduce(MAX) of per-block amax over the shard
  group, one collective per bucket; a bucket none of whose blocks a boundary cuts on any
  rank (learned on its first push, with the same collective) skips it afterwards.
* reconstruct: the shard group rebuilds the bucket's full tensors with one
  all-gather per dtype, then the planned rank quantizes and slices each task.

Both compute the same scale grids (MAX is exact), so they give identical bytes.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from .boxes import Box
from .copies import copy_all
from .finite import FiniteCheck, finite_check
from .meta import SourceParam
from .plan import DATA, Bucket, SenderPlan, Task
from . import quant
from .quant import get_quant_format, scales_from_amax
from .staging import StagingSlots
from .trace import Trace

# torch 2.13 renamed all_gather_into_tensor; 2.11 (the GPU machines) has only the old name.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


_WARNED_SELF_CHECK: set[str] = set()  # devices whose failed self-check was reported


def _kernels_for(device: torch.device, kernels: str):
    """(per-box ops, whether to group launches): Triton or the plain-torch reference, same bits.

    ``auto`` groups Triton launches on GPU (unless they fail a self-check against the
    per-box kernels, which it says) and takes the reference on CPU; the others force their
    choice (Triton on CPU runs only under TRITON_INTERPRET=1).
    """
    if kernels == "reference" or (kernels == "auto" and device.type != "cuda"):
        return quant, False
    from .kernels import fp8_grouped, fp8_quant

    if kernels == "auto" and (reason := fp8_grouped.self_check(device)):
        if str(device) not in _WARNED_SELF_CHECK:  # the sender and its packer both ask: say it once
            _WARNED_SELF_CHECK.add(str(device))
            warnings.warn(f"fsdp_sync: grouped FP8 launches failed their self-check on {device} ({reason}); "
                          "launching per box instead", stacklevel=3)
        return fp8_quant, False
    return fp8_quant, kernels in ("auto", "grouped")


def groups_launches(device: torch.device, kernels: str) -> bool:
    """Whether a packer on ``device`` with ``kernels`` groups its launches (Triton)."""
    return _kernels_for(device, kernels)[1]


def all_reduce_amax(amax: torch.Tensor, group) -> None:
    """MAX of float32 amaxes over ``group``, in place, as integers so that NaN always wins.

    A float MAX may drop NaN (gloo's does, depending on the order of its operands).
    Non-negative floats order like their bits; with the sign bit cleared every NaN's bits
    exceed inf's, as the Triton kernels already compute amax.
    """
    bits = amax.view(torch.int32)
    bits.bitwise_and_(0x7FFFFFFF)
    dist.all_reduce(bits, op=dist.ReduceOp.MAX, group=group)


@dataclass
class _Replay:
    """A bucket's launches, recorded on the push that built them, to run again on later
    pushes while its source tensors stay where they were (FSDP2 updates shards in place).

    A bucket is recorded when every launch reads the shards themselves and writes memory
    that stays: destinations, or (``staging_slots``) its FP8 payloads' fixed places in
    ``fsdp_sync.staging``. A push of the bucket is then a memset, an amax launch, the
    all-reduce, the scale arithmetic, a quantize launch per kind and the copies, with no
    Python per parameter.
    """

    sources: tuple[int, ...]  # data_ptr of each held tensor, in bucket order
    flat: torch.Tensor  # the bucket's amax grid, all params
    scales: torch.Tensor  # the bucket's scale grid, all params (fused launches write theirs here)
    grids: dict[str, torch.Tensor]  # per quantized param, its view of ``scales``
    group: object | None  # the shard group's process group, when its amaxes are all-reduced
    amax: object | None = None  # PreparedLaunch
    quantize: list = field(default_factory=list)  # PreparedLaunch per batch
    copies: object | None = None  # PreparedLaunch of the small copies
    rest: list = field(default_factory=list)  # (dst, src) copies too large for one launch
    stores: object | None = None  # delta pushes: PreparedLaunch of the large copies' changed elements
    whole: tuple[int, int] = (0, 0)  # delta pushes: bytes and weight elements stored whole
    out: list = field(default_factory=list)  # (task, payload): None, or memory that stays (a slot, a shard)

    def run(self, bucket: Bucket, trace: Trace, mode: str, stores=None) -> list:
        with trace.span("amax" if mode == "direct" else "scale", f"bucket {bucket.index} (replay)"):
            if self.flat.numel():
                self.flat.zero_()
                if self.amax is not None:
                    self.amax.launch()
                if self.group is not None:
                    all_reduce_amax(self.flat, self.group)
                self.scales.copy_(scales_from_amax(self.flat))
        with trace.span("quantize", f"bucket {bucket.index} (replay)"):
            for launch in self.quantize:
                launch.launch()
            if self.copies is not None:
                self.copies.launch()
            if self.stores is not None:
                self.stores.launch()
            copy_all(self.rest, non_blocking=True)
            if stores is not None:
                stores.whole(*self.whole)
        return self.out


class BucketPacker:
    """Packs this rank's tasks bucket by bucket, running the bucket's collectives.

    ``destination(task)`` may return a tensor the packer can write straight into (a
    peer GPU's buffer opened over CUDA IPC, a shared-memory file): the quantize kernel
    then stores there, no staging and no separate transfer, and the payload is None.

    With grouped kernels a bucket's amaxes take one launch and its quantizations another
    (``fsdp_sync.kernels.fp8_grouped``), instead of one launch per parameter each.

    ``delta`` (grouped kernels and a ``destination`` only): the shadows its stores compare
    with, for delta pushes (``fsdp_sync.delta_stores``).

    ``staging_slots`` (grouped kernels): FP8 payloads that are not stored straight into a
    destination go into that many slots that outlive a push (``fsdp_sync.staging``), so
    their buckets are recorded and replayed too; the pipeline must then hold at most that
    many buckets at once (``run_pipeline(slots=...)``). 0: a fresh buffer per payload and push.
    """

    def __init__(self, plan: SenderPlan, sources: dict[str, SourceParam], groups: dict[tuple[int, ...], object],
                 device: torch.device, destination: Callable[[Task], torch.Tensor | None] | None = None,
                 kernels: str = "auto", remote: Callable[[Task], bool] | None = None, check_finite: bool = False,
                 delta=None, staging_slots: int = 0):
        """``remote(task)``: whether ``destination(task)`` is on a peer GPU (see GroupedCells.freeze).
        ``check_finite``: check the unquantized params for inf and NaN too (see ``fsdp_sync.finite``)."""
        self.plan = plan
        self.check_finite = check_finite
        self.sources = sources
        self.groups = groups
        self.device = device
        self.ops, self.grouped = _kernels_for(device, kernels)
        if delta is not None and not (self.grouped and destination is not None):
            raise ValueError("delta stores need grouped kernels and a destination to store into")
        self.stores = delta
        self._whole = [0, 0]  # this bucket's bytes and weight elements stored whole (delta)
        self.destination = destination or (lambda task: None)
        self.remote = remote or (lambda task: False)
        self.tasks_of: dict[int, list[Task]] = defaultdict(list)
        self._slices: dict[tuple[int, Box], tuple[slice, ...]] = {}  # tasks live as long as the plan
        self._inner: dict[int, dict[str, Box]] = {}  # per bucket: see _inner_boxes
        self._pieces: dict[int, list[tuple]] = {}  # per task: see _pieces_of
        self._amax_parts: dict[tuple[int, str], list[tuple]] = {}  # per (bucket, param): see _amax_boxes
        self._replays: dict[int, _Replay] = {}  # per bucket, see _Replay
        self._reduce: dict[int, bool] = {}  # per bucket, direct mode: whether any rank holds a cut block
        self._replayable = False  # within one pack: every launch so far can be recorded
        for t in plan.tasks:
            self.tasks_of[t.bucket].append(t)
        self._staging: StagingSlots | None = None  # where staged FP8 payloads live, if anywhere
        if staging_slots and self.grouped:
            staging = StagingSlots(plan.buckets, self.tasks_of, self._stages, device, count=staging_slots)
            self._staging = staging if staging.capacity else None
        self.slots = self._staging.count if self._staging is not None else 0  # for run_pipeline

    @property
    def staging_bytes(self) -> int:
        """Bytes held by the staging slots."""
        return self._staging.nbytes if self._staging is not None else 0

    def pack(self, bucket: Bucket, local: dict[str, torch.Tensor],
             trace: Trace) -> tuple[list[tuple[Task, torch.Tensor | None]], FiniteCheck | None]:
        """The bucket's (task, payload) pairs, and its check for inf and NaN (None: nothing to
        check), to read once the work queued on the current stream is done, before sending."""
        shards = {name: self._on_device(local[name], trace) for name in bucket.params}
        replay = self._replays.get(bucket.index)
        if replay is not None:
            if replay.sources == tuple(shards[name].data_ptr() for name in bucket.params):
                return replay.run(bucket, trace, self.plan.mode, self.stores), self._finite(bucket, shards, replay)
            del self._replays[bucket.index]  # a source moved: pack it afresh, and record again
        boxes = {name: self._box(name, bucket.group) for name in bucket.params}
        # Recorded only when the launches read the shards themselves (no H2D, no gather).
        self._replayable = all(shards[n] is local[n] for n in bucket.params)
        if self.plan.mode == "reconstruct":
            with trace.span("gather", f"bucket {bucket.index}"):
                held = self._gather(bucket, shards)
            held_boxes = {name: Box.full(self.sources[name].shape) for name in bucket.params}
            self._replayable &= len(bucket.group) == 1
        else:
            held, held_boxes = shards, boxes
        inner = self._inner_boxes(bucket, held_boxes)
        self._whole = [0, 0]
        with trace.span("amax" if self.plan.mode == "direct" else "scale", f"bucket {bucket.index}"):
            scales, replay = self._scales(bucket, held, held_boxes, inner)
        with trace.span("quantize", f"bucket {bucket.index}"):
            batches = self._batches()
            copies: list[tuple[torch.Tensor, torch.Tensor, Task]] = []
            out = [(t, self._payload(t, held[t.src], held_boxes[t.src], scales, batches, copies, inner.get(t.src)))
                   for t in self.tasks_of[bucket.index]]
            replay.quantize = [batch.freeze() for batch in (batches or {}).values() if len(batch)]
            for launch in replay.quantize:
                launch.launch()
            replay.copies, replay.rest, replay.stores = self._copy(copies)
            if self.stores is not None:
                replay.whole = tuple(self._whole)
                self.stores.whole(*replay.whole)
            if self._replayable:  # payloads are None, slots or shards: they stay where they are
                replay.out = out
                self._replays[bucket.index] = replay
        return out, self._finite(bucket, shards, replay)

    def _finite(self, bucket: Bucket, shards: dict[str, torch.Tensor], replay: _Replay) -> FiniteCheck | None:
        """Queue the bucket's check: its scale grid (every block amax this rank holds, fused
        ones included, lands there once the quantize launches ran), and with ``check_finite``
        this rank's shards of its unquantized params (each element is some rank's)."""
        quantized = set(bucket.quantized)
        values = ({n: shards[n] for n in bucket.params if n not in quantized} if self.check_finite else {})
        return finite_check(bucket.index, replay.scales, replay.grids, values)

    def _copy(self, copies: list[tuple[torch.Tensor, torch.Tensor, Task]]) -> tuple[object | None, list, object | None]:
        """Run the (destination, bytes, task) copies: the small ones in one launch where Triton
        kernels are in use (on GPU each ``copy_`` into a peer costs the copy engine ~12 us),
        the rest through ``copy_all``; with delta stores, weights store only their changed
        elements (a launch or two a bucket) and the rest are copied into their shadows too.
        Returns the three parts, to replay."""
        stores = None
        if self.stores is not None:
            copies, stores = self._delta_copies(copies)
        else:
            copies = [(dst, src) for dst, src, _ in copies]
        if not self.grouped or not copies:
            copy_all(copies, non_blocking=True)
            return None, copies, stores
        from .kernels.copy_grouped import GroupedCopies

        small, rest = GroupedCopies(self.device), []
        for dst, src in copies:
            if not small.add(dst, src):
                rest.append((dst, src))
        prepared = small.freeze() if len(small) else None
        if prepared is not None:
            prepared.launch()
        copy_all(rest, non_blocking=True)
        return prepared, rest, stores

    def _delta_copies(self, copies: list[tuple[torch.Tensor, torch.Tensor, Task]]) -> tuple[list, object | None]:
        """Delta stores: the launches storing the changed elements of each weight (one per
        element size and tile shape, run here), and the (dst, src) pairs left to copy whole
        (scale grids, and what those launches cannot address), each into its shadow as well."""
        from .kernels.delta import GroupedStores

        stores, whole = GroupedStores(self.device, self.stores.target), []
        for dst, src, task in copies:
            shadow = self.stores.shadow(task, src)
            if not (task.kind == DATA and stores.add(dst, src, shadow)):
                whole += [(dst, src), (shadow, src)]
                self._whole[0] += task.nbytes
                self._whole[1] += src.numel() if task.kind == DATA else 0
        if not len(stores):
            return whole, None
        prepared = stores.freeze()
        prepared.launch()
        return whole, prepared

    def _inner_boxes(self, bucket: Bucket, held_boxes: dict[str, Box]) -> dict[str, Box]:
        """Per quantized param, the part of the held box made of blocks this rank holds whole.

        Their scales come out of the quantize launch itself (the weights are read once);
        only the rest, the blocks a shard boundary cuts, takes the amax pass and the
        all-reduce. In reconstruct mode, or with a shard group of one, that rest is empty.
        A param is left out (amax pass over all of it) where a task cuts a block inside
        this part (row-wise blocks under a row-parallel split, say). Fixed per plan.
        """
        if not self.grouped:
            return {}
        hit = self._inner.get(bucket.index)
        if hit is None:
            from .kernels.fp8_grouped import fusable

            hit = {}
            for name in bucket.quantized:
                shape = self.sources[name].shape
                block = get_quant_format(self.plan.fmt_of[name]).block_shape(shape)
                inner = held_boxes[name].whole_blocks(block, shape)
                if inner is not None and fusable(inner, block, shape):
                    hit[name] = inner
            for t in self.tasks_of[bucket.index]:
                if t.kind == DATA and t.fmt != "none" and t.src in hit:  # a bf16 receiver of an FP8 param
                    shape = self.sources[t.src].shape
                    part = t.src_box.intersect(hit[t.src])
                    if part is not None and not fusable(part, get_quant_format(t.fmt).block_shape(shape), shape):
                        del hit[t.src]
            self._inner[bucket.index] = hit
        return hit

    def _slices_in(self, task: Task, held_box: Box) -> tuple[slice, ...]:
        """Where the task's box lies in the held tensor; the same every push, so computed once."""
        key = (id(task), held_box)
        hit = self._slices.get(key)
        if hit is None:
            hit = self._slices[key] = task.src_box.relative_to(held_box).slices()
        return hit

    def _amax_batch(self):
        """A fresh amax launch batch when grouping, else None."""
        if not self.grouped:
            return None
        from .kernels.fp8_grouped import GroupedCells

        return GroupedCells(self.device, quantize=False)

    def _batches(self) -> dict[str, object] | None:
        """Fresh quantize launch batches when grouping (two-pass and fused), else None."""
        if not self.grouped:
            return None
        from .kernels.fp8_grouped import GroupedCells

        delta = self.stores.target(1) if self.stores is not None else None
        return {"two_pass": GroupedCells(self.device, quantize=True, delta=delta),
                "fused": GroupedCells(self.device, quantize=True, fused=True, delta=delta)}

    def _on_device(self, t: torch.Tensor, trace: Trace) -> torch.Tensor:
        if t.device == self.device:
            return t
        with trace.span("h2d"):  # CPU-offloaded shards come up to the compute device here
            return t.to(self.device, non_blocking=True)

    def _box(self, name: str, group: tuple[int, ...]) -> Box:
        for g in self.sources[name].groups:
            if g.ranks == group:
                return g.box_of(self.plan.rank)
        raise AssertionError(f"{name!r} has no shard group {group}")

    def _gather(self, bucket: Bucket, shards: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full tensors of the bucket: one all-gather per dtype over a flat, padded buffer."""
        full = {}
        ranks = bucket.group
        by_dtype: dict[torch.dtype, list[str]] = defaultdict(list)
        for name in bucket.params:
            by_dtype[self.sources[name].dtype].append(name)
        if len(ranks) == 1:  # this rank holds the whole tensors already
            return dict(shards)
        for dtype, names in by_dtype.items():
            groups = {n: next(g for g in self.sources[n].groups if g.ranks == ranks) for n in names}
            slot = {n: max(b.numel() for b in groups[n].boxes) for n in names}
            offsets, total = {}, 0
            for n in names:
                offsets[n], total = total, total + slot[n]
            send = torch.empty(total, dtype=dtype, device=self.device)  # padding is never read
            copy_all([(send[offsets[n]:offsets[n] + shards[n].numel()], shards[n].reshape(-1)) for n in names])
            recv = torch.empty(total * len(ranks), dtype=dtype, device=self.device)
            _all_gather_flat(recv, send, group=self.groups[ranks])
            pieces = []
            for n in names:
                full[n] = torch.empty(self.sources[n].shape, dtype=dtype, device=self.device)
                for i, box in enumerate(groups[n].boxes):
                    start = i * total + offsets[n]
                    pieces.append((box.view(full[n]), recv[start:start + box.numel()].view(box.sizes)))
            copy_all(pieces)
        return full

    def _scales(self, bucket: Bucket, held: dict[str, torch.Tensor], held_boxes: dict[str, Box],
                inner: dict[str, Box]) -> tuple[dict[str, torch.Tensor], _Replay]:
        """Scale grid of every quantized param of the bucket; direct mode reduces amax over the group.

        All grids of the bucket live in one flat buffer, so the all-reduce and the
        amax -> scale arithmetic are one call each per bucket, not per parameter. The
        blocks of ``inner`` boxes are left out: their quantize launch fills in their scales.
        """
        shapes, blocks = {}, {}
        for name in bucket.quantized:
            src = self.sources[name]
            fmt = get_quant_format(self.plan.fmt_of[name])
            blocks[name] = fmt.block_shape(src.shape)
            shapes[name] = fmt.scale_shape(src.shape)
        sizes = [Box.full(shape).numel() for shape in shapes.values()]
        n = sum(sizes)
        group = self.groups[bucket.group] if self.plan.mode == "direct" and len(bucket.group) > 1 and n else None
        decide = group is not None and bucket.index not in self._reduce
        flat = torch.zeros(n + (1 if decide else 0), dtype=torch.float32, device=self.device)
        amax = flat[:n]
        grids = dict(zip(shapes, (part.view(shape) for part, shape in zip(amax.split(sizes), shapes.values()))))
        batch = self._amax_batch()
        cut = False  # this rank holds part of a block that a shard boundary cuts
        for name, grid in grids.items():
            for box, rel, cells in self._amax_boxes(bucket.index, name, held_boxes[name], inner.get(name), blocks[name]):
                cut = True
                x, region = held[name][rel], grid[cells]
                if batch is None or not batch.add(x, box, blocks[name], region):
                    region.copy_(self.ops.block_amax(x, box, blocks[name]))
                    self._replayable = False
        prepared = batch.freeze() if batch is not None and len(batch) else None
        if prepared is not None:
            prepared.launch()
        if group is not None and self._reduce.get(bucket.index, True):
            if decide and cut:
                flat[n] = 1.0
            all_reduce_amax(flat, group)
            if decide:  # the extra element, reduced with the rest: does any rank hold a cut block?
                self._reduce[bucket.index] = bool(flat[n].item())  # one sync, on the first push only
        if group is not None and not self._reduce[bucket.index]:
            group = None  # every block of the bucket is whole on one rank: later pushes skip the collective
        scales = scales_from_amax(amax)
        grids = dict(zip(shapes, (part.view(shape) for part, shape in zip(scales.split(sizes), shapes.values()))))
        replay = _Replay(tuple(held[name].data_ptr() for name in bucket.params), amax, scales, grids, group, prepared)
        return grids, replay

    def _amax_boxes(self, bucket: int, name: str, whole: Box, inner: Box | None,
                    block: tuple[int, ...]) -> list[tuple[Box, tuple[slice, ...], tuple[slice, ...]]]:
        """(box, its slices in the held tensor, its blocks' slices in the scale grid) for each
        part of the held box that the amax pass covers: all of it but ``inner``. Fixed per plan."""
        key = (bucket, name)
        hit = self._amax_parts.get(key)
        if hit is None:
            boxes = whole.minus(inner) if inner is not None else [whole]
            hit = self._amax_parts[key] = [(b, b.relative_to(whole).slices(), b.to_blocks(block).slices())
                                           for b in boxes if b.numel()]
        return hit

    def _payload(self, task: Task, held: torch.Tensor, held_box: Box, scales: dict[str, torch.Tensor],
                 batches: dict | None, copies: list, inner: Box | None) -> torch.Tensor | None:
        """The task's bytes, or None once they are (to be) stored at ``destination(task)``.

        Quantizations queued on ``batches``, and the (destination, bytes) pairs appended to
        ``copies``, are written when the caller launches and copies them.
        """
        out = self.destination(task)
        if task.kind != DATA:
            data = task.src_box.view(scales[task.src])
        else:
            part = held[self._slices_in(task, held_box)]
            if task.fmt == "none":
                data = part
            else:
                data = self._quantize(task, part, scales[task.src], out, batches, inner)
                if data is None:
                    return None
        if out is None:
            return data
        copies.append((out, data, task))
        return None

    def _quantize(self, task: Task, part: torch.Tensor, grid: torch.Tensor, out: torch.Tensor | None,
                  batches: dict | None, inner: Box | None) -> torch.Tensor | None:
        """FP8 of ``part``: stored into ``out`` where a kernel can write it (then None), else returned.

        With grouped launches the task's box splits into its part of ``inner`` (fused: the
        launch computes those blocks' scales) and the rest (scales from the amax pass).
        """
        shape = self.sources[task.src].shape
        block = get_quant_format(task.fmt).block_shape(shape)
        direct = self._direct(out)
        if batches is None:  # per-box kernels or the torch reference: the grid is complete already
            self._replayable = False
            if direct and self.device.type == "cuda":
                self.ops.quantize_box(part, task.src_box, grid, Box.full(grid.shape), block, out=out)
                return None
            return self.ops.quantize_box(part, task.src_box, grid, Box.full(grid.shape), block)
        target = out if direct else self._staged(task, part.shape)
        if target is None:
            self._replayable = False  # a fresh buffer per push, which a replay would keep alive
            target = torch.empty(part.shape, dtype=quant.FP8_DTYPE, device=self.device)
        shadow = self.stores.shadow(task, target) if self.stores is not None and direct else None
        for box, whole, rel, blocks in self._pieces_of(task, inner, block):
            x, dst, region = part[rel], target[rel], grid[blocks]
            if batches["fused" if whole else "two_pass"].add(x, box, block, region, out=dst, shape=shape,
                                                             remote=direct and self.remote(task),
                                                             shadow=None if shadow is None else shadow[rel]):
                continue
            self._replayable = False  # the batch refused it (strides too large): not recorded
            if whole:  # this rank holds these blocks whole
                region.copy_(scales_from_amax(self.ops.block_amax(x, box, block)))
            dst.copy_(self.ops.quantize_box(x, box, region, box.to_blocks(block), block))
            if shadow is not None:  # stored whole: the shadow follows
                shadow[rel].copy_(dst)
                self._whole[0] += dst.numel()
                self._whole[1] += dst.numel()
        return None if direct else target

    def _direct(self, out: torch.Tensor | None) -> bool:
        """Whether the kernels store into ``out`` themselves. A destination they cannot store
        into (CPU memory from a GPU) gets a copy of the payload, made by the caller."""
        return out is not None and out.device.type == self.device.type

    def _stages(self, task: Task) -> bool:
        """Whether the task's FP8 goes into a payload (not straight into its destination)."""
        return task.kind == DATA and task.fmt != "none" and not self._direct(self.destination(task))

    def _staged(self, task: Task, shape: torch.Size) -> torch.Tensor | None:
        """The task's FP8 payload in the staging slots; None without slots."""
        return self._staging.target(task, shape) if self._staging is not None else None

    def _pieces_of(self, task: Task, inner: Box | None, block: tuple[int, ...]) -> list[tuple]:
        """(box, whole, its slices in the task's box, its slices in the scale grid) per piece
        of the task: its part of ``inner`` (whole blocks), then the rest. Fixed per plan."""
        hit = self._pieces.get(id(task))
        if hit is None:
            fused = task.src_box.intersect(inner) if inner is not None else None
            boxes = [(fused, True)] if fused is not None else []
            boxes += [(b, False) for b in (task.src_box.minus(fused) if fused is not None else [task.src_box])]
            hit = self._pieces[id(task)] = [(b, whole, b.relative_to(task.src_box).slices(),
                                             b.to_blocks(block).slices()) for b, whole in boxes]
        return hit
