"""End-to-end sync on CPU: real FSDP2 trainer processes, real receiver processes, gloo and shm.

Every receiver tensor must equal the reference (bit for bit): ``full_tensor()`` for
quant none, the reference quantizer for FP8, in both modes; and direct mode's FP8
bytes must equal reconstruct mode's.
"""

from __future__ import annotations

import pytest
import torch

from fsdp_sync import expected_destinations, mismatches
from tests.harness import all_cases, check_cases, new_port, run_cases
from tests.sync_workers import Case

def test_fsdp2_to_tp1_gloo_and_plan_cache():
    cases = all_cases("f2t1", model="llama", mesh=(2,), num_receivers=1, tp=1)
    cases[0].extra = {"bad_version": True}
    out = run_cases(cases, num_senders=2, num_receivers=1)
    check_cases(out, cases, 1)
    # The second push replayed the cached plan: rank 0 planned exactly once per case.
    for case in cases:
        assert out[("trainer", 0, case.name, 2)]["plans"] == 1
    for rank in (0, 1):
        assert "does not increase" in out[("trainer", rank, cases[0].name, "bad_version")]
    # The fixed cost around the push thread is in each result, step by step; a replayed
    # push neither plans nor connects, and only the controller waits on the previous push.
    for rank, steps in ((0, {"scan", "previous push", "plan", "go", "handoff"}), (1, {"scan", "go", "handoff"})):
        result = out[("trainer", rank, cases[0].name, 2)]["result"]
        assert set(result.announce_seconds) == steps, result.announce_seconds
        assert result.acks_seconds is not None and result.acks_seconds > 0
        assert {"finish", "done"} <= set(result.stage_seconds) and not steps & set(result.stage_seconds)
        first = out[("trainer", rank, cases[0].name, 1)]["result"]
        assert "connect" in first.announce_seconds and "connect" not in result.announce_seconds


def test_fsdp4_to_tp2():
    cases = all_cases("f4t2", model="llama", mesh=(4,), num_receivers=2, tp=2)
    check_cases(run_cases(cases, num_senders=4, num_receivers=2), cases, 2)


def test_hsdp_2x2_to_two_replicas_shm():
    cases = all_cases("hsdp", model="llama", mesh=(2, 2), num_receivers=2, tp=1, transport="shm")
    check_cases(run_cases(cases, num_senders=4, num_receivers=2), cases, 2)


def test_router_buffer_is_synced():
    """e_score_correction_bias, a buffer that training moves, lands as the default patterns say."""
    cases = [Case(name="buf", model="router", mesh=(2,), num_receivers=1, tp=1, quant="fp8_block", mode="direct",
                  port=new_port())]
    out = run_cases(cases, num_senders=2, num_receivers=1)
    check_cases(out, cases, 1)
    got = [out[("receiver", 0, "buf", v)]["tensors"]["gate.e_score_correction_bias"] for v in (1, 2)]
    assert got[0].dtype == got[1].dtype == torch.float32 and not got[0].equal(got[1]) and got[1].abs().sum() > 0


def test_uneven_rows_and_fewer_rows_than_ranks_small_buckets():
    # A small watermark forces many buckets, so the pipeline overlaps and bounds memory.
    cases = all_cases("odd", model="odd", mesh=(4,), num_receivers=1, tp=1, watermark_mb=0.05)
    check_cases(run_cases(cases, num_senders=4, num_receivers=1), cases, 1)


def test_triton_kernels_interpreted_land_the_reference_bytes(monkeypatch):
    """The packer's Triton paths, grouped and per box, run in the CPU interpreter inside real senders.

    The odd model's shards start mid-block and one rank holds no rows. gloo stages the
    grouped kernel's output; shm lets it store straight into the receiver's buffer, where
    the second version replays the first one's recorded launches (amax, all-reduce, scales).
    """
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the spawned senders inherit it
    cases = [Case(name=f"triton-{k}-{q}-{m}-{t}", model="odd", mesh=(4,), num_receivers=1, tp=1, quant=q, mode=m,
                  port=new_port(), transport=t, kernels=k, watermark_mb=0.05, extra={"report_replays": True})
             for k, q, m, t in [("grouped", "fp8_block", "direct", "gloo"), ("per_box", "fp8_block", "reconstruct", "gloo"),
                                ("grouped", "fp8_rowwise", "reconstruct", "shm"), ("grouped", "fp8_block", "direct", "shm")]]
    out = run_cases(cases, num_senders=4, num_receivers=1)
    check_cases(out, cases, 1)
    # gloo stages the grouped kernel's FP8 in slots that outlive a push (fsdp_sync.staging), so
    # its buckets are recorded and version 2 replays them, like shm's stored straight in.
    for name in ("triton-grouped-fp8_block-direct-gloo", "triton-grouped-fp8_block-direct-shm"):
        replays = [out[("trainer", r, name, "replays")] for r in range(4)]
        assert all(len(done) == buckets for done, buckets in replays), (name, replays)
    staged = [out[("trainer", r, "triton-grouped-fp8_block-direct-gloo", 2)]["result"].staging_bytes for r in range(4)]
    assert any(staged), staged


def test_direct_mode_skips_the_amax_all_reduce_where_no_block_is_cut(monkeypatch):
    """FSDP over 2 ranks of the tiny Llama cuts every weight at a multiple of 128 rows: no
    rank holds part of a block, so after the first push no bucket all-reduces amaxes (the
    second version replays without it and still lands the reference bytes). The odd model
    over 4 ranks cuts blocks, and one of its ranks holds no rows: every rank keeps the
    collective there (one that skipped it alone would hang the others)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for model, senders, cut in (("llama", 2, False), ("odd", 4, True)):
        case = Case(name=f"skip-reduce-{model}", model=model, mesh=(senders,), num_receivers=1, tp=1,
                    quant="fp8_block", mode="direct", port=new_port(), transport="shm", kernels="grouped",
                    watermark_mb=0.05 if model == "odd" else 256.0, extra={"report_reduce": True})
        out = run_cases([case], num_senders=senders, num_receivers=1)
        check_cases(out, [case], 1)
        decisions = [out[("trainer", r, case.name, "reduce")] for r in range(senders)]
        assert all(d == decisions[0] for d in decisions), decisions  # the ranks agree
        assert decisions[0] and any(v for _, v in decisions[0]) == cut, decisions[0]


@pytest.mark.parametrize("quant,mode,transport,senders", [
    ("fp8_block", "direct", "gloo", 1),
    ("fp8_rowwise", "reconstruct", "shm", 2),
])
def test_fused_scales_with_tp_slices_interpreted(monkeypatch, quant, mode, transport, senders):
    """Grouped kernels on a tiny Llama into TP=2 receivers: whole-block params take the fused
    one-read path (one sender; reconstruct), row-wise blocks cut by row-parallel slices fall
    back to amax + quantize. Receivers must hold the reference bytes either way. Row-wise
    blocks take a smaller Llama of one decoder layer, which still holds every kind of slice:
    the interpreter runs a program per row one after another (the 2-layer model's 5.6 k rows
    took 126 s on a quiet 2-core machine)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    small = dict(num_hidden_layers=1, hidden_size=128, intermediate_size=256, vocab_size=256)
    case = Case(name=f"fused-{quant}-{mode}", model="llama", mesh=(senders,), num_receivers=2, tp=2, quant=quant,
                mode=mode, port=new_port(), transport=transport, kernels="grouped", versions=1,
                llama=small if quant == "fp8_rowwise" else {})
    check_cases(run_cases([case], num_senders=senders, num_receivers=2), [case], 2)


def test_changed_model_replans_and_refuses_missing_name():
    case = Case(name="changed", model="llama", mesh=(2,), num_receivers=1, tp=1, quant="none", mode="direct",
                port=new_port(), extra={"add_param": True, "late_close": True})
    out = run_cases([case], num_senders=2, num_receivers=1)
    check_cases(out, [case], 1)
    for rank in (0, 1):
        msg = out[("trainer", rank, "changed", "add_param")]
        assert msg.startswith("PlanError") and "extra_bias" in msg, msg
    assert "extra_bias" in out[("receiver", 0, "changed", "add_param")]
    # Once the model is fixed, the next push plans again and lands: a refused push must not
    # leave the two sides disagreeing about which push comes next.
    # The restored model matches the plan already cached, so no new plan is needed.
    # Rank 1 reads that push's acks a second late: rank 0, hosting the store, must wait for it.
    assert out[("trainer", 0, "changed", "after_fix")] == "ok 1"
    assert out[("trainer", 1, "changed", "after_fix")].startswith("ok")
    assert out[("receiver", 0, "changed", "after_fix")] == f"version {case.versions + 1}"
    assert out[("trainer", 0, "changed", "second_close_s")] < 1.0


def test_inf_in_a_weight_is_refused_and_staged_receivers_keep_the_last_version():
    """An inf in one weight at version 2: FP8 always refuses it (its block amax), quant none
    with check_finite. The push raises on the trainer naming the tensor, the receiver's
    wait_for raises SyncError, and the staged receiver still serves version 1's bytes."""
    cases = [Case(name=f"finite-{q}-{t}", model="llama", mesh=(2,), num_receivers=1, tp=1, quant=q, mode="direct",
                  port=new_port(), transport=t, timeout_s=20.0, inf_at=(name, 2), commit="staged",
                  check_finite=q == "none")
             for q, t, name in [("fp8_block", "shm", "model.layers.1.mlp.down_proj.weight"),
                                ("none", "gloo", "model.layers.0.self_attn.q_proj.weight")]]
    out = run_cases(cases, num_senders=2, num_receivers=1, timeout_s=120)
    for case in cases:
        name = case.inf_at[0]
        first = out[("trainer", 0, case.name, 1)]
        assert "error" not in first, first["error"]
        refused = out[("trainer", 0, case.name, 2)]["error"]
        assert refused.startswith("NonFiniteWeights") and name in refused, refused
        # Rank 1 either saw the inf too (its amax all-reduce) or hears of it from the receiver's ack.
        assert name in out[("trainer", 1, case.name, 2)]["error"]
        want = expected_destinations(first["full"], layout=case.layout(0), quant=case.quant)
        assert mismatches(out[("receiver", 0, case.name, 1)]["tensors"], want) == []
        second = out[("receiver", 0, case.name, 2)]
        assert second["error"].startswith(("SyncError", "NonFiniteWeights")) and name in second["error"], second
        assert second["version"] == 1
        assert mismatches(second["tensors"], want) == [], case.name


@pytest.mark.parametrize("transport", ["gloo", "shm"])
def test_dead_sender_errors_every_receiver(transport):
    case = Case(name=f"dead-{transport}", model="llama", mesh=(2,), num_receivers=2, tp=2, quant="fp8_block",
                mode="direct", port=new_port(), transport=transport, watermark_mb=0.2, kill_sender_at_version=2,
                timeout_s=10.0)
    out = run_cases([case], num_senders=2, num_receivers=2, timeout_s=120)
    for r in (0, 1):
        first = out[("receiver", r, case.name, 1)]
        assert first["version"] == 1
        second = out[("receiver", r, case.name, 2)]
        assert "error" in second, second
        # in_place: the live tensors hold part of push 2, which is no version at all.
        assert second["version"] is None, "a receiver reported a version while its tensors were torn"
    assert "error" in out[("trainer", 0, case.name, 2)]
