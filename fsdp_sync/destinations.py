"""Destination tensors derived from source shapes: allocate them, or say what they must hold.

An engine normally owns its buffers; these helpers build the same buffers for tests,
demos and engines that load from a config (FP8 weights get their ``*_scale_inv``
tensors), and compute the exact expected contents from full source tensors, which is
how every sync is verified.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .layouts import make_layout
from .meta import LayoutSpec, SourceParam, as_layout_spec, with_tp_defaults
from .quant import DEFAULT_QUANT_SKIP, get_quant_format, reference_quantize, scale_name, should_quantize
from .world import job_rank_and_size


def _pieces(name: str, shape: tuple[int, ...], dtype: torch.dtype, layout: LayoutSpec):
    return make_layout(layout).pieces(SourceParam(name, tuple(shape), dtype, ()))


def _quantized(name: str, shape: Sequence[int], pieces, fmt, quant_skip: Sequence[str],
               dest_dtypes: Mapping[str, torch.dtype] | None) -> bool:
    """Whether a source lands in FP8: where the receiver registered its destination as float8
    (``dest_dtypes``, the engine's own per-layer choice, as the planner decides), else by name."""
    if not fmt.is_quantized:
        return False
    if dest_dtypes is None:
        return should_quantize(name, shape, quant_skip)
    return any(dest_dtypes.get(p.dst) == fmt.dtype for p in pieces)


def allocate_destinations(sources: Mapping[str, tuple[tuple[int, ...], torch.dtype] | torch.Tensor], *,
                          layout: LayoutSpec | str, layout_kwargs: dict | None = None, quant: str = "none",
                          quant_skip: Sequence[str] = DEFAULT_QUANT_SKIP,
                          dest_dtypes: Mapping[str, torch.dtype] | None = None,
                          device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Empty destination tensors (and FP8 scale tensors) for sources given as name -> (shape, dtype)
    or name -> tensor (e.g. a model's state_dict, read for shapes and dtypes only).

    ``layout`` is a LayoutSpec, or a layout name with ``layout_kwargs``, as WeightReceiver takes it;
    a TP layout given neither ``tp_rank`` nor ``tp_size`` slices this process's job world, as the
    receiver will (torchrun's RANK and WORLD_SIZE). ``dest_dtypes`` (destination name -> dtype,
    what a receiver registered) decides which destinations are FP8; without it, ``quant_skip``
    does, by source name.
    """
    layout = with_tp_defaults(as_layout_spec(layout, layout_kwargs), *job_rank_and_size())
    fmt = get_quant_format(quant)
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for name, source in sources.items():
        shape, dtype = (tuple(source.shape), source.dtype) if isinstance(source, torch.Tensor) else source
        pieces = _pieces(name, shape, dtype, layout)
        quantized = _quantized(name, shape, pieces, fmt, quant_skip, dest_dtypes)
        for piece in pieces:
            ends = shapes.setdefault(piece.dst, [0] * len(piece.dst_box.ends))
            shapes[piece.dst] = [max(a, b) for a, b in zip(ends, piece.dst_box.ends)]
            dtypes[piece.dst] = fmt.dtype if quantized else dtype
    # Rows no source fills (vocab padding) still belong to the engine's tensor; they stay zero.
    for name, boxes in getattr(make_layout(layout), "unwritten", dict)().items():
        for box in boxes:
            if name in shapes:
                shapes[name] = [max(a, b) for a, b in zip(shapes[name], box.ends)]
    out = {}
    for name, shape in shapes.items():
        out[name] = torch.zeros(shape, dtype=dtypes[name], device=device)
        if dtypes[name] == torch.float8_e4m3fn:
            out[scale_name(name)] = torch.zeros(fmt.scale_shape(shape), dtype=torch.float32, device=device)
    return out


def expected_destinations(full: Mapping[str, torch.Tensor], *, layout: LayoutSpec | str,
                          layout_kwargs: dict | None = None, quant: str = "none",
                          quant_skip: Sequence[str] = DEFAULT_QUANT_SKIP,
                          dest_dtypes: Mapping[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """What a receiver must hold after a push of the full tensors ``full``: the reference, sliced.
    ``dest_dtypes`` as for ``allocate_destinations``."""
    layout = as_layout_spec(layout, layout_kwargs)
    fmt = get_quant_format(quant)
    shapes = {n: (tuple(t.shape), t.dtype) for n, t in full.items()}
    device = next(iter(full.values())).device if full else "cpu"
    out = allocate_destinations(shapes, layout=layout, quant=quant, quant_skip=quant_skip, dest_dtypes=dest_dtypes,
                                device=device)
    for name, tensor in full.items():
        pieces = _pieces(name, tuple(tensor.shape), tensor.dtype, layout)
        quantized = _quantized(name, tensor.shape, pieces, fmt, quant_skip, dest_dtypes)
        values, scales = reference_quantize(tensor, fmt) if quantized else (tensor, None)
        for piece in pieces:
            piece.dst_box.view(out[piece.dst]).copy_(piece.src_box.view(values))
            if scales is not None:
                block = fmt.block_shape(tensor.shape)
                piece.dst_box.to_blocks(block).view(out[scale_name(piece.dst)]).copy_(
                    piece.src_box.to_blocks(block).view(scales))
    return out


def mismatches(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """Names whose bytes differ (bitwise, so NaN and -0.0 count), with a short reason."""
    bad = []
    for name, want in expected.items():
        got = actual.get(name)
        if got is None:
            bad.append(f"{name}: missing")
        elif got.shape != want.shape or got.dtype != want.dtype:
            bad.append(f"{name}: {got.dtype}{tuple(got.shape)} != {want.dtype}{tuple(want.shape)}")
        elif not torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)):
            bad.append(f"{name}: values differ")
    return bad


_CHECKSUM_CHUNK = 1 << 26  # bytes per step: temporaries of ~24x that, not 24x the tensor


def checksum(t: torch.Tensor) -> int:
    """A position-weighted sum of a tensor's bytes: equal bytes, equal sums; computed where it
    lives, a chunk at a time (a whole 32B-model embedding at once ran a GPU out of memory)."""
    flat = t.reshape(-1).view(torch.uint8)
    total = 0
    for start in range(0, flat.numel(), _CHECKSUM_CHUNK):
        b = flat[start:start + _CHECKSUM_CHUNK].to(torch.int64)
        weights = torch.arange(start, start + b.numel(), device=b.device, dtype=torch.int64) % 65521 + 1
        total += int((b * weights).sum())
    return total


__all__ = ["checksum", "allocate_destinations", "expected_destinations", "mismatches"]
