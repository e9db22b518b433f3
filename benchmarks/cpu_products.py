"""On a CPU: each product of a model's layers, per format and row count, by every path.

    python benchmarks/cpu_products.py [--shape 1B] [--threads 2] [--rows 1,4,16,64,512] [--layers wqkv,w13]

Paths: bf16 (torch's matmul on the bf16 weight), bf16gemv (one row: `llama.kernels.cpu_gemv`'s
compiled package; a first run has none and builds them as it ends, so run twice), int8pack (`_weight_int8pack_mm`),
int4pack (`_weight_int4pack_mm_for_cpu`, groups of 128), and the tiled dequantization of
`llama.kernels.cpu` (int8tile, int4tile). Milliseconds per product, best of a few, with
enough copies of each weight cycled that they do not fit in the caches (above 200 MB),
and the weight bandwidth it implies (GB/s of weights, scales and zeros read).
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama import quant  # noqa: E402
from llama.kernels import cpu, cpu_gemv  # noqa: E402

SHAPES = {"1B": dict(dim=2048, hidden=5632, heads=32, kv_heads=4, vocab=32000)}


def layers(s):
    hd = s["dim"] // s["heads"]
    return {"wqkv": (s["dim"] + 2 * s["kv_heads"] * hd, s["dim"]), "wo": (s["dim"], s["dim"]),
            "w13": (2 * s["hidden"], s["dim"]), "w2": (s["dim"], s["hidden"]), "output": (s["vocab"], s["dim"])}


def forms(n: int, k: int):
    w = torch.randn(n, k) * 0.02
    q8, s8 = quant.quantize_int8(w)
    p4, sc, z = quant.quantize_int4(w, 128)
    w4 = torch._convert_weight_to_int4pack_for_cpu(quant.unpack_int4(p4).int(), 1)
    sz = torch.stack([sc.t(), z.t()], dim=-1).bfloat16()
    return {"bf16": (w.bfloat16(),), "int8": (q8, s8.bfloat16()), "int4": (w4, sz)}


PATHS = {
    "bf16": ("bf16", lambda x, w: F.linear(x, w)),
    "bf16gemv": ("bf16", lambda x, w: cpu_gemv.gemv(x, w)),
    "int8pack": ("int8", lambda x, q, s: torch._weight_int8pack_mm(x, q, s)),
    "int8tile": ("int8", lambda x, q, s: cpu.int8_mm(x, q, s)),
    "int4pack": ("int4", lambda x, w, sz: torch._weight_int4pack_mm_for_cpu(x, w, 128, sz)),
    "int4tile": ("int4", lambda x, w, sz: cpu.int4pack_mm(x, w, 128, sz)),
}


def best_ms(fn, copies, reps: int) -> float:
    for c in copies[:2]:
        fn(c)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for c in copies:
            fn(c)
        best = min(best, (time.perf_counter() - t) / len(copies))
    return best * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1B", choices=list(SHAPES))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rows", default="1,4,16,64,512")
    p.add_argument("--layers", default="wqkv,wo,w13,w2,output")
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    shapes = layers(SHAPES[a.shape])
    print(f"{a.threads} threads, {a.shape} shape; ms per product (GB/s of weights read)")
    with torch.inference_mode():
        for name in a.layers.split(","):
            n, k = shapes[name]
            count = max(2, int(200e6 // (n * k * 2)))
            copies = [forms(n, k) for _ in range(count)]
            nbytes = {f: sum(t.numel() * t.element_size() for t in copies[0][f]) for f in copies[0]}
            for m in (int(r) for r in a.rows.split(",")):
                x = torch.randn(m, k, dtype=torch.bfloat16)
                cells = []
                for path in a.paths.split(","):
                    fmt, fn = PATHS[path]
                    if path == "int4tile" and cpu.int4pack_layout() != "known":
                        continue
                    if path == "bf16gemv":
                        cpu_gemv.prepare([copies[0]["bf16"][0]])
                        if m != 1 or not cpu_gemv.usable(x, copies[0]["bf16"][0]):
                            continue
                    ms = best_ms(lambda c: fn(x, *c[fmt]), copies, a.reps)
                    cells.append(f"{path} {ms:.3f} ({nbytes[fmt] / ms / 1e6:.1f})")
                print(f"{name} {n}x{k} rows {m}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
