"""Try the vLLM fixtures' ground-truth recipe with SGLang: build its own Qwen3 on CPU.

Run with SGLang in its own venv (never the project's), from the repo root::

    /work/sglang-venv/bin/python tests/engines/probe_sglang_cpu.py

Two ways a user would try, each reported with the exception that stops it:
``engine``: ``sgl.Engine(device="cpu")`` on a tiny Qwen3 checkpoint (``vllm_cases``'
recipe, written as safetensors), SGLang's default platform detection; ``model``: SGLang's
CPU backend (``SGLANG_USE_CPU_ENGINE=1``), its model loader called directly, no server.
With SGLang 0.5.23 on a CPU-only machine both fail (README, "SGLang on CPU").
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def checkpoint(folder: Path) -> None:
    from safetensors.torch import save_file

    from tests.engines.vllm_cases import CASES, hf_tensors

    cfg = CASES["qwen3"][0]
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in hf_tensors(cfg).items()}, str(folder / "model.safetensors"))


def engine(folder: str) -> None:
    import sglang as sgl

    sgl.Engine(model_path=folder, device="cpu", tp_size=1, skip_tokenizer_init=True, disable_cuda_graph=True,
               attention_backend="torch_native", log_level="error").shutdown()


def model(folder: str) -> None:
    from sglang.srt.runtime_context import get_context
    from sglang.srt.server_args import ServerArgs

    get_context().set_server_args(ServerArgs(model_path=folder, device="cpu", skip_tokenizer_init=True))
    from sglang.srt.configs.device_config import DeviceConfig
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
    from sglang.srt.model_loader import get_model

    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method="tcp://127.0.0.1:29731")
    initialize_model_parallel()
    get_model(model_config=ModelConfig(folder, dtype="bfloat16"), load_config=LoadConfig(),
              device_config=DeviceConfig("cpu"))


def main() -> None:
    if len(sys.argv) == 3:  # one attempt, in its own process
        {"engine": engine, "model": model}[sys.argv[1]](sys.argv[2])
        print("BUILT")
        return
    import sglang
    import torch

    print(f"sglang {sglang.__version__}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as folder:
        checkpoint(Path(folder))
        for attempt, env in (("engine", {}), ("model", {"SGLANG_USE_CPU_ENGINE": "1"})):
            start = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, attempt, folder], capture_output=True, text=True,
                                 env=dict(os.environ, **env), timeout=900)
            lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
            raised = [i for i, line in enumerate(lines) if re.match(r"[\w.]*(Error|Exception):", line)]
            verdict = "BUILT" if "BUILT" in out.stdout else f"rc {out.returncode}"
            if raised and verdict != "BUILT":  # the exception that ended it, and its message's next line
                verdict = " ".join(lines[raised[-1]:raised[-1] + 2])
            print(f"{attempt} {env or ''}: {verdict} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
