"""ParamScan: the per-push walk over an FSDP2 model keeps its key while nothing changed,
and notices a replaced or added parameter (one gloo process, real fully_shard)."""

from __future__ import annotations

from collections import UserDict

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from fsdp_sync.param_scan import ParamScan, named_parameters


@pytest.fixture()
def fsdp_model():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2, bias=False))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        yield model
    finally:
        dist.destroy_process_group()


def _ranks(mesh) -> tuple[int, ...]:
    return tuple(mesh.mesh.reshape(-1).tolist())


def test_key_is_reused_while_the_parameters_stay(fsdp_model):
    scan = ParamScan(fsdp_model, _ranks)
    key, local = scan.scan()
    assert [k[0] for k in key] == ["0.weight", "0.bias", "1.weight"]
    assert key[0][1:3] == ((4, 8), torch.float32) and key[0][3][1] == (0,)
    for name, p in fsdp_model.named_parameters():
        assert local[name].data_ptr() == p.to_local().data_ptr()  # the shard itself, not a copy
        assert not local[name].requires_grad
    again, _ = scan.scan()
    assert again is key  # nothing changed: the same key object, not rebuilt

    with torch.no_grad():  # an optimizer step writes in place: same objects, same key
        for p in fsdp_model.parameters():
            p.add_(1.0)
    assert scan.scan()[0] is key


def test_a_replaced_or_added_parameter_changes_the_key(fsdp_model):
    scan = ParamScan(fsdp_model, _ranks)
    key, _ = scan.scan()
    fsdp_model[1].register_parameter("bias", nn.Parameter(torch.zeros(2)))
    added, local = scan.scan()
    assert added != key and added[-1] == ("1.bias", (2,), torch.float32, None)
    assert torch.equal(local["1.bias"], torch.zeros(2)) and not local["1.bias"].requires_grad

    old = fsdp_model[1].bias
    fsdp_model[1].bias = nn.Parameter(torch.zeros(3))  # same name, another shape
    replaced, _ = scan.scan()
    assert replaced[-1][1] == (3,) and old is not fsdp_model[1].bias


def test_the_walk_matches_named_parameters():
    """Same names, objects and order as nn.Module.named_parameters, shared modules and tied
    parameters included (each reported once)."""
    shared = nn.Linear(3, 3)
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(shared, nn.ReLU(), shared), nn.Linear(3, 3))
    model[2].weight = model[0].weight  # tied
    model[1].register_parameter("empty", None)
    want = list(model.named_parameters())
    got = named_parameters(model)
    assert [n for n, _ in got] == [n for n, _ in want]
    assert all(a is b for (_, a), (_, b) in zip(got, want))


def test_a_plain_parameter_cast_or_resized_in_place_changes_the_key():
    """Casting a module or assigning ``p.data`` keeps the Parameter object: the key must
    still follow its dtype and shape (review finding; DTensors get a new spec instead)."""
    model = nn.Linear(4, 4, bias=False)
    scan = ParamScan(model, _ranks)
    key, _ = scan.scan()
    model.half()
    cast, local = scan.scan()
    assert cast[0][2] == torch.float16 and local["weight"].dtype == torch.float16
    model.weight.data = torch.zeros(8, 4, dtype=torch.float16)
    resized, _ = scan.scan()
    assert resized[0][1] == (8, 4)
    assert scan.scan()[0] is resized  # unchanged since: reused


def test_a_new_module_or_a_renamed_parameter_changes_the_key(fsdp_model):
    scan = ParamScan(fsdp_model, _ranks)
    key, _ = scan.scan()
    fsdp_model.add_module("head", nn.Linear(2, 2, bias=False))
    grown, local = scan.scan()
    assert grown[-1][0] == "head.weight" and "head.weight" in local
    head = fsdp_model.head
    head._parameters["w"] = head._parameters.pop("weight")  # same object, another name
    renamed, local = scan.scan()
    assert renamed[-1][0] == "head.w" and set(local) >= {"head.w"} and "head.weight" not in local


def test_local_shards_follow_a_swapped_local_tensor(fsdp_model):
    """FSDP2 may point a sharded parameter at new storage (``reset_sharded_param``): the
    layout is the same, but the push must read the new tensor."""
    scan = ParamScan(fsdp_model, _ranks)
    key, _ = scan.scan()
    p = fsdp_model[0].weight
    p._local_tensor = p._local_tensor.clone() + 1
    again, local = scan.scan()
    assert again is key and local["0.weight"] is p._local_tensor


def test_an_entry_moved_to_the_next_module_changes_the_key():
    """Ids and keys alone stay the same when an entry moves from the end of one dict to the
    start of the next in walk order: the dicts' sizes tell (review finding)."""
    model = nn.Module()
    model.a, model.b = nn.Module(), nn.Module()
    model.a.x = nn.Linear(2, 2)
    scan = ParamScan(model, _ranks)
    key, _ = scan.scan()
    x = model.a.x
    del model.a.x
    model.b.x = x
    moved, local = scan.scan()
    assert [k[0] for k in moved] == ["b.x.weight", "b.x.bias"] and set(local) == {"b.x.weight", "b.x.bias"}




def test_edits_straight_into_the_dicts_change_the_key():
    """The snapshot check sees what bypasses nn.Module's API: a child swapped in its parent's
    ``_modules`` (same size), a parameter deleted from ``_parameters``, a module deleted."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    scan = ParamScan(model, _ranks)
    key, _ = scan.scan()
    model._modules["1"] = nn.Linear(2, 3)
    swapped, local = scan.scan()
    assert swapped[2][1] == (3, 2) and local["1.weight"].data_ptr() == model[1].weight.data_ptr()
    del model[1]._parameters["bias"]
    assert [k[0] for k in scan.scan()[0]] == ["0.weight", "0.bias", "1.weight"]
    del model[1]
    before, _ = scan.scan()
    assert [k[0] for k in before] == ["0.weight", "0.bias"]
    model[0].weight = model[0].weight  # the same object again: the same key object
    assert scan.scan()[0] is before


def test_a_module_whose_dicts_are_not_dicts_is_walked_every_push():
    model = nn.Sequential(nn.Linear(2, 2))
    model[0]._parameters = UserDict(model[0]._parameters)  # no dict: the snapshot cannot read it
    scan = ParamScan(model, _ranks)
    key, _ = scan.scan()
    assert [k[0] for k in key] == ["0.weight", "0.bias"]
    model[0].register_parameter("extra", nn.Parameter(torch.zeros(1)))
    assert scan.scan()[0][-1][0] == "0.extra"


def test_synced_buffers_are_plain_sources(fsdp_model):
    """Buffers a pattern selects (DeepSeek's e_score_correction_bias) ride along as plain
    replicated tensors; edited in place they keep the key, reassigned they change it."""
    from fsdp_sync.meta import source_params

    fsdp_model[1].register_buffer("e_score_correction_bias", torch.arange(2.0))
    fsdp_model[1].register_buffer("step_counter", torch.zeros(1))  # no pattern: not synced
    patterns = (r"\.e_score_correction_bias$",)
    scan = ParamScan(fsdp_model, _ranks, buffers=patterns)
    key, local = scan.scan()
    assert key[-1] == ("1.e_score_correction_bias", (2,), torch.float32, None) and "1.step_counter" not in local
    assert local["1.e_score_correction_bias"] is fsdp_model[1].e_score_correction_bias
    fsdp_model[1].e_score_correction_bias.add_(1.0)
    assert scan.scan()[0] is key
    fsdp_model[1].e_score_correction_bias = torch.ones(2)  # a new tensor under the same name
    again, local = scan.scan()
    assert again == key and again is not key and torch.equal(local["1.e_score_correction_bias"], torch.ones(2))
    sources = {s.name: s for s in source_params(fsdp_model, world_size=1, buffers=patterns)}
    assert sources["1.e_score_correction_bias"].shape == (2,) and "1.step_counter" not in sources
    assert "1.e_score_correction_bias" not in ParamScan(fsdp_model, _ranks).scan()[1]  # opt-in by pattern
