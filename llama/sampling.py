"""Next-token choice: small pure functions over logits."""

import torch


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling: (bs, vocab) probabilities -> (bs, 1) token ids.

    Keeps the most likely tokens whose preceding cumulative mass is at most p,
    renormalises them and draws one.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1)
    return torch.gather(probs_idx, -1, next_token)


def next_token(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The reference's choice from last-position logits (bs, vocab) -> (bs,) ids."""
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return sample_top_p(probs, top_p).reshape(-1)
    return torch.argmax(logits, dim=-1).reshape(-1)
