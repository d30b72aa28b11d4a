"""fsdp_sync's ``vllm`` layout against real vLLM 0.33.0: every parameter, every rank.

``tests/engines/make_vllm_fixtures.py`` ran vLLM's own model classes on CPU (gloo, TP
1/2/4, with and without EP), loaded the tensors of ``vllm_cases.fill`` through vLLM's
``load_weights``, post-processed them where the CPU allows, and recorded each rank's
parameters (name, shape, dtype, sha256 of the bytes). Here, without vLLM, the same
HF-named tensors go through the layout (``expected_destinations``, which fills what a
push writes) and must give the same names, shapes, dtypes and bytes for every tensor the
vLLM adapter registers. The ``vllm``-marked tier redoes the comparison live.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import torch

from fsdp_sync.destinations import expected_destinations
from fsdp_sync.engines import registered_name
from fsdp_sync.meta import LayoutSpec
from tests.engines.vllm_cases import (CASES, VLLM_VERSION, describe, hf_params, hf_tensors, layout_spec, mla_absorbed,
                                      pushed, run_key, runs)

FIXTURES = Path(__file__).parent / "engines" / "fixtures"
CASE_RUNS = [(case, tp, ep, placement) for case in CASES for tp, ep, placement in runs(case)]


def run_id(v) -> str:
    return v if isinstance(v, str) else (f"tp{v}" if isinstance(v, int) and not isinstance(v, bool) else
                                         ("ep" if v else "noep"))


def recorded_ranks(case: str, tp: int, ep: bool, placement: str) -> list[dict]:
    return fixture(case)["runs"][run_key(tp, ep, placement)]["ranks"]


@functools.cache
def fixture(case: str) -> dict:
    return json.loads((FIXTURES / f"{case}.json").read_text())


def engine_view(params: dict[str, list]) -> dict[str, list]:
    """What the adapter registers of a rank's recorded parameters."""
    return {n: v for n, v in params.items() if registered_name(n)}


@functools.cache
def trainer(case: str) -> dict[str, torch.Tensor]:
    return hf_tensors(CASES[case][0])


@functools.cache
def _pushed(case: str, tp_rank: int, tp_size: int, ep: bool, placement: str, dtypes: tuple) -> dict[str, torch.Tensor]:
    return pushed(case, tp_rank=tp_rank, tp_size=tp_size, ep=ep, placement=placement, dtypes=dict(dtypes))


def pushed_into(case: str, *, tp_rank: int, tp_size: int, ep: bool, placement: str = "linear",
                engine: dict[str, list]) -> dict[str, torch.Tensor]:
    dtypes = tuple(sorted((n, getattr(torch, d)) for n, (_, d, _) in engine.items()))
    return _pushed(case, tp_rank, tp_size, ep, placement, dtypes)


def layout_view(case: str, *, tp_rank: int, tp_size: int, ep: bool, placement: str = "linear",
                engine: dict[str, list]) -> dict[str, list]:
    dests = pushed_into(case, tp_rank=tp_rank, tp_size=tp_size, ep=ep, placement=placement, engine=engine)
    return {n: describe(t) for n, t in dests.items()}


def differences(want: dict[str, list], got: dict[str, list]) -> list[str]:
    out = [f"{n}: vLLM has it, the layout does not" for n in sorted(set(want) - set(got))]
    out += [f"{n}: the layout has it, vLLM does not" for n in sorted(set(got) - set(want))]
    for n in sorted(set(want) & set(got)):
        (ws, wd, wh), (gs, gd, gh) = want[n], got[n]
        if (ws, wd) != (gs, gd):
            out.append(f"{n}: vLLM {wd}{ws}, layout {gd}{gs}")
        elif wh != gh:
            out.append(f"{n}: bytes differ")
    return out


@pytest.mark.parametrize("case,tp,ep,placement", CASE_RUNS, ids=run_id)
def test_layout_matches_vllm(case, tp, ep, placement):
    bad = []
    for rank, recorded in enumerate(recorded_ranks(case, tp, ep, placement)):
        engine = engine_view(recorded["processed"])
        got = layout_view(case, tp_rank=rank, tp_size=tp, ep=ep, placement=placement, engine=engine)
        bad += [f"rank {rank}: {d}" for d in differences(engine, got)]
    assert not bad, f"{case} tp {tp} ep {ep} {placement}:\n  " + "\n  ".join(bad)


def test_fixtures_are_for_this_recipe():
    from tests.engines.vllm_cases import FILL_RECIPE

    for case in CASES:
        f = fixture(case)
        assert (f["vllm"], f["recipe"], f["config"]) == (VLLM_VERSION, FILL_RECIPE, CASES[case][0]), case
        assert {k: (r["tp"], r["ep"], r["placement"]) for k, r in f["runs"].items()} == {
            run_key(*r): r for r in runs(case)}, case


@pytest.mark.parametrize("case", list(CASES))
def test_hf_params_restate_transformers(case):
    """The recipe's names and shapes are the trainer's: transformers >= 5 on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(CASES[case][0])
    cfg.pop("quantization_config", None)  # the trainer is bf16
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    trainer = {n: tuple(p.shape) for n, p in model.named_parameters()}
    trainer |= {n: tuple(b.shape) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    assert {n: s for n, (s, _) in hf_params(CASES[case][0]).items()} == trainer


# --- what vLLM derives after loading ---------------------------------------------------------

MLA_RUNS = [r for r in CASE_RUNS if CASES[r[0]][0]["model_type"].startswith("deepseek")]


@pytest.mark.parametrize("case,tp,ep,placement", MLA_RUNS, ids=run_id)
def test_mla_derived_tensors_follow_the_pushed_kv_b_proj(case, tp, ep, placement):
    """The adapter does not register W_UK_T/W_UV; at commit it re-runs vLLM's derivation on the
    pushed kv_b_proj. Here: that derivation, applied to what a push leaves, gives vLLM's bytes."""
    cfg = CASES[case][0]
    for rank, recorded in enumerate(recorded_ranks(case, tp, ep, placement)):
        engine = recorded["processed"]
        assert not [n for n in engine if n.endswith(("W_UK_T", "W_UV")) and registered_name(n)]
        dests = pushed_into(case, tp_rank=rank, tp_size=tp, ep=ep, placement=placement, engine=engine_view(engine))
        for i in range(cfg["num_hidden_layers"]):
            a = f"model.layers.{i}.self_attn."
            kv_b = dests[a + "kv_b_proj.weight"]
            w_uk_t, w_uv = mla_absorbed(kv_b, dests.get(a + "kv_b_proj.weight_scale_inv"), cfg)
            assert describe(w_uk_t) == engine[a + "mla_attn.mla_attn.W_UK_T"], (rank, i)
            assert describe(w_uv) == engine[a + "mla_attn.mla_attn.W_UV"], (rank, i)


def test_moe_backend_guard_reads_each_layers_choice():
    """vLLM on CPU chose its CPU prepack (unquantized) and no FP8 MoE kernel: both refused by
    layer; a layout-keeping Triton layer passes, FlashInfer's silent half-swap does not."""
    from fsdp_sync.engines.vllm_moe import refuse_relaying_moe_backends

    for case in CASES:
        for run in fixture(case)["runs"].values():
            for recorded in run["ranks"]:
                chosen = {layer: tuple(v.split(":")[1].split(".")) for layer, v in recorded["moe_backends"].items()}
                assert bool(chosen) == (case in MOE_CASES), case
                for layer, (kind, name) in chosen.items():
                    with pytest.raises(ValueError, match=re.escape(f"{layer}: {kind}.{name}")):
                        refuse_relaying_moe_backends({layer: (kind, name)})
    refuse_relaying_moe_backends({"model.layers.1.mlp.experts.routed_experts": ("UnquantizedMoeBackend", "TRITON"),
                                  "model.layers.2.mlp.experts.routed_experts": ("Fp8MoeBackend", "DEEPGEMM")})
    with pytest.raises(ValueError, match=r"layers\.3\.mlp\.experts\.routed_experts: UnquantizedMoeBackend\."
                                         r"FLASHINFER_CUTLASS"):
        refuse_relaying_moe_backends({"model.layers.3.mlp.experts.routed_experts":
                                      ("UnquantizedMoeBackend", "FLASHINFER_CUTLASS")})


MOE_CASES = {case for case, (_, _, moe) in CASES.items() if moe}


def test_old_expert_names_miss_vllm_033():
    """The fixture case the routed_experts fix answers: names for vLLM before 0.33 are refused."""
    case, tp, ep = "qwen3-moe", 2, True
    engine = engine_view(fixture(case)["runs"]["tp2-ep"]["ranks"][0]["processed"])
    spec = layout_spec(case, tp_rank=0, tp_size=tp, ep=ep)
    old = LayoutSpec("vllm", spec.kwargs | {"vllm_version": "0.32.1"})
    dests = expected_destinations(trainer(case), layout=old)
    assert "model.layers.0.mlp.experts.w13_weight" in dests
    assert "model.layers.0.mlp.experts.routed_experts.w13_weight" in engine
