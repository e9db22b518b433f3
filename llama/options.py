"""What a request asks for: sampling, lengths, stop strings; checked in one place."""

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from llama.sampling import Sampler
from llama.streaming import validate_stop


@dataclass(frozen=True)
class Options:
    """One request's options. The defaults are the reference's (and leave its RNG use as is):
    top_k, repetition_penalty, stop and seed are off."""

    temperature: float = 0.6
    top_p: float = 0.9
    max_gen_len: Optional[int] = None  # None: max_seq_len - 1, as the reference
    logprobs: bool = False
    echo: bool = False
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1.0: off
    stop: Tuple[str, ...] = field(default=())  # generation ends before the first of these
    seed: Optional[int] = None  # None: torch's global RNG, as the reference

    def __post_init__(self):
        number = (int, float)
        if not isinstance(self.temperature, number) or isinstance(self.temperature, bool) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, number) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 turns it off), got {self.top_k!r}")
        if (not isinstance(self.repetition_penalty, number) or isinstance(self.repetition_penalty, bool)
                or self.repetition_penalty <= 0):
            raise ValueError(f"repetition_penalty must be > 0 (1.0 turns it off), got {self.repetition_penalty!r}")
        if self.max_gen_len is not None and (not isinstance(self.max_gen_len, int) or isinstance(self.max_gen_len, bool)
                                             or self.max_gen_len < 0):
            raise ValueError(f"max_gen_len must be an int >= 0, got {self.max_gen_len!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -2**63 <= self.seed < 2**64):
            raise ValueError(f"seed must be an int in [-2**63, 2**64) or None, got {self.seed!r}")
        object.__setattr__(self, "stop", tuple(validate_stop(self.stop)))

    def gen_len(self, max_seq_len: int) -> int:
        """max_gen_len, or the reference's default of max_seq_len - 1."""
        return max_seq_len - 1 if self.max_gen_len is None else self.max_gen_len

    def sampler(self, device: torch.device) -> Sampler:
        """The next-token choice these options ask for (its own RNG when seeded)."""
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=device).manual_seed(self.seed)
        return Sampler(self.temperature, self.top_p, self.top_k, self.repetition_penalty, generator)
