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

import torch
import triton
import triton.language as tl

from .copy_grouped import _VIEWS, _as_2d

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
def _store_changed_kernel(src, shadow, dst, changed, anchor, rows, cols, s_row, s_col, d_row, d_col,
                          CONTIGUOUS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program ``pid`` of a ``rows x cols`` copy from ``src`` to ``dst`` (any strides) whose
    elements equal to the contiguous ``shadow`` are skipped (none while ``anchor[0]`` is
    set); the shadow takes the stored ones, and their count goes into one of 64 words of
    ``changed``. CONTIGUOUS: all three are flat, and the tile is one run of elements."""
    pid = tl.program_id(0)
    if CONTIGUOUS:
        offs = pid.to(tl.int64) * (BLOCK_R * BLOCK_C) + tl.arange(0, BLOCK_R * BLOCK_C)
        inside = offs < rows * cols
        src_ptrs, dst_ptrs, shadow_ptrs = src + offs, dst + offs, shadow + offs
    else:
        tiles_c = tl.cdiv(cols, BLOCK_C)
        r = (pid // tiles_c).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        c = (pid % tiles_c).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        inside = (r < rows) & (c < cols)
        src_ptrs, dst_ptrs = src + r * s_row + c * s_col, dst + r * d_row + c * d_col
        shadow_ptrs = shadow + r * cols + c
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


STORE_TILE = 4096  # elements per program of ``_store_changed_kernel``


def prepare_store_changed(dst: torch.Tensor, src: torch.Tensor, shadow: torch.Tensor, changed: torch.Tensor,
                          anchor: torch.Tensor) -> tuple | None:
    """The launch (kernel, grid, args, kwargs) that stores ``src``'s elements that differ
    from ``shadow`` into ``dst`` and ``shadow``, or None where it does not apply (shapes
    or dtypes differ, or dims that do not collapse to two). ``shadow`` is contiguous."""
    if not (src.shape == dst.shape == shadow.shape and src.dtype == dst.dtype == shadow.dtype):
        return None
    if src.element_size() not in _VIEWS or not shadow.is_contiguous() or src.numel() == 0:
        return None
    view = _VIEWS[src.element_size()]
    if src.is_contiguous() and dst.is_contiguous():
        rows, cols, strides, contiguous = 1, src.numel(), (0, 1, 0, 1), True
        block_r, block_c = 1, STORE_TILE
    else:
        s2, d2 = _as_2d(src), _as_2d(dst)
        if s2 is None or d2 is None:
            return None
        (rows, cols), strides, contiguous = s2.shape, (*s2.stride(), *d2.stride()), False
        block_c = min(triton.next_power_of_2(cols), 1024)
        block_r = max(1, STORE_TILE // block_c)
    programs = triton.cdiv(rows, block_r) * triton.cdiv(cols, block_c)
    return (_store_changed_kernel, (programs,), (src.view(view), shadow.view(view), dst.view(view), changed, anchor,
                                                  rows, cols, *strides),
            dict(CONTIGUOUS=contiguous, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8))


# The plain-torch reference lives in fsdp_sync.delta (it must import without Triton); tests
# and benchmarks import it here.
from fsdp_sync.delta import delta_update_reference  # noqa: E402
