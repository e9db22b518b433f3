"""What quantization does to a model's answers, measured on a real (small) trained model.

    python benchmarks/quality.py --out /tmp/quality-model [--seconds 150] [--llama_quantize PATH]

No real Llama weights exist here, so this trains one: a Llama-architecture model (dim 512,
8 layers, 8 heads, the real 32000-piece tokenizer) on real text found on the machine (the
sources and docstrings of the Python standard library and installed packages, each file a
document ending in EOS), deterministic (seeded, files in sorted order), with 5% of the
files held out. It is saved in Meta's format under --out (outside the repository).

Then the held-out perplexity (512-token windows) of the same weights as bf16, int8, int4
with groups of 32, 64 and 128 (this library's formats), and, when `llama-quantize` is
given, llama.cpp's Q8_0 and Q4_K_M: the model written as an F16 GGUF with gguf-py,
quantized by llama-quantize, read back and dequantized with gguf-py, and evaluated by
this library's code. Last, greedy answers to a few prompts (sensible text, and whether
generation stops at EOS).
"""

import argparse
import hashlib
import math
import os
import subprocess
import sys
import sysconfig
import time
from multiprocessing import Pool
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import TOKENIZER  # noqa: E402

from llama import Llama, quant  # noqa: E402
from llama.checkpoint import save_checkpoint  # noqa: E402
from llama.config import ModelArgs  # noqa: E402
from llama.layout import QuantSpec, is_quantized_layer  # noqa: E402
from llama.model import Transformer  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

SEQ = 512
PARAMS = {"dim": 512, "n_layers": 8, "n_heads": 8, "multiple_of": 256, "norm_eps": 1e-5, "vocab_size": -1}
PROMPTS = ["def fibonacci(n):\n", '"""Return the number of', "import os\n\n\ndef main():\n",
           "class Stack:\n    \"\"\"A last-in, first-out",
           # the end of a file: a document ends in EOS there
           "def main():\n    print(\"hello\")\n\n\nif __name__ == \"__main__\":\n    main()\n"]
GEN = 64


def corpus_files(max_mb: float):
    """Python files of the standard library, then of site-packages, sorted, up to max_mb."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    out, total = [], 0
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if 200 < size < 200_000:
                out.append(str(path))
                total += size
                if total > max_mb * 1e6:
                    return out
    return out


def _encode(path: str):
    tok = _encode.tok
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    return tok.encode(text, bos=True, eos=True)


def _init(tokenizer_path):
    _encode.tok = Tokenizer(tokenizer_path)


def tokens_of(files, workers: int):
    with Pool(workers, initializer=_init, initargs=(TOKENIZER,)) as pool:
        parts = pool.map(_encode, files, chunksize=16)
    return torch.tensor([t for p in parts for t in p], dtype=torch.long)


def held_out(path: str) -> bool:
    return int(hashlib.md5(path.encode()).hexdigest(), 16) % 20 == 0


def windows(data: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - SEQ - 1, (n,), generator=gen)
    return torch.stack([data[s : s + SEQ + 1] for s in starts.tolist()])


def train(train_data: torch.Tensor, seconds: float, device: str) -> Transformer:
    torch.manual_seed(0)
    args = ModelArgs.from_params(PARAMS, vocab_size=32000, max_seq_len=SEQ, max_batch_size=1)
    with torch.device(device):
        model = Transformer(args)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=device == "cuda")
    gen = torch.Generator().manual_seed(0)
    t0, step = time.time(), 0
    while time.time() - t0 < seconds:
        lr = 1e-3 * min(1.0, (step + 1) / 200) * max(0.1, 1 - (time.time() - t0) / seconds)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = windows(train_data, 16, gen).to(device)
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model.score(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 200 == 0:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
        step += 1
    print(f"trained {step} steps of 16 x {SEQ} tokens in {time.time() - t0:.0f} s, last loss {loss.item():.3f}")
    return model


def min_max_int4(w: torch.Tensor, group: int) -> torch.Tensor:
    """The int4 format as it was before scales were fitted: each group's 16 levels span its
    min..max (bf16 scale and zero), dequantized."""
    g = w.float().reshape(w.shape[0], -1, group)
    lo, hi = g.amin(2, keepdim=True), g.amax(2, keepdim=True)
    s = ((hi - lo) / 15).clamp(min=1e-6).bfloat16().float()
    z = (lo + 8 * s).bfloat16().float()
    return ((torch.round((g - z) / s + 8).clamp(0, 15) - 8) * s + z).reshape(w.shape)


def dequantized_state(state: dict, spec: QuantSpec, min_max: bool = False) -> dict:
    """The linear weights of `state` through this library's quantizer (`spec`, or with
    `min_max` the former int4 format) and back to bf16: for rows that vary one choice."""
    out = {}
    for key, w in state.items():
        if not is_quantized_layer(key):
            continue
        layer = spec.for_key(key)
        if layer.mode == "int4" and min_max:
            out[key] = min_max_int4(w, layer.group).to(torch.bfloat16)
            continue
        stored = quant.quantize_weight(key, w, layer)
        base = key[: -len("weight")]
        if layer.mode == "int8":
            back = quant.dequantize_int8(stored[key], stored[base + "weight_scale"])
        else:
            back = quant.dequantize_int4(stored[key], stored[base + "weight_scales"], stored[base + "weight_zeros"])
        out[key] = back.to(torch.bfloat16)
    return out


@torch.inference_mode()
def perplexity(model, evals: torch.Tensor, device: str) -> float:
    nll, count = 0.0, 0
    for chunk in evals.split(8):
        chunk = chunk.to(device)
        logits = model.score(chunk[:, :-1])
        nll += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += chunk[:, 1:].numel()
    return math.exp(nll / count)


def gguf_weights(model_dir: Path, state: dict, args: ModelArgs, llama_quantize: str, work: Path) -> dict:
    """{'Q8_0': state, 'Q4_K_M': state}: the model through llama.cpp's quantizer and back."""
    import gguf
    import numpy as np

    names = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "output.weight": "output.weight"}
    per_layer = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
                 "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up",
                 "feed_forward.w2": "ffn_down", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
    for i in range(args.n_layers):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    f16 = work / "model-f16.gguf"
    w = gguf.GGUFWriter(str(f16), "llama")
    w.add_context_length(2048)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_rope_dimension_count(args.head_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_vocab_size(args.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    sp = Tokenizer(TOKENIZER).sp_model
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
    w.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    w.add_token_types([gguf.TokenType.CONTROL if sp.is_control(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                       else gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.NORMAL
                       for i in range(sp.vocab_size())])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for key, gname in names.items():
        t = state[key].float().cpu().numpy()  # Meta's q/k row order is llama.cpp's
        w.add_tensor(gname, t.astype(np.float32 if t.ndim == 1 else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = {}
    for qtype in ("Q8_0", "Q4_K_M"):
        path = work / f"model-{qtype}.gguf"
        subprocess.run([llama_quantize, str(f16), str(path), qtype], check=True, capture_output=True)
        reader = gguf.GGUFReader(str(path))
        back = {t.name: t for t in reader.tensors}
        qstate = {}
        kinds = {}
        for key, gname in names.items():
            t = back[gname]
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
            qstate[key] = torch.from_numpy(np.array(arr)).reshape(state[key].shape).to(torch.bfloat16)
            kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
        print(f"{qtype}: tensor types {kinds}, file {path.stat().st_size / 1e6:.1f} MB", flush=True)
        out[qtype] = qstate
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="where the trained model goes (Meta's format)")
    p.add_argument("--seconds", type=float, default=150)
    p.add_argument("--corpus_mb", type=float, default=60)
    p.add_argument("--eval_windows", type=int, default=400)
    p.add_argument("--llama_quantize", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    out = Path(a.out)
    if a.llama_quantize and not os.access(a.llama_quantize, os.X_OK):
        p.error(f"--llama_quantize {a.llama_quantize}: no such program")
    t0 = time.time()
    files = corpus_files(a.corpus_mb)
    train_files = [f for f in files if not held_out(f)]
    test_files = [f for f in files if held_out(f)]
    train_data = tokens_of(train_files, os.cpu_count() or 1)
    test_data = tokens_of(test_files, os.cpu_count() or 1)
    print(f"corpus: {len(files)} files, {len(train_data) / 1e6:.1f}M train / {len(test_data) / 1e6:.2f}M held-out "
          f"tokens ({time.time() - t0:.0f} s)", flush=True)
    if not (out / "params.json").exists():
        model = train(train_data, a.seconds, a.device)
        state = {k: v.to(torch.bfloat16).cpu() for k, v in model.state_dict().items()}
        save_checkpoint([state], PARAMS, out)
        del model
    evals = windows(test_data, a.eval_windows, torch.Generator().manual_seed(1))
    rows = []
    build = dict(max_seq_len=SEQ + 64, max_batch_size=8, device=a.device, dtype="bfloat16", fast=False)
    base = Llama.build(str(out), TOKENIZER, **build)
    rows.append(("bf16", perplexity(base.model, evals, a.device)))
    for fmt, mode, group in (("int8", "int8", 128), ("int4 g128 (fitted levels, int8 head)", "int4", 128),
                             ("int4 g64", "int4", 64),
                             ("int4 g32", "int4", 32)):
        q = Llama.build(str(out), TOKENIZER, quantize=mode, group_size=group, **build)
        rows.append((fmt, perplexity(q.model, evals, a.device)))
        del q
    state = {k: v for k, v in base.model.state_dict().items()}

    def dequantized_row(name, qstate):
        copy = Llama.build(str(out), TOKENIZER, **build)
        copy.model.load_state_dict({k: v.to(a.device) for k, v in qstate.items()}, strict=False)
        rows.append((name, perplexity(copy.model, evals, a.device)))
        print(f"{name}: {rows[-1][1]:.3f}", flush=True)

    # what each part of the int4 format does (dequantized into bf16 weights)
    for group in (128, 32):
        dequantized_row(f"int4 g{group}, min..max levels, int4 head (the former format)",
                        dequantized_state(state, QuantSpec("int4", group, "int4"), min_max=True))
        dequantized_row(f"int4 g{group}, fitted levels, int4 head",
                        dequantized_state(state, QuantSpec("int4", group, "int4")))
        dequantized_row(f"int4 g{group}, min..max levels, int8 head",
                        dequantized_state(state, QuantSpec("int4", group), min_max=True))
    dequantized_row("int4 g128 head only (the rest bf16)",
                    {k: v for k, v in dequantized_state(state, QuantSpec("int4", 128, "int4")).items()
                     if k == "output.weight"})
    if a.llama_quantize:
        for qtype, qstate in gguf_weights(out, state, base.model.params, a.llama_quantize, out).items():
            dequantized_row(f"llama.cpp {qtype}", qstate)
    ref = rows[0][1]
    print(f"\nheld-out perplexity, {len(evals)} windows of {SEQ} tokens ({len(test_files)} files never trained on)")
    print("| weights | perplexity | vs bf16 |")
    print("|---|---|---|")
    for name, ppl in rows:
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / ref - 1):+.2f}% |")
    print(f"\ngreedy answers (bf16 and int4 g128), up to {GEN} tokens:")
    int4 = Llama.build(str(out), TOKENIZER, quantize="int4", **dict(build, fast=None))
    for name, llama in (("bf16", base), ("int4", int4)):
        outs = llama.text_completion(PROMPTS, temperature=0, max_gen_len=GEN)
        tokens, _ = llama.generate([llama.tokenizer.encode(x, bos=True, eos=False) for x in PROMPTS], GEN, temperature=0)
        for prompt, o, t in zip(PROMPTS, outs, tokens):
            stopped = f"stopped at EOS after {len(t)} tokens" if len(t) < GEN else f"{GEN} tokens, no EOS"
            print(f"[{name}] {prompt!r} -> {o['generation']!r} ({stopped})")


if __name__ == "__main__":
    main()
