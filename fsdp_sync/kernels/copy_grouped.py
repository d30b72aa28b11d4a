"""Many small copies in one launch: a bucket's scale grids and small weights, into a peer.

A push writes hundreds of tensors of a few KB (each FP8 weight's ``weight_scale_inv``, the
norms). ``copy_`` sends each through the copy engine: on the H100 pair one such peer copy
took ~12 us of GPU time (314 of them, 3.7 ms of a 26 ms push). Here one program copies one
tensor, all of them in one launch, storing into the peer from registers.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .fp8_quant import _interpreting
from .prepared import PreparedLaunch

MAX_ELEMS = 1 << 16  # larger tensors go to copy_, which reaches the link's bandwidth on its own
_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_FIELDS = ("src", "dst", "rows", "cols", "src_row", "src_col", "dst_row", "dst_col")
_TILE_R, _TILE_C = 8, 128


@triton.jit
def _copy_boxes_kernel(table, src_base, dst_base, NUM_FIELDS: tl.constexpr, TILE_R: tl.constexpr,
                       TILE_C: tl.constexpr):
    """Row ``pid`` of ``table``: a ``rows x cols`` strided tensor at an element offset from
    ``src_base``, copied to one at an offset from ``dst_base`` (bits, any dtype of that size)."""
    row = table + tl.program_id(0) * NUM_FIELDS
    src = src_base + tl.load(row + 0)
    dst = dst_base + tl.load(row + 1)
    rows = tl.load(row + 2)
    cols = tl.load(row + 3)
    src_row = tl.load(row + 4)
    src_col = tl.load(row + 5)
    dst_row = tl.load(row + 6)
    dst_col = tl.load(row + 7)
    tr = tl.arange(0, TILE_R)[:, None]
    tc = tl.arange(0, TILE_C)[None, :]
    for r0 in range(0, rows, TILE_R):
        for c0 in range(0, cols, TILE_C):
            r, c = r0 + tr, c0 + tc
            mask = (r < rows) & (c < cols)
            v = tl.load(src + r * src_row + c * src_col, mask=mask)
            tl.store(dst + r * dst_row + c * dst_col, v, mask=mask)


def _as_2d(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as ``[rows, cols]`` (leading dims collapsed), or None if they do not collapse."""
    if t.ndim == 2:
        return t
    try:
        return t.reshape(1, -1) if t.ndim < 2 else t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


class GroupedCopies:
    """Collects small (dst, src) copies of one device's kernels and runs them in one launch
    per element size. ``dst`` may live on a peer GPU this device can write."""

    def __init__(self, device: torch.device):
        self.device = device
        self._rows: dict[int, list[list[int]]] = {}
        self._pairs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._rows.values())

    def add(self, dst: torch.Tensor, src: torch.Tensor) -> bool:
        """Queue ``dst.copy_(src)``; False (nothing queued) if it is not a small same-dtype copy."""
        on_gpu = src.is_cuda and dst.is_cuda and src.device == self.device
        if not (on_gpu or (_interpreting() and src.device == dst.device == self.device)):
            return False
        if src.dtype != dst.dtype or src.shape != dst.shape or src.numel() > MAX_ELEMS:
            return False
        size = src.element_size()
        s2, d2 = _as_2d(src), _as_2d(dst)
        if size not in _VIEWS or s2 is None or d2 is None:
            return False
        if src.numel() == 0:
            return True
        self._rows.setdefault(size, []).append([s2.data_ptr(), d2.data_ptr(), *s2.shape, *s2.stride(), *d2.stride()])
        self._pairs.setdefault(size, []).append((d2, s2))
        return True

    def freeze(self) -> PreparedLaunch:
        """The launches for everything added, tables on the device, to run now and again later."""
        launches = []
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            for size, rows in self._rows.items():
                pairs = self._pairs[size]
                table = torch.tensor(rows, dtype=torch.int64)
                # Element offsets from the lowest address on each side, so none is negative.
                src_base = pairs[int(table[:, 0].argmin())][1].view(_VIEWS[size])
                dst_base = pairs[int(table[:, 1].argmin())][0].view(_VIEWS[size])
                table[:, 0] = (table[:, 0] - src_base.data_ptr()) // size
                table[:, 1] = (table[:, 1] - dst_base.data_ptr()) // size
                if self.device.type == "cuda":
                    table = table.to(self.device)
                launches.append((_copy_boxes_kernel, (len(rows),), (table, src_base, dst_base),
                                 dict(NUM_FIELDS=len(_FIELDS), TILE_R=_TILE_R, TILE_C=_TILE_C, num_warps=4)))
        prepared = PreparedLaunch(self.device, launches, [t for p in self._pairs.values() for pair in p for t in pair])
        self._rows, self._pairs = {}, {}
        return prepared
