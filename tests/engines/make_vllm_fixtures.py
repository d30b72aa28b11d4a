"""Golden fixtures from real vLLM: every parameter one rank holds after ``load_weights``.

Run with vLLM 0.33.0 in its own venv (never the project's), on CPU, from the repo root::

    VLLM_TARGET_DEVICE=cpu /work/vllm-venv/bin/python tests/engines/make_vllm_fixtures.py [case ...]

For each case of ``vllm_cases.CASES`` and each (TP, EP) of ``vllm_cases.runs``, one gloo
process per TP rank builds vLLM's own model class from a tiny ``config.json``, loads the
checkpoint-named tensors of ``vllm_cases.fill`` through ``model.load_weights`` and records
every parameter's name, shape, dtype and sha256 after vLLM's
``process_weights_after_loading`` (which derives MLA's ``W_UK_T``/``W_UV``), and as loaded
where that differs; per layer, which MoE backend it chose and which post-processing steps
the CPU could not run (the CPU MoE prepack op is not in the CUDA wheel, and no FP8 MoE
kernel exists on CPU: those layers keep their loaded weights). FP8 cases
get FP8 checkpoint tensors exactly where vLLM built an FP8 parameter, quantized by
fsdp_sync's reference quantizer (what a push writes); every other tensor stays bf16.
Fixtures are JSON in ``tests/engines/fixtures``; ``tests/test_vllm_fixtures.py`` compares
fsdp_sync's ``vllm`` layout with them.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from tests.engines.vllm_cases import (CASES, FILL_RECIPE, VLLM_VERSION, describe, hf_tensors, run_key,  # noqa: E402
                                      runs)

FIXTURES = ROOT / "tests" / "engines" / "fixtures"
FP8 = torch.float8_e4m3fn


def checkpoint_module(name: str, cfg: dict) -> str:
    """The vLLM module an HF tensor loads into (its fused module where vLLM fuses)."""
    stem = name.rsplit(".", 1)[0]
    fused = {".gate_proj": ".gate_up_proj", ".up_proj": ".gate_up_proj"}
    if not cfg["model_type"].startswith("deepseek"):  # MLA keeps its own q_proj
        fused |= {".q_proj": ".qkv_proj", ".k_proj": ".qkv_proj", ".v_proj": ".qkv_proj"}
    for old, new in fused.items():
        if stem.endswith(old):
            return stem[: -len(old)] + new
    if cfg.get("q_lora_rank") and stem.endswith((".q_a_proj", ".kv_a_proj_with_mqa")):
        return stem.rsplit(".", 1)[0] + ".fused_qkv_a_proj"
    if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        return name.rsplit(".", 1)[0]
    return stem


def checkpoint(cfg: dict, fp8_modules: set[str], *, salt: str = "") -> list[tuple[str, torch.Tensor]]:
    """The tensors an HF checkpoint of these weights holds: experts one by one (as on disk),
    FP8 with ``weight_scale_inv`` exactly where vLLM built an FP8 module; ``salt`` as in
    ``vllm_cases.fill`` (another version of the weights)."""
    from fsdp_sync.quant import reference_quantize

    out = []

    def emit(name: str, t: torch.Tensor, quantize: bool) -> None:
        if quantize:
            q, s = reference_quantize(t, "fp8_block")
            out.extend([(name, q), (name + "_scale_inv", s)])
        else:
            out.append((name, t))

    for name, t in hf_tensors(cfg, salt=salt).items():
        module = checkpoint_module(name, cfg)
        quantize = t.dim() >= 2 and any(m == module or m.startswith(module + ".") for m in fp8_modules)
        if name.endswith(".experts.gate_up_proj"):
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                emit(f"{module}.{e}.gate_proj.weight", t[e, :inter].contiguous(), quantize)
                emit(f"{module}.{e}.up_proj.weight", t[e, inter:].contiguous(), quantize)
        elif name.endswith(".experts.down_proj"):
            for e in range(t.shape[0]):
                emit(f"{module}.{e}.down_proj.weight", t[e].contiguous(), quantize)
        else:
            emit(name, t, quantize)
    return out


def derived(model) -> dict[str, list]:
    """What vLLM computes from weights after loading and keeps outside ``named_parameters``."""
    out = {}
    for prefix, module in model.named_modules():
        for attr in ("W_UK_T", "W_UV"):
            t = getattr(module, attr, None)
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                out[f"{prefix}.{attr}"] = describe(t)
    return out


def moe_backends(model) -> dict[str, str]:
    """Which MoE kernel each routed-experts layer chose (the backend enum on its quant method)."""
    out = {}
    for prefix, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        for value in vars(method).values() if method is not None else ():
            if isinstance(value, enum.Enum) and type(value).__name__.endswith("MoeBackend"):
                out[prefix] = f"{type(method).__name__}:{type(value).__name__}.{value.name}"
    return out


def post_process(model, model_config) -> dict[str, str]:
    """vLLM's ``process_weights_after_loading`` module by module, so that one step the CPU
    cannot run (the CPU MoE prepack op is missing from the CUDA wheel) is recorded, by
    module, instead of skipping the rest (MLA's derived tensors come last)."""
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    errors = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, QuantizeMethodBase):
            try:
                method.process_weights_after_loading(module)
            except Exception as e:  # noqa: BLE001 - recorded in the fixture
                errors[name] = f"{type(e).__name__}: {e}"
    for name, module in model.named_modules():
        if is_deferred_attention_layer(module):
            try:
                module.process_weights_after_loading(model_config.dtype)
            except Exception as e:  # noqa: BLE001
                errors[name] = f"{type(e).__name__}: {e}"
    return errors


def offer_triton_block_fp8_on_cpu() -> None:
    """Let block-FP8 linears be built on CPU: the CUDA wheel has no CPU FP8 op (and the
    CPU kernels want AMX), so offer vLLM's Triton block kernel. Its weight
    post-processing is plain torch; no matmul ever runs here."""
    from vllm.model_executor.kernels import linear
    from vllm.model_executor.kernels.linear.scaled_mm.triton import TritonFp8BlockScaledMMKernel
    from vllm.platforms import PlatformEnum

    class OfferedOnCpu(TritonFp8BlockScaledMMKernel):
        @classmethod
        def is_supported(cls, compute_capability=None):
            return True, None

    linear._POSSIBLE_FP8_BLOCK_KERNELS[PlatformEnum.CPU].insert(0, OfferedOnCpu)


def adapter_check(model, vllm_config, case: str, *, rank: int, tp: int, ep: bool, placement: str) -> dict:
    """fsdp_sync's vLLM adapter on the real model (``--adapter``, the live tier): what it
    registers, what its MoE guard says, and MLA's derived tensors after a push of new
    weights (``salt="v2"``) into the registered tensors and the adapter's re-derivation."""
    from fsdp_sync.engines import check_block_fp8, live_tensors
    from fsdp_sync.engines.vllm_moe import moe_backends as chosen
    from fsdp_sync.engines.vllm_moe import refuse_relaying_moe_backends
    from fsdp_sync.engines.vllm_worker import _rederive_mla, engine_layout_kwargs
    from tests.engines.vllm_cases import pushed

    live = live_tensors(model)
    out: dict = {"registered": sorted(live), "moe_guard": None,
                 "layout_kwargs": engine_layout_kwargs(vllm_config, model)}
    check_block_fp8(live)
    try:
        refuse_relaying_moe_backends(chosen(model))
    except ValueError as e:
        out["moe_guard"] = str(e)
    if CASES[case][0]["model_type"].startswith("deepseek"):
        dests = pushed(case, tp_rank=rank, tp_size=tp, ep=ep, dtypes={n: t.dtype for n, t in live.items()},
                       placement=placement, salt="v2")
        for name, t in dests.items():
            live[name].copy_(t)
        _rederive_mla(model, torch.bfloat16)
        out["after_push"] = {n: describe(p) for n, p in model.named_parameters() if n.endswith(("W_UK_T", "W_UV"))}
    return out


def record(rank: int, tp: int, port: int, jobs: list[tuple[str, bool, str]], scratch: str, adapter: bool) -> None:
    from vllm.config import DeviceConfig, ModelConfig, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import destroy_model_parallel
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    offer_triton_block_fp8_on_cpu()
    first = True
    for case, ep, placement in jobs:
        cfg = CASES[case][0]
        folder = Path(scratch) / case
        model_config = ModelConfig(model=str(folder), skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16")
        vllm_config = VllmConfig(model_config=model_config, device_config=DeviceConfig("cpu"),
                                 parallel_config=ParallelConfig(tensor_parallel_size=tp, enable_expert_parallel=ep,
                                                                expert_placement_strategy=placement))
        # The MoE config must be current when the groups are made, or no EP group exists.
        with set_current_vllm_config(vllm_config):
            if first:
                init_distributed_environment(world_size=tp, rank=rank, local_rank=rank, backend="gloo",
                                             distributed_init_method=f"tcp://127.0.0.1:{port}")
                first = False
            initialize_model_parallel(tp)
            with set_default_torch_dtype(model_config.dtype), torch.device("cpu"):
                model = initialize_model(vllm_config=vllm_config)
            fp8_modules = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.dtype == FP8}
            model.load_weights(checkpoint(cfg, fp8_modules))
            loaded = {n: describe(p) for n, p in model.named_parameters()}
            errors = post_process(model, model_config)
            processed = {n: describe(p) for n, p in model.named_parameters()}
            processed.update(derived(model))
            out = dict(loaded=loaded, processed=processed, processed_errors=errors, moe_backends=moe_backends(model))
            if adapter:
                out["adapter"] = adapter_check(model, vllm_config, case, rank=rank, tp=tp, ep=ep, placement=placement)
            Path(scratch, f"{case}.{run_key(tp, ep, placement)}.rank{rank}.json").write_text(json.dumps(out))
            del model
            destroy_model_parallel()


def compact(record: dict) -> dict:
    """Keep ``loaded`` only where post-processing changed or dropped a parameter: the rest
    equals ``processed``, and the fixtures stay small."""
    if "loaded" not in record:
        return record
    processed = record["processed"]
    out = {k: v for k, v in record.items() if k != "loaded"}
    out["loaded_differs"] = {n: v for n, v in record["loaded"].items() if processed.get(n) != v}
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cases", nargs="*", default=list(CASES))
    ap.add_argument("--tp", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--out", type=Path, default=FIXTURES, help="where to write (default: the committed fixtures)")
    ap.add_argument("--adapter", action="store_true", help="also run fsdp_sync's adapter on each model")
    args = ap.parse_args()
    import vllm

    assert vllm.__version__ == VLLM_VERSION, f"fixtures are for vLLM {VLLM_VERSION}, found {vllm.__version__}"
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for case in args.cases:
            (Path(scratch) / case).mkdir()
            (Path(scratch) / case / "config.json").write_text(json.dumps(CASES[case][0]))
        for tp in args.tp:
            jobs = [(case, ep, placement) for case in args.cases for t, ep, placement in runs(case) if t == tp]
            if not jobs:
                continue
            start = time.perf_counter()
            mp.spawn(record, args=(tp, _free_port(), jobs, scratch, args.adapter), nprocs=tp, join=True)
            print(f"tp {tp}: {len(jobs)} runs in {time.perf_counter() - start:.0f} s", flush=True)
        for case in args.cases:
            path = args.out / f"{case}.json"
            fixture = json.loads(path.read_text()) if path.exists() else {}
            fixture.update(vllm=VLLM_VERSION, torch=torch.__version__, recipe=FILL_RECIPE, config=CASES[case][0])
            fixture.setdefault("runs", {})
            for tp, ep, placement in runs(case):
                if tp not in args.tp:
                    continue
                key = run_key(tp, ep, placement)
                ranks = [compact(json.loads(Path(scratch, f"{case}.{key}.rank{r}.json").read_text())) for r in range(tp)]
                fixture["runs"][key] = dict(tp=tp, ep=ep, placement=placement, ranks=ranks)
            path.write_text(json.dumps(fixture, indent=1, sort_keys=True) + "\n")
            print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
