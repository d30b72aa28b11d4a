"""The delta pass, its encodings and its lowering, in one process.

The Triton kernel runs under TRITON_INTERPRET=1 on CPU and must match the torch
reference bit for bit; the reference is checked against numpy's own comparison of the
bytes, and every encoding must rebuild the new payload on top of the old one exactly.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fsdp_sync.boxes import Box  # noqa: E402
from fsdp_sync.delta import DeltaSender, DeltaStats, Encoded, apply, bits, digest, encode_body  # noqa: E402
from fsdp_sync.delta_plan import BITMAP, DENSE, POSITIONS, DeltaProgram, lower  # noqa: E402
from fsdp_sync.plan import DATA, SCALE, Task  # noqa: E402
from fsdp_sync.quant import FP8_DTYPE  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _pair(numel: int, dtype: torch.dtype, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(old, new) payloads where about ``fraction`` of the elements differ, with NaN, -0 and 0 among them."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(numel, generator=g)
    new = old.clone()
    moved = torch.rand(numel, generator=g) < fraction
    new[moved] += torch.randn(int(moved.sum()), generator=g)
    if numel > 8:
        old[:4] = torch.tensor([0.0, -0.0, float("nan"), 1.0])
        new[:4] = torch.tensor([-0.0, -0.0, float("nan"), 1.0])  # -0 vs 0 differs in bits; NaN vs NaN does not
    return old.to(dtype), new.to(dtype)


def _numpy_mask(old: torch.Tensor, new: torch.Tensor) -> np.ndarray:
    return old.contiguous().view(torch.uint8).numpy().reshape(old.numel(), -1) != \
        new.contiguous().view(torch.uint8).numpy().reshape(new.numel(), -1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8_DTYPE, torch.float32])
@pytest.mark.parametrize("numel", [1, 1000, 3000])
def test_reference_against_numpy(dtype, numel):
    old, new = _pair(numel, dtype, 0.05)
    from fsdp_sync.delta import delta_update_reference

    shadow, out = bits(old.clone()), bits(old.clone())
    mask, count = delta_update_reference(bits(new), shadow, out)
    expected = _numpy_mask(old, new).any(axis=1)
    assert np.array_equal(mask.numpy(), expected) and int(count) == expected.sum()
    assert torch.equal(shadow, bits(new)) and torch.equal(out, bits(new))


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8_DTYPE, torch.float32])
@pytest.mark.parametrize("numel", [1, 1000, 2049])
@pytest.mark.parametrize("with_out", [False, True])
def test_kernel_matches_reference(dtype, numel, with_out):
    from fsdp_sync.kernels.delta import delta_update, delta_update_reference

    old, new = _pair(numel, dtype, 0.1, seed=numel)
    results = []
    for fn in (delta_update, delta_update_reference):
        shadow = bits(old.clone()).to(DEVICE)
        out = bits(torch.zeros_like(old)).to(DEVICE) if with_out else None
        mask, count = fn(bits(new).to(DEVICE), shadow, out)
        results.append((mask.cpu(), int(count), shadow.cpu(), None if out is None else out.cpu()))
    (m1, c1, s1, o1), (m2, c2, s2, o2) = results
    assert torch.equal(m1, m2) and c1 == c2 and torch.equal(s1, s2)
    assert o1 is None or torch.equal(o1, o2)  # unchanged elements are left as they were: zeros


def test_kernel_empty_and_unchanged():
    from fsdp_sync.kernels.delta import delta_update

    empty = torch.empty(0, dtype=torch.uint8, device=DEVICE)
    assert int(delta_update(empty, empty.clone())[1]) == 0
    same = torch.arange(300, dtype=torch.int16, device=DEVICE)
    mask, count = delta_update(same, same.clone())
    assert int(count) == 0 and not mask.any()


def _program(numel: int, itemsize: int, dense: bool = False) -> DeltaProgram:
    return DeltaProgram(numel, itemsize, torch.int32, dense)


@pytest.mark.parametrize("encoding", [DENSE, POSITIONS, BITMAP])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_encodings_rebuild_the_payload(encoding, contiguous, dtype):
    """Also where the bitmap's bits do not fill whole words: the values after it stay aligned."""
    old, new = _pair(13 * 7, dtype, 0.2)
    old, new = old.view(13, 7), new.view(13, 7)
    mask = (bits(old) != bits(new)).view(-1)
    program = _program(old.numel(), old.element_size())
    body = encode_body(program, encoding, mask, bits(new).view(-1))
    assert body.numel() == program.body_nbytes(encoding, int(mask.sum()))
    holder = torch.zeros(13, 9, dtype=dtype)
    view = holder[:, 1:8] if not contiguous else holder[:, :7].contiguous()
    view.copy_(old)
    apply(program, Encoded(encoding, int(mask.sum()), body), view)
    assert torch.equal(bits(view), bits(new))
    if not contiguous:
        assert not holder[:, 0].any() and not holder[:, 8].any()  # nothing outside the box


def test_choose():
    p = _program(1024, 2)
    assert p.choose(0, "on") == POSITIONS and p.choose(0, "auto") == POSITIONS
    assert p.choose(10, "on") == POSITIONS  # 60 bytes against a 128-byte bitmap + 20
    assert p.choose(300, "on") == BITMAP  # 1800 against 728
    assert _program(1000, 1).bitmap_nbytes == 128  # 125 bytes of bits, padded to 16 words
    assert p.choose(1000, "on") == BITMAP and p.choose(1000, "auto") == DENSE  # 2128 > 2048
    assert _program(1024, 4, dense=True).choose(0, "on") == DENSE


def _task(kind: str, box: Box, nbytes: int, seq: int = 0) -> Task:
    return Task(0, 0, "w", box, "w", box, kind, "fp8_block", nbytes, 0, seq)


def test_lower():
    data, scale = _task(DATA, Box((0, 0), (4, 256)), 1024), _task(SCALE, Box((0, 0), (1, 2)), 8, 1)
    one, two = lower([data, scale], one_sided=True), lower([data, scale], one_sided=False)
    assert one[0] == DeltaProgram(1024, 1, torch.int32, False) and one[1] == DeltaProgram(2, 4, torch.int32, True)
    assert not two[1].dense  # two-sided: scales are encoded like anything else


@pytest.mark.parametrize("kernels", ["reference", "grouped"])
@pytest.mark.parametrize("strided", [False, True])
def test_sender_anchor_then_delta_one_and_two_sided(kernels, strided):
    """An anchor sends everything and fills the shadow; a delta sends only the change, which
    rebuilds the new payload at the receiver (two-sided) or in the destination (one-sided),
    also a strided one (a TP column slice), with the Triton pass or the reference."""
    box = Box((0, 0), (8, 64))
    task = _task(DATA, box, 8 * 64 * 2)
    old, new = (t.view(8, 64).to(DEVICE) for t in _pair(8 * 64, torch.bfloat16, 0.03, seed=3))
    for one_sided in (False, True):  # on the GPU where there is one: Triton launches need its tensors
        sender = DeltaSender([task], DEVICE, mode="auto", one_sided=one_sided, kernels=kernels)
        holder = torch.zeros(8, 80, dtype=torch.bfloat16, device=DEVICE)
        dest = holder[:, 8:72] if strided else holder[:, :64].contiguous()
        stats = DeltaStats()
        (item,) = sender.encode([(task, old)], delta=False, stats=stats, destination=lambda t: dest)
        assert item[1] is old and stats.bytes_sent == stats.full_bytes == task.nbytes
        assert sender.shadow_bytes == task.nbytes
        dest.copy_(old)  # what the transport does with a full payload
        stats = DeltaStats()
        (item,) = sender.encode([(task, new)], delta=True, stats=stats, destination=lambda t: dest, verify=True)
        changed = int((bits(old) != bits(new)).sum())
        assert stats.changed == changed and stats.elements == 8 * 64
        if one_sided:
            assert item[1] is None and stats.bytes_sent == changed * 2
        else:
            apply(sender.programs[id(task)], item[1], dest)
            assert stats.bytes_sent < task.nbytes
        assert torch.equal(bits(dest), bits(new)) and stats.digests == {"0/0": digest(new)}
        assert not strided or (not holder[:, :8].any() and not holder[:, 72:].any())


def test_a_delta_bucket_reads_its_change_counts_in_one_sync(monkeypatch):
    """Every task's pass runs first and the bucket's counts are read together: on a GPU each
    read of a count waits for the device, so one per task cost a sync apiece. Bodies are
    then built from the known counts; each still rebuilds its payload at the receiver."""
    tasks = [_task(DATA, Box((0, 0), (4, 64)), 4 * 64 * 2, seq=i) for i in range(5)]
    pairs = [(t.view(4, 64), u.view(4, 64)) for t, u in (_pair(256, torch.bfloat16, 0.05, seed=i) for i in range(5))]
    sender = DeltaSender(tasks, torch.device("cpu"), mode="auto", one_sided=False, kernels="reference")
    sender.encode([(t, old) for t, (old, _) in zip(tasks, pairs)], delta=False, stats=DeltaStats())
    real = {"tolist": torch.Tensor.tolist, "__int__": torch.Tensor.__int__, "item": torch.Tensor.item}
    reads = dict.fromkeys(real, 0)  # the ways a Python value is read off a tensor
    for attr, method in real.items():
        def counted(self, *args, _attr=attr, _method=method, **kwargs):
            reads[_attr] += 1
            return _method(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, attr, counted)
    stats = DeltaStats()
    items = sender.encode([(t, new) for t, (_, new) in zip(tasks, pairs)], delta=True, stats=stats)
    monkeypatch.undo()
    assert reads == {"tolist": 1, "__int__": 0, "item": 0}, reads
    for (task, encoded), (old, new) in zip(items, pairs):
        dest = old.clone()
        apply(sender.programs[id(task)], encoded, dest)
        assert torch.equal(bits(dest), bits(new))
    assert stats.changed == sum(int((bits(o) != bits(n)).sum()) for o, n in pairs)


def test_two_sided_masks_waiting_for_their_counts_are_bounded(monkeypatch):
    """A bucket whose change masks would outgrow MASK_BATCH_BYTES reads its counts in turns:
    here 256-byte masks against a 300-byte bound, so every second task's pass flushes."""
    from fsdp_sync import delta as delta_module

    monkeypatch.setattr(delta_module, "MASK_BATCH_BYTES", 300)
    tasks = [_task(DATA, Box((0, 0), (4, 64)), 4 * 64 * 2, seq=i) for i in range(5)]
    pairs = [(t.view(4, 64), u.view(4, 64)) for t, u in (_pair(256, torch.bfloat16, 0.05, seed=10 + i) for i in range(5))]
    sender = DeltaSender(tasks, torch.device("cpu"), mode="auto", one_sided=False, kernels="reference")
    sender.encode([(t, old) for t, (old, _) in zip(tasks, pairs)], delta=False, stats=DeltaStats())
    real, reads = torch.Tensor.tolist, []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.numel()) or real(self))
    items = sender.encode([(t, new) for t, (_, new) in zip(tasks, pairs)], delta=True, stats=DeltaStats())
    monkeypatch.undo()
    assert reads == [2, 2, 1], reads  # counts read two tasks at a time, then the last one
    assert [t for t, _ in items] == tasks
    for (task, encoded), (old, new) in zip(items, pairs):
        dest = old.clone()
        apply(sender.programs[id(task)], encoded, dest)
        assert torch.equal(bits(dest), bits(new))


def test_digest_sees_one_byte():
    x = torch.randn(1000).to(torch.bfloat16)
    y = x.clone()
    bits(y)[517] ^= 1
    assert digest(x) != digest(y) and digest(x) == digest(x.clone())
    assert digest(torch.tensor([1, 2], dtype=torch.uint8)) != digest(torch.tensor([2, 1], dtype=torch.uint8))


def test_both_jobs_must_agree_on_delta():
    from types import SimpleNamespace

    from fsdp_sync import SyncConfig
    from fsdp_sync.controller import check_shared_settings
    from fsdp_sync.errors import PlanError

    trainer, engine = SyncConfig(delta="auto"), SyncConfig(delta="off")
    check_shared_settings(trainer, [SimpleNamespace(rank=0, settings=SyncConfig(delta="auto").shared_settings())])
    with pytest.raises(PlanError, match=r"SyncConfig.delta is 'auto' on the trainer but 'off' on receiver ranks \[0\]"):
        check_shared_settings(trainer, [SimpleNamespace(rank=0, settings=engine.shared_settings())])
    with pytest.raises(ValueError, match="SyncConfig.delta='sometimes' is not one of"):
        SyncConfig(delta="sometimes")
    with pytest.raises(ValueError, match="verify_every"):
        SyncConfig(verify_every=-1)


def test_an_unknown_shadow_place_is_refused_by_name():
    from fsdp_sync import SyncConfig

    with pytest.raises(ValueError, match=r"SyncConfig.delta_shadow='nvme' is not one of \['device', 'pinned'\]"):
        SyncConfig(delta_shadow="nvme")
    assert SyncConfig().delta_shadow == "device"
