"""recipes.master: fp32 masters accumulate updates that bf16 weights alone would lose."""

import torch
from torch import nn

from recipes.master import fp32_master


def test_small_steps_accumulate_in_the_masters_and_round_into_the_weights():
    torch.manual_seed(0)
    model = nn.Linear(64, 64).to(torch.bfloat16)
    plain = nn.Linear(64, 64).to(torch.bfloat16)
    plain.load_state_dict(model.state_dict())
    start = model.weight.detach().clone()
    master, bare = fp32_master(model, torch.optim.SGD, lr=1e-5), torch.optim.SGD(plain.parameters(), lr=1e-5)
    for _ in range(200):
        for m, opt in ((model, master), (plain, bare)):
            m.weight.grad = torch.ones_like(m.weight)
            m.bias.grad = torch.ones_like(m.bias)
            opt.step()
            opt.zero_grad()
    masters = master.param_groups[0]["params"]
    assert torch.equal(model.weight, masters[0].to(torch.bfloat16))  # the weights are the rounded masters
    assert model.weight.grad is None  # taken by the step, as zero_grad would
    moved, lost = ((w != start).float().mean().item() for w in (model.weight, plain.weight))
    assert moved > 0.9 and lost < 0.2, (moved, lost)  # bf16 alone swallows 1e-5 steps but near zero
