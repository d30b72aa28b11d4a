"""The GRPO recipe end to end: a real FSDP2 trainer job, real staged receivers, rollouts tagged by version."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from recipes.grpo_loss import group_advantages
from recipes.grpo_task import Addition, decode
from tests.timeouts import scaled

ROOT = Path(__file__).resolve().parents[1]


def _grpo(tmp_path: Path, *overrides: str) -> tuple[list[dict], str]:
    command = [sys.executable, "-m", "recipes.grpo", "recipe=smoke", f"hydra.run.dir={tmp_path}",
               f"recipe.timeout_s={scaled(120)}", f"pipeline.timeout_s={scaled(60)}", *overrides]
    out = subprocess.run(command, capture_output=True, text=True, timeout=scaled(240), cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert (tmp_path / "grpo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return records, out.stdout


def test_on_policy_rollouts_carry_the_version_just_committed(tmp_path):
    records, stdout = _grpo(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        # Step t waited for push t-1; the engine committed it, then sampled every rollout of step t with it.
        assert r["push_version"] == r["step"] - 1
        assert r["version_min"] == r["version_max"] == r["step"] - 1, r
        # The trainer re-scores the rollouts with its own version t-1: the engine's log-probs match,
        # so the engine really computed with that version's weights.
        assert r["logp_gap"] < 1e-5, r
    assert sum(line.startswith("step ") for line in stdout.splitlines()) == 4
    assert "GRPO: 4 steps" in stdout


def test_one_step_off_policy_fp8_over_shm_with_two_engines(tmp_path):
    records, _ = _grpo(tmp_path, "recipe.max_staleness=1", "quant=fp8_block", "transport=shm", "topology=cpu_2x2",
                       "recipe.steps=5")
    versions = [r["version_min"] for r in records]
    assert versions == sorted(versions), "versions only go up"
    for r in records:
        assert max(0, r["step"] - 2) <= r["version_min"] <= r["version_max"] <= r["step"] - 1, r
        assert r["logp_gap"] > 0, "an FP8 engine is not bit-identical to the trainer"


def test_rewards_and_advantages():
    task = Addition(2)
    a, b = torch.tensor([7, 99]), torch.tensor([5, 1])
    assert [decode(p) for p in task.prompts(a, b)] == ["07+05=", "99+01="]
    right = task.answers(a, b)
    assert [decode(x) for x in right] == ["012", "100"]
    assert task.rewards(torch.stack([right[0], right[0]]), a, b).tolist() == [1.0, 0.0]
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)
    assert adv[2:].tolist() == [0.0, 0.0] and adv[0] > 0 > adv[1]
