"""The reference's decode loop over a static batch, behind any decoder.

Prompts are right-padded; one forward pass covers the shortest prompt, then one token
at a time, positions still inside a longer prompt keeping the prompt's token. Outputs are
cut at max_gen_len, at EOS and, when asked, before a stop string.
"""

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from llama.options import Options
from llama.sampling import Sampler
from llama.streaming import TextStream, find_stop
from llama.tokenizer import Tokenizer


def check_prompts(prompt_tokens, max_gen_len: int, n_words: int, max_batch_size: int, max_seq_len: int) -> None:
    """Raises ValueError naming the problem with a batch of tokenized prompts."""
    if not isinstance(prompt_tokens, (list, tuple)) or len(prompt_tokens) == 0:
        raise ValueError("no prompts given: pass a non-empty list of prompts")
    if len(prompt_tokens) > max_batch_size:
        raise ValueError(
            f"{len(prompt_tokens)} prompts but max_batch_size is {max_batch_size}: "
            f"pass at most {max_batch_size} per call, or build with a larger max_batch_size"
        )
    for i, t in enumerate(prompt_tokens):
        if not isinstance(t, (list, tuple)) or len(t) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < n_words for x in t):
            raise ValueError(f"prompt {i} holds values that are not token ids in [0, {n_words})")
        if len(t) > max_seq_len:
            raise ValueError(
                f"prompt {i} is {len(t)} tokens, longer than max_seq_len={max_seq_len}: "
                "shorten it, or build with a larger max_seq_len"
            )
    if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 0:
        raise ValueError(f"max_gen_len must be an int >= 0, got {max_gen_len!r}")


@dataclass
class Batch:
    """One generate call's state, shared by the decode loop and whoever reads it."""

    prompts: List[List[int]]
    max_gen_len: int
    tokens: torch.Tensor  # (bs, total_len), prompts right-padded with pad_id
    input_text_mask: torch.Tensor  # (bs, total_len) True where a prompt token stands
    eos_reached: torch.Tensor  # (bs,)
    token_logprobs: Optional[torch.Tensor]  # (bs, total_len) or None
    min_prompt_len: int
    total_len: int
    streams: List[Optional[TextStream]] = field(default_factory=list)  # per row, when stop strings are asked for
    row_ended: List[bool] = field(default_factory=list)  # per row: EOS seen (the stream is fed no more)


def start(prompts: List[List[int]], max_gen_len: int, max_seq_len: int, tokenizer: Tokenizer,
          device: torch.device, logprobs: bool, stops: Sequence[str] = ()) -> Batch:
    bsz = len(prompts)
    min_prompt_len = min(len(t) for t in prompts)
    max_prompt_len = max(len(t) for t in prompts)
    total_len = min(max_seq_len, max_gen_len + max_prompt_len)
    pad_id = tokenizer.pad_id
    tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long, device=device)
    for k, t in enumerate(prompts):
        tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
    return Batch(
        prompts=[list(p) for p in prompts], max_gen_len=max_gen_len, tokens=tokens,
        input_text_mask=tokens != pad_id,
        eos_reached=torch.zeros(bsz, dtype=torch.bool, device=device),
        token_logprobs=torch.zeros_like(tokens, dtype=torch.float) if logprobs else None,
        min_prompt_len=min_prompt_len, total_len=total_len,
        streams=[TextStream(tokenizer, stops) for _ in prompts] if stops else [],
        row_ended=[False] * bsz,
    )


def _logprobs(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> torch.Tensor:
    # logits (bs, seqlen, vocab) predict targets (bs, seqlen)
    return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=pad_id)


def steps(b: Batch, decoder, sampler: Sampler, tokenizer: Tokenizer) -> Iterator[int]:
    """The reference's decode loop; yields each position once its token is in `b.tokens`."""
    prev_pos = 0
    all_logits = b.token_logprobs is not None
    pad_id, eos_id = tokenizer.pad_id, tokenizer.eos_id
    if b.min_prompt_len == b.total_len and all_logits:
        # Nothing to generate: score the prompts in one pass (position 0, BOS, keeps 0).
        logits = decoder(b.tokens, 0, True)
        b.token_logprobs[:, 1:] = _logprobs(logits[:, :-1], b.tokens[:, 1:], pad_id)

    sync_every = decoder.sync_every
    for step, cur_pos in enumerate(range(b.min_prompt_len, b.total_len), start=1):
        logits = decoder(b.tokens[:, prev_pos:cur_pos], prev_pos, all_logits)
        token = sampler(logits[:, -1], b.tokens[:, :cur_pos])
        # positions still inside a longer prompt keep the prompt's token
        token = torch.where(b.input_text_mask[:, cur_pos], b.tokens[:, cur_pos], token)
        b.tokens[:, cur_pos] = token
        if b.token_logprobs is not None:
            b.token_logprobs[:, prev_pos + 1 : cur_pos + 1] = _logprobs(logits, b.tokens[:, prev_pos + 1 : cur_pos + 1],
                                                                        pad_id)
        b.eos_reached |= (~b.input_text_mask[:, cur_pos]) & (token == eos_id)
        for i, stream in enumerate(b.streams):  # host syncs, only when stop strings are asked for
            n_prompt = len(b.prompts[i])
            if stream.stopped or b.row_ended[i] or not n_prompt <= cur_pos < n_prompt + b.max_gen_len:
                continue
            tok = int(b.tokens[i, cur_pos])
            if tok == eos_id:
                b.row_ended[i] = True
                continue
            stream.add(tok)
            if stream.stopped:
                b.eos_reached[i] = True
        prev_pos = cur_pos
        yield cur_pos
        if step % sync_every == 0 and bool(b.eos_reached.all()):  # a host sync: not every step on GPU
            break


def outputs(b: Batch, tokenizer: Tokenizer, echo: bool) -> Tuple[List[str], List[List[int]], Optional[List[List[float]]]]:
    """(texts, tokens, logprobs) per prompt: cut at max_gen_len and EOS, and before a stop string
    (then the tokens, and their logprobs, whose text lies wholly before it)."""
    out_tokens, out_logprobs, texts = [], [], []
    all_logprobs = b.token_logprobs.tolist() if b.token_logprobs is not None else None
    for i, toks in enumerate(b.tokens.tolist()):
        n_prompt = len(b.prompts[i])
        start = 0 if echo else n_prompt
        end = n_prompt + b.max_gen_len
        toks = toks[start:end]
        probs = all_logprobs[i][start:end] if all_logprobs is not None else None
        # cut at EOS, or where decoding stopped early (a stop string): positions never filled
        ends = [toks.index(t) for t in (tokenizer.eos_id, tokenizer.pad_id) if t in toks]
        if ends:
            toks = toks[: min(ends)]
            probs = probs[: min(ends)] if probs is not None else None
        text = tokenizer.decode(toks)
        stream = b.streams[i] if b.streams else None
        if stream is not None:
            stream.finish()
        if stream is not None and stream.stopped:
            keep = (n_prompt if echo else 0) + stream.tokens_before_stop()
            if echo:
                base = len(tokenizer.decode(toks[:n_prompt]))
                cut = find_stop(text, stream.stops, base)
                text = text[:cut] if cut is not None else text
            else:
                text = stream.text
            toks = toks[:keep]
            probs = probs[:keep] if probs is not None else None
        texts.append(text)
        out_tokens.append(toks)
        out_logprobs.append(probs)
    return texts, out_tokens, (out_logprobs if all_logprobs is not None else None)


def run(decoder, tokenizer: Tokenizer, prompts, options: Options, max_seq_len: int, max_batch_size: int,
        device: torch.device):
    """Decodes a batch of tokenized prompts with `options`; returns `outputs`."""
    max_gen_len = options.gen_len(max_seq_len)
    check_prompts(prompts, max_gen_len, tokenizer.n_words, max_batch_size, max_seq_len)
    batch = start(prompts, max_gen_len, max_seq_len, tokenizer, device, options.logprobs, options.stop)
    for _ in steps(batch, decoder, options.sampler(device), tokenizer):
        pass
    return outputs(batch, tokenizer, options.echo)


def stream(decoder, tokenizer: Tokenizer, prompt: List[int], options: Options, max_seq_len: int,
           device: torch.device) -> Iterator[str]:
    """Text pieces of one prompt's generation as it is decoded (see `TextStream`); the pieces
    join to what `run` returns as its text."""
    batch = start([prompt], options.gen_len(max_seq_len), max_seq_len, tokenizer, device, False)
    text = TextStream(tokenizer, options.stop)
    decode = steps(batch, decoder, options.sampler(device), tokenizer)
    while True:
        with torch.inference_mode():  # only while computing, not while the caller holds a piece
            cur_pos = next(decode, None)
            token = None if cur_pos is None else int(batch.tokens[0, cur_pos])
        if token is None or token == tokenizer.eos_id:
            break
        piece = text.add(token)
        if piece:
            yield piece
        if text.stopped:
            break
    rest = text.finish()
    if rest:
        yield rest
