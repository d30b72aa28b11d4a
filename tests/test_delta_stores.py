"""The packer's own delta stores, in one process: the FP8 cell launch and the large-copy
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


def _reference_codes(x: torch.Tensor) -> torch.Tensor:
    """FP8 block codes of ``x`` (128x128) from the plain-torch quantizer, as uint8."""
    box = Box.full(x.shape)
    scales = quant.scales_from_amax(quant.block_amax(x, box, (128, 128)))
    return quant.quantize_box(x, box, scales, Box.full(scales.shape), (128, 128)).view(torch.uint8)


@pytest.mark.parametrize("fused", [True, False])
def test_fp8_cells_store_only_changed_codes_and_count_them(fused):
    from fsdp_sync.kernels.fp8_grouped import GroupedCells

    g = torch.Generator().manual_seed(1)
    old_x = torch.randn(256, 384, generator=g).to(torch.bfloat16)
    new_x = old_x.clone()
    moved = torch.rand(old_x.shape, generator=g) < 0.01
    new_x[moved] = (old_x[moved].float() * 1.5).to(torch.bfloat16)
    old_q, new_q = _reference_codes(old_x), _reference_codes(new_x)
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
        scales = quant.scales_from_amax(quant.block_amax(x, box, (128, 128))).to(DEVICE)
        grid = torch.empty_like(scales) if fused else scales  # fused: the launch computes them
        assert cells.add(x.to(DEVICE), box, (128, 128), grid, out=dst, shape=x.shape, shadow=shadow)
        cells.launch()
        return (full, *stores.end())

    # A delta before any anchor stores everything: the shadow's bytes are unset.
    assert launch(old_x, delta=True) == (True, old_x.numel(), old_x.numel())
    assert torch.equal(_bits(shadow).cpu(), old_q) and torch.equal(_bits(dst).cpu(), old_q)
    dst.view(torch.uint8).copy_(torch.where(old_q == new_q, garbage, old_q))  # unchanged bytes: left alone?
    changed = int(want_changed.sum())
    assert launch(new_x, delta=True) == (False, changed, changed)
    assert torch.equal(_bits(shadow).cpu(), new_q)
    assert torch.equal(_bits(dst).cpu(), torch.where(want_changed, new_q, garbage))
    # An anchor stores every code again, changed or not.
    assert launch(new_x, delta=False) == (True, new_x.numel(), new_x.numel())
    assert torch.equal(_bits(dst).cpu(), new_q)
    assert stores.digests().keys() == {"0/0"}


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_large_copies_store_only_changed_elements(strided, dtype):
    from fsdp_sync.kernels.delta import prepare_store_changed
    from fsdp_sync.kernels.prepared import PreparedLaunch

    g = torch.Generator().manual_seed(2)
    full_old = torch.randn(70, 300, generator=g).to(dtype)
    full_new = full_old.clone()
    moved = torch.rand(full_old.shape, generator=g) < 0.05
    full_new[moved] += 1
    full_new[0, :3] = torch.tensor([-0.0, float("nan"), 0.0]).to(dtype)  # -0 differs from 0 in bits
    full_old[0, :3] = torch.tensor([0.0, float("nan"), 0.0]).to(dtype)
    cols = slice(17, 250) if strided else slice(None)  # a column slice: both sides strided
    old, new = full_old[:, cols], full_new[:, cols]
    want_changed = _bits(old.contiguous()) != _bits(new.contiguous())

    stores = DeltaStores(DEVICE)
    task = _task(3, tuple(old.shape), old.element_size())
    shadow = stores.shadow(task, old)
    dst_full = torch.full_like(full_old, 7.0).to(DEVICE)
    dst = dst_full[:, cols]

    def run(full: torch.Tensor, delta: bool) -> tuple[int, int]:
        stores.begin(delta=delta)
        src = full.to(DEVICE)[:, cols]
        launch = prepare_store_changed(dst, src, shadow, *stores.target(src.element_size()))
        assert launch is not None and launch[3]["CONTIGUOUS"] == (not strided)
        PreparedLaunch(DEVICE, [launch], [src]).launch()
        return stores.end()

    assert run(full_old, delta=True) == (old.numel() * old.element_size(), old.numel())  # no anchor yet: all
    assert torch.equal(_bits(dst.contiguous()).cpu(), _bits(old.contiguous()))
    dst.fill_(5.0)
    changed = int(want_changed.sum())
    assert run(full_new, delta=True) == (changed * old.element_size(), changed)
    assert torch.equal(_bits(shadow).cpu(), _bits(new.contiguous()))
    five = _bits(torch.full_like(new, 5.0).contiguous())
    assert torch.equal(_bits(dst.contiguous()).cpu(), torch.where(want_changed, _bits(new.contiguous()), five))
    if strided:  # nothing outside the slice
        assert bool((dst_full[:, :17] == 7.0).all()) and bool((dst_full[:, 250:] == 7.0).all())


def test_store_changed_refuses_what_it_cannot_address():
    from fsdp_sync.kernels.delta import prepare_store_changed

    stores = DeltaStores(DEVICE)
    src = torch.zeros(4, 6, 8, device=DEVICE)
    odd = torch.zeros(8, 6, 4, device=DEVICE).permute(2, 1, 0)  # leading dims do not collapse
    assert prepare_store_changed(odd, src, torch.zeros_like(src), *stores.target(4)) is None
    assert prepare_store_changed(src.half(), src, torch.zeros_like(src), *stores.target(4)) is None
