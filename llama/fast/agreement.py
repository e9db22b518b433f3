"""How often two decoders pick the same next token, fed the same tokens (teacher forcing)."""

import torch


@torch.inference_mode()
def greedy_agreement(decoder_a, decoder_b, tokens: torch.Tensor, prompt_len: int) -> float:
    """Fraction of positions prompt_len-1 .. len-2 of `tokens` (bs, len) where both decoders'
    argmax next token agrees; each decoder prefills the prompt, then decodes one token at a time.

    Comparing free-running generations would stop meaning anything after the first
    divergence; here both always see the same history.
    """
    same = total = 0
    picks = []
    for decoder in (decoder_a, decoder_b):
        out = [decoder(tokens[:, :prompt_len], 0, False)[:, -1].argmax(-1)]
        for pos in range(prompt_len, tokens.shape[1] - 1):
            out.append(decoder(tokens[:, pos : pos + 1], pos, False)[:, -1].argmax(-1))
        picks.append(torch.stack(out, dim=1))
    same = (picks[0] == picks[1]).sum().item()
    total = picks[0].numel()
    return same / total
