"""The products behind the fast path, timed at a model's shapes; optionally tunes the GEMV
launch configurations and keeps the best in the start-up cache (and prints them).

    python benchmarks/kernels.py [--model 7B] [--tune [gemv|qmm]] [--rows 1,8,32,64,2000] [--formats bf16,int8,int4]
                                 [--group 128]

Per weight shape of a layer (joined q/k/v, wo, joined w1/w3 gated, w2, output) and format
(bf16, int8, int4 in groups of --group): the GPU time of x (rows, K) @ W.T, with enough copies of
W cycled to defeat the L2 cache, replayed as a CUDA graph of many calls; µs per call and
the bandwidth it implies (bytes of weights, scales and zeros read / time), beside cuBLAS
on the bf16 weight.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import SHAPES, graph_time  # noqa: E402

from llama import cache, kernels, quant  # noqa: E402
from llama.config import ModelArgs  # noqa: E402
from llama.kernels import triton_kernels as T  # noqa: E402
from llama.kernels import tuning  # noqa: E402

QMM_CANDIDATES = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st)
                  for n, k, w, st in ((32, 128, 4, 3), (64, 128, 4, 3), (64, 128, 4, 4), (128, 128, 8, 3),
                                      (64, 64, 4, 4), (128, 64, 4, 3), (128, 128, 4, 3), (64, 256, 4, 3),
                                      (128, 64, 4, 4), (32, 256, 4, 3), (128, 256, 8, 3))]


def qmm_candidates(fmt: str, group: int):
    """int4: each configuration with the scales applied after each tile's product (FOLD, tiles
    within a group) and before it (tiles of several groups); int8 has no such choice."""
    if fmt != "int4":
        return QMM_CANDIDATES
    out = [dict(c, FOLD=False) for c in QMM_CANDIDATES]
    out += [dict(c, FOLD=True) for c in QMM_CANDIDATES if c["BLOCK_K"] <= group]
    return out


CANDIDATES = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=1)
              for n, k, w in ((4, 1024, 4), (8, 512, 4), (8, 1024, 4), (16, 512, 4), (16, 1024, 8), (8, 2048, 8),
                              (32, 256, 4), (4, 2048, 4), (16, 1024, 4), (32, 512, 4), (32, 1024, 8), (4, 4096, 4),
                              (8, 4096, 8), (8, 4096, 4))]


def shapes(args: ModelArgs):
    hd = args.head_dim
    q_kv = args.n_heads * hd + 2 * args.kv_heads * hd
    return {"wqkv": (q_kv, args.dim, False), "wo": (args.dim, args.n_heads * hd, False),
            "w13": (2 * args.ffn_hidden_dim, args.dim, True), "w2": (args.dim, args.ffn_hidden_dim, False),
            "output": (args.vocab_size, args.dim, False)}


def stored(fmt: str, n: int, k: int, copies: int, group: int = 128):
    out = []
    for _ in range(copies):
        w = torch.randn(n, k, device="cuda") * 0.02
        if fmt == "bf16":
            out.append((w.to(torch.bfloat16), None, None))
        else:
            s = quant.quantize_weight("weight", w, quant.Spec(fmt, group))
            out.append((s["weight"], s.get("weight_scale", s.get("weight_scales")), s.get("weight_zeros")))
    return out


def nbytes(ws) -> int:
    return sum(t.numel() * t.element_size() for t in ws[0] if t is not None)


def gemv_key(kind: str, n: int, k: int, gated: bool, group: int) -> str:
    return f"gemv/{kind}/{n // (2 if gated else 1)}x{k}/{int(gated)}" + tuning.group_key(kind, group)


def time_gemv(fmt, ws, k, gated, group, cfg=None):
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    kind = "float" if fmt == "bf16" else fmt
    if cfg is not None:
        tuning._tuned()[gemv_key(kind, ws[0][0].shape[0], k, gated, group)] = cfg
    return graph_time(lambda i: T.gemv(x, *ws[i % len(ws)], kind, gated, group), 50)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="7B", choices=list(SHAPES))
    p.add_argument("--rows", default="1,8,32,64,2000")
    p.add_argument("--tune", nargs="?", const="all", choices=["all", "gemv", "qmm"], default=None,
                   help="try each configuration of the GEMV, the several-row product (qmm) or both; keep the best "
                        "in the cache")
    p.add_argument("--formats", default="bf16,int8,int4")
    p.add_argument("--group", type=int, default=128, help="int4 group size (tuned configurations are kept per group)")
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    args = ModelArgs(**SHAPES[a.model], vocab_size=32000)
    rows = [int(r) for r in a.rows.split(",")]
    print(f"{torch.cuda.get_device_name()}, {a.model} shapes; µs per product (GB/s of weights read)")
    tuned = {}
    table = []
    for name, (n, k, gated) in shapes(args).items():
        copies = max(2, int(3e9 // (n * k * 2)))  # ~3 GB of bf16 weights cycled: far past the L2
        for fmt in a.formats.split(","):
            ws = stored(fmt, n, k, copies if fmt == "bf16" else max(2, copies), a.group)
            size = nbytes(ws)
            kind = "float" if fmt == "bf16" else fmt
            if a.tune in ("all", "gemv"):
                best = None
                cands = [c for c in CANDIDATES if not (fmt == "int4" and c["BLOCK_K"] < a.group)]
                x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
                with kernels.compiling_ahead():  # every candidate compiled side by side first
                    for cfg in cands:
                        tuning._tuned()[gemv_key(kind, n, k, gated, a.group)] = cfg
                        T.gemv(x1, *ws[0], kind, gated, a.group)
                for cfg in cands:
                    try:
                        t = time_gemv(fmt, ws, k, gated, a.group, cfg)
                    except Exception as e:  # a configuration the compiler refuses (registers, shared memory)
                        print(f"  {name} {fmt} {cfg}: {type(e).__name__}", flush=True)
                        continue
                    if best is None or t < best[0]:
                        best = (t, cfg)
                key = gemv_key(kind, n, k, gated, a.group)
                tuned[key] = tuning._tuned()[key] = best[1]
            if a.tune in ("all", "qmm") and fmt != "bf16":
                for m in (r for r in rows if 1 < r < kernels.QUANT_DEQUANT_ROWS):
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    key = tuning.qmm_key(fmt, m, n, k, a.group)
                    best = None
                    with kernels.compiling_ahead():
                        for cfg in qmm_candidates(fmt, a.group):
                            tuning._tuned()[key] = dict(cfg)
                            T.qmm(x, *ws[0], fmt, a.group)
                    for cfg in qmm_candidates(fmt, a.group):
                        tuning._tuned()[key] = dict(cfg)
                        try:
                            t = graph_time(lambda i: T.qmm(x, *ws[i % len(ws)], fmt, a.group), 20)
                        except Exception as e:  # a configuration the compiler refuses
                            print(f"  {name} {fmt} qmm {cfg}: {type(e).__name__}", flush=True)
                            continue
                        if best is None or t < best[0]:
                            best = (t, cfg)
                    tuned[key] = tuning._tuned()[key] = best[1]
            for m in rows:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                if fmt == "bf16":
                    if m == 1:
                        t = graph_time(lambda i: kernels.linear(x, ws[i % len(ws)][0], gated), 50)
                    else:
                        t = graph_time(lambda i: kernels.linear(x, ws[i % len(ws)][0], gated), 20)
                    ref = graph_time(lambda i: F.linear(x, ws[i % len(ws)][0]), 20 if m > 1 else 50)
                    table.append((name, fmt, m, t, size, ref))
                else:
                    t = graph_time(lambda i: kernels.quantized_linear(x, fmt, *ws[i % len(ws)], a.group, gated),
                                   20 if m > 1 else 50)
                    table.append((name, fmt, m, t, size, None))
                print(f"{name} {n}x{k} {fmt} rows {m}: {t * 1e6:.1f} µs ({size / t / 1e9:.0f} GB/s)"
                      + (f"; cuBLAS bf16 {table[-1][5] * 1e6:.1f} µs" if table[-1][5] else ""), flush=True)
            del ws
            torch.cuda.empty_cache()
    print("\n| layer | format | " + " | ".join(f"rows {m}" for m in rows) + " |")
    print("|---|---|" + "---|" * len(rows))
    for name in shapes(args):
        for fmt in a.formats.split(","):
            cells = []
            for (nm, f, m, t, size, ref) in table:
                if nm == name and f == fmt:
                    cell = f"{t * 1e6:.1f} µs ({size / t / 1e9:.0f} GB/s)"
                    if ref:
                        cell += f", cuBLAS {ref * 1e6:.1f}"
                    cells.append(cell)
            print(f"| {name} | {fmt} | " + " | ".join(cells) + " |")
    if tuned:
        old = cache.load_json("kernel-configs") or {}
        old.update(tuned)
        print("saved to", cache.save_json("kernel-configs", old))
        print("TUNED " + json.dumps(tuned))


if __name__ == "__main__":
    main()
