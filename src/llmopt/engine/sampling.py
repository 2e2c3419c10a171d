"""Next-token choice from logits: greedy, or temperature sampling with top-k and top-p (nucleus), seeded.

``Sampler(temperature=0)`` is greedy (argmax). Otherwise logits are divided by the temperature, restricted to
the ``top_k`` largest and to the smallest set whose probability reaches ``top_p``, and sampled with a
``torch.Generator`` seeded by ``seed``, so a run is reproducible.
"""

from __future__ import annotations

import torch

from llmopt.errors import LlmoptError


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = 0):
        if temperature < 0:
            raise LlmoptError(f"sampling: temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise LlmoptError(f"sampling: top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise LlmoptError(f"sampling: top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution sampled from, ``[B, vocab]`` float32 (after temperature, top-k, top-p)."""
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            drop = cum - torch.softmax(sorted_logits, dim=-1) >= self.top_p  # keep tokens until the mass reaches p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        return torch.softmax(logits, dim=-1)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B]`` for logits ``[B, vocab]``."""
        if self.greedy:
            return logits.argmax(dim=-1)
        return torch.multinomial(self.probs(logits), 1, generator=self.generator).squeeze(-1)
