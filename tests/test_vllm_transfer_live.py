"""fsdp_sync as vLLM 0.33's weight-transfer backend, live: real vLLM models on CPU receive a
real FSDP2 push through vLLM's own config, factories and worker update calls.

Run in vLLM's own venv (the project venv never has vLLM)::

    /work/vllm-venv/bin/python -m pytest -m vllm tests/test_vllm_transfer_live.py

A TP 2 inference job (vLLM's gloo groups) and a 2-rank FSDP2 trainer job (gloo) run every
case in one spawn each (``tests/engines/vllm_transfer_jobs.py`` says how). Each case
pushes two versions; after each, every parameter of each worker's model equals what
vLLM's own ``load_weights`` and post-processing make of that version's HF tensors. One
case takes the worker-extension path instead (``collective_rpc`` of its methods).
"""

from __future__ import annotations

import json
import queue
import time

import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

from recipes.jobs import free_port, spawn_context, start_job  # noqa: E402
from tests.engines.vllm_cases import CASES, VLLM_VERSION  # noqa: E402
from tests.engines.vllm_transfer_jobs import TransferCase, engine, trainer  # noqa: E402
from tests.timeouts import scaled  # noqa: E402

TP = 2
NUM_TRAINERS = 2


def _cases() -> list[TransferCase]:
    # DeepSeek-V3 with every layer dense: MLA (whose W_UK_T/W_UV vLLM derives) without MoE,
    # whose post-processing no CPU backend runs (the MoE case below is refused instead).
    dense = dict(first_k_dense_replace=CASES["deepseek-v3"][0]["num_hidden_layers"])
    return [
        TransferCase("qwen3", CASES["qwen3"][0], "none", free_port()),
        TransferCase("deepseek-v3-dense", dict(CASES["deepseek-v3"][0], **dense), "none", free_port()),
        TransferCase("qwen3-fp8", CASES["qwen3-fp8"][0], "fp8_block", free_port()),
        TransferCase("deepseek-v3-dense-fp8", dict(CASES["deepseek-v3-fp8"][0], **dense), "fp8_block", free_port()),
        # The same push through the worker extension (collective_rpc), for vLLM without the API.
        TransferCase("deepseek-v3-dense-fp8-extension", dict(CASES["deepseek-v3-fp8"][0], **dense), "fp8_block",
                     free_port(), path="extension"),
        # On CPU every MoE layer picks a backend that re-lays w13/w2: the init call refuses it.
        TransferCase("qwen3-moe", CASES["qwen3-moe"][0], "none", free_port(), refused="model.layers.0.mlp.experts"),
    ]


CASE_LIST = _cases()


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    assert vllm.__version__ == VLLM_VERSION
    scratch = tmp_path_factory.mktemp("vllm-transfer")
    for case in CASE_LIST:
        (scratch / case.name).mkdir()
        (scratch / case.name / "config.json").write_text(json.dumps(case.config))
    ctx = spawn_context()
    commands, replies, results = [ctx.Queue() for _ in range(TP)], ctx.Queue(), ctx.Queue()
    start = time.perf_counter()
    port = free_port()
    procs = [ctx.Process(target=engine, args=(r, TP, port, CASE_LIST, str(scratch), commands, replies, results,
                                                   scaled(600)),
                         daemon=True) for r in range(TP)]
    for p in procs:
        p.start()
    procs += start_job(ctx, trainer, NUM_TRAINERS, results, CASE_LIST, commands, replies, results, scaled(300))
    out: dict = {}
    finished = 0
    deadline = time.monotonic() + scaled(900)
    try:
        while finished < len(procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs did not finish; got {sorted(map(str, out))}")
            try:
                item = results.get(timeout=1.0)
            except queue.Empty:
                if all(p.exitcode is not None for p in procs):
                    break
                continue
            if len(item) == 4:  # a process's last word: ("engine" | "trainer", rank, "ok" | "error", detail)
                finished += 1
                if item[2] == "error":  # the other job would wait for it: stop both now
                    raise RuntimeError(f"{item[0]} rank {item[1]} failed:\n{item[3]}")
                continue
            side, rank, case, key, value = item
            out[(side, rank, case, key)] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    print(f"\nvLLM {vllm.__version__}: {len(CASE_LIST)} cases, TP {TP} <- {NUM_TRAINERS} FSDP2 ranks, "
          f"{time.perf_counter() - start:.0f} s")
    return out


@pytest.mark.parametrize("case", [c for c in CASE_LIST if c.refused is None], ids=lambda c: c.name)
def test_push_through_vllm_weight_transfer_matches_vllm_load_weights(reports, case):
    native = case.path == "native"
    for rank in range(NUM_TRAINERS):
        assert reports[("trainer", rank, case.name, "engine")] == (
            "FsdpSyncTrainerWeightTransferEngine" if native else "FsdpSyncWorkerExtension")
    for rank in range(TP):  # vLLM's factory built fsdp_sync's engine from weight_transfer_config
        assert reports[("engine", rank, case.name, "backend")] == (
            "FsdpSyncWeightTransferEngine" if native else "NoneType")
    for version in range(1, len(case.salts) + 1):
        for rank in range(NUM_TRAINERS):
            assert reports[("trainer", rank, case.name, version)] == version
        for rank in range(TP):
            got = reports[("engine", rank, case.name, version)]
            assert got["compared"] > 0 and got["differ"] == [], (rank, version, got)


@pytest.mark.parametrize("case", [c for c in CASE_LIST if c.refused], ids=lambda c: c.name)
def test_refused_at_init_on_every_trainer_rank(reports, case):
    for rank in range(NUM_TRAINERS):
        message = reports[("trainer", rank, case.name, "init")]
        assert case.refused in message and "re-lays expert weights" in message, message
