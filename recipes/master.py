"""fp32 master weights for a bf16 FSDP2 model: the optimizer steps fp32 copies of the shards.

RL trainers keep bf16 parameters for forward and backward and fp32 masters in the
optimizer, so lr-sized updates accumulate instead of vanishing in bf16 rounding; only
when a master crosses a bf16 rounding boundary does the pushed weight change. That is
what makes a delta push sparse, and what the delta benchmarks must reproduce.
"""

from __future__ import annotations

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def fp32_master(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], **kwargs) -> torch.optim.Optimizer:
    """An optimizer over fp32 copies of ``model``'s local shards.

    Its step first takes the model's gradients (then drops them, as ``zero_grad`` would) and
    afterwards rounds the masters into the model's shards in place. The hooks are registered
    here, before a ``WeightSender.attach`` adds its own, so an attached push reads the rounded
    weights.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    shards = [_local(p) for p in params]
    masters = [s.detach().float().clone() for s in shards]
    optimizer = optimizer_cls(masters, **kwargs)

    def grads_in(_opt, _args, _kwargs) -> None:
        for p, m in zip(params, masters):
            m.grad = None if p.grad is None else _local(p.grad).float()
            p.grad = None

    @torch.no_grad()
    def weights_out(_opt, _args, _kwargs) -> None:
        for s, m in zip(shards, masters):
            s.copy_(m)

    optimizer.register_step_pre_hook(grads_in)
    optimizer.register_step_post_hook(weights_out)
    return optimizer
