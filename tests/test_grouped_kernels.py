"""The grouped FP8 kernel (one launch per bucket) against the plain-torch reference, bit for bit."""

import os
import re

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fsdp_sync.boxes import Box  # noqa: E402
from fsdp_sync.kernels import fp8_quant as K  # noqa: E402
from fsdp_sync.kernels.fp8_grouped import GroupedCells, interleaved_order  # noqa: E402
from fsdp_sync.quant import FP8_DTYPE, get_quant_format  # noqa: E402
from tests.ptx import kernel_spec, sm90_ptx  # noqa: E402
from tests.test_kernels import (DEVICE, assert_matches_numpy, assert_same_bits, make_input, tie_input,  # noqa: E402
                                with_special_values)


def _cases():
    """(name, x, box, block): boxes of several tensors, mid-block starts, strides, dtypes, formats."""
    full = with_special_values(make_input((300, 400), seed=1))
    three = make_input((2, 150, 260), seed=2)
    fp32 = make_input((130, 129), dtype=torch.float32, seed=3)
    fp16 = make_input((70, 300), dtype=torch.float16, seed=4)
    wide = make_input((5, 2000), seed=5).t()  # (2000, 5), strides (1, 2000)
    blk, row = get_quant_format("fp8_block"), get_quant_format("fp8_rowwise")
    out = []
    for name, t, box, fmt in [
        ("mid-block rows", full, Box((37, 0), (150, 400)), blk),
        ("column slice", full, Box((0, 129), (300, 171)), blk),
        ("whole", full, Box.full(full.shape), blk),
        ("3d", three, Box((1, 20, 0), (1, 130, 260)), blk),
        ("fp32", fp32, Box.full(fp32.shape), blk),
        ("fp16 rowwise", fp16, Box((3, 10), (60, 290)), row),
        ("transposed", wide, Box((100, 1), (900, 4)), blk),
        ("empty", full, Box((5, 0), (0, 400)), blk),
    ]:
        out.append((name, box.view(t), box, fmt.block_shape(t.shape)))
    return out


def test_amax_of_many_boxes_in_one_launch():
    group = GroupedCells(DEVICE, quantize=False)
    grids = {}
    for name, x, box, block in _cases():
        grids[name] = torch.full(box.to_blocks(block).sizes, -1.0, device=DEVICE)
        assert group.add(x, box, block, grids[name]), name
    # Aligned boxes (mid-block rows, whole) and the rest (a column slice starting at 129) both ran.
    assert {vec for _, _, vec in group._rows} == {False, True}
    group.launch()
    for name, x, box, block in _cases():
        # Which NaN an amax returns is its own business, as in test_kernels.
        assert_same_bits(grids[name], K.reference_block_amax(x, box, block), any_nan=True)


def test_quantize_many_boxes_into_strided_outputs_in_one_launch():
    group = GroupedCells(DEVICE, quantize=False)
    scales = {}
    for name, x, box, block in _cases():
        scales[name] = torch.empty(box.to_blocks(block).sizes, device=DEVICE)
        group.add(x, box, block, scales[name])
    group.launch()
    group = GroupedCells(DEVICE, quantize=True)
    outs, buffers = {}, {}
    for name, x, box, block in _cases():
        scales[name] = K.scales_from_amax(scales[name])
        # A transposed view of a larger buffer: every store goes through both strides.
        buffers[name] = torch.full((x.shape[-1] + 3, *x.shape[:-1]), 0x55, dtype=torch.uint8, device=DEVICE)
        outs[name] = buffers[name][1:1 + x.shape[-1]].movedim(0, -1).view(FP8_DTYPE)
        assert group.add(x, box, block, scales[name], out=outs[name]), name
    assert len(group) == len(_cases()) - 1  # the empty box queues nothing
    assert {vec for _, _, vec in group._rows} == {False}  # transposed outputs: no 16-byte stores
    group.launch()
    for name, x, box, block in _cases():
        expected = K.reference_quantize_box(x, box, scales[name], box.to_blocks(block), block)
        assert_same_bits(outs[name], expected)
        assert buffers[name][0].eq(0x55).all() and buffers[name][-2:].eq(0x55).all(), name


def test_cells_stored_into_a_peer_spread_among_the_local_ones():
    """The order is a permutation that keeps each kind's own order and mixes the kinds
    evenly: in every tenth of the grid each kind has about a tenth of its cells."""
    remote = torch.tensor([False] * 600 + [True] * 200 + [False] * 200)
    order = interleaved_order(remote)
    assert sorted(order.tolist()) == list(range(1000))
    kinds = remote[order.long()]
    for part in range(10):
        window = kinds[part * 100:(part + 1) * 100]
        assert int(window.sum()) == 20, (part, int(window.sum()))
    assert order[kinds].tolist() == list(range(600, 800))  # each kind keeps its order
    assert interleaved_order(torch.zeros(5, dtype=torch.bool)) is None
    assert interleaved_order(torch.ones(5, dtype=torch.bool)) is None


def test_a_launch_with_peer_and_local_cells_gives_the_same_bits():
    """Flagging some boxes remote reorders the programs (PERMUTED), never what they compute."""
    tensors = [with_special_values(make_input((300, 400), seed=1)), make_input((256, 512), seed=7),
               make_input((2, 130, 256), seed=8)]
    fmt = get_quant_format("fp8_block")
    results = []
    for remote in ((False, False, False), (False, True, False)):
        group = GroupedCells(DEVICE, quantize=True, fused=True)
        outs, grids = [], []
        for x, flag in zip(tensors, remote):
            box, block = Box.full(x.shape), fmt.block_shape(x.shape)
            outs.append(torch.full(x.shape, 0x55, dtype=torch.uint8, device=DEVICE).view(FP8_DTYPE))
            grids.append(torch.full(box.to_blocks(block).sizes, -1.0, device=DEVICE))
            assert group.add(x, box, block, grids[-1], out=outs[-1], shape=x.shape, remote=flag)
        prepared = group.freeze()
        assert any(kw["PERMUTED"] for *_, kw in prepared._launches) == any(remote)
        prepared.launch()
        results.append((outs, grids))
    for got, want in zip(results[1][0] + results[1][1], results[0][0] + results[0][1]):
        assert_same_bits(got, want)
    for x, out, grid in zip(tensors, *results[0]):
        box, block = Box.full(x.shape), fmt.block_shape(x.shape)
        assert_same_bits(grid, K.scales_from_amax(K.reference_block_amax(x, box, block)))
        assert_same_bits(out, K.reference_quantize_box(x, box, grid, box.to_blocks(block), block))


def test_boxes_whose_cells_are_not_blocks_are_left_to_the_caller():
    x = make_input((64, 300))
    box = Box.full(x.shape)
    group = GroupedCells(DEVICE, quantize=False)
    tensor_block = get_quant_format("fp8_tensor").block_shape(x.shape)
    assert not group.add(x, box, tensor_block, torch.empty(1, 1, device=DEVICE))
    long_rows = make_input((4, 20000))
    row_block = get_quant_format("fp8_rowwise").block_shape(long_rows.shape)
    assert not group.add(long_rows, Box.full(long_rows.shape), row_block, torch.empty(4, 1, device=DEVICE))
    assert len(group) == 0


def test_mismatched_arguments_name_the_shapes():
    x = make_input((200, 300))
    group = GroupedCells(DEVICE, quantize=True)
    with pytest.raises(ValueError, match=r"scales \(1, 1\)"):
        group.add(x, Box.full(x.shape), (128, 128), torch.ones(1, 1, device=DEVICE), out=torch.empty_like(x, dtype=FP8_DTYPE))
    with pytest.raises(ValueError, match="out must be"):
        group.add(x, Box.full(x.shape), (128, 128), torch.ones(2, 3, device=DEVICE))


gpu = pytest.mark.gpu


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_grouped_large_and_into_a_peer():
    """Large boxes, and (with 2 GPUs) stores straight into a peer GPU's buffer."""
    peer = torch.device("cuda", 1 if torch.cuda.device_count() > 1 else 0)
    torch.ones(1, device="cuda:0").to(peer)  # enables peer access
    xs = [make_input((4096, 7168), seed=7), make_input((7, 1000, 2112), seed=8)]
    boxes = [Box((300, 64), (3000, 7000)), Box((0, 129, 0), (7, 800, 2112))]
    block_of = [get_quant_format("fp8_block").block_shape(x.shape) for x in xs]
    amax = GroupedCells(DEVICE, quantize=False)
    grids = [torch.empty(b.to_blocks(k).sizes, device=DEVICE) for b, k in zip(boxes, block_of)]
    for x, box, block, grid in zip(xs, boxes, block_of, grids):
        amax.add(box.view(x), box, block, grid)
    amax.launch()
    quant = GroupedCells(DEVICE, quantize=True)
    outs = [torch.empty(b.sizes, dtype=FP8_DTYPE, device=peer) for b in boxes]
    scales = [K.scales_from_amax(g) for g in grids]
    for x, box, block, s, out in zip(xs, boxes, block_of, scales, outs):
        quant.add(box.view(x), box, block, s, out=out)
    quant.launch()
    torch.cuda.synchronize()
    for x, box, block, grid, s, out in zip(xs, boxes, block_of, grids, scales, outs):
        assert_same_bits(grid, K.reference_block_amax(box.view(x), box, block))
        expected = K.reference_quantize_box(box.view(x), box, s, box.to_blocks(block), block)
        assert_same_bits(out.cpu(), expected.cpu())


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two-pass"])
def test_gpu_grouped_launches_round_exactly(fused):
    """Compiled grouped launches (div.rn, cvt.rn.satfinite) against numpy on exact ties, one GPU."""
    tensors = [(tie_input((1024, 2048), "fp8_block", torch.float32, seed=31)[0], "fp8_block"),
               (tie_input((3, 1000, 2100), "fp8_block", torch.bfloat16, seed=32)[0], "fp8_block"),
               (tie_input((700, 3000), "fp8_rowwise", torch.bfloat16, seed=33)[0], "fp8_rowwise")]
    for (x, fmt), (q, scales) in zip(tensors, _grouped_quantize(tensors, fused=fused)):
        assert_matches_numpy(q, scales, x, fmt)


def test_self_check_passes_covers_every_launch_kind_and_reports_a_broken_kernel(monkeypatch):
    """Real models' shapes take the VEC launches: the self-check must run those too, beside
    the unaligned ones (one passing run records the kinds; each run takes ~12 s interpreted)."""
    from fsdp_sync.kernels import fp8_grouped

    kinds, freeze = set(), fp8_grouped.GroupedCells.freeze

    def record(self):
        kinds.update((self.quantize, self.fused, vec) for _, _, vec in self._rows)
        return freeze(self)

    monkeypatch.setattr(fp8_grouped.GroupedCells, "freeze", record)
    fp8_grouped.self_check.cache_clear()
    assert fp8_grouped.self_check(DEVICE) is None
    assert kinds == {(q, f, v) for q, f in [(False, False), (True, False), (True, True)] for v in (False, True)}
    monkeypatch.setattr(fp8_grouped.GroupedCells, "freeze", freeze)
    real_launch = GroupedCells.launch

    def fail(self):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(fp8_grouped.GroupedCells, "launch", fail)
    fp8_grouped.self_check.cache_clear()
    assert fp8_grouped.self_check(DEVICE) == "RuntimeError: no kernel today"

    def skip_quantize(self):
        if self.quantize:
            self._rows.clear()  # values never written
        real_launch(self)

    monkeypatch.setattr(fp8_grouped.GroupedCells, "launch", skip_quantize)
    fp8_grouped.self_check.cache_clear()
    assert "disagree" in fp8_grouped.self_check(DEVICE)
    fp8_grouped.self_check.cache_clear()


def test_fused_batch_computes_scales_and_values_in_one_pass():
    """Boxes of whole blocks: scales and FP8 from one read, equal to the two-pass reference."""
    full = with_special_values(make_input((300, 400), seed=11))
    three = make_input((2, 150, 260), seed=12)
    rows = make_input((70, 300), dtype=torch.float16, seed=13)
    blk, row = get_quant_format("fp8_block"), get_quant_format("fp8_rowwise")
    cases = [(full, Box.full(full.shape), blk), (full, Box((128, 256), (172, 144)), blk),  # ends at the edge
             (three, Box((1, 0, 128), (1, 150, 132)), blk), (rows, Box((3, 0), (60, 300)), row)]
    group = GroupedCells(DEVICE, quantize=True, fused=True)
    outs = []
    for t, box, fmt in cases:  # the first two are 16-aligned (VEC), the others are not
        block = fmt.block_shape(t.shape)
        out = torch.empty(box.sizes, dtype=FP8_DTYPE, device=DEVICE)
        scales = torch.full(box.to_blocks(block).sizes, -1.0, device=DEVICE)
        assert group.add(box.view(t), box, block, scales, out=out, shape=t.shape), box
        outs.append((out, scales))
    assert {vec for _, _, vec in group._rows} == {False, True}
    group.launch()
    for (t, box, fmt), (out, scales) in zip(cases, outs):
        ref_q, ref_scales = K.reference_quantize(t, fmt)
        block = fmt.block_shape(t.shape)
        assert_same_bits(scales, box.to_blocks(block).view(ref_scales), any_nan=True)
        assert_same_bits(out, box.view(ref_q), any_nan=True)


def _grouped_quantize(tensors: list[tuple[torch.Tensor, str]], *,
                      fused: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(FP8, scales) of whole tensors from grouped launches: one fused launch, or amax then quantize."""
    shapes = [(t, get_quant_format(fmt).block_shape(t.shape)) for t, fmt in tensors]
    grids = [torch.full(Box.full(t.shape).to_blocks(block).sizes, -1.0, device=DEVICE) for t, block in shapes]
    outs = [torch.empty(t.shape, dtype=FP8_DTYPE, device=DEVICE) for t, _ in shapes]
    if not fused:
        amax = GroupedCells(DEVICE, quantize=False)
        for (t, block), grid in zip(shapes, grids):
            assert amax.add(t, Box.full(t.shape), block, grid)
        amax.launch()
        grids = [K.scales_from_amax(g) for g in grids]
    group = GroupedCells(DEVICE, quantize=True, fused=fused)
    for (t, block), grid, out in zip(shapes, grids, outs):
        assert group.add(t, Box.full(t.shape), block, grid, out=out, shape=t.shape)
    group.launch()
    return list(zip(outs, grids))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two-pass"])
def test_grouped_launches_round_exactly(fused):
    """Exact ties (16-aligned boxes, which take the VEC launches, and odd ones), float32
    with arbitrary scales and bfloat16, against the independent numpy quantizer."""
    tensors = [(tie_input((256, 384), "fp8_block", torch.float32, seed=21)[0], "fp8_block"),
               (tie_input((2, 130, 257), "fp8_block", torch.bfloat16, seed=22)[0], "fp8_block"),
               (tie_input((70, 300), "fp8_rowwise", torch.float32, seed=23)[0], "fp8_rowwise")]
    for (x, fmt), (q, scales) in zip(tensors, _grouped_quantize(tensors, fused=fused)):
        assert_matches_numpy(q, scales, x, fmt)


def test_fused_batch_refuses_boxes_that_cut_blocks():
    x = make_input((300, 400))
    group = GroupedCells(DEVICE, quantize=True, fused=True)
    out = torch.empty(100, 400, dtype=FP8_DTYPE, device=DEVICE)
    box = Box((37, 0), (100, 400))  # starts mid-block: its first block's amax needs rows it does not hold
    assert not group.add(box.view(x), box, (128, 128), torch.empty(2, 4, device=DEVICE), out=out, shape=x.shape)
    box = Box((0, 0), (100, 400))  # ends mid-block, not at the tensor's end
    assert not group.add(box.view(x), box, (128, 128), torch.empty(1, 4, device=DEVICE), out=out, shape=x.shape)
    assert len(group) == 0


def _grouped_variant(vec: bool, quantize: bool, permuted: bool = False, *, from_amax: bool = True,
                     delta: bool = False) -> dict:
    """The grouped kernel over bf16 128x128 blocks, as a push launches it, for ``tests.ptx``."""
    from fsdp_sync.kernels.fp8_grouped import _NUM_FIELDS, _chunk_rows, _grouped_warps

    signature = {"table": "*i64", "row_of": "*i32", "order": "*i32", "x_base": "*i16", "q_base": "*u8",
                 "h_base": "*u8", "changed": "*i64", "anchor": "*i32"}
    constants = dict(NUM_FIELDS=_NUM_FIELDS, TILE_R=128, TILE_C=128, QUANTIZE=quantize, FROM_AMAX=from_amax,
                     HW_CAST=True, VEC=vec, PERMUTED=permuted, DELTA=delta,
                     CHUNK_R=_chunk_rows((128, 128)))
    return kernel_spec("fsdp_sync.kernels.fp8_grouped", "_grouped_cell_kernel", signature, constants,
                       aligned=(3, 4, 5), num_warps=_grouped_warps(128 * 128, delta=delta))


def _global_accesses(*variants: tuple) -> list[set[str]]:
    """The global loads and stores of each (vec, quantize, permuted[, from_amax, delta])
    variant of the grouped kernel compiled for sm_90, which needs no GPU."""
    ptxs = sm90_ptx([_grouped_variant(*v[:3], **dict(zip(("from_amax", "delta"), v[3:]))) for v in variants])
    return [set(re.findall(r"(?:ld|st)\.global\.[\w.]+", ptx)) for ptx in ptxs]


def test_grouped_quantize_divides_with_ieee_rounding():
    """Each code comes from a correctly rounded x / scale: fused, a reciprocal per block
    (div.rn) with one FMA residual per element (``_block_quotient``), div.rn per element for
    the blocks it does not take; two-pass, div.rn per element. The interpreter divides
    exactly whatever the kernel says, so only the PTX shows that the GPU does: Triton's
    ``/`` on fp32 compiles to div.full.f32 (approximate)."""
    from fsdp_sync.kernels.fp8_grouped import _chunk_rows, _grouped_warps

    per_thread = _chunk_rows((128, 128)) * 128 // (_grouped_warps(128 * 128) * 32)  # a chunk's elements
    fused, two_pass = sm90_ptx([_grouped_variant(True, True), _grouped_variant(False, True, from_amax=False)])
    assert fused.count("fma.rn.f32") >= 2 * per_thread, fused.count("fma.rn.f32")
    for ptx in (fused, two_pass):
        assert ptx.count("div.rn.f32") >= per_thread, ptx.count("div.rn.f32")
        divisions = sorted(set(re.findall(r"(?:div|rcp)\.[\w.]+", ptx)))
        assert not re.search(r"div\.(full|approx)|rcp\.approx", ptx), divisions
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx


@pytest.mark.parametrize("quantize", [False, True])
def test_aligned_launches_compile_to_16_byte_accesses(quantize):
    """Without VEC every bf16 load is 2 bytes and every FP8 store 1 byte: several times slower
    over NVLink. Triton gives per-box launches this from argument specialization; a table's
    offsets need the hints, and an address cast to a pointer would lose them."""
    # The last: cells in interleaved order.
    fast, slow, permuted = _global_accesses((True, quantize, False), (False, quantize, False), (True, quantize, True))
    assert "ld.global.v4.b32" in fast and "ld.global.b16" not in fast, fast
    assert "ld.global.v4.b32" in permuted and "ld.global.b16" not in permuted, permuted
    assert "ld.global.b16" in slow, slow
    if quantize:
        assert "st.global.v4.b32" in fast and "st.global.b8" not in fast, fast


def test_aligned_delta_launches_load_the_shadow_as_wide_as_the_codes():
    """A delta launch reads the shadow with 16-byte loads, as it reads the weights; it stores
    4-code words, each predicated on a change in it (not one store per code)."""
    fused, two_pass = _global_accesses((True, True, False, True, True), (True, True, False, False, True))
    for accesses in (fused, two_pass):
        assert "ld.global.v4.b32" in accesses and "ld.global.b16" not in accesses and "ld.global.b8" not in accesses, \
            accesses
        assert "st.global.b32" in accesses and "st.global.b8" not in accesses, accesses
