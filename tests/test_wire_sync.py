"""The signed control plane end to end: real FSDP2 trainer processes, real receivers, shm and gloo.

With a secret on both jobs every push lands bit for bit; forged announcements and done
keys between pushes commit nothing and the next real push still lands; a job with a
secret and one without fail with a clear error on both sides instead of waiting.
"""

from __future__ import annotations

import queue
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from fsdp_sync import SyncConfig, WeightReceiver
from fsdp_sync.config import SECRET_ENV
from fsdp_sync.control import ControlPlane, done_key, push_key
from fsdp_sync.errors import ControlPlaneError
from recipes.jobs import free_port, spawn_context, start_job
from tests import wire_workers
from tests.commit_workers import _model
from tests.harness import check_cases, new_port, run_cases
from tests.sync_workers import Case

SECRET = "s3cret shared by both jobs"


@pytest.fixture(autouse=True)
def no_secret_in_the_environment(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)


def test_signed_pushes_land_bit_exact_over_shm_and_gloo():
    cases = [Case(name="signed-shm", model="llama", mesh=(2,), num_receivers=2, tp=2, quant="fp8_block",
                  mode="direct", port=new_port(), transport="shm", secret=SECRET),
             Case(name="signed-gloo", model="llama", mesh=(2,), num_receivers=2, tp=2, quant="none",
                  mode="reconstruct", port=new_port(), transport="gloo", secret=SECRET)]
    check_cases(run_cases(cases, num_senders=2, num_receivers=2), cases, 2)


def _values(recv: WeightReceiver) -> list[float]:
    return sorted({float(x) for t in recv.tensors.values() for x in t.float().reshape(-1)})


def test_forged_keys_commit_nothing_and_mismatched_secrets_fail_clearly():
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)

    def config(job: str, secret: str | None) -> SyncConfig:
        return SyncConfig(control=f"127.0.0.1:{port}", job=job, transport="shm", host_control=False,
                          timeout_s=10.0, secret=secret)

    trainer_configs = [config("forge", SECRET), config("trainer-signs", SECRET), config("engine-signs", None)]
    ctx = spawn_context()
    results, commands = ctx.Queue(), ctx.Queue()
    procs = start_job(ctx, wire_workers.trainer, 1, results, trainer_configs, commands, results)

    def push(version: int) -> str:
        commands.put(version)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                item = results.get(timeout=0.5)
            except queue.Empty:
                assert procs[0].exitcode is None, "the trainer died"
                continue
            if item[0] == "pushed":
                return item[3]
            raise AssertionError(f"trainer: {item}")
        raise TimeoutError(f"push {version} did not end")

    try:
        # 1. Both jobs signed; between two real pushes, forged and copied keys for push 2.
        recv = WeightReceiver(_model(), config=config("forge", SECRET))
        assert push(1) == "ok" and recv.wait_for(1, timeout=30) == 1 and _values(recv) == [1.0]
        fp, generation = recv._plan.fingerprint, recv._generation
        raw = dist.PrefixStore("fsdp_sync/forge/", store)
        forgers = [(ControlPlane(store, "forge", 5.0), "unsigned"),
                   (None, "signature does not match"),  # push 1's genuine go and done key, copied to push 2
                   (ControlPlane(store, "forge", 5.0, secret="a guess"), None)]  # same refusal: not re-reported
        for forger, why in forgers:
            if forger is None:
                raw.multi_set([push_key(2), done_key(2, 0)], raw.multi_get([push_key(1), done_key(1, 0)]))
            else:
                forger.set_many({push_key(2): ("go", 999, fp, generation, None, False), done_key(2, 0): True})
            if why:
                with pytest.raises(ControlPlaneError, match=f"forge/push/2 refused: .*{why}"):
                    recv.wait_for(2, timeout=10)  # wait_for() would return the landed version 1 at once
            else:
                time.sleep(0.3)
            assert (recv.version, recv.landed_version) == (1, 1) and _values(recv) == [1.0]
        assert push(2) == "ok", "the real push over forged keys"
        assert recv.wait_for(2, timeout=30) == 2 and _values(recv) == [2.0]
        commands.put("next")
        recv.close()

        # 2. The trainer signs, the engine does not; 3. the other way round.
        for job, engine_secret, trainer_says, engine_says in [
                ("trainer-signs", None, "unsigned, but this job has a secret", "signed, but this job has no secret"),
                ("engine-signs", SECRET, "signed, but this job has no secret", "unsigned, but this job has a secret")]:
            recv = WeightReceiver(_model(), config=config(job, engine_secret))
            started = time.monotonic()
            outcome = push(1)
            assert "ControlPlaneError" in outcome and trainer_says in outcome, outcome
            with pytest.raises(ControlPlaneError, match=f"{job}/push/1 refused: .*{engine_says}"):
                recv.wait_for(timeout=10)
            assert time.monotonic() - started < 9, "an error, not a timeout"
            assert recv.version is None
            commands.put("next")
            recv.close()
    finally:
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
