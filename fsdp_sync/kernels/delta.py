"""The delta pass: compare a payload with the sender's shadow of what the receiver holds,
update the shadow, store the changed elements into the destination, and emit the change.

One read of the new payload and the shadow, a write of only the changed elements (into
the shadow and, one-sided, into the receiver's buffer), and a 1-byte change mask for the
two-sided encoders. Everything works on bits (integer views of the element size), so
NaN, -0 and FP8 codes compare exactly: "unchanged" means the same bytes.

Layout: ``new``, ``shadow`` and ``out`` are contiguous tensors of ``numel`` elements of
one integer dtype (1, 2, 4 or 8 bytes); ``mask`` is ``numel`` int8 (0/1) and ``count``
one int64 per program, summed after. ``out`` may live on a peer GPU the device can write.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
import triton
import triton.language as tl

from .copy_grouped import _VIEWS, _as_2d
from .fp8_quant import _interpreting
from .prepared import PreparedLaunch

BLOCK = 4096  # elements per program: the pass is bandwidth-bound; 8 warps keep each tile's loads wide


@triton.jit
def _delta_kernel(new_ptr, shadow_ptr, out_ptr, mask_ptr, count_ptr, numel, HAS_OUT: tl.constexpr,
                  BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    new = tl.load(new_ptr + offs, mask=inside)
    old = tl.load(shadow_ptr + offs, mask=inside)
    changed = (new != old) & inside
    tl.store(shadow_ptr + offs, new, mask=changed)
    if HAS_OUT:
        tl.store(out_ptr + offs, new, mask=changed)
    tl.store(mask_ptr + offs, changed.to(tl.int8), mask=inside)
    # One partial count per program: an atomic on one word from every program serialized them.
    tl.store(count_ptr + tl.program_id(0), tl.sum(changed.to(tl.int64), axis=0))


def delta_update(new: torch.Tensor, shadow: torch.Tensor,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool change mask, int64 count) of ``new`` against ``shadow``; ``shadow`` (and ``out``)
    take the changed elements. Same bits as ``delta_update_reference``."""
    assert new.dtype == shadow.dtype and not new.dtype.is_floating_point, "compare integer views of the bits"
    assert new.shape == shadow.shape and new.is_contiguous() and shadow.is_contiguous()
    assert out is None or (out.dtype == new.dtype and out.shape == new.shape and out.is_contiguous())
    numel = new.numel()
    mask = torch.empty(new.shape, dtype=torch.int8, device=new.device)
    programs = triton.cdiv(numel, BLOCK)
    if not numel:
        return mask.view(torch.bool), torch.zeros((), dtype=torch.int64, device=new.device)
    counts = torch.empty(programs, dtype=torch.int64, device=new.device)
    _delta_kernel[(programs,)](new, shadow, out if out is not None else shadow, mask, counts,
                               numel, HAS_OUT=out is not None, BLOCK=BLOCK, num_warps=8)
    return mask.view(torch.bool), counts.sum()


@triton.jit
def _grouped_store_changed_kernel(table, row_of, src_base, shadow_base, dst_base, changed, anchor,
                                  NUM_FIELDS: tl.constexpr, CONTIGUOUS: tl.constexpr, VEC: tl.constexpr,
                                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tile ``pid`` of the copy in row ``row_of[pid]`` of ``table``: a ``rows x cols`` tensor
    at element offsets from ``src_base`` and ``dst_base`` (any strides), whose elements equal
    to its contiguous shadow (at an offset from ``shadow_base``) are skipped, none while
    ``anchor[0]`` is set; the shadow takes the stored ones, and their count goes into one of
    64 words of ``changed``. CONTIGUOUS: all three are flat and a tile is one run of elements.
    VEC: offsets, row strides and widths are multiples of 16 and column strides 1 (checked
    when the table is built), so the compiler may issue 16-byte accesses."""
    pid = tl.program_id(0)
    row = table + tl.load(row_of + pid).to(tl.int64) * NUM_FIELDS
    src_off = tl.load(row + 0)
    shadow_off = tl.load(row + 1)
    dst_off = tl.load(row + 2)
    rows = tl.load(row + 3)
    cols = tl.load(row + 4)
    local = (pid - tl.load(row + 9)).to(tl.int64)
    if VEC:
        src_off = tl.multiple_of(src_off, 16)
        shadow_off = tl.multiple_of(shadow_off, 16)
        dst_off = tl.multiple_of(dst_off, 16)
        cols = tl.multiple_of(cols, 16)
    if CONTIGUOUS:
        offs = local * (BLOCK_R * BLOCK_C) + tl.arange(0, BLOCK_R * BLOCK_C)
        inside = offs < cols
        src_ptrs = src_base + src_off + offs
        dst_ptrs = dst_base + dst_off + offs
        shadow_ptrs = shadow_base + shadow_off + offs
    else:
        s_row = tl.load(row + 5)
        d_row = tl.load(row + 7)
        tiles_c = tl.cdiv(cols, BLOCK_C)
        r = (local // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        c = (local % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        inside = (r < rows) & (c < cols)
        if VEC:  # column strides 1, written as such so the compiler sees contiguous columns
            s_row = tl.multiple_of(s_row, 16)
            d_row = tl.multiple_of(d_row, 16)
            src_ptrs = src_base + src_off + r * s_row + c
            dst_ptrs = dst_base + dst_off + r * d_row + c
        else:
            src_ptrs = src_base + src_off + r * s_row + c * tl.load(row + 6)
            dst_ptrs = dst_base + dst_off + r * d_row + c * tl.load(row + 8)
        shadow_ptrs = shadow_base + shadow_off + r * cols + c
    new = tl.load(src_ptrs, mask=inside)
    old = tl.load(shadow_ptrs, mask=inside)
    # The flag broadcast as a tensor: the interpreter refuses a mask or'ed with a scalar.
    every = (tl.zeros_like(old.to(tl.int32)) + tl.load(anchor)) != 0
    write = inside & ((new != old) | every)
    tl.store(shadow_ptrs, new, mask=write)
    tl.store(dst_ptrs, new, mask=write)
    count = tl.sum(write.to(tl.int32), axis=0)  # int32 sums (a tile at most); int64 ones are emulated
    if not CONTIGUOUS:
        count = tl.sum(count, axis=0)
    tl.atomic_add(changed + pid % 64, count.to(tl.int64), sem="relaxed")


STORE_TILE = 4096  # elements per program: bandwidth-bound, 8 warps keep a tile's accesses wide
_FIELDS = ("src", "shadow", "dst", "rows", "cols", "s_row", "s_col", "d_row", "d_col", "first_program")


class GroupedStores:
    """Collects (dst, src, shadow) stores of changed elements and runs them in one launch per
    element size and tile shape: a bucket's weights cost a launch or two, not one each (from
    Python ~30 us apiece, ~200 of them a push for a 2B model). ``dst`` may live on a peer GPU
    this device can write; ``shadow`` is contiguous, on this device. ``target(itemsize)``
    gives the (counters, anchor flag) of ``fsdp_sync.delta_stores.DeltaStores``."""

    def __init__(self, device: torch.device, target: Callable[[int], tuple[torch.Tensor, torch.Tensor]]):
        if device.type == "cuda" and device.index is None:  # tensors name their index
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._target = target
        self._groups: dict[tuple, list[tuple[list[int], tuple[torch.Tensor, ...]]]] = defaultdict(list)

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._groups.values())

    def add(self, dst: torch.Tensor, src: torch.Tensor, shadow: torch.Tensor) -> bool:
        """Queue the store; False (nothing queued) where it does not apply (devices, shapes or
        dtypes differ, or dims that do not collapse to two)."""
        # A pinned host shadow is addressed over PCIe (UVA), like one on the device.
        shadow_here = shadow.device == self.device or (self.device.type == "cuda" and shadow.is_pinned())
        on_device = src.device == self.device and shadow_here and dst.device.type == self.device.type
        if not (on_device and (self.device.type == "cuda" or _interpreting())):
            return False
        if not (src.shape == dst.shape == shadow.shape and src.dtype == dst.dtype == shadow.dtype):
            return False
        size = src.element_size()
        if size not in _VIEWS or not shadow.is_contiguous():
            return False
        if src.numel() == 0:
            return True
        view = _VIEWS[size]
        if src.is_contiguous() and dst.is_contiguous():
            rows, cols, strides, contiguous = 1, src.numel(), (0, 1, 0, 1), True
            block_r, block_c = 1, STORE_TILE
        else:
            s2, d2 = _as_2d(src), _as_2d(dst)
            if s2 is None or d2 is None:
                return False
            (rows, cols), strides, contiguous = s2.shape, (*s2.stride(), *d2.stride()), False
            block_c = min(triton.next_power_of_2(cols), 1024)
            block_r = max(1, STORE_TILE // block_c)
        tensors = (src.view(view), shadow.view(view), dst.view(view))
        offsets = [t.data_ptr() // size for t in tensors]
        vec = (all(o % 16 == 0 for o in offsets) and cols % 16 == 0 and strides[1] == strides[3] == 1
               and strides[0] % 16 == 0 and strides[2] % 16 == 0)
        programs = triton.cdiv(rows, block_r) * triton.cdiv(cols, block_c)
        self._groups[(size, contiguous, vec, block_r, block_c)].append(
            ([*offsets, rows, cols, *strides, programs], tensors))
        return True

    def freeze(self) -> PreparedLaunch:
        """The launches for everything added, tables on the device, to run now and again later."""
        launches, alive = [], []
        for (size, contiguous, vec, block_r, block_c), entries in self._groups.items():
            table = torch.tensor([row for row, _ in entries], dtype=torch.int64)
            programs = table[:, 9].clone()
            table[:, 9] = torch.cumsum(programs, 0) - programs  # each row's first program
            row_of = torch.repeat_interleave(torch.arange(len(entries), dtype=torch.int32), programs)
            # Element offsets from the lowest address of each side, so none is negative; a
            # lowest one that is a multiple of 16 elements keeps VEC's offsets so.
            bases = []
            for side in range(3):
                lowest = int(table[:, side].argmin())
                bases.append(entries[lowest][1][side])
                table[:, side] -= int(table[lowest, side])
            changed, anchor = self._target(size)
            launches.append((_grouped_store_changed_kernel, (int(programs.sum()),),
                             (table.to(self.device), row_of.to(self.device), *bases, changed, anchor),
                             dict(NUM_FIELDS=len(_FIELDS), CONTIGUOUS=contiguous, VEC=vec, BLOCK_R=block_r,
                                  BLOCK_C=block_c, num_warps=8)))
            alive += [t for _, tensors in entries for t in tensors]
        self._groups = defaultdict(list)
        return PreparedLaunch(self.device, launches, alive)


# The plain-torch reference lives in fsdp_sync.delta (it must import without Triton); tests
# and benchmarks import it here.
from fsdp_sync.delta import delta_update_reference  # noqa: E402
