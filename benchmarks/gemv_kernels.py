"""Matrix-vector kernels, bf16 and weight-only quantized, timed at the 7B shapes.

    python benchmarks/gemv_kernels.py [--batch 1] [--kernels bf16,int8]

For each weight shape of a 7B layer (fused q/k/v, wo, fused w1/w3, w2, output) and each
candidate kernel (those whose names contain one of `--kernels`), the GPU time of x (batch, K) @ W.T, with enough copies of W cycled to
defeat the 50 MB L2 cache, timed as a CUDA graph of many calls. Prints µs per call and the
bandwidth it implies (bytes of weights and scales read / time). This is how the kernels
behind the fast path (`llama.gemv`) and `Llama.build(quantize=...)` were chosen.
"""

import argparse

import torch
import torch.nn.functional as F

from llama import gemv, quant

SHAPES = {"wqkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096), "w2": (4096, 11008), "output": (32000, 4096)}


def graph_time(fn, calls: int) -> float:
    """Seconds per call of `fn(i)` for i in range(calls), replayed as one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[2]


def candidates(w: torch.Tensor, full: bool):
    """name -> (weights object, fn(x, obj), bytes read per call)."""
    out = {}
    out["bf16 cuBLAS"] = (w, lambda x, t: F.linear(x, t), w.numel() * 2)
    mmbf = torch.compile(lambda x, t: F.linear(x, t), fullgraph=True)
    out["bf16 compiled"] = (w, lambda x, t: mmbf(x, t), w.numel() * 2)
    out["bf16 llama.gemv (Triton)"] = (w, lambda x, t: gemv.mm(x, t), w.numel() * 2)
    q, s = quant.quantize_int8(w)
    q8 = (q, s.to(w.dtype))
    out["int8 _weight_int8pack_mm"] = (q8, lambda x, q: torch._weight_int8pack_mm(x, q[0], q[1]), w.numel() + w.shape[0] * 2)
    mm8 = torch.compile(lambda x, qw, s: F.linear(x, qw.to(x.dtype)) * s, fullgraph=True)
    out["int8 llama.gemv (Triton)"] = (q8, lambda x, q: gemv.mm(x, q[0], q[1]), w.numel() + w.shape[0] * 2)
    out["int8 compiled dequant"] = (q8, lambda x, q: mm8(x, q[0], q[1]), w.numel() + w.shape[0] * 2)
    for group in (128, 64, 32) if full else (128,):
        packed4, scales, zeros = quant.quantize_int4(w, group)
        for tiles in (8, 4) if full else (8,):
            packed = torch._convert_weight_to_int4pack(packed4, tiles)
            sz = quant.tinygemm_scales(scales, zeros)
            nbytes = w.numel() // 2 + sz.numel() * 2
            out[f"int4 tinygemm g{group} k{tiles}"] = (
                (packed, sz, group), lambda x, p: torch._weight_int4pack_mm(x, p[0], p[2], p[1]), nbytes)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--coordinate_descent", type=int, default=1)
    p.add_argument("--full", action="store_true", help="also int4 groups of 64 and 32, and 4 k-tiles")
    p.add_argument("--kernels", default="", help="comma-separated parts of kernel names to time (default: all)")
    a = p.parse_args()
    torch._inductor.config.coordinate_descent_tuning = bool(a.coordinate_descent)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {a.batch}")
    print("| shape | kernel | µs | GB/s |")
    print("|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        w0 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(a.batch, k, device="cuda", dtype=torch.bfloat16)
        for kname, (obj, fn, nbytes) in candidates(w0, a.full).items():
            if a.kernels and not any(part in kname for part in a.kernels.split(",")):
                continue
            copies = max(2, (400 << 20) // nbytes + 1)
            objs = [obj] + [_clone(obj) for _ in range(copies - 1)]  # each call reads memory not in L2
            try:
                t = graph_time(lambda i, objs=objs: fn(x, objs[i % copies]), calls=4 * copies)
                print(f"| {name} {n}x{k} | {kname} | {t * 1e6:.1f} | {nbytes / t / 1e9:.0f} |", flush=True)
            except Exception as e:  # a kernel this torch build lacks
                print(f"| {name} {n}x{k} | {kname} | failed: {type(e).__name__}: {str(e)[:120]} | |", flush=True)
            del objs
            torch.cuda.empty_cache()


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    return tuple(_clone(o) if isinstance(o, torch.Tensor) else o for o in obj)


if __name__ == "__main__":
    main()
