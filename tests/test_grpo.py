"""The GRPO recipe end to end: a real FSDP2 trainer job, real staged receivers, rollouts tagged by version."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import torch

from recipes.grpo_loss import group_advantages
from recipes.grpo_task import Addition, decode
from tests.timeouts import scaled

ROOT = Path(__file__).resolve().parents[1]


def _grpo(tmp_path: Path, *overrides: str) -> tuple[list[dict], subprocess.CompletedProcess]:
    command = [sys.executable, "-m", "recipes.grpo", "recipe=smoke", f"hydra.run.dir={tmp_path}",
               f"recipe.timeout_s={scaled(120)}", f"sync.timeout_s={scaled(60)}", *overrides]
    out = subprocess.run(command, capture_output=True, text=True, timeout=scaled(240), cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert (tmp_path / "grpo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return records, out


def _messages(text: str) -> list[str]:
    """What the recipe logged, without Hydra's `[time][grpo][INFO] - ` prefix."""
    return [line.split("][grpo][INFO] - ", 1)[1] for line in text.splitlines() if "][grpo][INFO] - " in line]


def _png_text(path: Path) -> dict[str, str]:
    data, pos, text = path.read_bytes(), 8, {}
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"tEXt":
            key, _, value = data[pos + 8:pos + 8 + length].partition(b"\0")
            text[key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + length
    return text


def test_on_policy_rollouts_carry_the_version_just_committed(tmp_path):
    records, out = _grpo(tmp_path)
    stdout = "\n".join(_messages(out.stdout))
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
    # The run goes through logging, so Hydra's log file holds every line stdout got; the bar goes to stderr.
    assert _messages((tmp_path / "grpo.log").read_text()) == _messages(out.stdout)
    assert "GRPO: 100%" in out.stderr and "GRPO: 100%" not in out.stdout
    assert _png_text(tmp_path / "grpo.png")["Title"] == (
        "GRPO: model tiny (2 layers x 128, float32) | quant none | transport gloo | lr 0.0005 | 4 steps")


def test_one_step_off_policy_fp8_over_shm_with_two_engines_after_a_warm_up(tmp_path):
    records, out = _grpo(tmp_path, "recipe.max_staleness=1", "quant=fp8_block", "transport=shm", "topology=cpu_2x2",
                         "recipe.steps=5", "recipe.warmup_steps=3", "recipe.warmup_batch=8", "sync.delta=auto")
    # Delta pushes after the first (version 0, full), each on the version before; the JSONL says what moved.
    assert [r["delta_base"] for r in records] == [None, 0, 1, 2, 3]
    assert records[0]["push_bytes"] == records[0]["push_full_bytes"] > 0 and records[0]["changed_fraction"] == 1
    assert all(0 < r["push_bytes"] < r["push_full_bytes"] and r["changed_fraction"] < 1 for r in records[1:])
    # The warm-up has its own bar and lines, before the GRPO bar starts.
    assert "warm-up: 100%" in out.stderr and "3/3" in out.stderr
    assert out.stderr.index("warm-up: 100%") < out.stderr.index("GRPO:   0%")
    lines = _messages(out.stdout)
    assert [line.split(" |")[0] for line in lines if line.startswith("warm-up step")] == [
        f"warm-up step    {i}/3" for i in (1, 2, 3)]
    assert any(line.startswith("warm-up: 3 supervised steps") for line in lines)
    versions = [r["version_min"] for r in records]
    assert versions == sorted(versions), "versions only go up"
    for r in records:
        assert max(0, r["step"] - 2) <= r["version_min"] <= r["version_max"] <= r["step"] - 1, r
        assert r["logp_gap"] > 0, "an FP8 engine is not bit-identical to the trainer"


def _launch(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "recipes.grpo", *overrides], capture_output=True, text=True,
                          timeout=scaled(120), cwd=cwd, env=env)


def test_a_launch_that_fails_validation_leaves_no_run_dir(tmp_path):
    out = _launch(tmp_path, "recipe.group_size=1")
    assert out.returncode == 1
    assert "GRPOConfig.group_size must be >= 2" in out.stderr
    assert not list(tmp_path.iterdir()), "outputs/<date>/<time> is gone, and outputs/ with it"
    # A run dir the user named and already used keeps what was there.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    out = _launch(tmp_path, "hydra.run.dir=mine", "quant=fp8_block", "recipe.prompts_per_step=3")
    assert out.returncode == 1
    assert "prompts_per_step=3 must divide by topology.num_trainers=2" in out.stderr
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["mine", "mine/notes.txt"]


def test_rewards_and_advantages():
    task = Addition(2)
    a, b = torch.tensor([7, 99]), torch.tensor([5, 1])
    assert [decode(p) for p in task.prompts(a, b)] == ["07+05=", "99+01="]
    right = task.answers(a, b)
    assert [decode(x) for x in right] == ["012", "100"]
    assert task.rewards(torch.stack([right[0], right[0]]), a, b).tolist() == [1.0, 0.0]
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)
    assert adv[2:].tolist() == [0.0, 0.0] and adv[0] > 0 > adv[1]
