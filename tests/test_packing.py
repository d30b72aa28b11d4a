"""The packer alone, in one process: grouped Triton launches (interpreted) give the reference's bytes.

One sender rank holds every weight, so no collective runs; the plans still split weights
into TP slices and send some receivers FP8 and others bf16.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.distributed.tensor import Shard  # noqa: E402

from fsdp_sync.errors import NonFiniteWeights  # noqa: E402
from fsdp_sync.finite import finite_check  # noqa: E402
from fsdp_sync.meta import ReceiverMeta  # noqa: E402
from fsdp_sync.packing import BucketPacker  # noqa: E402
from fsdp_sync.trace import Trace  # noqa: E402
from tests.planner_fixtures import plan, receivers_for, sources_on  # noqa: E402

# TP=2 slices fall on 128-row boundaries; 200 leaves partial blocks at the tensor's edge.
SHAPES = {"model.layers.0.mlp.up_proj.weight": (512, 200), "model.layers.0.mlp.down_proj.weight": (200, 512),
          "model.norm.weight": (200,)}


def _payloads(quant: str, kernels: str, *, mixed: bool, watermark_bytes: int) -> list[tuple]:
    sources = sources_on(SHAPES, [0], [Shard(0)])
    receivers = receivers_for(sources, num_replicas=1, tp=2, quant=quant)
    if mixed:  # a third receiver takes the same weights in bf16
        other = receivers_for(sources, num_replicas=1, tp=1, quant="none")[0]
        receivers.append(ReceiverMeta(len(receivers), other.host, other.tensors, other.layout, other.quant))
    sender = plan(sources, receivers, watermark_bytes=watermark_bytes).for_sender(0)
    gen = torch.Generator().manual_seed(0)
    local = {s.name: (torch.randn(s.shape, generator=gen) * 3).to(torch.bfloat16) for s in sources}
    local["model.layers.0.mlp.up_proj.weight"][:128, :128] = 0  # an all-zero block: scale 1
    packer = BucketPacker(sender, {s.name: s for s in sources}, {}, torch.device("cpu"), kernels=kernels)
    out = []
    for bucket in sender.buckets:
        items, _ = packer.pack(bucket, local, Trace(0))
        out += [(t.src, t.kind, t.receiver, t.src_box, data.clone()) for t, data in items]
    return out


@pytest.mark.parametrize("quant", ["fp8_block", "fp8_rowwise"])
def test_grouped_launches_give_the_reference_bytes(quant):
    """The mixed plan holds every box the FP8-only one does (the TP=2 receivers' slices) and
    the bf16 receiver's besides, so it alone is checked (each interpreted plan costs ~11 s)."""
    want = _payloads(quant, "reference", mixed=True, watermark_bytes=1 << 30)
    got = _payloads(quant, "grouped", mixed=True, watermark_bytes=1 << 30)
    assert {w[2] for w in want} == {0, 1, 2} and {w[1] for w in want} >= {"data", "scale"}
    assert [w[:4] for w in want] == [g[:4] for g in got]
    for w, g in zip(want, got):
        assert w[4].dtype == g[4].dtype and torch.equal(w[4].view(torch.uint8), g[4].view(torch.uint8)), w[:4]


def test_direct_writes_are_recorded_and_replayed_while_the_shards_stay():
    """With destinations to store into, a bucket's launches are recorded on the first push and
    run again on later ones (no per-parameter Python); the bytes follow the weights' new
    values, and a shard that moved to new memory is packed afresh."""
    sources = sources_on(SHAPES, [0], [Shard(0)])
    receivers = receivers_for(sources, num_replicas=1, tp=2, quant="fp8_block")
    sender = plan(sources, receivers, watermark_bytes=1 << 30).for_sender(0)
    dests = {(m.rank, n): torch.full(d.shape, 7, dtype=d.dtype) if d.dtype != torch.float8_e4m3fn
             else torch.zeros(d.shape, dtype=d.dtype) for m in receivers for n, d in m.tensors.items()}
    # Receiver 1 stands for a peer GPU: its cells are interleaved with receiver 0's in each launch.
    packer = BucketPacker(sender, {s.name: s for s in sources}, {}, torch.device("cpu"), kernels="grouped",
                          destination=lambda t: t.dst_box.view(dests[(t.receiver, t.dst)]),
                          remote=lambda t: t.receiver == 1)
    reference = BucketPacker(sender, {s.name: s for s in sources}, {}, torch.device("cpu"), kernels="reference")
    gen = torch.Generator().manual_seed(1)
    local = {s.name: (torch.randn(s.shape, generator=gen) * 3).to(torch.bfloat16) for s in sources}

    def check(push: int) -> None:
        for bucket in sender.buckets:
            assert all(payload is None for _, payload in packer.pack(bucket, local, Trace(0))[0])
            for task, want in reference.pack(bucket, local, Trace(0))[0]:
                got = task.dst_box.view(dests[(task.receiver, task.dst)])
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (push, task.src, task.kind)

    check(0)
    replays = dict(packer._replays)
    assert set(replays) == {b.index for b in sender.buckets}
    assert any(kw["PERMUTED"] for r in replays.values() for launch in r.quantize for *_, kw in launch._launches)
    for name in local:  # an optimizer step: in place, new values
        local[name].mul_(-2).add_(0.5)
    check(1)
    assert packer._replays == replays  # the same recorded launches ran
    moved = "model.layers.0.mlp.up_proj.weight"
    local[moved] = local[moved].clone() * 3  # new storage: the old record must not be used
    check(2)
    bucket_of_moved = next(b.index for b in sender.buckets if moved in b.params)
    assert packer._replays[bucket_of_moved] is not replays[bucket_of_moved]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_staged_payloads_live_in_slots_and_their_buckets_replay(device):
    """A two-sided transport's payloads (no destination) with staging slots: each FP8 payload
    has a fixed place in its bucket's slot (consecutive buckets in different slots), so the
    bucket is recorded on the first push and replayed on later ones, and the payloads
    follow the weights' new values, bit for bit with the reference (on the CPU, from the
    same weights). On CPU the grouped kernels run interpreted; on a GPU compiled."""
    device = torch.device(device)
    sources = sources_on(SHAPES, [0], [Shard(0)])
    receivers = receivers_for(sources, num_replicas=1, tp=2, quant="fp8_block")
    sender = plan(sources, receivers, watermark_bytes=300_000).for_sender(0)
    assert len(sender.buckets) >= 2
    packer = BucketPacker(sender, {s.name: s for s in sources}, {}, device, kernels="grouped", staging_slots=2)
    reference = BucketPacker(sender, {s.name: s for s in sources}, {}, torch.device("cpu"), kernels="reference")
    assert packer.slots == 2 and packer.staging_bytes > 0
    slots = packer._staging._buffer
    gen = torch.Generator().manual_seed(2)
    local = {s.name: (torch.randn(s.shape, generator=gen) * 3).to(torch.bfloat16) for s in sources}
    shards = {n: t.to(device) for n, t in local.items()} if device.type != "cpu" else local

    def check(push: int) -> dict[int, set[int]]:
        used: dict[int, set[int]] = {}  # bucket position -> the slots its FP8 payloads lie in
        for position, bucket in enumerate(sender.buckets):
            got = packer.pack(bucket, shards, Trace(0))[0]
            want = reference.pack(bucket, local, Trace(0))[0]
            assert [t for t, _ in got] == [t for t, _ in want]
            for (task, g), (_, w) in zip(got, want):
                assert g.dtype == w.dtype and torch.equal(g.cpu().view(torch.uint8), w.view(torch.uint8)), (push, task)
                if g.dtype == torch.float8_e4m3fn:
                    offset = g.data_ptr() - slots.data_ptr()
                    assert 0 <= offset < slots.numel() and offset % 16 == 0
                    used.setdefault(position, set()).add(offset // slots.shape[1])
        return used

    used = check(0)
    assert all(len(s) == 1 for s in used.values()) and len(set().union(*used.values())) == 2
    assert all(used[p] != used[p + 1] for p in used if p + 1 in used)
    replays = dict(packer._replays)
    assert set(replays) == {b.index for b in sender.buckets}
    for name in local:  # an optimizer step: in place, new values
        local[name].mul_(-2).add_(0.5)
        if shards[name] is not local[name]:
            shards[name].copy_(local[name])  # in place on the device too: the shard stays where it is
    assert check(1) == used
    assert packer._replays == replays  # the same recorded launches ran

    fresh = BucketPacker(sender, {s.name: s for s in sources}, {}, device, kernels="grouped")
    assert fresh.slots == 0
    for bucket in sender.buckets:  # without slots a staged bucket is not recorded
        fresh.pack(bucket, shards, Trace(0))
    assert fresh._replays == {}


def test_inf_or_nan_in_a_weight_is_refused_naming_it():
    """FP8 params show it in their block scales (reference, grouped fused and two-pass, and
    a replayed bucket); unquantized ones (the norm) are checked with check_finite only.
    Huge finite values, whose norm overflows, pass."""
    sources = sources_on(SHAPES, [0], [Shard(0)])
    receivers = receivers_for(sources, num_replicas=1, tp=2, quant="fp8_block")
    sender = plan(sources, receivers, watermark_bytes=1 << 30).for_sender(0)
    gen = torch.Generator().manual_seed(2)
    clean = {s.name: torch.randn(s.shape, generator=gen).to(torch.bfloat16) for s in sources}
    dests = {(m.rank, n): torch.zeros(d.shape, dtype=d.dtype) for m in receivers for n, d in m.tensors.items()}

    def refusals(packer: BucketPacker, local: dict) -> list[str]:
        out = []
        for bucket in sender.buckets:
            _, check = packer.pack(bucket, local, Trace(0))
            try:
                if check is not None:
                    check.raise_if_not_finite()
            except NonFiniteWeights as e:
                out.append(str(e))
        return out

    def make_packer(kernels: str, *, check_finite: bool = False, direct: bool = False) -> BucketPacker:
        destination = (lambda t: t.dst_box.view(dests[(t.receiver, t.dst)])) if direct else None
        return BucketPacker(sender, {s.name: s for s in sources}, {}, torch.device("cpu"), kernels=kernels,
                            check_finite=check_finite, destination=destination)

    up, down, norm = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.norm.weight"
    # What check_finite adds does not depend on the kernels: the reference packer covers it.
    for check_finite, packer in [(False, make_packer("reference")), (False, make_packer("grouped")),
                                 (False, make_packer("grouped", direct=True)),
                                 (True, make_packer("reference", check_finite=True))]:
        assert refusals(packer, clean) == refusals(packer, dict(clean, **{norm: clean[norm] * 1e30})) == []
        for name, where, value, named in [(up, (5, 7), float("inf"), True), (down, (150, 300), float("nan"), True),
                                          (norm, (3,), -float("inf"), check_finite)]:
            bad = {n: t.clone() for n, t in clean.items()}
            bad[name][where] = value
            errors = refusals(packer, bad)
            assert bool(errors) == named and all(name in e and len(e.split("'model.")) == 2 for e in errors), errors
    # A recorded bucket replayed: the shard changed in place, its launches ran again.
    replayed = make_packer("grouped", direct=True)
    local = {n: t.clone() for n, t in clean.items()}
    assert refusals(replayed, local) == []
    replays = dict(replayed._replays)
    local[up][300, 100] = float("inf")
    assert [up in e for e in refusals(replayed, local)] == [True]
    assert replayed._replays == replays


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_verdict_is_a_pinned_flag_filled_without_a_sync():
    """On a GPU the check queues its reductions and a copy into pinned host memory on the
    packing stream, with no sync of its own; read after the bucket's event, it names the tensor."""
    device = torch.device("cuda")
    scales = torch.ones(8, 4, device=device)
    values = torch.randn(300, 70, device=device).to(torch.bfloat16)
    values[7, 9] = float("nan")
    stream = torch.cuda.Stream()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call below raises
    try:
        with torch.cuda.stream(stream):
            check = finite_check(0, scales.view(-1), {"w": scales}, {"norm.weight": values})
            event = torch.cuda.Event()
            event.record(stream)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert check.flag.device.type == "cpu" and check.flag.is_pinned()
    event.synchronize()
    with pytest.raises(NonFiniteWeights, match=r"'norm\.weight' \(inf or NaN in its weights\)"):
        check.raise_if_not_finite()

    # Through the packer, grouped kernels on the GPU: the FP8 param's scales give it away.
    sources = sources_on(SHAPES, [0], [Shard(0)])
    receivers = receivers_for(sources, num_replicas=1, tp=2, quant="fp8_block")
    sender = plan(sources, receivers, watermark_bytes=1 << 30).for_sender(0)
    gen = torch.Generator().manual_seed(3)
    local = {s.name: torch.randn(s.shape, generator=gen).to(torch.bfloat16).to(device) for s in sources}
    local["model.layers.0.mlp.up_proj.weight"][5, 7] = float("inf")
    packer = BucketPacker(sender, {s.name: s for s in sources}, {}, device, kernels="grouped")
    errors = []
    for bucket in sender.buckets:
        with torch.cuda.stream(stream):
            _, check = packer.pack(bucket, local, Trace(0))
            event = torch.cuda.Event()
            event.record(stream)
        event.synchronize()
        try:
            if check is not None:
                check.raise_if_not_finite()
        except NonFiniteWeights as e:
            errors.append(str(e))
    assert len(errors) == 1 and "'model.layers.0.mlp.up_proj.weight' (a block amax" in errors[0], errors


def test_a_failed_self_check_is_reported_once_per_device(monkeypatch):
    """The sender asks whether launches are grouped, and so does each packer it builds: a
    failed self-check is one warning, not one per question."""
    import warnings

    from fsdp_sync import packing
    from fsdp_sync.kernels import fp8_grouped

    device = torch.device("cuda", 7)  # never built on: only asked about
    monkeypatch.setattr(fp8_grouped, "self_check", lambda d: "RuntimeError: no kernel today")
    monkeypatch.setattr(packing, "_WARNED_SELF_CHECK", set(), raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not packing.groups_launches(device, "auto")
        assert not packing.groups_launches(device, "auto")
        assert packing._kernels_for(device, "auto")[1] is False
    assert [str(w.message) for w in caught] == [
        "fsdp_sync: grouped FP8 launches failed their self-check on cuda:7 (RuntimeError: no kernel today); "
        "launching per box instead"]
