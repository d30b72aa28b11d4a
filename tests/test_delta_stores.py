"""The packer's own delta stores, in one process: the FP8 cell launch and the grouped copy
launch store only what differs from the shadow (everything on an anchor), and count it.

The Triton kernels run under TRITON_INTERPRET=1 on CPU. The expectation is built in plain
torch from the reference quantizer (``fsdp_sync.quant``) and elementwise comparisons of the
bytes: unchanged elements of the destination keep whatever they held.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fsdp_sync import quant  # noqa: E402
from fsdp_sync.boxes import Box  # noqa: E402
from fsdp_sync.delta_stores import DeltaStores  # noqa: E402
from fsdp_sync.plan import DATA, Task  # noqa: E402
from fsdp_sync.quant import FP8_DTYPE  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _task(seq: int, shape: tuple[int, ...], itemsize: int) -> Task:
    box = Box.full(shape)
    return Task(bucket=0, seq=seq, src=f"w{seq}", receiver=0, dst=f"w{seq}", src_box=box, dst_box=box,
                nbytes=box.numel() * itemsize, kind=DATA, fmt="fp8_block", sender=0)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _reference_codes(x: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """FP8 codes of ``x`` in ``block`` blocks from the plain-torch quantizer, as uint8."""
    box = Box.full(x.shape)
    scales = quant.scales_from_amax(quant.block_amax(x, box, block))
    return quant.quantize_box(x, box, scales, Box.full(scales.shape), block).view(torch.uint8)


# Rows of 512 (fp8_rowwise): a row's changed bytes are counted in pairs, not four byte counters.
@pytest.mark.parametrize("fused,aligned,block", [(True, True, (128, 128)), (False, True, (128, 128)),
                                                 (True, False, (128, 128)), (True, True, (1, 512))])
def test_fp8_cells_store_only_changed_codes_and_count_them(fused, aligned, block):
    from fsdp_sync.kernels.fp8_grouped import GroupedCells

    g = torch.Generator().manual_seed(1)
    cols = block[1] if block[0] == 1 else 384 if aligned else 392  # 392: no 16-wide rows
    old_x = torch.randn(256 if block[0] > 1 else 64, cols, generator=g).to(torch.bfloat16)
    new_x = old_x.clone()
    moved = torch.rand(old_x.shape, generator=g) < (0.01 if block[0] > 1 else 0.6)  # some rows: > 255 changes
    new_x[moved] = (old_x[moved].float() * 1.5).to(torch.bfloat16)
    old_q, new_q = _reference_codes(old_x, block), _reference_codes(new_x, block)
    want_changed = old_q != new_q
    assert 0 < int(want_changed.sum()) < new_q.numel()

    stores = DeltaStores(DEVICE)
    task = _task(0, tuple(old_x.shape), 1)
    shadow = stores.shadow(task, torch.empty(old_x.shape, dtype=FP8_DTYPE))
    garbage = torch.randint(0, 255, old_x.shape, generator=g, dtype=torch.uint8)
    dst = garbage.clone().view(FP8_DTYPE).to(DEVICE)
    box = Box.full(old_x.shape)

    def launch(x: torch.Tensor, delta: bool) -> tuple[bool, int, int]:
        full = stores.begin(delta=delta)
        cells = GroupedCells(DEVICE, quantize=True, fused=fused, delta=stores.target(1))
        scales = quant.scales_from_amax(quant.block_amax(x, box, block)).to(DEVICE)
        grid = torch.empty_like(scales) if fused else scales  # fused: the launch computes them
        assert cells.add(x.to(DEVICE), box, block, grid, out=dst, shape=x.shape, shadow=shadow)
        cells.launch()
        return (full, *stores.end())

    # A delta before any anchor stores everything: the shadow's bytes are unset.
    assert launch(old_x, delta=True) == (True, old_x.numel(), old_x.numel())
    assert torch.equal(_bits(shadow).cpu(), old_q) and torch.equal(_bits(dst).cpu(), old_q)
    dst.view(torch.uint8).copy_(torch.where(old_q == new_q, garbage, old_q))  # unchanged bytes: left alone?
    changed = int(want_changed.sum())
    assert launch(new_x, delta=True) == (False, changed, changed)  # counts codes, not the words stored
    assert torch.equal(_bits(shadow).cpu(), new_q)
    # Aligned launches store 4-code words, each one holding a changed code whole (its other
    # codes are what the destination holds, in a real push), and no other word; the others
    # store the changed codes alone.
    stored = want_changed
    if aligned:
        stored = want_changed.view(old_q.shape[0], -1, 4).any(-1, keepdim=True).expand(-1, -1, 4).reshape(old_q.shape)
        assert changed < int(stored.sum()) <= 4 * changed
    assert torch.equal(_bits(dst).cpu(), torch.where(stored, new_q, garbage))
    # An anchor stores every code again, changed or not.
    assert launch(new_x, delta=False) == (True, new_x.numel(), new_x.numel())
    assert torch.equal(_bits(dst).cpu(), new_q)
    assert stores.digests().keys() == {"0/0"}


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_stores_store_only_changed_elements(strided, dtype):
    """Several weights in one launch: each stores only its changed elements, into its destination and shadow, and the counts
    add up over all of them."""
    from fsdp_sync.kernels.delta import GroupedStores

    g = torch.Generator().manual_seed(2)
    cols = slice(17, 250) if strided else slice(None)  # a column slice: both sides strided
    olds, news, dst_fulls, shadows = [], [], [], []
    stores = DeltaStores(DEVICE)
    for seq, shape in enumerate([(70, 300), (40, 300), (3, 257)]):
        full_old = torch.randn(shape, generator=g).to(dtype)
        full_new = full_old.clone()
        moved = torch.rand(shape, generator=g) < 0.05
        full_new[moved] += 1
        full_new[0, :3] = torch.tensor([-0.0, float("nan"), 0.0]).to(dtype)  # -0 differs from 0 in bits
        full_old[0, :3] = torch.tensor([0.0, float("nan"), 0.0]).to(dtype)
        olds.append(full_old)
        news.append(full_new)
        dst_fulls.append(torch.full_like(full_old, 7.0).to(DEVICE))
        shadows.append(stores.shadow(_task(seq, tuple(full_old[:, cols].shape), full_old.element_size()),
                                     full_old[:, cols]))
    want = [_bits(o[:, cols].contiguous()) != _bits(n[:, cols].contiguous()) for o, n in zip(olds, news)]

    def run(fulls: list[torch.Tensor], delta: bool) -> tuple[int, int]:
        stores.begin(delta=delta)
        grouped = GroupedStores(DEVICE, stores.target)
        for full, dst_full, shadow in zip(fulls, dst_fulls, shadows):
            assert grouped.add(dst_full[:, cols], full.to(DEVICE)[:, cols], shadow)
        launch = grouped.freeze()
        # Flat: the 771-element one is not a multiple of 16 (no wide accesses), a launch of its
        # own; strided: all three are 233 wide, one launch.
        assert len(launch._launches) == (1 if strided else 2)
        launch.launch()
        return stores.end()

    numel = sum(o[:, cols].numel() for o in olds)
    assert run(olds, delta=True) == (numel * olds[0].element_size(), numel)  # no anchor yet: all
    for old, dst_full in zip(olds, dst_fulls):
        assert torch.equal(_bits(dst_full[:, cols].contiguous()).cpu(), _bits(old[:, cols].contiguous()))
        dst_full[:, cols] = 5.0
    changed = int(sum(w.sum() for w in want))
    assert run(news, delta=True) == (changed * olds[0].element_size(), changed)
    for new, dst_full, shadow, w in zip(news, dst_fulls, shadows, want):
        new_bits = _bits(new[:, cols].contiguous())
        assert torch.equal(_bits(shadow).cpu(), new_bits)
        five = _bits(torch.full_like(new[:, cols], 5.0).contiguous())
        assert torch.equal(_bits(dst_full[:, cols].contiguous()).cpu(), torch.where(w, new_bits, five))
        if strided:  # nothing outside the slice
            assert bool((dst_full[:, :17] == 7.0).all()) and bool((dst_full[:, 250:] == 7.0).all())


def test_grouped_stores_refuse_what_they_cannot_address():
    from fsdp_sync.kernels.delta import GroupedStores

    stores = DeltaStores(DEVICE)
    grouped = GroupedStores(DEVICE, stores.target)
    src = torch.zeros(4, 6, 8, device=DEVICE)
    odd = torch.zeros(8, 6, 4, device=DEVICE).permute(2, 1, 0)  # leading dims do not collapse
    assert not grouped.add(odd, src, torch.zeros_like(src))
    assert not grouped.add(src.half(), src, torch.zeros_like(src))
    assert not grouped.add(src, src, torch.zeros_like(src).transpose(0, 1).contiguous().transpose(0, 1))
    assert len(grouped) == 0


def test_aligned_grouped_stores_compile_to_16_byte_loads():
    """VEC launches read the weights and the shadow 16 bytes at a time, flat or strided (the
    table's offsets carry the hints Triton gives a per-weight launch's pointers); without VEC
    each bf16 load is 2 bytes. Compiled for sm_90, which needs no GPU."""
    import re

    from fsdp_sync.kernels.delta import _FIELDS
    from tests.ptx import kernel_spec, sm90_ptx

    signature = {"table": "*i64", "row_of": "*i32", "src_base": "*i16", "shadow_base": "*i16",
                 "dst_base": "*i16", "changed": "*i64", "anchor": "*i32"}

    def variant(contiguous: bool, vec: bool) -> dict:
        block_r, block_c = (1, 4096) if contiguous else (4, 1024)
        constants = dict(NUM_FIELDS=len(_FIELDS), CONTIGUOUS=contiguous, VEC=vec, BLOCK_R=block_r, BLOCK_C=block_c)
        return kernel_spec("fsdp_sync.kernels.delta", "_grouped_store_changed_kernel", signature, constants,
                           aligned=(2, 3, 4), num_warps=8)

    ptxs = sm90_ptx([variant(True, True), variant(False, True), variant(True, False)])
    flat, strided, slow = (set(re.findall(r"(?:ld|st)\.global\.[\w.]+", ptx)) for ptx in ptxs)
    for accesses in (flat, strided):
        assert "ld.global.v4.b32" in accesses and "ld.global.b16" not in accesses, accesses
    assert "ld.global.b16" in slow, slow
