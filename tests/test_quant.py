"""The plain-torch reference of every format, and the direct-mode identity it rests on."""

import math

import numpy as np
import pytest
import torch

from fsdp_sync import LayoutSpec, expected_destinations
from fsdp_sync.boxes import Box
from fsdp_sync.quant import (FP8_MAX, block_amax, dequantize, get_quant_format, quantize_box, reference_quantize,
                             scales_from_amax)

from tests import fp8_numpy

FORMATS = ("fp8_block", "fp8_rowwise", "fp8_tensor")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 200), (130, 257), (257, 129), (2, 130, 140)])
def test_sharded_amax_and_quantize_equal_reference(fmt, shape):
    """MAX over shards of per-shard block amax, then quantizing each shard, equals the reference."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.bfloat16)
    q_ref, s_ref = reference_quantize(x, fmt)
    f = get_quant_format(fmt)
    block = f.block_shape(shape)
    grid_box = Box.full(f.scale_shape(shape))
    dim = len(shape) - 2
    cuts = sorted({0, shape[dim] // 3, shape[dim] // 3 + 1, shape[dim]})
    shards = []
    for lo, hi in zip(cuts, cuts[1:]):
        offsets = [0] * len(shape)
        sizes = list(shape)
        offsets[dim], sizes[dim] = lo, hi - lo
        shards.append(Box(tuple(offsets), tuple(sizes)))
    amax = torch.zeros(grid_box.sizes)
    for b in shards:
        touched = b.to_blocks(block)
        touched.view(amax).copy_(torch.maximum(touched.view(amax), block_amax(b.view(x), b, block)))
    scales = scales_from_amax(amax)
    assert torch.equal(scales, s_ref)
    for b in shards:
        q = quantize_box(b.view(x), b, scales, grid_box, block)
        assert torch.equal(q.view(torch.uint8), b.view(q_ref).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_and_expected_destinations_match_numpy(fmt, dtype):
    """The reference, and what ``expected_destinations`` says a receiver must hold (the bar
    every sync test sets), against the independent numpy quantizer, on exact ties."""
    x, ties = fp8_numpy.tie_input((2, 130, 257), fmt, str(dtype).removeprefix("torch."), seed=2)
    assert ties.mean() > 0.5
    full = torch.from_numpy(x).to(dtype)
    want_q, want_scales = fp8_numpy.quantize(full.float().numpy(), fmt)
    q, scales = reference_quantize(full, fmt)
    expected = expected_destinations({"w": full}, layout=LayoutSpec("identity"), quant=fmt)
    for got_q, got_scales in ((q, scales), (expected["w"], expected["w_scale_inv"])):
        assert np.array_equal(got_q.view(torch.uint8).numpy(), want_q)
        assert np.array_equal(got_scales.numpy().view(np.uint32), want_scales.view(np.uint32))


def test_block_layout_and_partial_blocks():
    x = torch.zeros(130, 257)
    x[129, 256] = 7.0  # the only element of the last partial block
    q, s = reference_quantize(x, "fp8_block")
    assert s.shape == (2, 3) and s.dtype == torch.float32
    assert s[1, 2] == 7.0 / FP8_MAX  # scaled by its own real elements
    assert float(q[129, 256].float()) == FP8_MAX


def test_all_zero_blocks_get_scale_one_and_nan_propagates():
    x = torch.zeros(4, 256)
    x[0, 200] = float("nan")
    q, s = reference_quantize(x, "fp8_block")
    assert s[0, 0] == 1.0 and torch.all(q[:, :128].float() == 0)
    assert math.isnan(s[0, 1]) and torch.isnan(q[0, 200].float())


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequant_error_is_small(fmt):
    torch.manual_seed(1)
    x = torch.randn(256, 384)
    q, s = reference_quantize(x, fmt)
    back = dequantize(q, s, get_quant_format(fmt).block_shape(x.shape))
    snr_db = 10 * torch.log10(x.pow(2).mean() / (x - back).pow(2).mean())
    assert snr_db > 25


def test_unknown_format_lists_the_valid_ones():
    with pytest.raises(ValueError, match="fp8_block"):
        get_quant_format("int4")


def test_checksum_is_the_same_in_chunks_and_sees_one_changed_byte(monkeypatch):
    """The bench verifies receivers by checksum; chunking (to bound memory) must not change it."""
    from fsdp_sync import destinations

    t = torch.randn(300, 70)
    whole = destinations.checksum(t)
    monkeypatch.setattr(destinations, "_CHECKSUM_CHUNK", 1001)  # chunks that cut elements
    assert destinations.checksum(t) == whole
    swapped = t.clone()
    swapped.view(-1)[[5, 6]] = swapped.view(-1)[[6, 5]]  # same bytes, other positions
    assert destinations.checksum(swapped) != whole
