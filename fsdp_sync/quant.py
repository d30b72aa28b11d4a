"""Quant formats and their plain-torch reference.

Every format is "one float32 scale per block" with a different block shape, so one
amax-grid rule serves all of them, in both modes:

* ``fp8_block``: 128x128 blocks over the last two dims (DeepSeek-V3 / Kimi-K2 layout);
* ``fp8_rowwise``: one scale per row (block = 1 x last dim);
* ``fp8_tensor``: one scale for the whole tensor (block = the shape);
* ``none``: the tensor as it is.

``scale = amax / 448`` and the engines store it as ``weight_scale_inv`` (the dequant
multiplier). A block's amax covers only its real elements, so partial blocks are scaled
by their own values. An all-zero block gets scale 1 (never 0, which would divide by zero).
NaN propagates: a block containing NaN gets a NaN scale and NaN values, as the
reference on the full tensor would (an inf gives an inf scale). Pushes never ship such
blocks: senders refuse them from their scales (``fsdp_sync.finite``).

Direct mode never sees a full tensor: each rank computes the amax of the blocks its
rows touch, the shard group reduces those grids with MAX (exact, order-free), and
quantizing with the reduced scales is then bit-identical to the reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from .boxes import Box

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_SUFFIX = "_scale_inv"
# Engines keep embeddings, the LM head and norms in high precision.
DEFAULT_QUANT_SKIP = (r"embed_tokens", r"lm_head", r"norm")


@dataclass(frozen=True)
class QuantFormat:
    """A quantization format: which dtype it stores and how big its scale blocks are."""

    name: str
    kind: str  # "none", "block", "row" or "tensor"

    @property
    def dtype(self) -> torch.dtype | None:
        return None if self.kind == "none" else FP8_DTYPE

    @property
    def is_quantized(self) -> bool:
        return self.kind != "none"

    def block_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The scale block of a tensor of ``shape`` (one float32 scale per block)."""
        shape = tuple(int(s) for s in shape)
        if self.kind == "block":
            if len(shape) < 2:
                raise ValueError(f"{self.name} needs a tensor of >= 2 dims, got shape {shape}")
            return (1,) * (len(shape) - 2) + (128, 128)
        if self.kind == "row":
            if len(shape) < 1:
                raise ValueError(f"{self.name} needs a tensor of >= 1 dim, got shape {shape}")
            return (1,) * (len(shape) - 1) + (max(1, shape[-1]),)
        if self.kind == "tensor":
            return tuple(max(1, s) for s in shape)
        raise ValueError(f"format {self.name!r} has no scale blocks")

    def scale_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        block = self.block_shape(shape)
        return tuple(-(-int(s) // b) for s, b in zip(shape, block))


QUANT_FORMATS: dict[str, QuantFormat] = {
    "none": QuantFormat("none", "none"),
    "fp8_block": QuantFormat("fp8_block", "block"),
    "fp8_rowwise": QuantFormat("fp8_rowwise", "row"),
    "fp8_tensor": QuantFormat("fp8_tensor", "tensor"),
}


def get_quant_format(name: str) -> QuantFormat:
    try:
        return QUANT_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown quant format {name!r}; valid: {sorted(QUANT_FORMATS)}") from None


def scale_name(weight_name: str) -> str:
    """The engines' name for a weight's scale tensor: ``x.weight`` -> ``x.weight_scale_inv``."""
    return weight_name + SCALE_SUFFIX


def should_quantize(name: str, shape: Sequence[int], skip: Sequence[str] = DEFAULT_QUANT_SKIP) -> bool:
    """Whether an FP8 receiver stores ``name`` in FP8: matrices, except the skipped names."""
    return len(shape) >= 2 and not any(re.search(p, name) for p in skip)


def block_amax(x: torch.Tensor, box: Box, block: Sequence[int]) -> torch.Tensor:
    """Per-block amax of ``x``, the part ``box`` of a larger tensor, over ``box.to_blocks(block)``.

    Blocks that ``box`` covers only partly get the amax of the part it holds; a MAX over
    all holders then gives the true block amax.
    """
    grid = box.to_blocks(block)
    if x.numel() == 0:
        return torch.zeros(grid.sizes, dtype=torch.float32, device=x.device)
    padded_shape = [g * b for g, b in zip(grid.sizes, block)]
    padded = torch.zeros(padded_shape, dtype=torch.float32, device=x.device)
    inner = Box(tuple(o - g * b for o, g, b in zip(box.offsets, grid.offsets, block)), box.sizes)
    inner.view(padded).copy_(x.float().abs())
    split = [n for g, b in zip(grid.sizes, block) for n in (g, b)]
    return torch.amax(padded.reshape(split), dim=tuple(range(1, 2 * len(block), 2)))


def scales_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """``weight_scale_inv`` from block amax: amax/448, and 1 for all-zero blocks."""
    # Tensor-by-tensor division is correctly rounded on every device; ATen's CUDA division
    # by a Python scalar multiplies by its float32 reciprocal instead, which differs.
    return torch.where(amax == 0, torch.ones_like(amax), amax / torch.full_like(amax, FP8_MAX))


def expand_scales(scales: torch.Tensor, scale_box: Box, box: Box, block: Sequence[int]) -> torch.Tensor:
    """One scale per element of ``box``, taken from ``scales`` (the grid part ``scale_box``)."""
    out = scales
    for d, b in enumerate(block):
        out = out.repeat_interleave(b, dim=d)
    start = tuple(o - g * b for o, g, b in zip(box.offsets, scale_box.offsets, block))
    return Box(start, box.sizes).view(out)


def quantize_box(x: torch.Tensor, box: Box, scales: torch.Tensor, scale_box: Box, block: Sequence[int]) -> torch.Tensor:
    """FP8 of ``x`` (the part ``box`` of a tensor), with the block ``scales`` over ``scale_box``.

    Each code is the round-to-nearest-even FP8 of the correctly rounded float32 quotient
    ``x / scale``, saturated to +-448, as DeepSeek's and torchao's quantizers compute it.
    Multiplying by ``1 / scale`` instead rounds twice and resolves ~0.04% of codes, ties
    among them, one step the other way. Tensor-by-tensor division is IEEE on CPU and CUDA.
    """
    per_element = expand_scales(scales, scale_box, box, block)
    return (x.float() / per_element).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def reference_quantize(full: torch.Tensor, fmt: QuantFormat | str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference: quantize a whole tensor, returning (values, weight_scale_inv)."""
    fmt = get_quant_format(fmt) if isinstance(fmt, str) else fmt
    if not fmt.is_quantized:
        return full.clone(), None
    block = fmt.block_shape(full.shape)
    box = Box.full(full.shape)
    scales = scales_from_amax(block_amax(full, box, block))
    return quantize_box(full, box, scales, box.to_blocks(block), block), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    """Back to float32, for checks: value times its block's scale."""
    box = Box.full(q.shape)
    return q.float() * expand_scales(scales, box.to_blocks(block), box, block)
