"""The kernels' ``x / scale`` (``_quotient``), held bit for bit to IEEE division (numpy's float32
divide on CPU, CUDA's on the GPU) on random and adversarial pairs: any faster exact quotient
that replaces ``div.rn.f32`` must pass it, signed zeros and tiny scales included. The quotient
of a block by its own scale (``_block_quotient``) is held to it on blocks with their own amax."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fsdp_sync.kernels.fp8_quant import _block_quotient, _quotient  # noqa: E402


@triton.jit
def _quotients(x_ptr, scale_ptr, out_ptr, BLOCK: tl.constexpr, OWN_SCALE: tl.constexpr = False):
    """Program p divides BLOCK values by its own scalar scale, as a quantize cell does; with
    OWN_SCALE through ``_block_quotient`` (the scale is that of the program's block)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    scale = tl.load(scale_ptr + pid)
    x = tl.load(x_ptr + offs)
    if OWN_SCALE:
        tl.store(out_ptr + offs, _block_quotient(x, scale))
    else:
        tl.store(out_ptr + offs, _quotient(x, scale))


def _blocks(num_blocks: int, block: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks with their own scale (amax / 448 correctly rounded, 1 for an all-zero block), as
    a quantize cell has them: amaxes over all binades down to subnormal, significands all
    ones and powers of two, values exact multiples of the scale, +-amax, +-0, blocks of zeros,
    blocks holding inf or NaN (their scale is inf or NaN)."""
    rng = np.random.default_rng(seed)
    exps = rng.integers(-149, 128, num_blocks).astype(np.float64)
    amax = np.minimum(rng.uniform(1, 2, num_blocks) * 2.0 ** exps, 3.4e38).astype(np.float32)
    mant = amax.view(np.uint32) & np.uint32(0xFF800000)
    amax[::7] = (mant[::7] | np.uint32(0x007FFFFF)).view(np.float32)
    amax[1::7] = mant[1::7].view(np.float32)
    x = (rng.uniform(-1, 1, (num_blocks, block)) * amax[:, None].astype(np.float64)).astype(np.float32)
    x[:, 0], x[:, 1] = amax, -amax
    x[:, 2], x[:, 3] = np.float32(0.0), np.float32(-0.0)
    x[:, 4] = np.minimum((np.float32(3.0) * (amax / np.float32(448))).astype(np.float32), amax)
    x[5::11] = np.where(rng.uniform(size=(len(x[5::11]), block)) < 0.5, np.float32(0.0), np.float32(-0.0))
    x[6::13, 7], x[7::13, 7], x[8::13, 7] = np.float32(np.inf), np.float32(-np.inf), np.float32(np.nan)
    with np.errstate(all="ignore"):
        amax = np.abs(x).max(axis=1)  # NaN wins, as in the kernels
        amax[np.isnan(x).any(axis=1)] = np.nan
        scales = np.where(amax == 0, np.float32(1), amax / np.float32(448)).astype(np.float32)
    return x, scales


def _pairs(num_scales: int, block: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scales: random over many binades, all-ones and power-of-two significands, below 2^-100,
    subnormal; values: up to 448 x scale and beyond, exact multiples (zero residual), +-0."""
    rng = np.random.default_rng(seed)
    exps = rng.integers(-140, 120, num_scales).astype(np.float64)
    scales = (rng.uniform(1, 2, num_scales) * 2.0 ** exps).astype(np.float32)
    mant = scales.view(np.uint32) & np.uint32(0xFF800000)
    scales[::7] = (mant[::7] | np.uint32(0x007FFFFF)).view(np.float32)  # significand all ones
    scales[1::7] = mant[1::7].view(np.float32)  # powers of two
    scales[2::7] = np.float32(3e-39)  # subnormal
    scales = np.maximum(scales, np.float32(1e-44))
    x = (rng.uniform(-1, 1, (num_scales, block)) * 448 * scales[:, None].astype(np.float64)).astype(np.float32)
    x[:, :4] = x[:, :4] * np.float32(1e6)  # quotients far beyond 448
    x[:, 4] = (np.float32(3.0) * scales).astype(np.float32)  # exact: zero residual
    x[:, 5], x[:, 6] = np.float32(0.0), np.float32(-0.0)
    return x, scales


def _check(x: np.ndarray, scales: np.ndarray, got: np.ndarray) -> None:
    with np.errstate(all="ignore"):
        want = (x / scales[:, None]).astype(np.float32)
    bad = np.argwhere(got.view(np.uint32) != want.view(np.uint32))
    assert bad.size == 0, f"{len(bad)} of {x.size} differ, e.g. {x[tuple(bad[0])]!r} / {scales[bad[0][0]]!r}: " \
                          f"{got[tuple(bad[0])]!r} != {want[tuple(bad[0])]!r}"


def _run(x: np.ndarray, scales: np.ndarray, device: str, own_scale: bool = False) -> np.ndarray:
    xt, st = torch.from_numpy(x).to(device), torch.from_numpy(scales).to(device)
    out = torch.empty_like(xt)
    _quotients[(len(scales),)](xt, st, out, BLOCK=x.shape[1], OWN_SCALE=own_scale)
    return out.cpu().numpy()


def test_quotient_is_ieee_division_in_the_interpreter():
    if torch.cuda.is_available():
        pytest.skip("the GPU test below checks the compiled kernel")
    x, scales = _pairs(2048, 64, seed=0)
    _check(x, scales, _run(x, scales, "cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quotient_is_ieee_division_on_the_gpu():
    """2^24 pairs against CUDA's own correctly rounded division (torch's ``/``)."""
    x, scales = _pairs(1 << 16, 256, seed=1)
    got = _run(x, scales, "cuda")
    xt, st = torch.from_numpy(x).cuda(), torch.from_numpy(scales).cuda()
    want = (xt / st[:, None]).cpu().numpy()
    differ = int((got.view(np.uint32) != want.view(np.uint32)).sum())
    assert differ == 0, f"{differ} of {got.size} quotients differ from CUDA's division"
    _check(x, scales, got)


def _check_nan_as_nan(x: np.ndarray, scales: np.ndarray, got: np.ndarray) -> None:
    """As ``_check``, any NaN standing for any other (a block holding NaN or inf gives NaNs,
    whose payload the FP8 cast does not keep)."""
    with np.errstate(all="ignore"):
        want = (x / scales[:, None]).astype(np.float32)
    both_nan = np.isnan(got) & np.isnan(want)
    bad = np.argwhere((got.view(np.uint32) != want.view(np.uint32)) & ~both_nan)
    assert bad.size == 0, f"{len(bad)} of {x.size} differ, e.g. {x[tuple(bad[0])]!r} / {scales[bad[0][0]]!r}: " \
                          f"{got[tuple(bad[0])]!r} != {want[tuple(bad[0])]!r}"


def test_block_quotient_is_ieee_division_in_the_interpreter():
    if torch.cuda.is_available():
        pytest.skip("the GPU test below checks the compiled kernel")
    x, scales = _blocks(2048, 64, seed=2)
    _check_nan_as_nan(x, scales, _run(x, scales, "cpu", own_scale=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_block_quotient_is_ieee_division_on_the_gpu():
    """2^24 values in blocks with their own scales, against numpy's float32 division."""
    x, scales = _blocks(1 << 16, 256, seed=3)
    _check_nan_as_nan(x, scales, _run(x, scales, "cuda", own_scale=True))
