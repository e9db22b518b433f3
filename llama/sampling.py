"""Next-token choice: small pure functions over logits, and the Sampler that combines them."""

from dataclasses import dataclass
from typing import Optional

import torch


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling: (bs, vocab) probabilities -> (bs, 1) token ids.

    Keeps the most likely tokens whose preceding cumulative mass is at most p,
    renormalises them and draws one.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort.masked_fill_(mask, 0.0)  # (the reference's probs_sort[mask] = 0.0, without a host sync)
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def keep_top_k(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Zeroes all but the k most likely tokens of each row and renormalises."""
    kth = torch.topk(probs, min(k, probs.shape[-1]), dim=-1).values[:, -1:]
    probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    return probs / probs.sum(dim=-1, keepdim=True)


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divides positive logits (multiplies negative ones) by `penalty` for every token id in
    `history` (bs, n), the usual definition (CTRL, Keskar et al. 2019)."""
    scores = torch.gather(logits, 1, history)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(1, history, scores)


@dataclass
class Sampler:
    """How the next token is chosen (values checked by `llama.options.Options`). The defaults
    of top_k, repetition_penalty and generator are off, leaving exactly the reference's
    computation (and RNG use)."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1.0: off
    generator: Optional[torch.Generator] = None  # None: torch's global RNG, as the reference

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """Last-position logits (bs, vocab) and the tokens so far (bs, n) -> next ids (bs,)."""
        if self.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, history, self.repetition_penalty)
        if self.temperature > 0:
            probs = torch.softmax(logits / self.temperature, dim=-1)
            if self.top_k > 0:
                probs = keep_top_k(probs, self.top_k)
            return sample_top_p(probs, self.top_p, self.generator).reshape(-1)
        return torch.argmax(logits, dim=-1).reshape(-1)
