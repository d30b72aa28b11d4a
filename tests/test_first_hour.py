"""What a new user meets first: torchrun ranks, one process per rank, wait_for's meaning, settings
both sides must share, and a trainer that closes. Real processes, a real TCPStore."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fsdp_sync import (PlanError, allocate_destinations, SyncConfig, SyncError, TrainerGone, WeightReceiver, expected_destinations,
                       mismatches)
from fsdp_sync.controller import check_model_layouts
from fsdp_sync.meta import LayoutSpec, ReceiverMeta
from fsdp_sync.world import job_rank_and_size
from recipes.jobs import free_port, spawn_context, start_job, unpack
from tests import fleet_workers
from tests.timeouts import scaled

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(module: str, control: str, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", module, "--control", control, "--out", str(out)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_torchrun_jobs_from_the_readme_land_three_versions_bit_exact(tmp_path):
    """Both README jobs under torchrun with 2 processes each: no rank arguments anywhere."""
    control = f"127.0.0.1:{free_port()}"
    engine = _torchrun("recipes.example_engine", control, tmp_path)
    trainer = _torchrun("recipes.example_trainer", control, tmp_path)
    logs = {}
    for name, proc in (("trainer", trainer), ("engine", engine)):
        try:
            logs[name], _ = proc.communicate(timeout=scaled(150))
        finally:
            proc.kill()
        assert proc.returncode == 0, f"{name}:\n{logs[name][-4000:]}"
    assert "Traceback" not in logs["engine"] and "DistNetworkError" not in logs["engine"], logs["engine"]
    for version in (1, 2, 3):
        full = torch.load(tmp_path / f"trainer-v{version}.pt")
        for rank in (0, 1):
            got = torch.load(tmp_path / f"engine-r{rank}-v{version}.pt")
            want = expected_destinations(full, layout="hf_tp", layout_kwargs={"tp_rank": rank, "tp_size": 2},
                                         quant="fp8_block")
            assert mismatches(got, want) == [], f"receiver {rank} version {version}"


@pytest.mark.parametrize("path,tag", [("recipes/example_trainer.py", "trainer"), ("recipes/example_engine.py", "engine")])
def test_the_readme_shows_the_code_the_torchrun_test_runs(path, tag):
    region = (ROOT / path).read_text().split(f"# --8<-- [{tag}]\n")[1]
    code = textwrap.dedent(region.rsplit("\n", 1)[0])  # up to the closing marker's line
    assert code.strip() and code in (ROOT / "README.md").read_text()


def test_receiver_rank_comes_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert job_rank_and_size() == (1, 2)
    assert job_rank_and_size(0, 4) == (0, 4)  # given values win


def _store() -> tuple[dist.TCPStore, str]:
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=scaled(10)),
                          wait_for_workers=False)
    return store, f"127.0.0.1:{port}"


def _config(control: str, job: str, **kw) -> SyncConfig:
    return SyncConfig(control=control, job=job, transport="shm", timeout_s=scaled(10), connect_timeout_s=scaled(60),
                      **kw)


def test_a_rank_claimed_twice_is_refused_on_both_claimants():
    _keep, control = _store()
    cfg = _config(control, "dup")
    first = WeightReceiver(fleet_workers.model(), config=cfg, rank=0, world_size=1)
    try:
        with pytest.raises(SyncError, match="receiver rank 0 of job 'dup' is already held by a live process"):
            WeightReceiver(fleet_workers.model(), config=cfg, rank=0, world_size=1)
        with pytest.raises(SyncError, match="was refused to a second process"):
            first.wait_for(timeout=scaled(5))
    finally:
        first.close()
    again = WeightReceiver(fleet_workers.model(), config=cfg, rank=0, world_size=1)  # closed: the rank is free
    again.close()


def _claim_and_die(control: str) -> None:
    import os

    WeightReceiver(fleet_workers.model(), config=_config(control, "stale"), rank=0, world_size=1)
    os._exit(0)  # no close(): the claim stays behind, its heartbeat stops


def test_a_dead_holders_claim_is_taken_over():
    _keep, control = _store()
    proc = spawn_context().Process(target=_claim_and_die, args=(control,))
    proc.start()
    proc.join(timeout=scaled(60))
    assert proc.exitcode == 0
    started = time.monotonic()
    receiver = WeightReceiver(fleet_workers.model(), config=_config(control, "stale"), rank=0, world_size=1)
    receiver.close()
    assert time.monotonic() - started < scaled(10)


def _trainer_job(cfg: SyncConfig, versions: list[int], *, gate: str | None = None, senders: int = 2):
    ctx = spawn_context()
    results = ctx.Queue()
    return start_job(ctx, fleet_workers.trainer, senders, results, cfg, versions, gate), results


def _finish(procs, results) -> dict[int, str]:
    return fleet_workers.reports(procs, results, scaled(120))


_values = fleet_workers.values


def test_wait_for_returns_the_newest_landed_version_and_waits_only_for_a_newer_one_asked_for():
    cfg = _config(f"127.0.0.1:{free_port()}", "semantics")
    procs, results = _trainer_job(cfg, [1, 2], gate="go")
    receiver = WeightReceiver(fleet_workers.model(), config=cfg, commit="staged")
    try:
        assert receiver.wait_for(1) == 1
        assert receiver.wait_for() == 1  # the newest landed version, at once: nothing newer is asked for
        with pytest.raises(SyncError, match="no version 2 within"):
            receiver.wait_for(2, timeout=0.5)
        assert receiver.commit() == 1 and _values(receiver) == {1.0}
        receiver.control.set("go/2", True)
        assert receiver.wait_for(2) == 2
        assert receiver.commit() == 2 and _values(receiver) == {2.0}
    finally:
        outcome = _finish(procs, results)
        receiver.close()
    assert outcome == {0: "1: ok\n2: ok", 1: "1: ok\n2: ok"}


def test_a_quant_the_two_sides_do_not_share_is_refused_on_both_sides():
    cfg = _config(f"127.0.0.1:{free_port()}", "quant", quant="fp8_block")
    procs, results = _trainer_job(cfg, [1])
    receiver = WeightReceiver(fleet_workers.model(), config=_config(cfg.control, "quant"))  # quant none
    try:
        with pytest.raises(PlanError, match=r"SyncConfig.quant is 'fp8_block' on the trainer but 'none' on "
                                            r"receiver ranks \[0\]"):
            receiver.wait_for(timeout=scaled(60))
    finally:
        outcome = _finish(procs, results)
        receiver.close()
    assert all("PlanError" in o and "SyncConfig.quant" in o for o in outcome.values()), outcome


def test_a_closing_trainer_leaves_receivers_serving_and_a_new_trainer_job_lands_on_them(caplog, capfd):
    """Trainer rank 0 hosts the store; it closes and exits. The receiver keeps version 1, says the
    trainer closed without a raw torch error, registers with the next trainer job, and lands its push."""
    cfg = _config(f"127.0.0.1:{free_port()}", "restart")
    procs, results = _trainer_job(cfg, [1])
    receiver = WeightReceiver(fleet_workers.model(), config=cfg, commit="staged")
    try:
        with caplog.at_level(logging.INFO, logger="fsdp_sync"):
            assert receiver.wait_for(1) == 1
            assert _finish(procs, results) == {0: "1: ok", 1: "1: ok"}
            deadline = time.monotonic() + scaled(10)
            while time.monotonic() < deadline:
                try:
                    receiver.wait_for(2, timeout=0.2)
                except TrainerGone as e:
                    assert "the trainer closed" in str(e) or "went away" in str(e)
                    break
                except SyncError as e:
                    assert "within" in str(e), e  # a timeout while the close is on its way
            else:
                pytest.fail("wait_for did not say the trainer closed")
            assert receiver.commit() == 1 and _values(receiver) == {1.0}
            procs, results = _trainer_job(cfg, [2])  # the trainer restarts: a new job, the same control
            assert _finish(procs, results) == {0: "2: ok", 1: "2: ok"}
            assert receiver.wait_for(2, timeout=scaled(30)) == 2
            assert receiver.commit() == 2 and _values(receiver) == {2.0}
    finally:
        receiver.close()
    assert not [r for r in caplog.records if "DistNetworkError" in r.getMessage() or "frame" in r.getMessage()]
    err = capfd.readouterr().err  # torch's C++ warnings go to the process's stderr, not to logging
    assert "frame #" not in err and "DistNetworkError" not in err, err[-3000:]


def test_a_sender_on_a_mesh_inside_a_larger_world_counts_its_ranks_in_that_mesh():
    """World of 3: global rank 0 is no sender; ranks 1 and 2 shard the model and push with
    ``group=mesh``. Global rank 1 is the controller; the push lands bit-exact in FP8."""
    cfg = _config(f"127.0.0.1:{free_port()}", "subgroup", quant="fp8_block")
    ctx = spawn_context()
    results = ctx.Queue()
    procs = start_job(ctx, fleet_workers.subgroup_trainer, 3, results, cfg, [1, 2])
    fp8 = allocate_destinations(fleet_workers.model().state_dict(), layout="identity", quant="fp8_block")
    receiver = WeightReceiver(fp8, config=cfg, commit="staged")
    try:
        assert receiver.wait_for(2, timeout=scaled(60)) == 2
        receiver.commit()
        got = {n: t.clone() for n, t in receiver.tensors.items()}
    finally:
        outcome = _finish(procs, results)
        receiver.close()
    assert outcome[0] == "rank 0 ok" and outcome[2] == "rank 2 ok", outcome
    full = unpack(outcome[1])[2]
    assert mismatches(got, expected_destinations(full, layout="identity", quant="fp8_block")) == []


def test_a_mesh_rank_outside_the_senders_group_is_refused_naming_the_parameter():
    from fsdp_sync.trainer_group import local_ranks

    assert local_ranks([5, 7], (3, 5, 7), what="parameter 'w'") == (1, 2)
    with pytest.raises(PlanError, match=r"parameter 'w' lives on global ranks \[9\], outside the sender's group"):
        local_ranks([5, 9], (3, 5, 7), what="parameter 'w'")


def _meta(rank: int, layout: str, **kwargs) -> ReceiverMeta:
    return ReceiverMeta(rank, "host", {}, LayoutSpec(layout, kwargs), "none")


def test_receivers_describing_different_models_are_refused_naming_the_keyword_and_both_values():
    heads = dict(hidden_size=64, vocab_size=128, num_attention_heads=4)
    metas = [_meta(0, "vllm", tp_rank=0, tp_size=2, num_key_value_heads=4, **heads),
             _meta(1, "vllm", tp_rank=1, tp_size=2, num_key_value_heads=2, **heads)]
    with pytest.raises(PlanError, match=r"layout_kwargs\['num_key_value_heads'\] is 4 on receiver ranks \[0\] "
                                        r"but 2 on receiver ranks \[1\]"):
        check_model_layouts(metas)
    with pytest.raises(PlanError, match=r"layout is 'vllm' on receiver ranks \[0\] but 'sglang' on receiver ranks \[1\]"):
        check_model_layouts([metas[0], _meta(1, "sglang", tp_rank=1, tp_size=2, num_key_value_heads=4, **heads)])
    # Replicas may differ in their parallel layout: TP 2 beside TP 1 serves the same model.
    check_model_layouts(metas[:1] + [_meta(1, "vllm", tp_rank=0, tp_size=1, num_key_value_heads=4, **heads)])
