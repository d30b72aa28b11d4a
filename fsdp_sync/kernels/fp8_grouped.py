"""One launch for many boxes: a bucket's block amaxes, or its FP8 quantizations, together.

``fp8_quant`` launches once per box. A bucket of a dense 8B model holds hundreds of boxes,
and each launch costs tens of microseconds of Python and driver time, more than the
kernel takes to move a 128x128 block's bytes. Here each box becomes one row of an int64
table (addresses, strides, sizes) and one launch runs every cell of every row: a program
finds its row through a per-program index and turns the row's addresses into pointers.

Only boxes whose cells are whole scale blocks take this path (``_CellPlan.fused``:
``fp8_block``, ``fp8_rowwise`` rows up to ``MAX_TILE_COLS``); ``add`` returns False for
the rest, which the caller sends through ``fp8_quant``. Per cell the bits are those of
``fp8_quant._fp8_cell_kernel``: the same amax and scale, and quotients correctly rounded
either way (``_block_quotient`` where a launch computes its block's scale).
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from typing import Sequence

import torch
import triton
import triton.language as tl

from fsdp_sync.boxes import Box
from fsdp_sync.quant import FP8_DTYPE

from .fp8_quant import (_as_3d, _block_quotient, _e4m3_bits, _num_warps, _plan_cells, _quotient, _scale_of,
                        _use_hw_cast)
from .prepared import PreparedLaunch

# Columns of a row of the table, in the order the kernel loads them. ``x`` and ``q`` are
# element offsets from the launch's base tensors; ``s`` is an address.
# ``h`` and its strides address a delta launch's shadow (``fsdp_sync.delta_stores``), else 0.
_FIELDS = ("x", "q", "s", "sxb", "sxr", "sxc", "sqb", "sqr", "sqc", "ssb", "ssr", "ssc",
           "rows", "cols", "skip_r", "skip_c", "cells_r", "cells_c", "block_r", "block_c", "first_program",
           "h", "shb", "shr", "shc")
_NUM_FIELDS = len(_FIELDS)
_X_VIEWS = {torch.bfloat16: torch.int16, torch.float16: torch.float16, torch.float32: torch.float32}
_VEC = 16  # elements: what VEC launches promise of offsets, strides, widths and skips


@triton.jit
def _grouped_cell_kernel(table, row_of, order, x_base, q_base, h_base, changed, anchor,
                         NUM_FIELDS: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr,
                         QUANTIZE: tl.constexpr, FROM_AMAX: tl.constexpr, HW_CAST: tl.constexpr,
                         VEC: tl.constexpr, PERMUTED: tl.constexpr, DELTA: tl.constexpr,
                         CHUNK_R: tl.constexpr):
    """One cell (= one scale block) of the box in row ``row_of[pid]`` of ``table``.

    PERMUTED: program ``i`` runs cell ``order[i]`` (see ``GroupedCells.freeze``: cells that
    store into a peer GPU spread evenly among those that store locally).

    QUANTIZE: FP8 of the cell with the block's scale, stored at ``q``; with FROM_AMAX the
    cell is a whole block, whose scale it computes and stores at ``s`` first (one read).
    FROM_AMAX alone: the cell's amax (float32) is stored where its scale lives, at ``s``.

    Values are addressed as a base pointer plus an element offset, not as an address cast
    to a pointer: the compiler knows a pointer argument's alignment, and with VEC (every
    row's offsets, batch and row strides, width, skip and block columns are multiples of
    16 and its column strides 1) it then issues 16-byte loads and stores, as per-box
    launches get from Triton's argument specialization. An address cast to a pointer has
    no known alignment: one 1- or 2-byte access per element, and byte stores over NVLink
    are several times slower.

    DELTA (with QUANTIZE): the codes are compared with the shadow at ``h`` (what the
    receiver holds), and only those that differ are stored, there and at ``q``; all of
    them while ``anchor[0]`` is set. Each program adds its count of stored codes to one of
    ``changed``'s 64 words (spread, so that the atomics do not queue on one address).
    """
    pid = tl.program_id(0)
    if PERMUTED:
        pid = tl.load(order + pid)
    row = table + tl.load(row_of + pid).to(tl.int64) * NUM_FIELDS
    x_off = tl.load(row + 0)
    sxb = tl.load(row + 3)
    sxr = tl.load(row + 4)
    sxc = tl.load(row + 5)
    rows = tl.load(row + 12)
    cols = tl.load(row + 13)
    skip_c = tl.load(row + 15)
    cells_r = tl.load(row + 16)
    cells_c = tl.load(row + 17)
    block_r = tl.load(row + 18)
    block_c = tl.load(row + 19)
    if VEC:
        x_off = tl.multiple_of(x_off, 16)
        sxb = tl.multiple_of(sxb, 16)
        sxr = tl.multiple_of(sxr, 16)
        cols = tl.multiple_of(cols, 16)
        skip_c = tl.multiple_of(skip_c, 16)
        block_c = tl.multiple_of(block_c, 16)
    s_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    local = pid - tl.load(row + 20)
    cell_c = local % cells_c
    cell_r = (local // cells_c) % cells_r
    b = local // (cells_c * cells_r)
    r0 = cell_r * block_r - tl.load(row + 14)
    c0 = cell_c * block_c - skip_c

    tc = tl.arange(0, TILE_C)
    mask_c = (tc < block_c) & (c0 + tc >= 0) & (c0 + tc < cols)
    if VEC:  # column stride 1, written as such so the compiler sees contiguous columns
        x_at = x_base + (x_off + b * sxb + r0 * sxr + c0) + tc[None, :]
    else:
        x_at = x_base + (x_off + b * sxb + r0 * sxr + c0 * sxc) + tc[None, :] * sxc.to(tl.int32)
    s_off = b * tl.load(row + 9) + cell_r * tl.load(row + 10) + cell_c * tl.load(row + 11)

    # The cell is walked CHUNK_R rows at a time, twice when FROM_AMAX and QUANTIZE (the
    # second read is meant to hit L2; not measured): a whole 128x128 cell in registers took
    # 167-255 of them a thread, 2-3 programs an SM, too few loads in flight to keep HBM busy.
    tr = tl.arange(0, CHUNK_R)
    if FROM_AMAX:
        acc = tl.zeros([CHUNK_R, TILE_C], dtype=tl.int32)
        for i in range(TILE_R // CHUNK_R):
            rr = i * CHUNK_R + tr
            mask = ((rr < block_r) & (r0 + rr >= 0) & (r0 + rr < rows))[:, None] & mask_c[None, :]
            acc = tl.maximum(acc, _magnitude_bits(tl.load(x_at + rr[:, None] * sxr.to(tl.int32), mask=mask, other=0)))
        amax = tl.max(acc).to(tl.float32, bitcast=True)  # NaN wins: its magnitude bits are the largest
    if QUANTIZE:
        if FROM_AMAX:
            scale = _scale_of(amax)
            tl.store(s_ptr + s_off, scale)
        else:
            scale = tl.load(s_ptr + s_off)
        q_off = tl.load(row + 1)
        sqb = tl.load(row + 6)
        sqr = tl.load(row + 7)
        sqc = tl.load(row + 8)
        if VEC:
            q_off = tl.multiple_of(q_off, 16)
            sqb = tl.multiple_of(sqb, 16)
            sqr = tl.multiple_of(sqr, 16)
            q_start = q_off + b * sqb + r0 * sqr + c0
            q_at = q_base + q_start + tc[None, :]
        else:
            q_at = q_base + (q_off + b * sqb + r0 * sqr + c0 * sqc) + tc[None, :] * sqc.to(tl.int32)
        if DELTA:
            h_off = tl.load(row + 21)
            shb = tl.load(row + 22)
            shr = tl.load(row + 23)
            shc = tl.load(row + 24)
            if VEC:
                h_off = tl.multiple_of(h_off, 16)
                shb = tl.multiple_of(shb, 16)
                shr = tl.multiple_of(shr, 16)
                h_start = h_off + b * shb + r0 * shr + c0
                h_at = h_base + h_start + tc[None, :]
                tw = tl.arange(0, TILE_C // 4)
                word_c = c0 + 4 * tw
                mask_wc = (word_c - c0 < block_c) & (word_c >= 0) & (word_c < cols)
                q_words = q_base.to(tl.pointer_type(tl.uint32), bitcast=True) + q_start // 4 + tw[None, :]
                h_words = h_base.to(tl.pointer_type(tl.uint32), bitcast=True) + h_start // 4 + tw[None, :]
            else:
                h_at = h_base + (h_off + b * shb + r0 * shr + c0 * shc) + tc[None, :] * shc.to(tl.int32)
            # The flag broadcast as a tensor: the interpreter refuses a mask or'ed with a scalar.
            every = (tl.zeros([CHUNK_R, TILE_C // 4 if VEC else TILE_C], dtype=tl.int32) + tl.load(anchor)) != 0
            count = tl.sum(tl.zeros([CHUNK_R], dtype=tl.int32), axis=0)
        for i in range(TILE_R // CHUNK_R):
            rr = i * CHUNK_R + tr
            mask_r = (rr < block_r) & (r0 + rr >= 0) & (r0 + rr < rows)
            mask = mask_r[:, None] & mask_c[None, :]
            x = _widened(tl.load(x_at + rr[:, None] * sxr.to(tl.int32), mask=mask, other=0))
            q = _e4m3_bits(_block_quotient(x, scale) if FROM_AMAX else _quotient(x, scale), HW_CAST)
            if DELTA:
                old = tl.load(h_at + rr[:, None] * shr.to(tl.int32), mask=mask, other=0)
                if VEC:  # 4 codes a word: a store per word, not per code
                    q_w, old_w = _words(q, CHUNK_R, TILE_C), _words(old, CHUNK_R, TILE_C)
                    write = (mask_r[:, None] & mask_wc[None, :]) & ((q_w != old_w) | every)
                    tl.store(q_words + rr[:, None] * (sqr // 4).to(tl.int32), q_w, mask=write)
                    tl.store(h_words + rr[:, None] * (shr // 4).to(tl.int32), q_w, mask=write)
                    # Codes, not words: the changed bytes of each stored word (all four on an anchor).
                    count += tl.sum(tl.sum(tl.where(write, _changed_bytes(q_w ^ old_w, every), 0), axis=1), axis=0)
                else:
                    write = mask & ((q != old) | every)
                    tl.store(h_at + rr[:, None] * shr.to(tl.int32), q, mask=write)
                    tl.store(q_at + rr[:, None] * sqr.to(tl.int32), q, mask=write)
                    count += tl.sum(tl.sum(write.to(tl.int32), axis=1), axis=0)  # int32 sums: at most a cell
            else:
                tl.store(q_at + rr[:, None] * sqr.to(tl.int32), q, mask=mask)
        if DELTA:
            tl.atomic_add(changed + tl.program_id(0) % 64, count.to(tl.int64), sem="relaxed")
    else:
        tl.store(s_ptr + s_off, amax)


@triton.jit
def _magnitude_bits(x):
    """The float32 bits of ``|x|`` as int32 (bfloat16 bits, float16 or float32 ``x``): their
    integer max is the amax, exact, and NaN wins."""
    if x.dtype == tl.int16:
        return (x.to(tl.int32) & 0x7FFF) << 16
    else:
        return x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _widened(x):
    """``x`` as float32; int16 ``x`` holds bfloat16 bits, which widen by a shift (as in fp8_quant)."""
    if x.dtype == tl.int16:
        return (x.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _words(codes, TILE_R: tl.constexpr, TILE_C: tl.constexpr):
    """``[TILE_R, TILE_C]`` uint8 codes as ``[TILE_R, TILE_C // 4]`` little-endian uint32
    words: word ``j`` holds columns ``4j .. 4j+3``, as memory does."""
    quads = tl.reshape(codes.to(tl.uint32), (TILE_R, TILE_C // 4, 2, 2))
    even, odd = tl.split(quads)  # columns 4j + 2k and 4j + 2k + 1
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0 | (c1 << 8) | (c2 << 16) | (c3 << 24)


@triton.jit
def _changed_bytes(diff, every):
    """How many of each uint32 word's 4 bytes are nonzero in ``diff`` (4 where ``every``)."""
    t = diff | (diff >> 4)
    t = t | (t >> 2)
    t = (t | (t >> 1)) & 0x01010101
    n = ((t * 0x01010101) >> 24).to(tl.int32)
    return tl.where(every, 4, n)


def fusable(box: Box, block: Sequence[int], shape: Sequence[int]) -> bool:
    """Whether a fused batch takes ``box`` of a tensor of ``shape`` (strides aside): its
    cells are blocks, and it is made of whole blocks (a block cut by the tensor's end counts)."""
    return _plan_cells(box, block).fused and (box.is_empty() or box.whole_blocks(block, shape) == box)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _strides_3d(t: torch.Tensor) -> tuple[int, int, int] | None:
    """Element strides of ``t`` seen as ``[batch, rows, cols]``; None if its leading dims do not collapse.

    Arithmetic rather than a view: this runs once per box per push.
    """
    if t.ndim == 2:
        return (0, *t.stride())
    try:
        return _as_3d(t, "t").stride()
    except ValueError:
        return None


_CHUNK_ELEMS = 4096  # of a cell, in registers at once: 32 rows of a 128x128 block


def _chunk_rows(tile: tuple[int, int]) -> int:
    """Rows of a tile that a program holds at once (``_grouped_cell_kernel``'s CHUNK_R).

    On one H200 (bench_kernels, 1 GiB bf16 in 32 tensors, 128x128 blocks, share of a copy;
    full / delta launch): whole cells (16384 elements) 62.9 / 44.5%; chunks of 8192 71.0 /
    49.8%, 4096 76.4 / 49.7%, 2048 72.1 / 51.5%, 1024 54.3 / 41.1% (4 warps).
    """
    return min(tile[0], max(1, _CHUNK_ELEMS // tile[1]))


def _grouped_warps(tile_elems: int, *, delta: bool = False) -> int:
    """Warps a program: at most 4 (more cells in flight per SM), 2 for delta launches.

    On an H100 a 1 GiB bf16 tensor in whole 128x128 cells ran at 1.78 TB/s with 16 warps
    (59% of a copy), 2.7 with 8, 2.96-3.03 with 4 and 2.83-2.86 with 2 (grouped x1 and x32,
    bits unchanged). On one H200 with 4096-element chunks (full / delta launch, share of a
    copy): 2 warps 77.4 / 54.3%, 4 warps 76.4 / 49.7%, 8 warps 76.9 / 38.4%.
    """
    return min(2 if delta else 4, _num_warps(tile_elems))


class GroupedCells:
    """Collects boxes of one kind (amax or quantize) and runs them in one launch per tile shape.

    The table holds addresses and offsets, so the batch keeps every tensor handed to ``add``
    alive until ``launch``; they must not change before it. ``launch`` runs on the current
    stream of the device given here.
    """

    def __init__(self, device: torch.device, *, quantize: bool, fused: bool = False,
                 delta: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``fused`` (with ``quantize``): each box's blocks are whole, and their scales are
        computed from the same read and stored into ``scales``, instead of read from it.
        ``delta`` (with ``quantize``): (int64[64] changed-code counters, int32[1] anchor
        flag); every box then comes with its shadow and only changed codes are stored."""
        if fused and not quantize:
            raise ValueError("GroupedCells: fused needs quantize")
        if delta is not None and not quantize:
            raise ValueError("GroupedCells: delta needs quantize")
        self.device = device
        self.quantize = quantize
        self.fused = fused
        self.delta = delta
        self._rows: dict[tuple, list[list[int]]] = defaultdict(list)
        self._programs: dict[tuple, int] = defaultdict(int)
        self._values: dict[tuple, list[tuple[torch.Tensor, torch.Tensor | None]]] = defaultdict(list)
        self._remote: dict[tuple, list[bool]] = defaultdict(list)
        self._shadows: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        self._alive: list[torch.Tensor] = []

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._rows.values())

    def add(self, x: torch.Tensor, box: Box, block: Sequence[int], scales: torch.Tensor,
            out: torch.Tensor | None = None, *, shape: Sequence[int] | None = None, remote: bool = False,
            shadow: torch.Tensor | None = None) -> bool:
        """Queue the box ``box`` held as ``x``; False (nothing queued) if it needs ``fp8_quant``.

        ``remote``: ``out`` lies on a peer GPU (its stores cross NVLink); see ``freeze``.
        ``shadow`` (delta batches): FP8 of ``out``'s shape on this device, any strides, the
        codes ``out`` holds now.

        ``scales`` is float32 of the shape ``box.to_blocks(block)``, any strides: the scales
        to quantize with, or where each block's amax (or, fused, its scale) goes. ``out``
        (quantize only) is FP8 of ``x``'s shape, any strides, on this GPU or a peer it can
        write. Fused batches need ``shape``, the whole tensor's, and take only boxes made
        of whole blocks (a block cut by the tensor's end counts as whole).
        """
        plan = _plan_cells(box, block)
        if not plan.fused or x.dtype not in _X_VIEWS:
            return False
        if self.fused:
            if shape is None:
                raise ValueError("a fused GroupedCells needs the tensor's shape")
            if not fusable(box, block, shape):
                return False
        if tuple(x.shape) != box.sizes or tuple(scales.shape) != plan.grid.sizes or scales.dtype != torch.float32:
            raise ValueError(f"x {tuple(x.shape)} and scales {tuple(scales.shape)} do not fit box {box}, block {block}")
        if self.quantize and (out is None or out.dtype != FP8_DTYPE or out.shape != x.shape):
            raise ValueError(f"out must be {FP8_DTYPE} of shape {tuple(x.shape)}")
        if (self.delta is not None) != (shadow is not None) or (
                shadow is not None and (shadow.dtype != FP8_DTYPE or shadow.shape != x.shape)):
            raise ValueError(f"a delta batch, and only one, takes a {FP8_DTYPE} shadow of shape {tuple(x.shape)}")
        if box.is_empty():
            if not self.quantize:
                scales.zero_()  # as block_amax: an empty box's blocks have amax 0
            return True
        xs, ss = _strides_3d(x), _strides_3d(scales)
        qs = _strides_3d(out) if self.quantize else xs
        hs = _strides_3d(shadow) if shadow is not None else qs
        if xs is None or ss is None or qs is None or hs is None:
            return False
        tile = tuple(_next_power_of_2(c) for c in plan.cell)
        if any(tile[0] * abs(t[1]) + tile[1] * abs(t[2]) >= 2**31 for t in (xs, qs, hs)):
            return False
        vec = _vectorizable(x, xs, out, qs if self.quantize else None, box, plan) and (
            shadow is None or _fits_vec(shadow, hs))
        key = (tile, x.dtype, vec)
        batch = x.numel() // (box.sizes[-2] * box.sizes[-1])
        self._rows[key].append([x.data_ptr(), out.data_ptr() if self.quantize else 0, scales.data_ptr(), *xs, *qs,
                                *ss, *box.sizes[-2:], *plan.skip, *plan.num_cells, *plan.block, self._programs[key],
                                *((shadow.data_ptr(), *hs) if shadow is not None else (0, 0, 0, 0))])
        self._programs[key] += batch * plan.num_cells[0] * plan.num_cells[1]
        self._values[key].append((x, out))
        if shadow is not None:
            self._shadows[key].append(shadow)
        self._remote[key].append(remote)
        self._alive.append(scales)
        return True

    def launch(self) -> None:
        """One kernel per tile shape, input dtype and alignment class over everything added; then empty."""
        self.freeze().launch()

    def freeze(self) -> PreparedLaunch:
        """The launches for everything added, tables on the device, to run now and again
        later (a plan replays the same boxes every push); this batch is emptied.

        Where a launch stores both into a peer GPU and locally, its programs are reordered
        so that the two kinds spread evenly over the grid: in box order, long runs of local
        cells (HBM-bound) and of peer cells (NVLink-bound) would use one link at a time.
        """
        hw_cast = _use_hw_cast(self.device)
        launches = []
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            for key, rows in self._rows.items():
                (tile, dtype, vec), values = key, self._values[key]
                table = torch.tensor(rows, dtype=torch.int64)
                # Offsets from the lowest address, so that none is negative.
                x_base = values[int(table[:, 0].argmin())][0].view(_X_VIEWS[dtype])
                table[:, 0] = (table[:, 0] - x_base.data_ptr()) // x_base.element_size()
                if self.quantize:
                    q_base = values[int(table[:, 1].argmin())][1].view(torch.uint8)
                    table[:, 1] -= q_base.data_ptr()
                else:
                    q_base = x_base  # not read
                shadows = self._shadows.get(key)
                if shadows:
                    h_base = shadows[int(table[:, _FIELDS.index("h")].argmin())].view(torch.uint8)
                    table[:, _FIELDS.index("h")] -= h_base.data_ptr()
                    changed, anchor = self.delta
                else:
                    h_base, changed, anchor = q_base, None, None  # not read (the table stands in below)
                programs = self._programs[key]
                first = _FIELDS.index("first_program")
                counts = torch.tensor([r[first] for r in rows[1:]] + [programs]) - table[:, first]
                row_of = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32), counts)
                remote = self._remote[key]
                # Per program only where the launch mixes both kinds: staged pushes pack afresh every time.
                order = (interleaved_order(torch.repeat_interleave(torch.tensor(remote), counts))
                         if 0 < sum(remote) < len(remote) else None)
                if self.device.type == "cuda":
                    table = table.pin_memory().to(self.device, non_blocking=True)
                    row_of = row_of.pin_memory().to(self.device, non_blocking=True)
                    if order is not None:
                        order = order.pin_memory().to(self.device, non_blocking=True)
                    # The pinned host blocks are not reused before these copies end (caching host allocator).
                if changed is None:
                    changed = anchor = table
                launches.append((_grouped_cell_kernel, (programs,), (
                    table, row_of, row_of if order is None else order, x_base, q_base, h_base, changed, anchor), dict(
                    NUM_FIELDS=_NUM_FIELDS, TILE_R=tile[0], TILE_C=tile[1], QUANTIZE=self.quantize,
                    FROM_AMAX=self.fused or not self.quantize, HW_CAST=hw_cast, VEC=vec, PERMUTED=order is not None,
                    DELTA=bool(shadows), CHUNK_R=_chunk_rows(tile),
                    num_warps=_grouped_warps(tile[0] * tile[1], delta=bool(shadows)))))
        prepared = PreparedLaunch(self.device, launches, [t for v in self._values.values() for pair in v
                                                          for t in pair if t is not None]
                                  + [t for v in self._shadows.values() for t in v] + self._alive)
        self._rows.clear()
        self._programs.clear()
        self._values.clear()
        self._remote.clear()
        self._shadows.clear()
        self._alive = []
        return prepared


def interleaved_order(remote: torch.Tensor) -> torch.Tensor | None:
    """A program order (int32) in which the cells flagged ``remote`` and the others are each
    spread evenly over the grid, keeping their own order; None if only one kind is present.

    Each cell's place is the fraction of its kind issued before it, so at any point of the
    grid both kinds have progressed alike: the scheduler then keeps NVLink and HBM busy at
    once, and the launch takes about the longer of the two instead of their sum.
    """
    remote = remote.to(torch.bool)
    n_remote = int(remote.sum())
    if n_remote in (0, remote.numel()):
        return None
    place = torch.empty(remote.numel(), dtype=torch.float64)
    place[remote] = (torch.arange(n_remote, dtype=torch.float64) + 0.5) / n_remote
    n_local = remote.numel() - n_remote
    place[~remote] = (torch.arange(n_local, dtype=torch.float64) + 0.5) / n_local
    return torch.argsort(place, stable=True).to(torch.int32)


def _vectorizable(x: torch.Tensor, xs: tuple[int, int, int], out: torch.Tensor | None,
                  qs: tuple[int, int, int] | None, box: Box, plan) -> bool:
    """Whether a box may join a VEC launch: see ``_grouped_cell_kernel``. Offsets from the
    launch's base are multiples of ``_VEC`` when every address is a multiple of ``_VEC`` elements."""
    return (box.sizes[-1] % _VEC == 0 and plan.skip[1] % _VEC == 0 and plan.block[1] % _VEC == 0
            and _fits_vec(x, xs) and (out is None or _fits_vec(out, qs)))


def _fits_vec(t: torch.Tensor, strides: tuple[int, int, int]) -> bool:
    """``t``'s part of ``_vectorizable``: unit column stride, other strides and address aligned."""
    return (strides[2] == 1 and strides[0] % _VEC == 0 and strides[1] % _VEC == 0
            and t.data_ptr() % (_VEC * t.element_size()) == 0)


@functools.lru_cache(maxsize=None)
def self_check(device: torch.device) -> str | None:
    """Why grouped launches cannot be trusted on ``device``, or None if they match ``fp8_quant``.

    Boxes that take each kernel variant a push uses (bf16 and fp32 128x128 blocks, bf16
    rows; mid-block, transposed and 3-D; 16-aligned ones, which take the VEC launches that
    real models' shapes get, and the rest), amax then quantize, compared bit for bit with
    the per-box kernels. ``kernels=auto`` runs this once per process before grouping.
    """
    from . import fp8_quant

    try:
        gen = torch.Generator().manual_seed(0)
        full = torch.randn(300, 260, generator=gen).to(torch.bfloat16).to(device)
        stacked = torch.randn(3, 140, 130, generator=gen).to(device)
        aligned = torch.randn(256, 384, generator=gen).to(torch.bfloat16).to(device)
        aligned_3d = torch.randn(2, 128, 256, generator=gen).to(torch.bfloat16).to(device)
        cases = [(Box((37, 0), (200, 260)), full, (128, 128)),
                 (Box((0, 5), (250, 250)), full.t().contiguous().t(), (128, 128)),
                 (Box((1, 20, 0), (2, 100, 130)), stacked, (1, 128, 128)),
                 (Box((3, 0), (40, 260)), full, (1, 260)),
                 (Box((128, 0), (128, 384)), aligned, (128, 128)),
                 (Box((1, 0, 0), (1, 128, 256)), aligned_3d, (1, 128, 128))]
        views = [box.view(t) for box, t, _ in cases]
        amax, quant = GroupedCells(device, quantize=False), GroupedCells(device, quantize=True)
        grids = [torch.empty(box.to_blocks(block).sizes, device=device) for box, _, block in cases]
        for (box, _, block), x, grid in zip(cases, views, grids):
            if not amax.add(x, box, block, grid):
                return f"box {box} with block {block} does not take the grouped path"
        amax.launch()
        outs = [torch.empty(x.shape, dtype=FP8_DTYPE, device=device) for x in views]
        for (box, _, block), x, grid, out in zip(cases, views, grids, outs):
            quant.add(x, box, block, fp8_quant.scales_from_amax(grid), out=out)
        quant.launch()
        for (box, _, block), x, grid, out in zip(cases, views, grids, outs):
            want = fp8_quant.block_amax(x, box, block)
            expected = fp8_quant.quantize_box(x, box, fp8_quant.scales_from_amax(want), box.to_blocks(block), block)
            if not (torch.equal(grid, want) and torch.equal(out.view(torch.uint8), expected.view(torch.uint8))):
                return f"grouped and per-box kernels disagree on box {box} ({x.dtype}, block {block})"
        fused = GroupedCells(device, quantize=True, fused=True)
        whole = [(full, (128, 128)), (stacked, (1, 128, 128)), (full, (1, 260)), (aligned, (128, 128)),
                 (aligned_3d, (1, 128, 128))]
        results = [(torch.empty(t.shape, dtype=FP8_DTYPE, device=device),
                    torch.empty(Box.full(t.shape).to_blocks(block).sizes, device=device)) for t, block in whole]
        for (t, block), (out, scales) in zip(whole, results):
            if not fused.add(t, Box.full(t.shape), block, scales, out=out, shape=t.shape):
                return f"a whole {tuple(t.shape)} tensor does not take the fused path"
        fused.launch()
        for (t, block), (out, scales) in zip(whole, results):
            want_scales = fp8_quant.scales_from_amax(fp8_quant.block_amax(t, Box.full(t.shape), block))
            expected = fp8_quant.quantize_box(t, Box.full(t.shape), want_scales, Box.full(want_scales.shape), block)
            if not (torch.equal(scales, want_scales) and torch.equal(out.view(torch.uint8), expected.view(torch.uint8))):
                return f"fused grouped and per-box kernels disagree on a {tuple(t.shape)} tensor, block {block}"
    except Exception as e:  # noqa: BLE001 - any failure means: do not group
        return f"{type(e).__name__}: {e}"
    return None
