"""An FP8 (e4m3fn) quantizer in numpy, independent of the library's, for the tests to hold it to.

Nothing here calls torch's or Triton's FP8 code: the 256 codes are decoded from their bit
layout (1 sign bit, 4 exponent bits with bias 7, 3 mantissa bits; no inf, 0x7f and 0xff
are NaN, the largest finite value is 448), and a value is encoded by finding the nearest
code in that table, ties going to the code whose mantissa LSB is 0. The policy it
implements, as DeepSeek's and torchao's quantizers do:

* ``scale = amax / 448`` in float32 (correctly rounded), 1 for an all-zero block;
* code = round-to-nearest-even of the correctly rounded float32 quotient ``x / scale``,
  saturated to +-448 (inf included); NaN stays NaN (0x7f, with the input's sign bit).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

FP8_MAX = 448.0


def e4m3_table() -> np.ndarray:
    """float64 value of each of the 256 codes, NaN for 0x7f and 0xff."""
    values = np.empty(256)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exponent, mantissa = (code >> 3) & 0xF, code & 0x7
        if exponent == 0xF and mantissa == 0x7:
            values[code] = np.nan
        elif exponent == 0:
            values[code] = sign * mantissa * 2.0**-9  # subnormal: 2^(1 - 7) * mantissa / 8
        else:
            values[code] = sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)
    return values


_POSITIVE = e4m3_table()[:0x7F]  # codes 0x00..0x7e, increasing, 0 to 448
# Midpoints of neighbouring codes: 5 significant bits at most, exact in float32 and float64.
_MIDPOINTS = (_POSITIVE[:-1] + _POSITIVE[1:]) / 2


def encode_e4m3(y: np.ndarray) -> np.ndarray:
    """uint8 codes of float32 ``y``: nearest value, ties to the even code, saturated to +-448."""
    y = np.asarray(y, dtype=np.float32)
    a = np.minimum(np.abs(y).astype(np.float64), FP8_MAX)  # NaN handled below
    below = np.searchsorted(_MIDPOINTS, a, side="left")  # midpoints < a: the lower candidate
    tie = (below < len(_MIDPOINTS)) & (_MIDPOINTS[np.minimum(below, len(_MIDPOINTS) - 1)] == a)
    code = np.where(tie & (below % 2 == 1), below + 1, below)  # a tie between codes i and i+1 takes the even one
    code = np.where(np.isnan(y), 0x7F, code).astype(np.uint8)
    return code | np.where(np.signbit(y), 0x80, 0).astype(np.uint8)


def midpoints() -> np.ndarray:
    """The 126 positive values halfway between neighbouring finite codes (float32)."""
    return _MIDPOINTS.astype(np.float32)


def block_shape(fmt: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The scale block of each format, written out here rather than taken from the library."""
    if fmt == "fp8_block":
        return (1,) * (len(shape) - 2) + (128, 128)
    if fmt == "fp8_rowwise":
        return (1,) * (len(shape) - 1) + (max(1, shape[-1]),)
    if fmt == "fp8_tensor":
        return tuple(max(1, s) for s in shape)
    raise ValueError(fmt)


def block_ids(shape: Sequence[int], block: Sequence[int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Per element, the flat index of its block in the scale grid; and the grid's shape."""
    grid = tuple(-(-s // b) for s, b in zip(shape, block))
    coords = np.indices(tuple(shape)) if len(shape) else np.zeros((0,), dtype=np.int64)
    per_dim = [c // b for c, b in zip(coords, block)]
    return np.ravel_multi_index(per_dim, grid), grid


def scales_of(x: np.ndarray, block: Sequence[int]) -> np.ndarray:
    """float32 ``amax / 448`` per block (1 for all-zero blocks); NaN or inf in a block propagates."""
    ids, grid = block_ids(x.shape, block)
    amax = np.zeros(int(np.prod(grid)), dtype=np.float32)
    with np.errstate(invalid="ignore"):
        np.maximum.at(amax, ids.reshape(-1), np.abs(x.astype(np.float32)).reshape(-1))  # fmax would drop NaN
    scales = np.where(amax == 0, np.float32(1), amax / np.float32(FP8_MAX)).astype(np.float32)
    return scales.reshape(grid)


def quantize_with(x: np.ndarray, scales: np.ndarray, block: Sequence[int]) -> np.ndarray:
    """uint8 codes of ``x`` (a whole tensor) with the block ``scales``."""
    ids, _ = block_ids(x.shape, block)
    per_element = scales.reshape(-1)[ids]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return encode_e4m3(x.astype(np.float32) / per_element)  # numpy float32 division is IEEE


def quantize(x: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 codes, float32 scales) of a whole tensor."""
    block = block_shape(fmt, x.shape)
    scales = scales_of(x, block)
    return quantize_with(x, scales, block), scales


def tie_input(shape: Sequence[int], fmt: str, dtype: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(float32 values exact in ``dtype``, mask of exact ties): most values divided by their
    block's scale give exactly a midpoint between two neighbouring FP8 codes.

    Each block holds its amax at its first element. float32 blocks get arbitrary scales and
    each value is the float32 next to ``scale * midpoint`` whose quotient is the midpoint;
    bfloat16 and float16 blocks get scales of at most 4 significant bits, so that the
    product is often exact in 8 or 11 bits. Values that are no tie are ordinary inputs.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    block = block_shape(fmt, shape)
    ids, grid = block_ids(shape, block)
    num_blocks = int(np.prod(grid))
    if dtype == "float32":
        amax = np.exp(rng.normal(0.0, 3.0, num_blocks)).astype(np.float32)
    else:
        amax = (FP8_MAX * (1 + rng.integers(0, 8, num_blocks) / 8)
                * 2.0 ** rng.integers(-8, 6, num_blocks)).astype(np.float32)
    scale = (amax / np.float32(FP8_MAX))[ids]
    mid = midpoints()[rng.integers(0, len(_MIDPOINTS), shape)] * rng.choice(np.float32([-1, 1]), shape)
    nearest = (mid.astype(np.float64) * scale).astype(np.float32)
    x = nearest
    for step in (np.float32(np.inf), np.float32(-np.inf)):
        neighbour = np.nextafter(nearest, step)
        x = np.where((x / scale != mid) & (neighbour / scale == mid), neighbour, x)
    x = _round_to(x, dtype)
    first = np.all(np.stack([c % b == 0 for c, b in zip(np.indices(shape), block)]), axis=0)
    x = np.where(first, amax[ids] * rng.choice(np.float32([-1, 1]), shape), x).astype(np.float32)
    return x, (x / scale == mid) & ~first


def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``x`` rounded to ``dtype`` (nearest even) and back."""
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16  # bfloat16: round the low 16 bits away, ties to even
    return bits.astype(np.uint32).view(np.float32)
