"""Structured configs of the recipes: the library's dataclasses as Hydra schemas, plus the recipe's own.

The library never imports Hydra: its ``SyncConfig`` is registered here, as the type of
the ``sync`` node. The groups transport, quant, mode and pipeline each set a few of its
fields, and each group's base holds ``SyncConfig``'s defaults for them, so types and
defaults have one source. model, topology and recipe are the recipe's own dataclasses.
``conf/<group>/<name>.yaml`` starts from its group's ``base`` and ends with ``_self_``;
``to_job`` turns a composed config into plain dataclasses, which validate themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fsdp_sync import SyncConfig

if TYPE_CHECKING:
    from omegaconf import DictConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEVICES = ("cpu", "cuda")

# Which SyncConfig fields each group sets; every field not listed keeps SyncConfig's default.
SYNC_GROUPS: dict[str, tuple[str, ...]] = {
    "transport": ("transport",),
    "quant": ("quant", "quant_skip"),
    "mode": ("mode",),
    "pipeline": ("watermark_mb", "timeout_s", "wait_for_receivers", "trace_dir"),
}


@dataclass(kw_only=True)
class ModelConfig:
    """A Llama-style model that transformers builds from a config: no download."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    dtype: str = "float32"  # float32 | bfloat16: what the trainer holds and the engine computes in

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelConfig.dtype={self.dtype!r} is not one of {list(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(kw_only=True)
class TopologyConfig:
    """The two jobs: FSDP2 trainer ranks, and engine replicas that each hold the whole model."""

    num_trainers: int = 2
    num_engines: int = 1
    device: str = "cpu"  # cuda: trainer rank r on GPU r, engine e on GPU num_trainers + e (mod the GPU count)

    def __post_init__(self) -> None:
        if self.num_trainers < 1 or self.num_engines < 1:
            raise ValueError(f"TopologyConfig needs >= 1 trainer and >= 1 engine, "
                             f"got {self.num_trainers} and {self.num_engines}")
        if self.device not in DEVICES:
            raise ValueError(f"TopologyConfig.device={self.device!r} is not one of {list(DEVICES)}")


@dataclass(kw_only=True)
class GRPOConfig:
    """GRPO on multi-digit addition; a supervised warm-up first, so the reward starts above zero."""

    digits: int = 2
    steps: int = 150
    prompts_per_step: int = 32
    group_size: int = 8  # completions sampled per prompt (GRPO's G)
    lr: float = 5e-4
    lr_warmup_steps: int = 0  # GRPO steps over which lr rises linearly to ``lr`` (a fresh Adam's first
    # steps move every weight by about lr, whatever the gradient's size)
    clip_eps: float = 0.2
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    max_staleness: int = 1  # batch t is sampled with a version >= t-1-max_staleness (0: on-policy)
    warmup_steps: int = 200
    warmup_batch: int = 64
    warmup_lr: float = 1e-3
    seed: int = 0
    master_fp32: bool = False  # AdamW over fp32 masters of the (bf16) model's shards: see recipes.master
    out_dir: str | None = None  # default: Hydra's run directory
    timeout_s: float = 300.0  # longest wait for a rollout batch or a job message

    def __post_init__(self) -> None:
        for name in ("digits", "steps", "prompts_per_step", "group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"GRPOConfig.group_size must be >= 2 to normalize within a group, got {self.group_size}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"GRPOConfig.lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if self.max_staleness < 0:
            raise ValueError(f"GRPOConfig.max_staleness must be >= 0, got {self.max_staleness}")


@dataclass(kw_only=True)
class GRPOJob:
    """Everything ``python -m recipes.grpo`` runs with."""

    sync: SyncConfig = field(default_factory=SyncConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    recipe: GRPOConfig = field(default_factory=GRPOConfig)

    def __post_init__(self) -> None:
        groups = self.recipe.prompts_per_step
        for name in ("num_trainers", "num_engines"):
            if groups % getattr(self.topology, name):
                raise ValueError(f"recipe.prompts_per_step={groups} must divide by topology.{name}="
                                 f"{getattr(self.topology, name)}: each process takes whole groups")
        if self.recipe.warmup_batch % self.topology.num_trainers:
            raise ValueError(f"recipe.warmup_batch={self.recipe.warmup_batch} must divide by "
                             f"topology.num_trainers={self.topology.num_trainers}")


def sync_defaults(group: str) -> dict:
    """A sync group's base: ``SyncConfig``'s defaults of the fields it sets.

    Untyped on purpose: OmegaConf refuses to merge one dataclass into a node typed as
    another, and the ``sync: SyncConfig`` node these land in type-checks every value.
    """
    default = SyncConfig()
    return {name: getattr(default, name) for name in SYNC_GROUPS[group]}


def register_configs() -> None:
    """Store every schema: ``grpo_schema`` for the primary config, ``<group>/base`` per group."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="grpo_schema", node=GRPOJob)
    for group in SYNC_GROUPS:
        cs.store(group=group, name="base", node=sync_defaults(group), package="sync")
    cs.store(group="model", name="base", node=ModelConfig)
    cs.store(group="topology", name="base", node=TopologyConfig)
    cs.store(group="recipe", name="base", node=GRPOConfig)


def to_job(cfg: DictConfig) -> GRPOJob:
    """A composed config as plain dataclasses; each validates itself, so bad values fail here."""
    from omegaconf import OmegaConf

    job = OmegaConf.to_object(cfg)
    assert isinstance(job, GRPOJob), type(job)
    return job
