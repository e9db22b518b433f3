"""Weight-only int8 / int4 quantization: numerics, kernels, models, checkpoints, errors."""

import json

import pytest
import torch
import torch.nn.functional as F

from llama import ModelArgs, kernels, memory, quant
from llama.config import weight_bytes
from llama import checkpoint as ck
from llama.tools import check, quantize
from tests.conftest import TOKENIZER, torchrun
from tests.helpers import cli

INT4 = quant.Spec("int4", 32)


def test_int8_error_is_at_most_half_a_step():
    w = torch.randn(64, 96) * torch.rand(64, 1)
    q, scale = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    err = (quant.dequantize_int8(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()
    assert torch.equal(q.abs().amax(dim=1), torch.full((64,), 127, dtype=torch.int8))  # the full range is used


def _int4_round_to_nearest(w: torch.Tensor, group: int) -> torch.Tensor:
    """The plain int4 baseline: each group's 16 levels span its min..max (bf16 scale, zero)."""
    g = w.float().reshape(w.shape[0], -1, group)
    lo, hi = g.amin(2, keepdim=True), g.amax(2, keepdim=True)
    s = ((hi - lo) / 15).clamp(min=1e-6).bfloat16().float()
    z = (lo + 8 * s).bfloat16().float()
    return ((torch.round((g - z) / s + 8).clamp(0, 15) - 8) * s + z).reshape(w.shape)


def test_int4_rounds_to_the_nearest_level_and_fits_better_than_min_max():
    torch.manual_seed(0)
    w = torch.cat([torch.randn(32, 128), torch.distributions.StudentT(3.0).sample((32, 128))])
    packed, scales, zeros = quant.quantize_int4(w, 32)
    assert packed.shape == (64, 64) and packed.dtype == torch.uint8 and scales.shape == zeros.shape == (64, 4)
    back = quant.dequantize_int4(packed, scales, zeros)
    err = (back - w).abs().reshape(64, 4, 32)
    step = scales.float()[..., None]
    # a value between the lowest and highest level is rounded to the nearest one (bf16 slack)
    inner = (quant.unpack_int4(packed).reshape(64, 4, 32) % 15) != 0
    assert (err[inner] <= (step / 2 + 2**-7 * step + 2**-8 * w.abs().max()).expand_as(err)[inner]).all()
    # each group's squared error is no worse than levels spanning its min..max, and overall better
    base = ((_int4_round_to_nearest(w, 32) - w) ** 2).reshape(64, 4, 32).sum(2)
    ours = (err ** 2).sum(2)
    assert (ours <= base * 1.02 + 1e-6).all()
    assert ours.sum() < 0.93 * base.sum()


def test_int4_constant_and_two_valued_groups():
    w = torch.cat([torch.full((2, 32), 0.5), torch.tensor([[0.0, 1.0] * 16, [-3.0] * 31 + [2.0]])])
    packed, scales, zeros = quant.quantize_int4(w, 32)
    assert torch.isfinite(scales.float()).all() and (scales.float() > 0).all()
    assert torch.allclose(quant.dequantize_int4(packed, scales, zeros), w, atol=2e-2)


def test_int4_packing_round_trip():
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    packed = quant.pack_int4(q)
    assert packed.shape == (16, 32)
    assert torch.equal(quant.unpack_int4(packed), q)
    assert packed[0, 0] == q[0, 0] * 16 + q[0, 1]


@pytest.mark.parametrize("mode,group,n", [("int8", 128, 48), ("int4", 32, 48), ("int4", 16, 48), ("int4", 32, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_compute_the_dequantized_product(mode, group, n, dtype):
    """Each kernel (int8pack, int4 CPU, dequantize fallback) gives x @ dequant(W).T."""
    torch.manual_seed(0)
    w, x = torch.randn(n, 64), torch.randn(2, 3, 64).to(dtype)
    spec = quant.Spec(mode, group)
    layer = quant.QuantLinear(64, n, spec)
    for name, t in quant.quantize_weight("weight", w, spec).items():
        setattr(layer, name, t)
    want = x.float() @ layer.dequantized().t()
    layer.prepare(dtype)
    expected_kernel = {"int8": "int8pack", "int4": "int4cpu" if group >= 32 and n % 16 == 0 else "dequant"}[mode]
    assert layer.kernel == expected_kernel
    got = layer(x)
    assert got.shape == (2, 3, n) and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 0.05 * want.abs().max().item()
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=0.02 if dtype == torch.bfloat16 else 1e-4)


def quant_layer(mode, n, k, group=32, seed=0):
    torch.manual_seed(seed)
    spec = quant.Spec(mode, group)
    layer = quant.QuantLinear(k, n, spec)
    for name, t in quant.quantize_weight("weight", torch.randn(n, k), spec).items():
        setattr(layer, name, t)
    return layer


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_products_of_many_rows_compute_the_dequantized_product(monkeypatch, mode, dtype):
    """Many rows on the CPU: the weight dequantized tile by tile (small tiles here, the last one
    partial) and torch's matmul, against x @ dequant(W).T in float32."""
    from llama.kernels import cpu

    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 128 * 256)  # 128 rows a tile: 2 and a half tiles
    layer = quant_layer(mode, 320, 256)
    want_w = layer.dequantized()
    layer.prepare(dtype)
    rows = kernels.CPU_DEQUANT_ROWS[mode]
    x = torch.randn(rows + 3, 256).to(dtype)
    assert kernels.cpu_quantized_mm(x[:rows - 1], mode, layer.weight, torch.ones(1), 32) is None  # too few rows
    if mode == "int4":
        assert cpu.int4pack_layout() in ("known", "other")
        if cpu.int4pack_layout() != "known":
            pytest.skip("torch packs int4 differently on this CPU (the fallback is tested apart)")
    got = layer(x)
    if dtype == torch.float32:
        torch.testing.assert_close(got, x @ want_w.t(), atol=1e-4, rtol=1e-4)
    else:  # against the weight rounded to bf16, as the tile holds it
        want = x.float() @ want_w.bfloat16().float().t()
        torch.testing.assert_close(got.float(), want, atol=0.02 * want.abs().max().item(), rtol=0.02)
        assert got.dtype == torch.bfloat16


def test_int4_cpu_layout_is_read_as_torch_writes_it():
    from llama.kernels import cpu

    if cpu.int4pack_layout() != "known":
        pytest.skip("torch packs int4 differently on this CPU")
    q = torch.randint(0, 16, (192, 256), dtype=torch.int32)
    assert torch.equal(torch._convert_weight_to_int4pack_for_cpu(q, 1), cpu.pack_like_torch(q))


def test_int4_cpu_repacking_a_slice_at_a_time_is_the_whole_repacking():
    from llama.kernels import cpu

    if cpu.int4pack_layout() == "none":
        pytest.skip("no CPU int4 packing in this torch")
    packed = torch.randint(0, 256, (1040, 64), dtype=torch.uint8)  # 1040: a last slice of 16 rows
    whole = torch._convert_weight_to_int4pack_for_cpu(quant.unpack_int4(packed).int(), 1)
    assert torch.equal(quant._int4pack_for_cpu(packed, rows=256), whole)


def test_int4_cpu_products_fall_back_where_the_layout_differs(monkeypatch, capfd):
    """A torch whose int4 packing is not the one llama.kernels.cpu reads (another CPU): prompts
    use torch's int4 product, with a one-line notice, and the answer is still the product."""
    from llama.kernels import cpu

    layer = quant_layer("int4", 128, 256)
    want_w = layer.dequantized()
    layer.prepare(torch.float32)
    monkeypatch.setattr(cpu, "_LAYOUT", "other")
    monkeypatch.setattr(kernels, "_NOTICED", set())
    x = torch.randn(kernels.CPU_DEQUANT_ROWS["int4"] + 1, 256)
    for _ in range(2):
        torch.testing.assert_close(layer(x), x @ want_w.t(), atol=1e-4, rtol=1e-4)
    err = capfd.readouterr().err
    assert [line for line in err.splitlines() if "int4" in line] == [
        next(line for line in err.splitlines() if line.startswith("int4 prompts on this CPU use torch's int4 product"))]


def test_int4_on_a_cpu_without_torchs_int4_product_dequantizes(monkeypatch, capfd):
    """A torch with no CPU int4 packing (as on some arm64 builds): every product dequantizes
    the stored form, after a one-line notice, and the answer is still the product."""
    from llama.kernels import cpu

    monkeypatch.setattr(cpu, "_LAYOUT", "none")
    monkeypatch.setattr(kernels, "_NOTICED", set())
    for _ in range(2):
        layer = quant_layer("int4", 128, 256)
        layer.prepare(torch.float32)
        assert layer.kernel == "dequant"
        x = torch.randn(3, 256)
        torch.testing.assert_close(layer(x), x @ layer.dequantized().t(), atol=1e-4, rtol=1e-4)
    err = capfd.readouterr().err
    assert [line for line in err.splitlines() if "int4" in line] == [
        next(line for line in err.splitlines() if line.startswith("int4 on this CPU: this torch has no CPU int4 product"))]


def teacher_forced(model, ref_logits, tokens):
    logits = model.forward(tokens, 0)
    agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    kl = F.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
    return agree, kl.item()


def test_quantized_model_mostly_agrees_with_float(ckpts, build):
    """Teacher-forced next-token agreement over 4 x 160 positions of a tiny random model:
    measured 97.9% (int8) and 64% (int4, one group per row here); floors a little lower."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 32000, (4, 160))
    ref = build(ckpts["gqa1"], max_seq_len=256, fast=False).model.forward(tokens, 0)
    for mode, floor, max_kl in (("int8", 0.93, 1e-3), ("int4", 0.5, 0.05)):
        model = build(ckpts["gqa1"], max_seq_len=256, fast=False, quantize=mode).model
        agree, kl = teacher_forced(model, ref, tokens)
        assert agree >= floor and kl < max_kl, (mode, agree, kl)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fast_path_matches_faithful_path_when_quantized(ckpts, build, mode):
    prompts = ["Hello world", "I believe the meaning of life is", "你好"]
    outs = []
    for fast in (False, True):
        llama = build(ckpts["gqa1"], fast=fast, quantize=mode, group_size=32)
        outs.append(llama.text_completion(prompts, temperature=0, max_gen_len=12, logprobs=True))
    for a, b in zip(*outs):
        assert a["tokens"] == b["tokens"]
        assert max(abs(p - q) for p, q in zip(a["logprobs"], b["logprobs"])) < 1e-4


def buffers(llama):
    return {k: v for k, v in llama.model.named_buffers() if "cache" not in k and "freqs" not in k}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_saved_quantized_checkpoint_loads_bit_exact(ckpts, build, tmp_path, mode):
    out = tmp_path / mode
    quantize.quantize_dir(ckpts["gqa2"], mode, out, group_size=32, device="cpu")
    params = json.loads((out / "params.json").read_text())
    assert params["quantization"]["mode"] == mode and len(ck.shard_paths(out)) == 2
    assert check.check(out, TOKENIZER) == []
    at_load = build(ckpts["gqa1"], quantize=mode, group_size=32, fast=False)
    saved = build(str(out), fast=False)  # no quantize argument: the checkpoint says
    a, b = buffers(at_load), buffers(saved)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert build(str(out), quantize=mode, fast=False).model.output.spec == at_load.model.output.spec
    # a quantized checkpoint reshards on disk like any other
    from llama.tools import reshard

    reshard.reshard_dir(out, 1, tmp_path / f"{mode}-mp1")
    b = buffers(build(str(tmp_path / f"{mode}-mp1"), fast=False))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_int4_keeps_the_output_head_in_int8_unless_asked(ckpts, build, tmp_path):
    spec = quant.Spec("int4", 32)
    assert spec.for_key("output.weight") == quant.Spec("int8", 32, "int8")
    assert spec.for_key("layers.0.attention.wq.weight") is spec
    assert spec.params() == {"mode": "int4", "group_size": 32, "output": "int8"}
    assert quant.Spec("int8").params() == {"mode": "int8"}
    llama = build(ckpts["gqa1"], quantize="int4", group_size=32, fast=False)
    assert llama.model.output.spec.mode == "int8" and llama.model.layers[0].attention.wq.spec.mode == "int4"
    # an int4 head is written as folders were before heads were int8: no 'output' in params.json
    out = tmp_path / "int4-head"
    quantize.quantize_dir(ckpts["gqa1"], "int4", out, group_size=32, device="cpu", output_mode="int4")
    params = json.loads((out / "params.json").read_text())
    assert params["quantization"] == {"mode": "int4", "group_size": 32}
    old = build(str(out), fast=False)
    assert old.model.output.spec.mode == "int4" and old.model.output.weight.shape[1] == old.model.params.dim // 2
    source = torch.load(ck.shard_paths(ckpts["gqa1"])[0], map_location="cpu")["output.weight"]
    saved = torch.load(ck.shard_paths(out)[0], map_location="cpu")
    head = quant.quantize_weight("output.weight", source, quant.Spec("int4", 32, "int4"))
    assert head.keys() <= saved.keys() and all(torch.equal(saved[k], t) for k, t in head.items())
    params["quantization"]["output"] = "int3"
    (out / "params.json").write_text(json.dumps(params))
    with pytest.raises(ck.CheckpointError, match="output should be 'int8' or 'int4', got 'int3'"):
        build(str(out))


def test_quantize_errors(ckpts, build, tmp_path):
    with pytest.raises(ValueError, match="quantize must be None, 'int8' or 'int4', got 'int3'"):
        build(ckpts["gqa1"], quantize="int3")
    out = tmp_path / "q8"
    quantize.quantize_dir(ckpts["gqa1"], "int8", out, device="cpu")
    with pytest.raises(ValueError, match="already quantized to int8: drop quantize='int4'"):
        build(str(out), quantize="int4")
    with pytest.raises(ck.CheckpointError, match="already quantized"):
        quantize.quantize_dir(out, "int4", tmp_path / "again", device="cpu")
    assert cli(quantize.main, "--ckpt_dir", ckpts["gqa1"], "--mode", "int4", "--out", str(tmp_path / "x"),
               "--shards", "3") == 2
    assert not (tmp_path / "x").exists()
    params = json.loads((out / "params.json").read_text())
    (out / "params.json").write_text(json.dumps(dict(params, quantization={"mode": "int2"})))
    with pytest.raises(ck.CheckpointError, match="'quantization' should be"):
        build(str(out))
    from llama.tools import convert

    (out / "params.json").write_text(json.dumps(params))
    with pytest.raises(ck.CheckpointError, match="is quantized"):
        convert.meta_to_hf(out, tmp_path / "hf")


def test_int4_world_sizes_keep_whole_groups():
    args = ModelArgs(dim=4096, n_layers=1, n_heads=32, vocab_size=32000)  # FFN 11008 = 86 groups of 128
    assert ck.valid_world_sizes(args, upto=8) == [1, 2, 4, 8]
    assert ck.valid_world_sizes(args, upto=8, spec=quant.Spec("int4", 128)) == [1, 2]
    assert quant.choose_group(64, 192) == 64 and quant.choose_group(4096, 11008) == 128
    assert quant.choose_group(4096, 11008, world_size=8) == 32  # 11008 / 8 = 1376 = 43 x 32


def test_memory_planner_knows_quantized_sizes(monkeypatch):
    args13 = ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, max_seq_len=512, max_batch_size=1)
    bf16 = memory.plan(args13, torch.bfloat16).weights
    int8 = weight_bytes(args13, torch.bfloat16, quant.Spec("int8"))
    int4 = weight_bytes(args13, torch.bfloat16, quant.Spec("int4", 128))
    assert 0.5 < int8 / bf16 < 0.53 and 0.27 < int4 / bf16 < 0.3
    monkeypatch.setattr(memory, "free_bytes", lambda device: 12 * memory.GiB)
    with pytest.raises(MemoryError, match=r"It would fit with: quantize='int4'"):
        memory.check_fits(args13, torch.bfloat16, 1, torch.device("cuda"))
    memory.check_fits(args13, torch.bfloat16, 1, torch.device("cuda"), spec=quant.Spec("int4", 128), loading=True)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_parallel_matches_one_process(ckpts, tmp_path, mode):
    def run(nproc, ckpt, tag):
        out = tmp_path / f"{tag}.json"
        res = torchrun(nproc, "tests/mp_worker.py", "--ckpt_dir", ckpt, "--tokenizer_path", TOKENIZER,
                       "--out", str(out), "--quantize", mode, "--group_size", "32", "--max_gen_len", "12")
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(out.read_text())

    one, two = run(1, ckpts["gqa1"], "mp1"), run(2, ckpts["gqa2"], "mp2")
    assert one["chat"] == two["chat"]
    for a, b in zip(one["text"], two["text"]):
        assert a["tokens"] == b["tokens"]
        assert max(abs(p - q) for p, q in zip(a["logprobs"], b["logprobs"])) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("mode,rows", [("int8", 1), ("int8", 3), ("int8", 8), ("int8", 300), ("int4", 1), ("int4", 5),
                                       ("int4", 300)])
def test_cuda_kernels_compute_the_dequantized_product(mode, rows):
    """The layer's product on CUDA (GEMV, tensor-core kernel or dequantized cuBLAS, by rows)."""
    torch.manual_seed(0)
    n, k = 96, 512
    spec = quant.Spec(mode, 64)
    layer = quant.QuantLinear(k, n, spec)
    for name, t in quant.quantize_weight("weight", torch.randn(n, k, device="cuda"), spec).items():
        setattr(layer, name, t)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    want = x.float() @ layer.dequantized().t()
    layer.prepare(torch.bfloat16)
    assert layer.kernel == "triton"
    got = layer(x).float()
    torch.testing.assert_close(got, want, atol=0.02 * want.abs().max().item(), rtol=0.02)
