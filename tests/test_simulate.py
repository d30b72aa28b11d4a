"""The cost model against the committed benchmark run, and planning at scale from shapes-only metadata."""

from __future__ import annotations

import json
import re
import time

import pytest

from fsdp_sync import cost_model as cm
from fsdp_sync.boxes import Box
from fsdp_sync.planner import build_plan
from fsdp_sync.transport.rdma_wr import contiguous_runs
from recipes import scale_models as sm
from recipes import simulate

# Rows the model misses by more than 15%, both reconstruct without quantization: their
# traced stages match the model (test_stage_model_matches_traced_spans), but they spend
# 92 and 112 ms outside those stages against the fitted 62.5 ms per push (docs/simulate.md).
KNOWN_MISSES = {("a", "none", "reconstruct"), ("b", "none", "reconstruct")}


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads(simulate.BENCH_RUN.read_text())


@pytest.fixture(scope="module")
def overheads(report) -> cm.Overheads:
    return simulate.calibrate(report)


@pytest.fixture(scope="module")
def rows(report, overheads) -> list[simulate.BenchRow]:
    return simulate.validate(report, overheads)


def test_constants_come_from_case_a_spans(report, overheads):
    a = report["cases"][0]
    plain, fp8 = simulate._row(a, "none", "direct"), simulate._row(a, "fp8_block", "direct")
    assert overheads.launch_s == pytest.approx(plain["stage_s"]["quantize"] / 399)
    assert overheads.amax_param_s == pytest.approx(fp8["stage_s"]["amax"] / 252)  # 36 layers x 7 matrices
    assert 10e-6 < overheads.launch_s < overheads.quant_task_s < overheads.amax_param_s < 1e-3
    assert 0.02 < overheads.push_s < 0.1


def test_model_predicts_the_committed_bench_within_15_percent(rows):
    assert len(rows) == 8
    for r in rows:
        if (r.case, r.quant, r.mode) in KNOWN_MISSES:
            assert 0.15 < abs(r.error) < 0.25, (r.case, r.quant, r.mode, r.error)
        else:
            assert abs(r.error) <= 0.15, (r.case, r.quant, r.mode, r.error)


def test_stage_model_matches_traced_spans(report, rows, overheads):
    """Case a has one sender: its producer spans are CPU time, its transfer span the GPU time left after them."""
    hw = simulate.bench_hardware(report["cases"][0]["ceilings"])
    for r in rows:
        if r.case != "a":
            continue
        tl = cm.sender_timeline(r.work[0], hw, overheads, watermark_bytes=1 << 31)
        cpu = sum(v for k, v in r.stage_s.items() if k not in ("transfer", "release"))
        assert tl.busy.cpu == pytest.approx(cpu, rel=0.2), (r.quant, r.mode)
        if r.quant == "none":  # GPU-bound: the transfer thread waits out the GPU's work
            assert tl.busy.gpu == pytest.approx(r.stage_s["transfer"], rel=0.1), r.mode


def test_later_log_gives_a_smaller_push_cost(overheads):
    assert 0.0 < simulate.later_push_s(simulate.LATER_LOG.read_text(), overheads) < overheads.push_s


@pytest.mark.parametrize("box,shape", [(Box((0, 0), (4, 8)), (4, 8)), (Box((0, 2), (4, 3)), (4, 8)),
                                       (Box((1, 0, 0), (2, 3, 8)), (4, 6, 8)), (Box((1, 0, 0), (2, 6, 8)), (4, 6, 8)),
                                       (Box((0,), (5,)), (9,)), (Box((2, 0), (0, 8)), (4, 8))])
@pytest.mark.parametrize("max_write_bytes", [1, 6, 1 << 20])
def test_num_writes_counts_the_rdma_schedule(box, shape, max_write_bytes):
    run, starts = contiguous_runs(box, shape)
    want = len(starts) * -(-run * 2 // max_write_bytes)
    assert cm.num_writes(box, shape, box.numel() * 2, max_write_bytes) == want


HW = cm.Hardware(nic_gbit=8.0, nic_efficiency=1.0, nvlink_gbps=1.0, hbm_gbps=1e6, quant_gbps=1e6)  # 1 GB/s links
OV = cm.Overheads(launch_s=1e-3, quant_task_s=0.0, amax_param_s=0.0, push_s=0.0, write_s=0.0)


def test_nic_bound_pipeline_hides_the_cpu_and_reuses_two_staging_slots():
    """Ten buckets of 10 ms CPU and 100 ms on the wire: all but the first bucket's CPU hides behind the NIC."""
    work = [cm.BucketWork(1, launches=10, nic_bytes=1e8) for _ in range(10)]
    tl = cm.sender_timeline(work, HW, OV, watermark_bytes=1 << 40)
    assert tl.busy.cpu == pytest.approx(0.1) and tl.busy.nic == pytest.approx(1.0)
    assert tl.first_out_s == pytest.approx(0.01, rel=1e-3)
    assert tl.end_s == pytest.approx(0.01 + 1.0, rel=1e-3)


@pytest.mark.parametrize("cpu_ms,gpu_ms", [(10, 100), (100, 10)])
def test_one_stream_runs_kernels_as_they_are_launched(cpu_ms, gpu_ms):
    """Buckets stored over NVLink: the slower of launching and running binds, never their sum."""
    work = [cm.BucketWork(1, launches=cpu_ms, nvlink_bytes=gpu_ms * 1e6) for _ in range(10)]
    assert cm.sender_timeline(work, HW, OV, watermark_bytes=1 << 40).end_s == pytest.approx(1.0, rel=1e-3)


def test_an_oversized_bucket_waits_until_nothing_is_in_flight():
    work = [cm.BucketWork(10, nvlink_bytes=1e8), cm.BucketWork(100, launches=10, nvlink_bytes=1e6)]
    # The second bucket exceeds the watermark: packed only once the first is released at 0.1 s.
    assert cm.sender_timeline(work, HW, OV, watermark_bytes=50).end_s == pytest.approx(0.1 + 0.01, rel=1e-3)


@pytest.mark.parametrize("model,billions", [("kimi_k2", 1026), ("deepseek_v3", 671), ("qwen3_235b", 235)])
def test_scale_models_have_their_published_sizes(model, billions):
    total = sum(sm.numel(shape) for _, shape in sm.param_shapes(model))
    assert total / 1e9 == pytest.approx(billions, rel=0.01)


def test_training_layout_holds_whole_experts_and_shards_the_rest_in_a_node():
    sources, hosts = sm.training_sources("kimi_k2", sm.Training(), num_layers=4)
    by_name = {s.name: s for s in sources}
    experts = by_name["model.layers.3.mlp.experts.gate_up_proj"]
    (group,) = experts.groups  # EP and FSDP both shard: one group, the whole second stage
    assert sorted(group.ranks) == list(range(128, 256))
    assert {b.sizes[0] for b in group.boxes} == {3} and {b.sizes[1:] for b in group.boxes} == {(4096, 7168)}
    dense = by_name["model.layers.0.self_attn.q_b_proj.weight"]
    assert len(dense.groups) == 16
    assert all(len({hosts[r] for r in g.ranks}) == 1 for g in dense.groups)  # one node each


def test_small_kimi_plans_at_full_rank_count_and_the_receive_link_binds():
    """Four Kimi-K2 layers, 256 -> 128 (EP 32 x 4): planned and predicted in a few seconds."""
    sources, hosts = sm.training_sources("kimi_k2", sm.Training(), num_layers=4)
    receivers = sm.receivers_for("kimi_k2", sources, sm.inference_layout("ep32", 128), quant="fp8_block")
    hw = cm.Hardware()
    devices = [f"gpu{r}" for r in range(256)]
    started = time.perf_counter()
    plan = build_plan(sources, receivers, sender_hosts=hosts, mode="direct", links=hw.links(),
                      watermark_bytes=1 << 31, sender_devices=devices)
    assert time.perf_counter() - started < 20
    ov = cm.Overheads(launch_s=17e-6, quant_task_s=85e-6, amax_param_s=150e-6, push_s=0.05)
    work = cm.count_work(plan, sources, receivers, sender_hosts=hosts, sender_devices=devices)
    nic_in = cm.receive_nic_bytes(plan, receivers, hosts)
    assert sum(nic_in.values()) == plan.stats.bytes_total  # training and inference share no host
    p = cm.predict(plan, work, hw, ov, watermark_bytes=1 << 31, nic_in=nic_in)
    assert p.binding == "receive link" and p.seconds > p.floor_s > 0
    assert 0 < p.receive_utilization < hw.nic_efficiency


def test_simulate_ends_with_the_summary_line(capsys):
    assert simulate.main(["--num-layers", "4"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"kimi_k2 256->128 predicted_s=\d+\.\d+ floor_s=\d+\.\d+ plan_s=\d+\.\d+", last)
