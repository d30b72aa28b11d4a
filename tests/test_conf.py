"""Every YAML under conf/ composes and becomes the library's dataclasses; overrides work as on the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra", reason="the Hydra configs need hydra-core (in '.[test]'; GPU machines may lack it)")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.errors import ConfigCompositionException, MissingConfigException  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from fsdp_sync import SyncConfig  # noqa: E402
from recipes.config_store import SYNC_GROUPS, GRPOJob, register_configs, to_job  # noqa: E402
from tests.timeouts import scaled  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUP_FILES = sorted(p for p in CONF.glob("*/*.yaml"))
PRIMARY_FILES = sorted(CONF.glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def _own_settings(path: Path) -> dict:
    values = OmegaConf.to_container(OmegaConf.load(path))
    values.pop("defaults")
    return values


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_group_file_composes_into_dataclasses(path):
    group = path.parent.name
    assert OmegaConf.load(path).defaults == ["base", "_self_"], "start from the group's schema, end with _self_"
    job = to_job(compose("grpo", overrides=[f"{group}={path.stem}"]))
    assert isinstance(job, GRPOJob) and isinstance(job.sync, SyncConfig)
    node = job.sync if group in SYNC_GROUPS else getattr(job, group)
    for key, value in _own_settings(path).items():
        got = getattr(node, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, f"{group}/{path.stem}: {key}"


@pytest.mark.parametrize("path", PRIMARY_FILES, ids=lambda p: p.stem)
def test_primary_file_composes_into_dataclasses(path):
    job = to_job(compose(path.stem))
    assert isinstance(job.sync, SyncConfig) and job.sync.job == "grpo"


def test_command_line_overrides():
    job = to_job(compose("grpo", overrides=["quant=fp8_block", "transport=shm", "mode=reconstruct", "model=tiny",
                                            "topology=cpu_2x2", "pipeline=tight", "sync.timeout_s=30",
                                            "sync.links.inter_host_gbps=50", "recipe.steps=3"]))
    assert (job.sync.quant, job.sync.transport, job.sync.mode) == ("fp8_block", "shm", "reconstruct")
    assert job.sync.watermark_mb == 1 and job.sync.timeout_s == 30 and job.sync.links.inter_host_gbps == 50
    assert job.topology.num_engines == 2 and job.recipe.steps == 3
    gpu = to_job(compose("grpo_gpu", overrides=["quant=fp8_block"]))
    assert (gpu.topology.device, gpu.model.dtype, gpu.sync.quant) == ("cuda", "bfloat16", "fp8_block")


def test_the_secret_defaults_to_none_and_takes_an_override():
    assert to_job(compose("grpo")).sync.secret is None  # None: FSDP_SYNC_SECRET, if set, signs
    assert to_job(compose("grpo", overrides=["sync.secret=hunter2"])).sync.secret == "hunter2"


@pytest.mark.parametrize("overrides, error", [
    (["quant=fp9"], MissingConfigException),
    (["recipe.no_such_field=1"], ConfigCompositionException),
    (["sync.watermark_mb=lots"], ConfigCompositionException),
])
def test_bad_overrides_fail_in_composition(overrides, error):
    with pytest.raises(error):
        compose("grpo", overrides=overrides)


@pytest.mark.parametrize("overrides, match", [
    (["sync.quant=fp9"], "SyncConfig.quant"),
    (["model.dtype=int8"], "ModelConfig.dtype"),
    (["recipe.prompts_per_step=3"], "prompts_per_step"),
])
def test_bad_values_fail_in_the_dataclasses(overrides, match):
    with pytest.raises(ValueError, match=match):
        to_job(compose("grpo", overrides=overrides))


def test_the_cli_takes_overrides():
    out = subprocess.run([sys.executable, "-m", "recipes.grpo", "--cfg", "job", "quant=fp8_block", "transport=shm",
                          "recipe.steps=7"], capture_output=True, text=True, timeout=scaled(120), cwd=CONF.parent)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert (cfg.sync.quant, cfg.sync.transport, cfg.recipe.steps) == ("fp8_block", "shm", 7)


def test_the_library_does_not_import_hydra():
    code = "import sys, fsdp_sync; sys.exit(any(m in sys.modules for m in ('hydra', 'omegaconf')))"
    assert subprocess.run([sys.executable, "-c", code], timeout=scaled(120)).returncode == 0
