"""The planner in one process: at the seed's rank counts, and refusing bad input by name."""

from __future__ import annotations

import gc

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from fsdp_sync.boxes import Box
from fsdp_sync.config import LinkModel
from fsdp_sync.errors import PlanError
from fsdp_sync.layouts import make_layout
from fsdp_sync.meta import DestTensor, LayoutSpec, ReceiverMeta, SourceParam
from fsdp_sync.planner import build_plan
from tests.planner_fixtures import llama_like_shapes, plan, receivers_for, sources_on


@pytest.mark.parametrize("mode,quant", [("direct", "fp8_block"), ("reconstruct", "none")])
def test_256_senders_to_128_receivers(mode, quant):
    """HSDP 16x16 -> 4 replicas of TP 32, hundreds of params: exact cover, balanced.

    40 layers (363 params) hold every kind of weight a layer has; 112 layers (1,011) took
    27 s on a 2-core CI machine and tested nothing more. (How fast it plans is a
    benchmark's question: ``recipes.simulate`` prints planning time.)"""
    shapes = llama_like_shapes(num_layers=40, hidden=4096, inter=12288, kv=4096, vocab=151552)
    assert len(shapes) >= 360
    mesh = [[r * 16 + c for c in range(16)] for r in range(16)]
    sources = sources_on(shapes, mesh, [Replicate(), Shard(0)])
    receivers = receivers_for(sources, num_replicas=4, tp=32, quant=quant)
    p = plan(sources, receivers, mode=mode)  # validation inside: every element once, in bounds
    per_sender = [p.stats.bytes_per_sender.get(s, 0) for s in range(256)]
    ideal = sum(per_sender) / 256
    assert max(per_sender) <= 1.05 * ideal, f"imbalance {max(per_sender) / ideal - 1:.3%}"
    want = sum(Box.full(t.shape).numel() * t.dtype.itemsize for r in receivers for t in r.tensors.values())
    assert p.stats.bytes_total == want


def test_prefers_same_host_and_spreads_over_replicas():
    shapes = {"w": (512, 64)}
    sources = sources_on(shapes, [[0, 1], [2, 3]], [Replicate(), Shard(0)])
    receivers = receivers_for(sources, num_replicas=2, tp=1, quant="none", host=lambda r: f"h{r}")
    # Ranks 0,1 live with receiver 0, ranks 2,3 with receiver 1: each receiver is fed locally.
    p = plan(sources, receivers, hosts=["h0", "h0", "h1", "h1"])
    assert {t.sender for t in p.arrivals[0]} == {0, 1}
    assert {t.sender for t in p.arrivals[1]} == {2, 3}


def test_floor_is_the_busiest_link():
    sources = sources_on({"w": (1000, 1000)}, [0], [Shard(0)], dtype=torch.float32)
    receivers = receivers_for(sources, num_replicas=1, tp=1, quant="none")
    p = build_plan(sources, receivers, sender_hosts=["a"], mode="direct",
                   links=LinkModel(inter_host_gbps=1.0, intra_host_gbps=10.0, hbm_gbps=100.0), watermark_bytes=1 << 30)
    assert p.stats.floor_s == pytest.approx(4e6 / 1e9)



# --- bad input: refused before anything moves, naming the tensor or rank ---------------------

def _small(quant="none", tp=1):
    sources = sources_on({"a.q_proj.weight": (256, 256), "b.weight": (64,)}, [0, 1], [Shard(0)])
    return sources, receivers_for(sources, num_replicas=1, tp=tp, quant=quant)


def _edit(receiver: ReceiverMeta, **tensors) -> ReceiverMeta:
    new = dict(receiver.tensors)
    for name, t in tensors.items():
        if t is None:
            new.pop(name.replace("__", "."))
        else:
            new[t.name] = t
    return ReceiverMeta(receiver.rank, receiver.host, new, receiver.layout, receiver.quant)


def test_refuses_name_missing_on_receiver():
    sources, (recv,) = _small()
    with pytest.raises(PlanError, match="receiver 0 has no tensor 'b.weight'"):
        plan(sources, [_edit(recv, b__weight=None)])


def test_refuses_name_missing_on_trainer():
    sources, (recv,) = _small()
    extra = DestTensor("c.weight", (4,), torch.bfloat16)
    with pytest.raises(PlanError, match="'c.weight' has no source parameter"):
        plan(sources, [_edit(recv, c=extra)])


def test_refuses_two_fp8_formats_for_one_param_but_allows_a_bf16_receiver_beside_fp8():
    sources = sources_on({"a.q_proj.weight": (256, 256), "b.weight": (64,)}, [0, 1], [Shard(0)])
    (block,) = receivers_for(sources, num_replicas=1, tp=1, quant="fp8_block")
    (rows,) = receivers_for(sources, num_replicas=1, tp=1, quant="fp8_rowwise")
    (plain,) = receivers_for(sources, num_replicas=1, tp=1, quant="none")
    relabel = lambda r, rank: ReceiverMeta(rank, r.host, r.tensors, r.layout, r.quant)  # noqa: E731
    with pytest.raises(PlanError, match=r"'a.q_proj.weight' is asked for in several FP8 formats: "
                                        r"fp8_block \(receiver 0\), fp8_rowwise \(receiver 1\)"):
        plan(sources, [block, relabel(rows, 1)])
    assert plan(sources, [block, relabel(plain, 1)]).fmt_of["a.q_proj.weight"] == "fp8_block"


def test_refuses_shape_mismatch_and_too_small():
    sources, (recv,) = _small()
    with pytest.raises(PlanError, match="'b.weight': destination too small"):
        plan(sources, [_edit(recv, b=DestTensor("b.weight", (32,), torch.bfloat16))])
    with pytest.raises(PlanError, match=r"'b.weight' of shape \(100,\): boxes cover 64 of 100 elements "
                                        r"\(written from 'b.weight' \(64,\)\)"):
        plan(sources, [_edit(recv, b=DestTensor("b.weight", (100,), torch.bfloat16))])
    with pytest.raises(PlanError, match="'b.weight': shape"):
        plan(sources, [_edit(recv, b=DestTensor("b.weight", (8, 8), torch.bfloat16))])



def test_cover_proof_refuses_a_task_twice_or_missing():
    """The final check sees the arrivals as planned: one row written twice, or never, is refused."""
    from fsdp_sync.planner import _validate_cover

    sources, (recv,) = _small()
    p = plan(sources, [recv])
    layouts, by_name = {0: make_layout(recv.layout)}, {s.name: s for s in sources}
    arrivals = p.arrivals[0]
    _validate_cover({0: arrivals}, [recv], layouts, by_name)
    twice = next(t for t in arrivals if t.dst == "b.weight")
    with pytest.raises(PlanError, match=r"'b.weight' of shape \(64,\): Box\[0:32\] and Box\[0:32\] overlap "
                                        r"\(written from 'b.weight' \(64,\)\)"):
        _validate_cover({0: arrivals + [twice]}, [recv], layouts, by_name)
    with pytest.raises(PlanError, match=r"'b.weight' of shape \(64,\): boxes cover 32 of 64 elements"):
        _validate_cover({0: [t for t in arrivals if t is not twice]}, [recv], layouts, by_name)

def test_refuses_unsupported_and_mismatched_dtypes():
    sources, (recv,) = _small()
    bad = [SourceParam("b.weight", (64,), torch.int64, sources[1].groups), sources[0]]
    with pytest.raises(PlanError, match="'b.weight' has unsupported dtype torch.int64"):
        plan(bad, [recv])
    with pytest.raises(PlanError, match="'b.weight': dtype torch.float32 does not match"):
        plan(sources, [_edit(recv, b=DestTensor("b.weight", (64,), torch.float32))])


def test_refuses_fp8_block_misaligned_with_tp_slice():
    sources = sources_on({"l.q_proj.weight": (384, 256)}, [0, 1], [Shard(0)])
    receivers = receivers_for(sources, num_replicas=1, tp=2, quant="fp8_block")  # 192-row slices
    with pytest.raises(PlanError, match=r"'l.q_proj.weight': FP8 block of 128 misaligned .*\[192:384\)"):
        plan(sources, receivers)
    with pytest.raises(PlanError) as info:
        plan(sources, receivers)
    assert "has no source parameter" not in str(info.value)  # its scale is no second problem


def test_refuses_missing_scale_tensor():
    sources, (recv,) = _small(quant="fp8_block")
    with pytest.raises(PlanError, match="scale tensor 'a.q_proj.weight_scale_inv'"):
        plan(sources, [_edit(recv, a__q_proj__weight_scale_inv=None)])
    wrong = DestTensor("a.q_proj.weight_scale_inv", (3, 3), torch.float32)
    with pytest.raises(PlanError, match=r"of shape \(2, 2\), got torch.float32 \(3, 3\)") as info:
        plan(sources, [_edit(recv, a=wrong)])
    assert "has no source parameter" not in str(info.value)


def test_every_problem_is_listed_at_once():
    sources, (recv,) = _small()
    broken = _edit(recv, b__weight=None, c=DestTensor("c.weight", (4,), torch.bfloat16))
    with pytest.raises(PlanError) as info:
        plan(sources, [broken])
    assert "'b.weight'" in str(info.value) and "'c.weight'" in str(info.value)


def test_tp_slice_must_divide():
    with pytest.raises(ValueError, match="'x.q_proj.weight': dim 0 of size 10 does not divide by tp_size 4"):
        make_layout(LayoutSpec("hf_tp", {"tp_rank": 0, "tp_size": 4})).pieces(
            SourceParam("x.q_proj.weight", (10, 4), torch.bfloat16, ()))


def test_fingerprint_is_stable_and_input_sensitive():
    sources, receivers = _small()
    assert plan(sources, receivers).fingerprint == plan(sources, receivers).fingerprint
    other = sources_on({"a.q_proj.weight": (256, 256), "b.weight": (64,)}, [1, 0], [Shard(0)])
    assert plan(other, receivers).fingerprint != plan(sources, receivers).fingerprint


def test_plan_tasks_stay_inside_sender_boxes():
    sources, receivers = _small(quant="fp8_block")
    p = plan(sources, receivers)
    held = {(s.name, r): g.box_of(r) for s in sources for g in s.groups for r in g.ranks}
    for tasks in p.tasks.values():
        for t in tasks:
            if t.kind == "data":
                assert held[(t.src, t.sender)].contains(t.src_box)


@pytest.mark.parametrize("enabled", [True, False])
def test_planning_leaves_the_cyclic_collector_as_it_found_it(enabled):
    """The planner pauses the collector while it builds the plan (and on refusal too)."""
    sources, (recv,) = _small()
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        plan(sources, [recv])
        assert gc.isenabled() is enabled
        with pytest.raises(PlanError):
            plan(sources, [_edit(recv, b__weight=None)])
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
