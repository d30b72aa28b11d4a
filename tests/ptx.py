"""Triton kernels compiled for sm_90 without a GPU, so CPU tests can check what a GPU would run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_COMPILE_FOR_SM90 = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ptx = []
for spec in json.loads(sys.argv[1]):
    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    signature = dict(spec["signature"], **{name: "constexpr" for name in spec["constants"]})
    aligned = [["tt.divisibility", 16]]  # what Triton's launcher makes of 16-aligned pointers
    source = ASTSource(kernel, signature, constexprs=spec["constants"], attrs={(i,): aligned for i in spec["aligned"]})
    options = {"num_warps": spec["num_warps"]}
    ptx.append(triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"])
print(json.dumps(ptx))
"""


def kernel_spec(module: str, kernel: str, signature: dict[str, str], constants: dict, *,
                aligned: tuple[int, ...] = (), num_warps: int = 4) -> dict:
    """One kernel variant: its runtime arguments' types, its constexprs, which pointer arguments
    (by position) are 16-byte aligned."""
    return {"module": module, "kernel": kernel, "signature": signature, "constants": constants,
            "aligned": list(aligned), "num_warps": num_warps}


def sm90_ptx(specs: list[dict]) -> list[str]:
    """The PTX of each variant, compiled for sm_90 in one subprocess, since the calling test
    module may run under the interpreter; skips where this machine cannot compile for sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90, json.dumps(specs)],
                         capture_output=True, text=True, env=env, timeout=600)
    if run.returncode != 0:
        pytest.skip(f"cannot compile for sm_90 here: {run.stderr.strip().splitlines()[-1:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])
