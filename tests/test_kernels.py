"""The Triton FP8 kernels against the plain-torch reference, bit for bit.

On a machine without CUDA the kernels run in Triton's CPU interpreter, so the variable
must be set before triton is first imported. With CUDA the same small cases run compiled,
and the ``gpu``-marked tests add large shapes and a peer-to-peer write.
"""

import os
import re

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fsdp_sync.boxes import Box  # noqa: E402
from fsdp_sync.kernels import fp8_quant as K  # noqa: E402
from fsdp_sync.quant import FP8_DTYPE, get_quant_format  # noqa: E402
from tests import fp8_numpy as N  # noqa: E402
from tests.ptx import kernel_spec, sm90_ptx  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FORMATS = ["fp8_block", "fp8_rowwise", "fp8_tensor"]
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, *, any_nan: bool = False) -> None:
    """Bit-exact equality, NaN payloads included (``torch.equal`` says NaN != NaN).

    ``any_nan`` lets every NaN match every NaN, for paths where the NaN that x86 returns
    depends on operand order (``torch.maximum`` on CPU even makes an all-ones NaN).
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, expected.dtype)
    if any_nan:
        actual, expected = (canonical_nan(t) for t in (actual, expected))
    a, e = (t.contiguous().view(_INT_OF_SIZE[t.element_size()]) for t in (actual, expected))
    bad = (a != e).nonzero()
    if len(bad):
        first = tuple(bad[0])
        raise AssertionError(f"{len(bad)} mismatches, first at {bad[:5].tolist()}: {a[first]} vs {e[first]}")


def canonical_nan(t: torch.Tensor) -> torch.Tensor:
    """Every NaN as one bit pattern: 0x7f for FP8, the default NaN for floats."""
    if t.dtype == FP8_DTYPE:
        bits = t.view(torch.uint8)
        return torch.where(bits == 0xFF, 0x7F, bits).view(FP8_DTYPE)
    return torch.where(t.isnan(), float("nan"), t)


def make_input(shape, dtype=torch.bfloat16, seed=0) -> torch.Tensor:
    """Normal values with a magnitude that varies across the tensor, so blocks get distinct scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape[-2:], generator=g))
    return x.to(dtype).to(DEVICE)


def with_special_values(x: torch.Tensor) -> torch.Tensor:
    """An all-zero 128x128 block and row, NaN, +-inf and tiny values, at block-distinct places."""
    x = x.clone()
    x[..., :128, :128] = 0
    x[..., 60, :] = 0
    x[..., 5, 140] = float("nan")
    x[..., 150, 10] = float("inf")
    x[..., 130, -3] = -float("inf")
    x[..., 10:20, 260:] = 1e-3 * x[..., 10:20, 260:].sign()
    return x


def direct_mode_with_kernels(full: torch.Tensor, fmt: str, boxes: list[Box]) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct mode with the kernels: per-shard partial amax, a MAX reduction, per-shard quantize.

    Every shard is a view of ``full`` and writes into the matching view of one output, as
    a receiver's buffer would be written.
    """
    block = get_quant_format(fmt).block_shape(full.shape)
    grid = Box.full(full.shape).to_blocks(block)
    amax = torch.zeros(grid.sizes, dtype=torch.float32, device=full.device)
    for box in boxes:
        x = box.view(full)
        partial = K.block_amax(x, box, block)
        # Which NaN torch.amax returns is its own business (CUDA's is 0x7fffffff).
        assert_same_bits(partial, K.reference_block_amax(x, box, block), any_nan=True)
        region = box.to_blocks(block).view(amax)
        region.copy_(torch.maximum(region, partial))
    scales = K.scales_from_amax(amax)
    out = torch.full(full.shape, 0x55, dtype=torch.uint8, device=full.device).view(FP8_DTYPE)
    for box in boxes:
        blocks = box.to_blocks(block)
        written = K.quantize_box(box.view(full), box, blocks.view(scales), blocks, block, out=box.view(out))
        assert written.data_ptr() == box.view(out).data_ptr()
    return out, scales


def grid_boxes(shape, splits) -> list[Box]:
    """The boxes of a grid with cuts at ``splits[d]`` along each dim."""
    boxes = [Box((), ())]
    for size, cuts in zip(shape, splits):
        edges = [0, *cuts, size]
        boxes = [Box((*b.offsets, lo), (*b.sizes, hi - lo)) for b in boxes for lo, hi in zip(edges, edges[1:])]
    return boxes


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 200), (130, 257), (257, 129), (2, 130, 257)])
def test_quantize_full_matches_reference(fmt, shape):
    x = make_input(shape)
    q, scales = K.quantize_full(x, fmt)
    ref_q, ref_scales = K.reference_quantize(x, fmt)
    assert_same_bits(q, ref_q)
    assert_same_bits(scales, ref_scales)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_full_other_dtypes(fmt, dtype):
    x = make_input((130, 257), dtype=dtype)
    q, scales = K.quantize_full(x, fmt)
    ref_q, ref_scales = K.reference_quantize(x, fmt)
    assert_same_bits(q, ref_q)
    assert_same_bits(scales, ref_scales)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(200, 300), (2, 200, 300)])
def test_special_values(fmt, shape):
    """Zero blocks get scale 1, NaN makes its block NaN, inf makes its block's scale inf."""
    x = with_special_values(make_input(shape))
    q, scales = K.quantize_full(x, fmt)
    ref_q, ref_scales = K.reference_quantize(x, fmt)
    assert_same_bits(q, ref_q)
    assert_same_bits(scales, ref_scales)


def test_long_rows_take_two_passes():
    """Rows longer than a tile are split into cells whose amax is reduced before quantizing."""
    x = make_input((3, K.MAX_TILE_COLS + 77))
    assert not K._plan_cells(Box.full(x.shape), (1, x.shape[1])).fused
    q, scales = K.quantize_full(x, "fp8_rowwise")
    ref_q, ref_scales = K.reference_quantize(x, "fp8_rowwise")
    assert_same_bits(q, ref_q)
    assert_same_bits(scales, ref_scales)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_encoding_of_every_bfloat16(dtype):
    """Every bfloat16 bit pattern under scales that hit rounding ties, saturation, subnormals and NaN."""
    x = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(256, 256)
    x = x.to(dtype).to(DEVICE)
    box, scale_box, block = Box.full(x.shape), Box.full((1, 1)), x.shape
    for value in [1.0, 2**-4, 0.7, 3.0, 1e-30, 0.0, float("inf"), float("nan")]:
        scales = torch.full((1, 1), value, device=DEVICE)
        q = K.quantize_box(x, box, scales, scale_box, block)
        ref = K.reference_quantize_box(x, box, scales, scale_box, block)
        # Negative-NaN inputs divided by a NaN scale: the NaN's sign is the operand order's.
        assert_same_bits(q, ref, any_nan=value != value)


def test_fp8_encoding_ties_and_saturation():
    """Midpoints between neighbouring FP8 values and their float32 neighbours, and the range past 448."""
    codes = torch.arange(0x7F, dtype=torch.uint8).view(FP8_DTYPE).float()
    mid = (codes[:-1] + codes[1:]) / 2
    beyond = torch.linspace(440, 500, 121)
    values = torch.cat([mid, mid.nextafter(torch.tensor(0.0)), mid.nextafter(torch.tensor(1e9)), codes, beyond])
    x = torch.cat([values, -values]).reshape(1, -1).to(DEVICE)
    box, scale_box, block = Box.full(x.shape), Box.full((1, 1)), x.shape
    scales = torch.ones(1, 1, device=DEVICE)
    q = K.quantize_box(x, box, scales, scale_box, block)
    assert_same_bits(q, K.reference_quantize_box(x, box, scales, scale_box, block))


def _direct_rows(fmt: str, rows: int = 200) -> tuple[int, list[int]]:
    """Rows of a direct-mode test tensor and where its shards' rows are cut. Row-wise blocks
    are one row, so no row cut splits one, and the interpreter runs a program per row: 48
    rows hold every case (cuts mid-tensor, a column cut through each row) at a quarter of
    the time. 128-row blocks need more rows than a block for cuts to fall inside them."""
    if fmt == "fp8_rowwise":
        return 48, [17, 40]
    return rows, [37, 150] if rows > 150 else [70]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("special", [False, True], ids=["plain", "special"])
def test_direct_mode_2d(fmt, special):
    """Shards that start mid-block, column slices among them, match the reference on the full tensor."""
    rows, cuts = _direct_rows(fmt) if not special else (200, [37, 150])  # the special values' rows
    full = make_input((rows, 300))
    if special:
        full = with_special_values(full)
    out, scales = direct_mode_with_kernels(full, fmt, grid_boxes(full.shape, [cuts, [129]]))
    ref_q, ref_scales = K.reference_quantize(full, fmt)
    # The MAX reduction of partial amax may turn a NaN into another NaN.
    assert_same_bits(out, ref_q, any_nan=special)
    assert_same_bits(scales, ref_scales, any_nan=special)


@pytest.mark.parametrize("fmt", FORMATS)
def test_direct_mode_3d(fmt):
    rows, cuts = _direct_rows(fmt, rows=150)
    full = make_input((2, rows, 140))
    out, scales = direct_mode_with_kernels(full, fmt, grid_boxes(full.shape, [[1], cuts[:1], [50]]))
    ref_q, ref_scales = K.reference_quantize(full, fmt)
    assert_same_bits(out, ref_q)
    assert_same_bits(scales, ref_scales)


def test_quantize_into_strided_out_and_transposed_views():
    """``out`` may be any strided view; bytes outside it stay untouched."""
    x = make_input((200, 150)).t()  # (150, 200), strides (1, 150)
    block = (128, 128)
    box = Box((10, 0), tuple(x.shape))  # starts mid-block
    grid = box.to_blocks(block)
    scales = K.scales_from_amax(K.reference_block_amax(x, box, block))
    expected = K.reference_quantize_box(x, box, scales, grid, block)
    for make_view in (lambda t: t[3:153, 7:207], lambda t: t[:200, :150].t()):
        big = torch.full((210, 230), 0x55, dtype=torch.uint8, device=DEVICE)
        inside = torch.zeros_like(big, dtype=torch.bool)
        make_view(inside).fill_(True)
        out = make_view(big).view(FP8_DTYPE)
        K.quantize_box(x, box, scales, grid, block, out=out)
        assert_same_bits(out, expected)
        assert big[~inside].eq(0x55).all()


def test_scales_may_be_part_of_a_larger_grid():
    """``scales`` is the part ``scale_box`` of the grid; the kernel picks the box's blocks from it."""
    full = make_input((400, 300))
    block = (128, 128)
    all_scales = K.reference_quantize(full, "fp8_block")[1]
    box = Box((140, 130), (200, 150))
    scale_box = Box((1, 0), (3, 3))
    x = box.view(full)
    q = K.quantize_box(x, box, scale_box.view(all_scales), scale_box, block)
    assert_same_bits(q, K.reference_quantize_box(x, box, scale_box.view(all_scales), scale_box, block))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(200, 300), (2, 200, 300)])
def test_dequantize_matches_reference(fmt, shape):
    """Bit-exact but for which NaN a NaN scale times a NaN value gives (operand order again)."""
    q, scales = K.reference_quantize(with_special_values(make_input(shape)), fmt)
    block = get_quant_format(fmt).block_shape(shape)
    assert_same_bits(K.dequantize(q, scales, block), K.reference_dequantize(q, scales, block), any_nan=True)


def test_dequantize_every_code():
    q = torch.arange(256, dtype=torch.uint8).reshape(16, 16).view(FP8_DTYPE).to(DEVICE)
    scales = torch.tensor([[0.5, 3.0], [1e-3, 7.0]], device=DEVICE)
    assert_same_bits(K.dequantize(q, scales, (8, 8)), K.reference_dequantize(q, scales, (8, 8)))


def test_invalid_arguments():
    x = make_input((4, 8))
    box = Box.full(x.shape)
    with pytest.raises(ValueError, match="valid"):
        K.quantize_full(x, "fp9")
    with pytest.raises(ValueError, match="FP8 format"):
        K.quantize_full(x, "none")
    with pytest.raises(ValueError, match=">= 2 dims"):
        K.quantize_full(x[0], "fp8_rowwise")
    with pytest.raises(ValueError, match="dtype"):
        K.quantize_full(x.to(torch.int32), "fp8_block")
    with pytest.raises(ValueError, match="box"):
        K.block_amax(x, Box.full((4, 9)), (1, 8))
    scales = torch.ones(1, 1, device=DEVICE)
    with pytest.raises(ValueError, match="out must be"):
        K.quantize_box(x, box, scales, Box.full((1, 1)), (4, 8), out=torch.empty(4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="scales must be"):
        K.quantize_box(x, box, scales.double(), Box.full((1, 1)), (4, 8))
    with pytest.raises(ValueError, match="does not hold"):
        K.quantize_box(x, box, scales, Box.full((1, 1)), (2, 8))
    with pytest.raises(ValueError, match="collapse"):
        K.quantize_full(make_input((4, 4, 8, 8))[:, :2], "fp8_block")
    with pytest.raises(ValueError, match="leading dims"):
        K.block_amax(make_input((4, 8, 8)), Box.full((4, 8, 8)), (2, 8, 8))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(K, "_interpreting", lambda: False)
    with pytest.raises(ValueError, match="CUDA"):
        K.quantize_full(torch.ones(4, 8), "fp8_block")


# ---------------------------------------------------------------------------------------
# Against the independent numpy quantizer (tests/fp8_numpy.py): codes and scales bit for bit.
# ---------------------------------------------------------------------------------------

_NUMPY_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def assert_matches_numpy(q: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, fmt: str) -> None:
    """``q`` and ``scales`` are what the numpy quantizer makes of ``x`` (NaN: any NaN code)."""
    want_q, want_scales = N.quantize(x.float().cpu().numpy(), fmt)
    assert_same_bits(scales.cpu(), torch.from_numpy(want_scales), any_nan=True)
    assert_same_bits(q.cpu(), torch.from_numpy(want_q).view(FP8_DTYPE), any_nan=True)


def tie_input(shape, fmt: str, dtype=torch.bfloat16, seed=0) -> tuple[torch.Tensor, np.ndarray]:
    """``fp8_numpy.tie_input`` as a tensor on DEVICE: values that divide to FP8 midpoints."""
    x, ties = N.tie_input(shape, fmt, _NUMPY_DTYPES[dtype], seed)
    t = torch.from_numpy(x).to(dtype)
    assert torch.equal(t.float(), torch.from_numpy(x))  # tie_input made them exact in dtype
    return t.to(DEVICE), ties


def with_overflow_and_zeros(x: torch.Tensor) -> torch.Tensor:
    """Blocks far past 448 before scaling (up to near the dtype's max), an all-zero block with
    signed zeros, a zero row and values that round to zero."""
    x = x.clone()
    top = torch.finfo(x.dtype).max
    x[..., :128, 128:256] = x[..., :128, 128:256].float().clamp(-1, 1) * (top / 2)
    x[..., 3, 130] = top
    x[..., 128:, :128] = 0
    x[..., 129, :7] = -0.0
    x[..., 60, :] = 0
    x[..., 10:20, 260:] = 1e-3 * x[..., 10:20, 260:].sign()
    return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_exact_ties_match_numpy(fmt, dtype):
    """x / scale exactly halfway between two codes: the even code wins, in kernel and reference.

    A product with ``1 / scale`` (the old rounding) lands many of these one step off.
    """
    x, ties = tie_input((2, 130, 257), fmt, dtype)
    assert ties.mean() > 0.5, ties.mean()
    assert_matches_numpy(*K.quantize_full(x, fmt), x, fmt)
    assert_matches_numpy(*K.reference_quantize(x, fmt), x, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_tie_inputs_catch_a_reciprocal(fmt):
    """The tie test above would fail a quantizer that multiplies by ``1 / scale``."""
    x, ties = N.tie_input((2, 130, 257), fmt, "float32")
    block = N.block_shape(fmt, x.shape)
    scales = N.scales_of(x, block)
    per_element = scales.reshape(-1)[N.block_ids(x.shape, block)[0]]
    off = N.encode_e4m3(x * (np.float32(1) / per_element)) != N.quantize_with(x, scales, block)
    assert (off & ties).sum() > 1000, (off & ties).sum()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape, dtype", [((1, 1), torch.bfloat16), ((3, 200), torch.bfloat16),
                                          ((257, 129), torch.bfloat16), ((130, 257), torch.bfloat16),
                                          ((130, 257), torch.float32), ((2, 130, 257), torch.float16)])
def test_random_values_match_numpy(fmt, shape, dtype):
    """Odd shapes and partial blocks; where a block has room, overflow and all-zero blocks."""
    x = make_input(shape, dtype=dtype, seed=3)
    if shape[-2] > 128 and shape[-1] > 256:
        x = with_overflow_and_zeros(x)
    assert x.isfinite().all()
    assert_matches_numpy(*K.quantize_full(x, fmt), x, fmt)
    assert_matches_numpy(*K.reference_quantize(x, fmt), x, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_direct_mode_matches_numpy(fmt):
    """Shards that start mid-block: partial amax, MAX, quantize per shard, on tie inputs."""
    rows, cuts = _direct_rows(fmt)
    full, _ = tie_input((rows, 300), fmt, torch.float32, seed=4)
    out, scales = direct_mode_with_kernels(full, fmt, grid_boxes(full.shape, [cuts, [129]]))
    assert_matches_numpy(out, scales, full, fmt)


@pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")  # the interpreter's x / 0 and inf / inf
def test_saturation_and_non_finite_match_numpy():
    """|x / scale| past 448 (and past float32's range) clamps to +-448; inf in a block makes
    its scale inf, its finite codes 0 and the inf's code NaN; NaN makes the block NaN."""
    x = make_input((130, 260), dtype=torch.float32, seed=5)
    x[0, :5] = torch.tensor([1e3, -1e3, 3e38, -3e38, 464.0])
    x[129, 259] = float("inf")  # the last, partial block
    x[5, 200] = float("nan")
    block = (128, 128)
    box = Box.full(x.shape)
    scales = torch.tensor([[1e-3, 0.5, 1.0], [2.0, 4.0, 1e-2]], device=DEVICE)  # < amax / 448: saturates
    want = torch.from_numpy(N.quantize_with(x.cpu().numpy(), scales.cpu().numpy(), block)).view(FP8_DTYPE)
    assert want.view(torch.uint8)[0, :5].tolist() == [0x7E, 0xFE, 0x7E, 0xFE, 0x7E]
    for quantize_box in (K.quantize_box, K.reference_quantize_box):
        assert_same_bits(quantize_box(x, box, scales, box.to_blocks(block), block).cpu(), want, any_nan=True)
    q, s = K.quantize_full(x, "fp8_block")
    assert s[1, 2] == float("inf") and s[0, 1].isnan()
    assert_matches_numpy(q, s, x, "fp8_block")


def _cell_variant(quantize: bool, from_amax: bool) -> dict:
    """``_fp8_cell_kernel`` over bf16 128x128 cells, as ``quantize_full`` and ``quantize_box`` launch it."""
    ints = ["stride_xb", "stride_xr", "stride_xc", "stride_qb", "stride_qr", "stride_qc", "stride_sb", "stride_sr",
            "stride_sc", "rows", "cols", "row_skip", "col_skip", "first_cell_row", "first_cell_col", "cell_rows",
            "cell_cols", "num_cell_rows", "num_cell_cols", "block_rows", "block_cols"]
    signature = {"x_ptr": "*i16", "q_ptr": "*u8", "scale_ptr": "*fp32", "amax_ptr": "*fp32",
                 **dict.fromkeys(ints, "i32")}
    constants = dict(TILE_R=128, TILE_C=128, FROM_AMAX=from_amax, QUANTIZE=quantize, HW_CAST=True)
    return kernel_spec("fsdp_sync.kernels.fp8_quant", "_fp8_cell_kernel", signature, constants, aligned=(0, 1))


def test_quantize_divides_with_ieee_rounding_on_the_gpu():
    """The interpreter divides exactly whatever the kernel says; only the PTX shows that the GPU
    does too: every x / scale (and the fused amax / 448) is div.rn.f32, never div.full.f32
    (what Triton's ``/`` on fp32 compiles to) or an approximate reciprocal."""
    for ptx in sm90_ptx([_cell_variant(True, True), _cell_variant(True, False)]):
        # One division per element a thread holds (128 x 128 over 4 warps), not one reciprocal.
        assert ptx.count("div.rn.f32") >= 128 * 128 // (4 * 32), ptx.count("div.rn.f32")
        divisions = sorted(set(re.findall(r"(?:div|rcp)\.[\w.]+", ptx)))
        assert not re.search(r"div\.(full|approx)|rcp\.approx", ptx), divisions
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx


def test_numpy_table_is_e4m3fn():
    """The table's own facts: 254 finite values, +-448 at most, no inf, NaN at 0x7f and 0xff."""
    table = N.e4m3_table()
    assert np.isnan(table).nonzero()[0].tolist() == [0x7F, 0xFF]
    assert np.isfinite(table).sum() == 254 and np.nanmax(np.abs(table)) == 448.0
    assert table[0x01] == 2.0**-9 and table[0x08] == 2.0**-6 and table[0x38] == 1.0
    assert N.encode_e4m3(np.float32([1.0625, 1.1875, 464.0, 1e9, -np.inf, -0.0])).tolist() == [
        0x38, 0x3A, 0x7E, 0x7E, 0xFE, 0x80]


# ---------------------------------------------------------------------------------------
# GPU only: large shapes, the integer encoding on hardware, and a write into a peer GPU.
# ---------------------------------------------------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(4096, 7168), (7, 1000, 2112), (300, 40000)])
def test_gpu_large_shapes(fmt, shape):
    x = with_special_values(make_input(shape))
    q, scales = K.quantize_full(x, fmt)
    ref_q, ref_scales = K.reference_quantize(x, fmt)
    assert_same_bits(q, ref_q)
    assert_same_bits(scales, ref_scales)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_exact_rounding_matches_numpy(fmt, dtype):
    """Compiled kernels (div.rn, cvt.rn.satfinite) and torch's CUDA reference against numpy:
    exact ties, random values with overflowing and all-zero blocks, partial blocks."""
    x, ties = tie_input((3, 1000, 2100), fmt, dtype, seed=6)
    assert ties.mean() > 0.5
    for case in (x, with_overflow_and_zeros(make_input((1000, 3000), dtype=dtype, seed=7))):
        assert_matches_numpy(*K.quantize_full(case, fmt), case, fmt)
        assert_matches_numpy(*K.reference_quantize(case, fmt), case, fmt)


@gpu
@needs_cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_integer_encoding_matches_hardware_cast(fmt, monkeypatch):
    """The interpreter's integer encoding, compiled for the GPU, agrees with cvt.rn.satfinite."""
    x = with_special_values(make_input((1000, 3000)))
    hw = K.quantize_full(x, fmt)
    monkeypatch.setattr(K, "_use_hw_cast", lambda device: False)
    soft = K.quantize_full(x, fmt)
    for a, b in zip(hw, soft):
        assert_same_bits(a, b)
    assert_same_bits(hw[0], K.reference_quantize(x, fmt)[0])


@gpu
@needs_cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_direct_mode_large(fmt):
    full = make_input((2, 1500, 2100))
    boxes = grid_boxes(full.shape, [[1], [300, 1111], [129, 1900]])
    out, scales = direct_mode_with_kernels(full, fmt, boxes)
    ref_q, ref_scales = K.reference_quantize(full, fmt)
    assert_same_bits(out, ref_q)
    assert_same_bits(scales, ref_scales)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_quantize_into_peer_memory():
    """Quantize on cuda:0 straight into a strided view of a buffer on cuda:1."""
    if not torch.cuda.can_device_access_peer(0, 1):
        pytest.skip("cuda:0 cannot access cuda:1")
    # PyTorch enables peer access (cuda:0 -> cuda:1) on its first copy between the two.
    torch.ones(1, device="cuda:0").to("cuda:1")
    x = make_input((1000, 3000)).to("cuda:0")
    box = Box((200, 64), x.shape)
    block = (128, 128)
    grid = box.to_blocks(block)
    scales = K.scales_from_amax(K.block_amax(x, box, block))
    buffer = torch.zeros((1200, 3100), dtype=torch.uint8, device="cuda:1")
    out = buffer[100:1100, 50:3050].view(FP8_DTYPE)
    K.quantize_box(x, box, scales, grid, block, out=out)
    torch.cuda.synchronize(0)
    expected = K.reference_quantize_box(x, box, scales, grid, block)
    assert_same_bits(out.cpu(), expected.cpu())
    assert buffer[:100].eq(0).all() and buffer[1100:].eq(0).all()
