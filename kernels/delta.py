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


# The plain-torch reference lives in fsdp_sync.delta (it must import without Triton); tests
# and benchmarks import it here.
from fsdp_sync.delta import delta_update_reference  # noqa: E402
