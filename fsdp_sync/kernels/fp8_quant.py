"""FP8 (e4m3fn) quantization kernels in Triton, bit-identical to ``fsdp_sync.quant``.

Every launcher sees its tensor as ``[batch, rows, cols]``: the last two dims are the
``rows x cols`` of one matrix and all leading dims collapse into ``batch`` (they must be
collapsible into one view). Scale blocks cover the last two dims; on leading dims the
block is 1 (``fp8_block``, ``fp8_rowwise``) or spans the whole box (``fp8_tensor``).

One program handles one *cell*: a tile-sized piece of one scale block, so a cell never
straddles blocks and its scale is one scalar. For 128x128 blocks a cell is the whole
block: the fused kernel reads it once, takes its amax, writes the scale and the FP8
values from registers. Blocks larger than a tile (long rows, whole tensors) are split
into cells whose partial amax torch reduces with MAX, which is exact, before a second
pass quantizes.

Bit-exactness with the torch reference rests on four choices:

* amax is an integer max over ``bits & 0x7fffffff``: exact, and NaN (whose bits exceed
  inf's) wins, as ``torch.amax`` propagates it, where float max on GPU would drop it;
* the scale ``amax / 448`` and every quotient ``x / scale`` are correctly rounded
  divisions, ``div_rn`` (Triton's ``/`` on fp32 is ``div.full.f32`` on GPU, approximate;
  a CPU test checks the PTX), or, in grouped launches that compute a block's scale, a
  correctly rounded reciprocal with one FMA residual (``_block_quotient``, exact there).
  Multiplying by ``1 / scale`` alone would round twice and move ~0.04% of codes one step,
  ties among them;
* the FP8 encoding on sm_89+ is ``cvt.rn.satfinite``: round to nearest even, saturating
  to +-448, which equals torch's clamp-then-cast; elsewhere it is c10's algorithm in
  integers, because the CPU interpreter's fp8 cast is wrong on ties and subnormals and
  neither saturates nor keeps NaN.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from fsdp_sync.boxes import Box
from fsdp_sync.quant import FP8_DTYPE, QuantFormat, get_quant_format

# ---------------------------------------------------------------------------------------
# Configs. Fixed rather than autotuned: the kernels are memory-bound, one tile shape per
# block shape is enough, and the CPU interpreter would run every autotune candidate.
# ---------------------------------------------------------------------------------------

MAX_TILE_ELEMS = 128 * 128  # a cell holds at most this many elements (one fp8_block block)
MAX_TILE_COLS = 16384  # rowwise rows up to this long are quantized in one fused read
_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _num_warps(tile_elems: int) -> int:
    """About 32 elements per thread: enough loads in flight, no register spills."""
    return max(1, min(16, tile_elems // 1024))


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _e4m3_bits(y, HW_CAST: tl.constexpr):
    """uint8 bits of ``clamp(y, -448, 448).to(float8_e4m3fn)``, rounding to nearest even."""
    if HW_CAST:
        # cvt.rn.satfinite: saturation to +-448 (inf too) is the reference's clamp.
        return y.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
    else:
        # c10's fp8e4m3fn_from_fp32_value, in integers only: c10 rounds subnormals with a
        # float add of a magic constant, which LLVM may fuse with nearby arithmetic into an
        # FMA (it did with the scaling multiply that preceded it before exact division).
        bits = y.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        mag = bits & 0x7FFFFFFF
        is_nan = mag > 0x7F800000
        mag = tl.minimum(mag, 0x43E00000)  # |y| <= 448.0 (inf included)
        # Normal range (|y| >= 2^-6): round the fp32 mantissa to 3 bits, ties to even.
        normal = (mag + (((7 - 127) << 23) + 0x7FFFF) + ((mag >> 20) & 1)) >> 20
        # Subnormal range: count units of 2^-9, ties to even.
        shift = tl.minimum(141 - (mag >> 23), 30)
        full = (mag & 0x7FFFFF) | 0x800000
        units = full >> shift
        rem = full & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        units += ((rem > half) | ((rem == half) & ((units & 1) == 1))).to(tl.int32)
        code = tl.where(mag < (121 << 23), units, normal)
        code = tl.where(is_nan, 0x7F, code)
        return (code | sign).to(tl.uint8)


@triton.jit
def _abs_max(x):
    """amax as an integer max over the bits with the sign cleared: exact, and NaN wins."""
    return (tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _scale_of(amax):
    """The reference's scales_from_amax: a correctly rounded amax / 448, 1 for all-zero blocks."""
    return tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, 448.0))


@triton.jit
def _quotient(x, scale):
    """``x / scale``, correctly rounded: ``div.rn.f32`` per element.

    Measured on one H200 (bench_kernels, 1 GiB, share of a device copy; fp8_block / its
    quantize_box / grouped x32): div.rn 67 / 75 / 57%. A reciprocal per block with one FMA
    residual (Markstein) is as exact and reached 76 / 88 / 70%, but the compiled FMA pair
    lost the sign of -0 / s; restoring it with a select fell to 48 / 61 / 51%. The inexact
    ``x * (1 / scale)`` of before was 92 / 100 / 91%. Kept here; grouped launches that
    compute their block's scale take ``_block_quotient``, with the sign mended.
    """
    return tl.math.div_rn(x, scale)


@triton.jit
def _block_quotient(x, scale):
    """``x / scale`` for a cell of the block whose amax gave ``scale`` (``_scale_of``),
    correctly rounded, cheaper than ``div.rn``: a reciprocal per block, then per element a
    product and one FMA residual (Markstein's correction). That is exact for a reciprocal
    that is itself correctly rounded, when nothing overflows: a normal, finite scale and
    ``|x| <= 448 * scale``, which a block's own amax guarantees. The residual turns
    ``-0 / s`` into ``+0`` (``+0 + -0``), and the scale is positive, so the quotient takes
    x's sign bit. Other scales (subnormal, tiny, inf or NaN: a block holding inf or NaN)
    take ``div.rn``.

    Measured on one H200 before the sign fix (bench_kernels, 1 GiB, share of a device copy;
    fp8_block / its quantize_box / grouped x32): 76 / 88 / 70%, against div.rn's 67 / 75 / 57%.
    """
    if (scale >= 2.0**-100) & (scale < 3.0e38):
        r = tl.math.div_rn(1.0, scale)
        q = x * r
        q = tl.fma(tl.fma(-q, scale, x), r, q)
        sign = x.to(tl.uint32, bitcast=True) & 0x80000000
        y = ((q.to(tl.uint32, bitcast=True) & 0x7FFFFFFF) | sign).to(tl.float32, bitcast=True)
    else:
        y = tl.math.div_rn(x, scale)
    return y


@triton.jit
def _fp8_cell_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    amax_ptr,
    stride_xb,
    stride_xr,
    stride_xc,
    stride_qb,
    stride_qr,
    stride_qc,
    stride_sb,
    stride_sr,
    stride_sc,
    rows,
    cols,
    row_skip,
    col_skip,
    first_cell_row,
    first_cell_col,
    cell_rows,
    cell_cols,
    num_cell_rows,
    num_cell_cols,
    block_rows,
    block_cols,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
    FROM_AMAX: tl.constexpr,
    QUANTIZE: tl.constexpr,
    HW_CAST: tl.constexpr,
):
    """One cell of a ``[batch, rows, cols]`` box.

    FROM_AMAX and not QUANTIZE: store the cell's amax at ``amax_ptr[pid]``.
    QUANTIZE and not FROM_AMAX: quantize with the block's scale read from ``scale_ptr``.
    Both: the cell is a whole block; compute its scale, store it, quantize.
    ``row_skip``/``col_skip`` say where the box starts inside its first block; cells are
    counted from that block's start, so ``first_cell_*`` is the first one the box touches.
    """
    pid = tl.program_id(0)
    cell_c = pid % num_cell_cols
    cell_r = (pid // num_cell_cols) % num_cell_rows
    b = pid // (num_cell_cols * num_cell_rows)

    # Cell start in block coordinates (0 = first block's start), then in box coordinates.
    start_r = (first_cell_row + cell_r) * cell_rows
    start_c = (first_cell_col + cell_c) * cell_cols
    block_r = start_r // block_rows
    block_c = start_c // block_cols
    r0 = start_r - row_skip
    c0 = start_c - col_skip

    tr = tl.arange(0, TILE_R)
    tc = tl.arange(0, TILE_C)
    mask_r = (tr < cell_rows) & (r0 + tr >= 0) & (r0 + tr < rows)
    mask_c = (tc < cell_cols) & (c0 + tc >= 0) & (c0 + tc < cols)
    mask = mask_r[:, None] & mask_c[None, :]

    # 64-bit base offset per program, 32-bit offsets inside the tile.
    x_base = x_ptr + b.to(tl.int64) * stride_xb + r0.to(tl.int64) * stride_xr + c0.to(tl.int64) * stride_xc
    x = tl.load(x_base + tr[:, None] * stride_xr + tc[None, :] * stride_xc, mask=mask, other=0)
    if x_ptr.dtype.element_ty == tl.int16:
        # bfloat16 bits: widening is a shift, exact for subnormals, which the interpreter flushes.
        x = (x.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = x.to(tl.float32)

    if FROM_AMAX:
        amax = _abs_max(x)
    if QUANTIZE:
        scale_off = b.to(tl.int64) * stride_sb + block_r * stride_sr + block_c * stride_sc
        if FROM_AMAX:
            scale = _scale_of(amax)
            tl.store(scale_ptr + scale_off, scale)
        else:
            scale = tl.load(scale_ptr + scale_off)
        # div.rn here: _block_quotient measured slower in this kernel (fp8_block 51% of a
        # copy against 67%, one H200), where it made the grouped launch faster.
        q = _e4m3_bits(_quotient(x, scale), HW_CAST)
        q_base = q_ptr + b.to(tl.int64) * stride_qb + r0.to(tl.int64) * stride_qr + c0.to(tl.int64) * stride_qc
        tl.store(q_base + tr[:, None] * stride_qr + tc[None, :] * stride_qc, q, mask=mask)
    else:
        tl.store(amax_ptr + pid, amax)


@triton.jit
def _dequant_kernel(
    q_ptr,
    scale_ptr,
    out_ptr,
    stride_qb,
    stride_qr,
    stride_qc,
    stride_sb,
    stride_sr,
    stride_sc,
    rows,
    cols,
    block_rows,
    block_cols,
    num_tile_rows,
    num_tile_cols,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
):
    """float32 of FP8 bits times the block scale; ``out`` is contiguous ``[batch, rows, cols]``.

    Decodes in integers: the interpreter's fp8 upcast turns NaN (0x7f) into 480.
    """
    pid = tl.program_id(0)
    tile_c = pid % num_tile_cols
    tile_r = (pid // num_tile_cols) % num_tile_rows
    b = pid // (num_tile_cols * num_tile_rows)
    r = tile_r * TILE_R + tl.arange(0, TILE_R)[:, None]
    c = tile_c * TILE_C + tl.arange(0, TILE_C)[None, :]
    mask = (r < rows) & (c < cols)

    bits = tl.load(q_ptr + b.to(tl.int64) * stride_qb + r * stride_qr + c * stride_qc, mask=mask, other=0)
    bits = bits.to(tl.int32)
    exponent = (bits >> 3) & 0xF
    mantissa = bits & 0x7
    normal = ((exponent + 120) << 23) | (mantissa << 20)
    normal = tl.where((bits & 0x7F) == 0x7F, 0x7FF00000, normal)  # the NaN that c10 decodes to
    subnormal = (mantissa.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)  # 2^-9 units
    # The sign goes in as a bit: Triton's -x is 0 - x, which turns -0 into +0.
    value = (tl.where(exponent == 0, subnormal, normal) | ((bits & 0x80) << 24)).to(tl.float32, bitcast=True)

    scale_off = b.to(tl.int64) * stride_sb + (r // block_rows) * stride_sr + (c // block_cols) * stride_sc
    scale = tl.load(scale_ptr + scale_off, mask=mask, other=1.0)
    out = out_ptr + b.to(tl.int64) * rows * cols + r * cols + c
    tl.store(out, value * scale, mask=mask)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _use_hw_cast(device: torch.device) -> bool:
    """The hardware fp8 cast exists from sm_89; the interpreter's cast is not exact."""
    return device.type == "cuda" and not _interpreting() and torch.cuda.get_device_capability(device) >= (8, 9)


def _check_input(x: torch.Tensor, name: str, dtypes: Sequence[torch.dtype]) -> None:
    if x.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {list(dtypes)}, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have >= 2 dims, got shape {tuple(x.shape)}")
    if not (x.is_cuda or _interpreting()):
        raise ValueError(f"{name} must be a CUDA tensor (or set TRITON_INTERPRET=1), got {x.device}")


def _as_3d(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` as a ``[batch, rows, cols]`` view; leading dims must collapse without a copy."""
    if t.ndim == 2:
        return t.unsqueeze(0)
    try:
        return t.view(-1, *t.shape[-2:])
    except RuntimeError:
        raise ValueError(f"{name}'s leading dims {tuple(t.shape[:-2])} must collapse into one view") from None


@dataclass(frozen=True)
class _CellPlan:
    """How the cells of one box map onto its scale blocks; see the module docstring."""

    grid: Box  # the block indices the box touches
    block: tuple[int, int]  # block rows and cols
    batch_in_one_block: bool  # the leading dims lie inside one block (fp8_tensor)
    skip: tuple[int, int]  # where the box starts inside its first block, rows and cols
    cell: tuple[int, int]
    first_cell: tuple[int, int]
    num_cells: tuple[int, int]
    cells_per_block: tuple[int, int]  # to group cells by block; >= num_cells if one block

    @property
    def fused(self) -> bool:
        """Cells are whole blocks: one program can own a block's amax, scale and values."""
        return self.cells_per_block == (1, 1) and not self.batch_in_one_block


def _plan_cells(box: Box, block: Sequence[int]) -> _CellPlan:
    return _plan_cells_of(box, tuple(int(b) for b in block))


@functools.lru_cache(maxsize=65536)
def _plan_cells_of(box: Box, block: tuple[int, ...]) -> _CellPlan:
    """Cached: a plan replays the same boxes every push, and this arithmetic is per launch."""
    if len(block) != box.ndim or box.ndim < 2:
        raise ValueError(f"block {block} must have one entry per dim of {box} (>= 2 dims)")
    if any(b < 1 for b in block):
        raise ValueError(f"block sizes must be >= 1, got {block}")
    grid = box.to_blocks(block)
    lead = range(box.ndim - 2)
    batch_in_one_block = any(block[d] > 1 for d in lead)
    if batch_in_one_block and any(grid.sizes[d] > 1 for d in lead):
        raise ValueError(f"on leading dims the block must be 1 or hold the whole box; {box} spans blocks {block}")

    skip, cell, first_cell, num_cells, per_block = [], [], [], [], []
    col_limit = min(block[-1], MAX_TILE_COLS)
    row_limit = max(1, MAX_TILE_ELEMS // triton.next_power_of_2(col_limit))
    for d, limit in ((box.ndim - 2, row_limit), (box.ndim - 1, col_limit)):
        b, offset, size = block[d], box.offsets[d], box.sizes[d]
        s = offset - grid.offsets[d] * b
        if b <= limit:
            c = b
        elif grid.sizes[d] == 1:
            c = limit  # one block: a cell that runs past its end runs past the box's, masked
        else:
            c = max(k for k in range(1, limit + 1) if b % k == 0)  # cells must tile every block
        first, last = s // c, -(-(s + size) // c)
        skip.append(s)
        cell.append(c)
        first_cell.append(first)
        num_cells.append(last - first)
        per_block.append(b // c if b % c == 0 else last)
    return _CellPlan(grid, block[-2:], batch_in_one_block, *map(tuple, (skip, cell, first_cell, num_cells, per_block)))


def _run_cells(
    plan: _CellPlan,
    x: torch.Tensor,
    *,
    amax: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    fused: bool = False,
) -> None:
    """Launch one program per cell.

    Modes: ``amax`` given: write each cell's amax into it (contiguous, cell order).
    ``q`` and ``scales`` given: quantize with ``scales`` (the grid ``plan.grid``), or,
    with ``fused``, compute the scales into ``scales`` first.
    """
    # bfloat16 travels as its bits; see the kernel.
    x3 = _as_3d(x.view(torch.int16) if x.dtype == torch.bfloat16 else x, "x")
    q3 = _as_3d(q.view(torch.uint8), "out") if q is not None else x3
    s3 = _as_3d(scales, "scales") if scales is not None else x3
    num_batch, rows, cols = x3.shape
    tile_r, tile_c = (triton.next_power_of_2(c) for c in plan.cell)
    for t in (x3, q3):
        if tile_r * abs(t.stride(1)) + tile_c * abs(t.stride(2)) >= 2**31:
            raise ValueError(f"strides {t.stride()} are too large for 32-bit offsets inside a tile")
    quantize = q is not None
    # A box inside one block on its leading dims reads the same scale for every batch entry.
    stride_sb = 0 if plan.batch_in_one_block else s3.stride(0)
    num_programs = num_batch * plan.num_cells[0] * plan.num_cells[1]
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _fp8_cell_kernel[(num_programs,)](
            x3,
            q3,
            s3,
            amax if amax is not None else s3,
            *x3.stride(),
            *q3.stride(),
            stride_sb,
            s3.stride(1),
            s3.stride(2),
            rows,
            cols,
            *plan.skip,
            *plan.first_cell,
            *plan.cell,
            *plan.num_cells,
            *plan.block,
            TILE_R=tile_r,
            TILE_C=tile_c,
            FROM_AMAX=not quantize or fused,
            QUANTIZE=quantize,
            HW_CAST=_use_hw_cast(x.device),
            num_warps=_num_warps(tile_r * tile_c),
        )


def _cells_to_blocks(cells: torch.Tensor, dim: int, first: int, per_block: int) -> torch.Tensor:
    """MAX over the cells of each block along ``dim``; cells are counted from the first block's start."""
    if per_block == 1:
        return cells
    lead, n = first % per_block, cells.shape[dim]
    num_blocks = -(-(lead + n) // per_block)
    pad = [0, 0] * (cells.ndim - 1 - dim) + [lead, num_blocks * per_block - lead - n]
    padded = torch.nn.functional.pad(cells, pad)  # zeros: abs values never go below
    shape = cells.shape[:dim] + (num_blocks, per_block) + cells.shape[dim + 1 :]
    return padded.reshape(shape).amax(dim=dim + 1)


def _check_box(x: torch.Tensor, box: Box) -> None:
    if tuple(x.shape) != box.sizes:
        raise ValueError(f"x has shape {tuple(x.shape)} but box {box} has sizes {box.sizes}")


def block_amax(x: torch.Tensor, box: Box, block: Sequence[int]) -> torch.Tensor:
    """Same contract as ``fsdp_sync.quant.block_amax``: float32 partial amax over ``box.to_blocks(block)``.

    ``x`` is the part ``box`` of a larger tensor, with any strides (a column slice, say);
    direct mode calls this on shards that start mid-block, then MAX-reduces across ranks.
    """
    _check_input(x, "x", _INPUT_DTYPES)
    _check_box(x, box)
    plan = _plan_cells(box, block)
    if box.is_empty():
        return torch.zeros(plan.grid.sizes, dtype=torch.float32, device=x.device)
    num_batch = x.numel() // (box.sizes[-2] * box.sizes[-1])
    cells = torch.empty((num_batch, *plan.num_cells), dtype=torch.float32, device=x.device)
    _run_cells(plan, x, amax=cells)
    for dim in (1, 2):
        cells = _cells_to_blocks(cells, dim, plan.first_cell[dim - 1], plan.cells_per_block[dim - 1])
    if plan.batch_in_one_block:
        cells = cells.amax(dim=0, keepdim=True)
    return cells.reshape(plan.grid.sizes)


def quantize_box(
    x: torch.Tensor,
    box: Box,
    scales: torch.Tensor,
    scale_box: Box,
    block: Sequence[int],
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same as ``fsdp_sync.quant.quantize_box``: FP8 of ``x`` (the part ``box``) with block ``scales``.

    ``scales`` is float32, the part ``scale_box`` of the scale grid, on ``x``'s device.
    With ``out`` (float8_e4m3fn, shape of ``x``, any strides, on any GPU that ``x``'s GPU
    can reach by peer access) the values go straight there: no staging copy. The write
    runs on the current stream of ``x``'s GPU; whoever reads ``out`` must wait for it.
    """
    _check_input(x, "x", _INPUT_DTYPES)
    _check_box(x, box)
    plan = _plan_cells(box, block)
    if scales.dtype != torch.float32 or tuple(scales.shape) != scale_box.sizes:
        raise ValueError(f"scales must be float32 of shape {scale_box.sizes}, got {scales.dtype} {tuple(scales.shape)}")
    if scales.device != x.device:
        raise ValueError(f"scales are on {scales.device}, x on {x.device}")
    if not scale_box.contains(plan.grid):
        raise ValueError(f"scale box {scale_box} does not hold the blocks {plan.grid} of {box}")
    if out is None:
        out = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    elif out.dtype != FP8_DTYPE or out.shape != x.shape:
        raise ValueError(f"out must be {FP8_DTYPE} of shape {tuple(x.shape)}, got {out.dtype} {tuple(out.shape)}")
    elif out.device.type != x.device.type:
        raise ValueError(f"out is on {out.device}, which a kernel on {x.device} cannot write")
    if not box.is_empty():
        _run_cells(plan, x, q=out, scales=plan.grid.relative_to(scale_box).view(scales))
    return out


def quantize_full(x: torch.Tensor, fmt: QuantFormat | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference_quantize`` for the FP8 formats: (float8_e4m3fn values, float32 scales).

    Blocks that fit a tile (``fp8_block``, rows up to MAX_TILE_COLS) take one fused read;
    larger ones take an amax pass, the reference's scale rule, then a quantize pass.
    """
    fmt = get_quant_format(fmt) if isinstance(fmt, str) else fmt
    if not fmt.is_quantized:
        raise ValueError(f"quantize_full needs an FP8 format, got {fmt.name!r}")
    _check_input(x, "x", _INPUT_DTYPES)
    block = fmt.block_shape(x.shape)
    box = Box.full(x.shape)
    plan = _plan_cells(box, block)
    if not plan.fused or box.is_empty():
        scales = scales_from_amax(block_amax(x, box, block))
        return quantize_box(x, box, scales, plan.grid, block), scales
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty(plan.grid.sizes, dtype=torch.float32, device=x.device)
    _run_cells(plan, x, q=q, scales=scales, fused=True)
    return q, scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    """Same as ``fsdp_sync.quant.dequantize``: float32 of ``q`` times its block's scale.

    ``scales`` is the full float32 grid; the result is a new contiguous tensor.
    """
    _check_input(q, "q", (FP8_DTYPE,))
    plan = _plan_cells(Box.full(q.shape), block)
    if scales.dtype != torch.float32 or tuple(scales.shape) != plan.grid.sizes:
        raise ValueError(f"scales must be float32 of shape {plan.grid.sizes}, got {scales.dtype} {tuple(scales.shape)}")
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out
    q3, s3 = _as_3d(q.view(torch.uint8), "q"), _as_3d(scales, "scales")
    num_batch, rows, cols = q3.shape
    tile_r, tile_c = 32, 128
    num_tiles = (triton.cdiv(rows, tile_r), triton.cdiv(cols, tile_c))
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _dequant_kernel[(num_batch * num_tiles[0] * num_tiles[1],)](
            q3,
            s3,
            out,
            *q3.stride(),
            0 if plan.batch_in_one_block else s3.stride(0),
            s3.stride(1),
            s3.stride(2),
            rows,
            cols,
            *block[-2:],
            *num_tiles,
            TILE_R=tile_r,
            TILE_C=tile_c,
            num_warps=4,
        )
    return out


# ---------------------------------------------------------------------------------------
# The plain-torch reference lives in fsdp_sync.quant; tests and benchmarks import it here.
# ---------------------------------------------------------------------------------------

from fsdp_sync.quant import block_amax as reference_block_amax  # noqa: E402
from fsdp_sync.quant import dequantize as reference_dequantize  # noqa: E402
from fsdp_sync.quant import quantize_box as reference_quantize_box  # noqa: E402
from fsdp_sync.quant import reference_quantize, scales_from_amax  # noqa: E402

__all__ = [
    "block_amax",
    "dequantize",
    "quantize_box",
    "quantize_full",
    "reference_block_amax",
    "reference_dequantize",
    "reference_quantize",
    "reference_quantize_box",
    "scales_from_amax",
]
