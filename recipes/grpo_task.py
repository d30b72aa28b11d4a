"""The verifiable task of the GRPO recipe: multi-digit addition, char-level, exact-match reward.

Operands are zero-padded to ``digits`` and the sum to ``digits + 1``, so every prompt
and every answer has one fixed length: batches need no padding, the engine needs no
attention mask and no stop token. Problems come from a seeded generator per step, so the trainer and every
engine replica agree on them without talking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHARS = "0123456789+="
VOCAB_SIZE = len(CHARS)


@dataclass(frozen=True)
class Addition:
    """``a+b=`` with ``digits``-digit operands; the answer is ``a + b`` in ``digits + 1`` digits."""

    digits: int

    @property
    def prompt_len(self) -> int:
        return 2 * self.digits + 2

    @property
    def answer_len(self) -> int:
        return self.digits + 1

    def problems(self, num: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``num`` random operand pairs, as two int64 tensors."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, 10**self.digits, (2, num), generator=gen).unbind(0)

    def prompts(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _encode([f"{x:0{self.digits}d}+{y:0{self.digits}d}=" for x, y in zip(a.tolist(), b.tolist())])

    def answers(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The target completions: what the reward asks for, and the warm-up's labels."""
        return _encode([f"{x + y:0{self.answer_len}d}" for x, y in zip(a.tolist(), b.tolist())])

    def rewards(self, completions: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """1.0 where the completion is exactly the answer, else 0.0."""
        return (completions == self.answers(a, b)).all(dim=1).float()


def _encode(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[CHARS.index(c) for c in t] for t in texts], dtype=torch.long)


def decode(ids: torch.Tensor) -> str:
    """One sequence as text, for logs."""
    return "".join(CHARS[i] for i in ids.tolist())
