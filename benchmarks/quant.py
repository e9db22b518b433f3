"""bf16 vs int8 vs int4 weights: batch-1 decode speed, peak GPU memory and agreement.

    python benchmarks/quant.py [--models 7B,13B]

For each model shape and mode, in one run: random bf16 weights (the same seeded weights
for every mode) are made on the GPU one tensor at a time and, for int8/int4, quantized as
they come (as `Llama.build(quantize=...)` does while loading, so the bf16 model is never
whole on the GPU); then the fast path's compile warm-up, batch-1 decode tokens/s (prompt 16,
128 new tokens, greedy), its % of the bandwidth limit for that mode's bytes of weights, and
peak GPU memory (weights, 512-token KV cache, warm-up and the scoring pass below).
Agreement: the bf16 model's own 300-token greedy continuation is scored by every mode in
one pass; we report how often each mode's next-token argmax equals bf16's, and the mean KL
divergence of its next-token distribution from bf16's. Random weights give flat
distributions with many near-ties: a sanity check of the numerics, not a quality measure.
"""

import argparse
import json

import torch
import torch.nn.functional as F
from decode import SHAPES, copy_bandwidth, decode_rates, no_eos

from llama import Llama, ModelArgs, quant
from llama.checkpoint import expected_shapes
from llama.fast import FastDecoder
from llama.loading import empty_model
from llama.tokenizer import Tokenizer
from llama.tools.random_checkpoint import random_tensor

SCORE_LEN = 300


def build(args: ModelArgs, spec) -> torch.nn.Module:
    """Seeded random bf16 weights made tensor by tensor on the GPU, quantized as they come."""
    model = empty_model(args)
    if spec is not None:
        quant.quantize_modules(model, spec)
    gen = torch.Generator(device="cuda").manual_seed(0)
    state = {}
    for key, shape in expected_shapes(args).items():
        t = random_tensor(key, shape, gen, torch.bfloat16, "cuda")
        state.update(quant.quantize_weight(key, t, spec) if spec is not None and quant.is_quantized_layer(key) else {key: t})
        del t
    model.load_state_dict(state, assign=True)
    del state
    model.requires_grad_(False)
    model.reset_buffers(torch.device("cuda"), torch.bfloat16)
    return model


def weight_bytes(model) -> int:
    named = list(model.named_parameters()) + list(model.named_buffers())
    return sum(t.numel() * t.element_size() for k, t in named if "cache" not in k and "freqs" not in k)


def bench(args, spec, tokenizer, bandwidth, seq, ref_logits):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build(args, spec)
    decoder = FastDecoder(model)
    if spec is not None:
        quant.prepare(model, torch.bfloat16)
    nbytes = weight_bytes(model)
    llama = Llama(model, tokenizer, decoder)
    warm = decoder.warmup((1,))
    rate = decode_rates(llama, [1], 0.0)[1][0]
    if seq is None:  # the bf16 run: its own greedy continuation is what every mode scores
        out, _ = llama.generate([list(range(1000, 1016))], max_gen_len=SCORE_LEN - 16, temperature=0, echo=True)
        seq = torch.tensor(out, device="cuda")
    logits = decoder(seq, 0, True)[0, 15:-1].float()  # (positions, vocab): predictions of tokens 16..
    row = {"mode": spec.mode if spec else "bf16", "tok_s": rate, "weights_gb": nbytes / 1e9,
           "pct_of_limit": 100 * rate * nbytes / bandwidth, "warmup_s": warm,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    if ref_logits is not None:
        row["agreement"] = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        row["mean_kl"] = F.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True,
                                  reduction="none").sum(-1).mean().item()
    del llama, decoder, model
    return row, seq, logits


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="7B,13B")
    p.add_argument("--tokenizer", default="tests/fixtures/tokenizer.model")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    tokenizer = no_eos(Tokenizer(a.tokenizer))
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    results = []
    for name in a.models.split(","):
        args = ModelArgs(**SHAPES[name], vocab_size=tokenizer.n_words, max_seq_len=512, max_batch_size=1)
        group = quant.choose_group(args.dim, args.ffn_hidden_dim)
        seq = ref = None
        for spec in (None, quant.Spec("int8"), quant.Spec("int4", group)):
            row, seq, logits = bench(args, spec, tokenizer, bandwidth, seq, ref)
            ref = logits if ref is None else ref
            row["model"] = name
            results.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s; batch 1, prompt 16, 128 new tokens, greedy")
    print("| model | weights | GB of weights | decode tok/s | % of its bandwidth limit | peak GPU GiB | warm-up s "
          f"| agreement with bf16 ({SCORE_LEN - 16} positions) | mean KL vs bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        agree = f"{100 * r['agreement']:.1f}%" if "agreement" in r else "-"
        kl = f"{r['mean_kl']:.4f}" if "mean_kl" in r else "-"
        print(f"| {r['model']} | {r['mode']} | {r['weights_gb']:.2f} | {r['tok_s']:.0f} | {r['pct_of_limit']:.0f}% "
              f"| {r['peak_gib']:.2f} | {r['warmup_s']:.1f} | {agree} | {kl} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
