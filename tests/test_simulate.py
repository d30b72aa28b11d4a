"""The cost model against the committed benchmark run, and planning at scale from shapes-only metadata."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from recipes.sim import cost_model as cm
from fsdp_sync.boxes import Box
from fsdp_sync.planner import build_plan
from fsdp_sync.transport.rdma_wr import contiguous_runs
from recipes.sim import control_plane, delta, seed
from recipes.sim import scale_models as sm
from recipes import simulate


@pytest.fixture(scope="module")
def fitted() -> tuple[dict, list[simulate.BenchRow], simulate.Fit]:
    report, rows, fit = simulate.fitted()
    return report, simulate.validate(rows, fit), fit


@pytest.fixture(scope="module")
def rows(fitted) -> list[simulate.BenchRow]:
    return fitted[1]


@pytest.fixture(scope="module")
def fit(fitted) -> simulate.Fit:
    return fitted[2]


def _row(rows, *key):
    return next(r for r in rows if r.key == key)


# Measured by BENCH_RUN, and missed by the model for a reason it does not model (docs/simulate.md).
KNOWN_MISS = ("b", "fp8_block", "reconstruct", "cuda_ipc")


def test_calibration_reads_the_h100_runs_of_eaed402():
    assert simulate.BENCH_RUN.name.endswith("-eaed402.json") and simulate.KERNEL_RUN.name.endswith("-eaed402.json")
    report = json.loads(simulate.BENCH_RUN.read_text())
    kernels = json.loads(simulate.KERNEL_RUN.read_text())
    assert report["environment"]["gpu"] == kernels["env"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert report["environment"]["git_sha"].startswith("eaed402") and kernels["env"]["git_sha"].startswith("eaed402")
    assert [len(c["rows"]) for c in report["cases"]] == [8, 4]
    simulate.check_same_code(report, kernels)


def test_calibration_refuses_a_kernel_run_of_other_code():
    old = json.loads((simulate.RUNS / "bench-NVIDIA-H100-80GB-HBM3-20261126T111006-86ffe14.json")
                     .read_text())
    with pytest.raises(ValueError, match="86ffe14.*eaed402"):
        simulate.check_same_code(old, json.loads(simulate.KERNEL_RUN.read_text()))


def test_python_costs_come_from_case_a_nccl_spans(rows, fit):
    """Nothing is replayed over NCCL: every task is packed afresh, and its spans say what that costs."""
    plain, fp8 = _row(rows, "a", "none", "direct", "nccl"), _row(rows, "a", "fp8_block", "direct", "nccl")
    assert not any(w.replayed for w in plain.work[0] + fp8.work[0])
    ov = fit.ov
    assert ov.task_s == pytest.approx(plain.raw["stage_s"]["quantize"] / 399)
    assert ov.amax_param_s == pytest.approx(fp8.raw["stage_s"]["amax"] / 252)  # 36 layers x 7 matrices
    assert 399 * ov.task_s + 252 * ov.quant_task_s == pytest.approx(fp8.raw["stage_s"]["quantize"])
    assert 1e-6 < ov.task_s < ov.amax_param_s < ov.quant_task_s < 1e-3
    # Per push: what the rows spent outside the push thread (announce, acks), 2-5 ms.
    outside = [r.raw["parts_s"]["publish"] + r.raw["parts_s"]["acks"] for r in rows]
    assert min(outside) < ov.push_s < max(outside) < 0.006


def test_fitted_efficiencies_are_physical(fit):
    hw = fit.hw
    for name in ("copy_efficiency", "peer_copy_efficiency"):
        assert 0.5 < hw[name] <= 1.0, name
    # KERNEL_RUN: the grouped launch at 4 warps a program, 2966 of a copy's 2998 GB/s (16 warps, as
    # 86ffe14 launched it, had 1780), and storing into the peer 367 of a peer copy's 394 GB/s.
    assert hw["quant_efficiency"] == pytest.approx(2965.6 / 2997.8, rel=1e-3)
    assert hw["peer_store_efficiency"] == pytest.approx(367.4 / 394.4, rel=1e-3)
    # Large tensors take one copy_ each since cfcdf92: the peer copies now run at the peer-copy ceiling.
    assert hw["peer_copy_efficiency"] > 0.95
    assert 100 < hw["allgather_gbps"] < 340  # below the NCCL send/recv ceiling that case b measured
    assert 10e-6 < fit.ov.send_s < 100e-6


def test_model_predicts_every_bench_row_but_one_within_15_percent(rows, fit):
    assert len(rows) == 12
    fitted = set(fit.in_sample.values())
    assert len(fitted) == 4 and KNOWN_MISS not in fitted
    for r in rows:
        if r.key == KNOWN_MISS:
            assert -0.30 < r.error < -0.15, r.error  # see test_known_miss_ran_its_cpu_and_gpu_in_series
        else:
            assert abs(r.error) <= 0.15, (r.key, r.error)
        if r.key in fitted:  # each of these rows fixed one constant: the model meets it
            assert abs(r.error) < 1e-3, (r.key, r.error)


def test_validation_counts_twins_once_and_splits_in_from_out_of_sample(rows, fit):
    """Case a has one sender: its reconstruct rows are its direct rows' plans again, so they are dropped.
    Four rows fix a constant each; four remain out of sample, one of whose spans fixed Python costs."""
    kind = simulate.sample_of(rows, fit)
    twins = {k for k, v in kind.items() if v == "twin"}
    assert twins == {("a", q, "reconstruct", t) for q in ("none", "fp8_block") for t in ("cuda_ipc", "nccl")}
    assert sum(v == "in" for v in kind.values()) == 4
    out = [r for r in rows if kind[r.key] in ("out", "spans")]
    assert len(out) == 4 and {r.case for r in out} == {"a", "b"}
    for r in rows:
        if kind[r.key] == "twin":
            twin = simulate.is_twin(r, rows)
            assert r.planned.plan.stats.num_tasks == twin.planned.plan.stats.num_tasks
            assert r.predicted_s == pytest.approx(twin.predicted_s)


def test_known_miss_ran_its_cpu_and_gpu_in_series(rows, fit):
    """Case b fp8_block reconstruct: its producer thread's spans fill nearly all of the push thread's
    time, and the transfer thread had little GPU work left to wait for, so the producer waited for
    the GPU; the model overlaps the two, and its CPU and GPU seconds summed would give the run time.
    In bf16 reconstruct the two threads did overlap."""
    def producer_share(r):
        return sum(v for k, v in r.raw["stage_s"].items() if k not in ("transfer", "release")) / r.raw["parts_s"]["run"]

    miss = _row(rows, *KNOWN_MISS)
    assert producer_share(miss) > 0.9 and miss.raw["stage_s"]["transfer"] < 0.1 * miss.raw["parts_s"]["run"]
    assert producer_share(_row(rows, "b", "none", "reconstruct", "cuda_ipc")) < 0.5
    p = simulate.predict_row(miss, fit)
    assert p.slowest.cpu + p.slowest.gpu == pytest.approx(miss.raw["parts_s"]["run"], rel=0.05)


def test_interleaved_stores_overlap_in_the_case_b_launches(rows, fit, monkeypatch):
    """Case b fp8_block direct: each sender's launches store into both GPUs and take the FP8 its peer
    stores here. Modelled as bound by the slower of HBM and NVLink it is within 5% of the run; the
    two added one after the other (the model before eaed402) it would be over 20% slow."""
    r = _row(rows, "b", "fp8_block", "direct", "cuda_ipc")
    zero, one = r.work[0], r.work[1]
    assert sum(w.peer_in_bytes for w in zero) == sum(w.peer_store_bytes for w in one) > 0
    assert [w.peer_in_bytes for w in one] == [w.peer_store_bytes for w in zero]
    hw = simulate.bench_hardware(r.ceilings, fit.hw)
    w = max(zero, key=lambda w: w.peer_store_bytes)
    hbm = (w.quant_bytes + w.peer_read_bytes + w.peer_in_bytes) / (hw.quant_gbps * 1e9)
    link = w.peer_store_bytes / (hw.nvlink_gbps * hw.peer_store_efficiency * 1e9)
    assert link > 0.2 * hbm and cm.quantize_launch_s(w, hw) == pytest.approx(max(hbm, link))
    assert abs(r.error) < 0.05

    def serial(w, hw):
        return ((w.quant_bytes + w.peer_read_bytes) / (hw.quant_gbps * 1e9)
                + w.peer_store_bytes / (hw.nvlink_gbps * hw.peer_store_efficiency * 1e9))

    monkeypatch.setattr(cm, "quantize_launch_s", serial)
    assert simulate.predict_row(r, fit).seconds > 1.2 * r.measured_s


def test_stage_model_matches_traced_spans(rows, fit):
    """Case a has one sender. Over cuda_ipc its transfer span is the GPU time left after launching
    (the efficiencies were fitted on whole push times, not on this span), and a replayed push's
    producer spans are its launches: fitted by least squares over four rows, within a millisecond
    here (-34% and +24%), and under a tenth of the GPU time they hide behind."""
    checked = 0
    for r in rows:
        if r.case != "a" or r.transport != "cuda_ipc":
            continue
        hw = simulate.bench_hardware(r.ceilings, fit.hw)
        busy = cm.sender_timeline(r.work[0], hw, fit.ov, watermark_bytes=r.raw["watermark_bytes"]).busy
        assert busy.gpu == pytest.approx(r.raw["stage_s"]["transfer"], rel=0.05), r.key
        spans = sum(v for k, v in r.raw["stage_s"].items() if k not in ("transfer", "release"))
        assert busy.cpu == pytest.approx(spans, abs=1e-3) and busy.cpu < 0.1 * busy.gpu, r.key
        checked += 1
    assert checked == 4


@pytest.mark.parametrize("box,shape", [(Box((0, 0), (4, 8)), (4, 8)), (Box((0, 2), (4, 3)), (4, 8)),
                                       (Box((1, 0, 0), (2, 3, 8)), (4, 6, 8)), (Box((1, 0, 0), (2, 6, 8)), (4, 6, 8)),
                                       (Box((0,), (5,)), (9,)), (Box((2, 0), (0, 8)), (4, 8))])
@pytest.mark.parametrize("max_write_bytes", [1, 6, 1 << 20])
def test_num_writes_counts_the_rdma_schedule(box, shape, max_write_bytes):
    run, starts = contiguous_runs(box, shape)
    want = len(starts) * -(-run * 2 // max_write_bytes)
    assert cm.num_writes(box, shape, box.numel() * 2, max_write_bytes) == want


HW = cm.Hardware(nic_gbit=8.0, nic_efficiency=1.0, nvlink_gbps=1.0, hbm_gbps=1e6, sendrecv_gbps=1.0)  # 1 GB/s links
OV = cm.Overheads(bucket_s=0.0, launch_s=1e-3, task_s=0.0, quant_task_s=0.0, amax_param_s=0.0, send_s=1e-3,
                  write_s=0.0)


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
    work = [cm.BucketWork(1, launches=cpu_ms, peer_copy_bytes=gpu_ms * 1e6) for _ in range(10)]
    assert cm.sender_timeline(work, HW, OV, watermark_bytes=1 << 40).end_s == pytest.approx(1.0, rel=1e-3)


def test_an_oversized_bucket_waits_until_nothing_is_in_flight():
    work = [cm.BucketWork(10, peer_copy_bytes=1e8), cm.BucketWork(100, launches=10, peer_copy_bytes=1e6)]
    # The second bucket exceeds the watermark: packed only once the first is released at 0.1 s.
    assert cm.sender_timeline(work, HW, OV, watermark_bytes=50).end_s == pytest.approx(0.1 + 0.01, rel=1e-3)


def test_nccl_sends_follow_the_gpu_in_the_transfer_thread():
    """Each bucket: 10 ms of kernels, then 10 sends (10 ms) and 100 ms of bytes, one bucket after another."""
    work = [cm.BucketWork(1, quant_bytes=1e4, sends=10, link_bytes=1e8) for _ in range(3)]
    hw = replace(HW, hbm_gbps=1e-3)  # 1e4 bytes quantized: 10 ms
    tl = cm.sender_timeline(work, hw, OV, watermark_bytes=1 << 40)
    assert tl.first_out_s == pytest.approx(0.01 + 0.01)
    assert tl.end_s == pytest.approx(0.01 + 3 * (0.01 + 0.1))


def test_count_work_replays_only_buckets_stored_straight_into_their_destinations():
    """Case a's plan: over cuda_ipc every bucket is replayed (launches only); over nccl none is,
    so each task and scale grid costs Python, and every byte is sent, none stored."""
    report = json.loads(simulate.BENCH_RUN.read_text())
    a = report["cases"][0]
    planned = simulate.bench_plan("a", a["model"], "fp8_block", "direct", a["ceilings"], 4 << 30)
    ipc, nccl = planned.work("cuda_ipc")[0], planned.work("nccl")[0]
    assert all(w.replayed for w in ipc) and not any(w.replayed for w in nccl)
    assert sum(w.tasks + w.quant_tasks for w in ipc) == 0
    assert sum(w.quant_tasks for w in nccl) == sum(w.amax_params for w in nccl) == 252
    assert sum(w.tasks for w in nccl) == 399
    assert sum(w.link_bytes for w in nccl) == planned.plan.stats.bytes_total
    assert sum(w.sends for w in nccl) == planned.plan.stats.num_tasks
    assert sum(w.peer_store_bytes + w.peer_copy_bytes for w in ipc) == planned.plan.stats.bytes_total
    assert sum(w.hbm_bytes for w in ipc) == 0  # one rank holds every block whole: no amax pass
    assert sum(w.peer_in_bytes for w in ipc) == 0  # no sender on the receiver's GPU


def test_staged_replay_counts_two_sided_buckets_as_replayed():
    """The forecast for the code since the staging slots: over nccl case a's buckets replay
    (no Python per task) and still send every byte; the default counts them packed afresh."""
    report = json.loads(simulate.BENCH_RUN.read_text())
    a = report["cases"][0]
    planned = simulate.bench_plan("a", a["model"], "fp8_block", "direct", a["ceilings"], 4 << 30)
    afresh, staged = planned.work("nccl")[0], planned.work("nccl", staged_replay=True)[0]
    assert all(w.replayed for w in staged) and not any(w.replayed for w in afresh)
    assert sum(w.tasks + w.quant_tasks + w.amax_params for w in staged) == 0
    assert sum(w.link_bytes for w in staged) == sum(w.link_bytes for w in afresh) == planned.plan.stats.bytes_total
    assert sum(w.sends for w in staged) == planned.plan.stats.num_tasks
    reconstruct = simulate.bench_plan("b", report["cases"][1]["model"], "fp8_block", "reconstruct",
                                      report["cases"][1]["ceilings"], 4 << 30)
    gathered = [w for ws in reconstruct.work("nccl", staged_replay=True).values() for w in ws]
    assert any(w.collectives for w in gathered)
    assert not any(w.replayed for w in gathered if w.collectives)  # a gather's buffers are fresh: packed afresh


def test_quantize_launch_is_bound_by_the_slower_of_hbm_and_nvlink():
    hw = cm.Hardware(hbm_gbps=1.0, nvlink_gbps=1.0, peer_store_efficiency=0.5)  # 1 GB/s HBM, 0.5 GB/s stores
    local = cm.BucketWork(1, quant_bytes=3e9)
    assert cm.quantize_launch_s(local, hw) == pytest.approx(3.0)
    mixed = cm.BucketWork(1, quant_bytes=3e9, peer_read_bytes=2e9, peer_store_bytes=1e9, peer_in_bytes=1e9)
    assert cm.quantize_launch_s(mixed, hw) == pytest.approx(6.0)  # HBM: 3 + 2 + 1 GB; NVLink 2 s
    link_bound = cm.BucketWork(1, quant_bytes=1e9, peer_read_bytes=2e9, peer_store_bytes=4e9)
    assert cm.quantize_launch_s(link_bound, hw) == pytest.approx(8.0)
    assert cm.quantize_launch_s(cm.BucketWork(1, peer_in_bytes=1e9), hw) == 0.0  # no launch of its own


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
    """Four Kimi-K2 layers, 256 -> 128 (EP 32 x 4): planned and predicted (planning time: recipes.simulate)."""
    sources, hosts = sm.training_sources("kimi_k2", sm.Training(), num_layers=4)
    receivers = sm.receivers_for("kimi_k2", sources, sm.inference_layout("ep32", 128), quant="fp8_block")
    hw = cm.Hardware()
    devices = [f"gpu{r}" for r in range(256)]
    plan = build_plan(sources, receivers, sender_hosts=hosts, mode="direct", links=hw.links(),
                      watermark_bytes=1 << 31, sender_devices=devices)
    ov = cm.Overheads(bucket_s=3e-4, launch_s=2e-6, task_s=6e-6, quant_task_s=90e-6, amax_param_s=50e-6, push_s=0.003)
    work = cm.count_work(plan, sources, receivers, sender_hosts=hosts, sender_devices=devices)
    nic_in = cm.receive_nic_bytes(plan, receivers, hosts)
    assert sum(nic_in.values()) == plan.stats.bytes_total  # training and inference share no host
    p = cm.predict(plan, work, hw, ov, watermark_bytes=1 << 31, nic_in=nic_in)
    assert p.binding == "receive link" and p.seconds > p.floor_s > 0
    assert 0 < p.receive_utilization < hw.nic_efficiency


def test_simulate_ends_with_the_summary_line(capsys):
    assert simulate.main(["--num-layers", "4"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"kimi_k2 256->128 predicted_s=(\d+\.\d+) range_s=(\d+\.\d+)-(\d+\.\d+) floor_s=(\d+\.\d+) "
                     r"plan_s=\d+\.\d+ delta_s=(\d+\.\d+)", last)
    assert m, last
    mid, low, high, floor, delta_s = map(float, m.groups())
    assert floor <= low <= mid <= high and mid == pytest.approx((low + high) / 2, abs=1e-3)
    assert delta_s < low  # a delta moves ~1-2% of the bytes


def test_buffers_are_sources_kimi_has_975_tensors():
    """915 parameters and 60 e_score_correction_bias buffers (float32, unsharded on every rank): the
    seed reports 974 full_tensor calls."""
    sources, _ = sm.training_sources("kimi_k2", sm.Training.seed(256))
    buffers = [s for s in sources if s.name.endswith("e_score_correction_bias")]
    assert len(sources) == 975 and len(buffers) == 60
    assert all(s.shape == (384,) and s.dtype.itemsize == 4 and len(s.groups) == 256 for s in buffers)


def test_seed_layout_holds_a_nodes_experts_sharded_on_rows():
    sources, hosts = sm.training_sources("kimi_k2", sm.Training.seed(256), num_layers=2)
    experts = next(s for s in sources if s.name.endswith("experts.gate_up_proj"))
    (group,) = experts.groups
    node0 = [b for r, b in zip(group.ranks, group.boxes) if hosts[r] == "train0"]
    assert {b.offsets[0] for b in node0} == {0} and {b.sizes[:2] for b in node0} == {(12, 512)}
    with pytest.raises(ValueError, match="seed layout"):
        sm.Training(num_gpus=256, layout="seed")


@pytest.fixture(scope="module")
def seed_kimi(fit):
    """The seed's own method for Kimi-K2 256 -> 128 (ep32), the seed's published case."""
    report = json.loads(simulate.BENCH_RUN.read_text())
    hw = simulate.bench_hardware(report["cases"][0]["ceilings"], fit.hw)
    sources, hosts = sm.training_sources("kimi_k2", sm.Training.seed(256))
    receivers = sm.receivers_for("kimi_k2", sources, sm.inference_layout("ep32", 128), quant="fp8_block")
    work, recv_bytes = seed.count_seed_work(sources, receivers, hosts)
    spread = seed.push_spread(seed.bench_runs(simulate.RUNS))
    return work, seed.predict_seed(work, recv_bytes, hw, fit.ov, seed.SeedConstants(), spread,
                                   goodput=simulate.GOODPUT_RANGE)


def test_seed_method_reproduces_the_seeds_kimi_push_within_20_percent(seed_kimi):
    """Per rank the seed spent ~1.23 s (1.3 s a push); nothing in the model was fitted on it."""
    _, p = seed_kimi
    per_rank = sum(p.stages.values())
    assert abs(per_rank / seed.SEED_PER_RANK_S - 1) < 0.20, per_rank
    assert abs(p.seconds / 1.3 - 1) < 0.20, p.seconds
    assert p.range_s[0] < 1.3 < p.range_s[1]
    # Each stage within a factor of 1.5 of the seed's, but for the two smallest (RDMA submit, fuse).
    for k in ("full_tensor", "waiting", "h2d", "quantize"):
        assert 1 / 1.5 < p.stages[k] / seed.SEED_BREAKDOWN[k] < 1.5, (k, p.stages[k])
    assert abs(p.calls / seed.SEED_FULL_TENSOR_CALLS - 1) < 0.1  # 915 DTensor parameters against 974 calls


def test_seed_method_sends_every_byte_once_and_only_from_a_holding_node(seed_kimi):
    work, p = seed_kimi
    assert p.extra["busiest_receiver_bytes"] == pytest.approx(34.6e9, rel=0.01)  # as the planner's ep32 plan
    payload = [w.payload_bytes for w in work.values()]
    assert max(payload) < 1.5 * sum(payload) / len(payload)  # fewest bytes so far keeps ranks balanced


def test_straggler_grows_with_the_number_of_senders_and_its_range_is_ordered():
    spread = seed.push_spread(seed.bench_runs(simulate.RUNS))
    assert len(spread) > 500 and 0.03 < spread.std() < 0.15
    import numpy as np

    few, many = (seed.expected_slowest(np.ones(n), spread, gaussian=True) for n in (8, 256))
    assert 1 < few < many
    assert seed.expected_slowest(np.ones(256), spread, gaussian=False) > many  # the samples' tail is heavier


def _toy_plan(nbytes_per_bucket, num_buckets=3):
    """Two senders on two hosts, each bucket to both receivers on a third host: a Plan-shaped stand-in."""
    from types import SimpleNamespace

    tasks, buckets = {0: [], 1: []}, []
    for i in range(num_buckets):
        buckets.append(SimpleNamespace(index=i, group=(0, 1)))
        for s in (0, 1):
            for r in (0, 1):
                tasks[s].append(SimpleNamespace(bucket=i, receiver=r, nbytes=nbytes_per_bucket))
    receivers = [SimpleNamespace(rank=r, host="infer") for r in (0, 1)]
    return SimpleNamespace(tasks=tasks, buckets=buckets), receivers, ["a", "b"]


def test_flow_replay_shares_links_max_min_fairly():
    plan, receivers, hosts = _toy_plan(1e9, num_buckets=1)
    tl = {s: cm.SenderTimeline(packed_s=[0.0], fill_s=[0.0], post_s=[0.0]) for s in (0, 1)}
    # Each receiver takes 2 GB at 1 GB/s: 2 s, the senders' 2 GB at 10 GB/s do not bind.
    assert cm.flow_replay(plan, tl, receivers, hosts, sender_gbps=10, receiver_gbps=1) == pytest.approx(2.0)
    # Sender-bound: each sender's 2 GB at 1 GB/s.
    assert cm.flow_replay(plan, tl, receivers, hosts, sender_gbps=1, receiver_gbps=10) == pytest.approx(2.0)
    rates = cm._max_min_rates(__import__("numpy").array([0, 0, 1]), __import__("numpy").array([2, 3, 3]),
                              __import__("numpy").array([2.0, 9.0, 9.0, 1.0]))
    assert list(rates) == pytest.approx([1.5, 0.5, 0.5])  # flow 0 takes what flow 1 leaves of sender 0


def test_flow_replay_waits_for_packing_and_the_two_staging_slots():
    plan, receivers, hosts = _toy_plan(1e9, num_buckets=3)
    late = {s: cm.SenderTimeline(packed_s=[0.0, 0.0, 0.0], fill_s=[0.1] * 3, post_s=[0.0] * 3) for s in (0, 1)}
    # Receivers bind (6 GB each at 1 GB/s); the first bucket starts after its 0.1 s copy into a slot.
    end = cm.flow_replay(plan, late, receivers, hosts, sender_gbps=10, receiver_gbps=1)
    assert end >= 6.1 - 1e-9
    # Bucket 2 is packed only at 10 s: the replay cannot end before it has moved.
    slow = {s: cm.SenderTimeline(packed_s=[0.0, 0.0, 10.0], fill_s=[0.0] * 3, post_s=[0.0] * 3) for s in (0, 1)}
    assert cm.flow_replay(plan, slow, receivers, hosts, sender_gbps=10, receiver_gbps=1) == pytest.approx(12.0)


def test_replay_is_never_below_the_busy_from_the_first_byte_bound():
    """A small Kimi plan: the replay of the plan's order, flows max-min fair, ends no earlier than the bound."""
    sources, hosts = sm.training_sources("kimi_k2", sm.Training(num_gpus=64), num_layers=2)
    receivers = sm.receivers_for("kimi_k2", sources, sm.inference_layout("ep32", 32), quant="fp8_block")
    hw = cm.Hardware()
    devices = [f"gpu{r}" for r in range(64)]
    plan = build_plan(sources, receivers, sender_hosts=hosts, mode="direct", links=hw.links(),
                      watermark_bytes=1 << 31, sender_devices=devices)
    ov = cm.Overheads(bucket_s=3e-4, launch_s=2e-6, task_s=6e-6, quant_task_s=90e-6, amax_param_s=50e-6, push_s=0.003)
    work = cm.count_work(plan, sources, receivers, sender_hosts=hosts, sender_devices=devices)
    nic_in = cm.receive_nic_bytes(plan, receivers, hosts)
    p = cm.predict(plan, work, hw, ov, watermark_bytes=1 << 31, nic_in=nic_in, replay=(receivers, hosts))
    assert p.binding in ("flow replay", "plan floor", "sender pipeline")
    assert p.replay_s >= p.receive_bound_s * (1 - 0.01)  # events batched within 1%


def test_delta_moves_one_to_two_percent_of_the_bytes_and_ranges_are_ordered():
    w = cm.BucketWork(1, quant_tasks=10, nic_bytes=1e9)
    d = delta.predict_delta({0: [w]}, {0: 10**9}, cm.Hardware(), OV, goodput=simulate.GOODPUT_RANGE,
                            straggler=(1.2, 1.6))
    assert 0.007 < d.wire_bytes[0] / 1e9 < d.wire_bytes[1] / 1e9 < 0.02
    assert d.range_s[0] <= d.seconds <= d.range_s[1]
    assert delta.delta_bytes(1e9, 0.125) > 1e9 / 8  # above ~12% a bitmap would be smaller: positions lose


def test_control_plane_store_fanout_was_measured_at_384_ranks_and_grows_linearly():
    """bench_store_fanout at 4-384 ranks (bench_results/store-fanout-cpu-*): a straight line fits every
    point from 32 ranks on within 30%, and the push's control cost at 384 ranks is what was measured there."""
    runs = control_plane.control_runs(simulate.RUNS)
    assert max(n + m for n, m, _ in runs) == 384
    fit = control_plane.fit_control(runs)
    assert 0 < fit.per_rank_s < 1e-3
    for n, t in fit.points:
        if n >= 32:
            assert abs(fit.at(n) / t - 1) < 0.30, (n, t)
    low, high, _ = control_plane.push_cost_range(0.0024, 384, simulate.RUNS)
    measured = next(t for n, m, t in runs if n + m == 384)
    assert low == 0.0024 and high == pytest.approx(0.0024 + fit.at(384) - fit.at(4))
    assert 0.5 * measured < high - low < 1.5 * measured
    # The whole control plane, a process per rank on 2 cores: measured up to 48 processes.
    processes = control_plane.control_runs(simulate.RUNS, kind="processes")
    assert max(n + m for n, m, _ in processes) >= 32
