"""The fixture comparison, live: real vLLM 0.33.0 on CPU, recorded now, against the layout.

Run in vLLM's own venv (the project venv never has vLLM)::

    /work/vllm-venv/bin/python -m pytest -m vllm tests/test_vllm_live.py

One run of ``tests/engines/make_vllm_fixtures.py --adapter`` records every case at every
TP/EP into a temporary folder (minutes: vLLM is imported once per TP size, every rank a
gloo process), also running fsdp_sync's adapter on each real model. The tests then check
the fresh records against the layout, against the committed fixtures, and the adapter:
what it registers, its MoE guard, and MLA's derived tensors after a push.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

from tests.engines.vllm_cases import (CASES, VLLM_VERSION, describe, layout_spec, mla_absorbed, pushed,  # noqa: E402
                                      run_key, runs)
from tests.test_vllm_fixtures import (CASE_RUNS, differences, engine_view, layout_view, recorded_ranks,  # noqa: E402
                                      run_id)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Path:
    assert vllm.__version__ == VLLM_VERSION
    out = tmp_path_factory.mktemp("vllm-live")
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "tests/engines/make_vllm_fixtures.py"), "--adapter", "--out", str(out)],
                   check=True, cwd=ROOT, env=dict(os.environ, VLLM_TARGET_DEVICE="cpu"))
    print(f"\nrecorded {len(CASE_RUNS)} case x TP/EP runs with vLLM {vllm.__version__} in "
          f"{time.perf_counter() - start:.0f} s")
    return out


def ranks(live: Path, case: str, tp: int, ep: bool, placement: str) -> list[dict]:
    return json.loads((live / f"{case}.json").read_text())["runs"][run_key(tp, ep, placement)]["ranks"]


@pytest.mark.parametrize("case,tp,ep,placement", CASE_RUNS, ids=run_id)
def test_live_vllm_matches_layout_and_fixtures(live, case, tp, ep, placement):
    committed = recorded_ranks(case, tp, ep, placement)
    for rank, recorded in enumerate(ranks(live, case, tp, ep, placement)):
        engine = engine_view(recorded["processed"])
        got = layout_view(case, tp_rank=rank, tp_size=tp, ep=ep, placement=placement, engine=engine)
        assert not differences(engine, got), (rank, differences(engine, got))
        assert recorded["processed"] == committed[rank]["processed"], rank  # the fixtures are current
        adapter = recorded["adapter"]
        assert adapter["registered"] == sorted(engine), rank  # the adapter registers what the test compares
        # ... and reads from the running engine the keywords the comparison used
        assert adapter["layout_kwargs"] == layout_spec(case, tp_rank=rank, tp_size=tp, ep=ep,
                                                       placement=placement).kwargs | dict(
            dp_rank=0, dp_size=1, vocab_padding=64), rank
        if recorded["moe_backends"]:  # on CPU: the CPU prepack / no FP8 kernel, refused by layer
            assert all(layer in adapter["moe_guard"] for layer in recorded["moe_backends"]), adapter["moe_guard"]
        else:
            assert adapter["moe_guard"] is None


@pytest.mark.parametrize("case,tp,ep,placement",
                         [r for r in CASE_RUNS if CASES[r[0]][0]["model_type"].startswith("deepseek")], ids=run_id)
def test_live_mla_rederived_after_a_push(live, case, tp, ep, placement):
    """New weights pushed into the registered tensors, then the adapter's commit-time
    re-derivation: W_UK_T/W_UV follow the new kv_b_proj (not stale, not refused)."""
    cfg = CASES[case][0]
    for rank, recorded in enumerate(ranks(live, case, tp, ep, placement)):
        after = recorded["adapter"]["after_push"]
        dtypes = {n: getattr(torch, d) for n, (_, d, _) in engine_view(recorded["processed"]).items()}
        dests = pushed(case, tp_rank=rank, tp_size=tp, ep=ep, placement=placement, dtypes=dtypes, salt="v2")
        for i in range(cfg["num_hidden_layers"]):
            a = f"model.layers.{i}.self_attn."
            w_uk_t, w_uv = mla_absorbed(dests[a + "kv_b_proj.weight"], dests.get(a + "kv_b_proj.weight_scale_inv"), cfg)
            assert after[a + "mla_attn.mla_attn.W_UK_T"] == describe(w_uk_t), (rank, i)
            assert after[a + "mla_attn.mla_attn.W_UV"] == describe(w_uv), (rank, i)
            assert after[a + "mla_attn.mla_attn.W_UK_T"] != recorded["processed"][a + "mla_attn.mla_attn.W_UK_T"]


def test_every_case_ran():
    assert {r[0] for r in CASE_RUNS} == set(CASES) and all(runs(c) for c in CASES)
