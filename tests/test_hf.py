"""Hugging Face format in and out, checked against transformers' own LlamaForCausalLM."""

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from llama import Llama  # noqa: E402
from llama import checkpoint as ck  # noqa: E402
from llama.config import META_PARAM_KEYS, meta_params, params_from_hf, reference_hidden  # noqa: E402
from llama.tools import convert  # noqa: E402
from tests.conftest import TOKENIZER, torchrun  # noqa: E402

VOCAB = 700
WORDS = "北京 上海 你好 世界 llama model token weights alpaca river mountain 学习 模型 数据 sky blue green".split()


def train_tokenizer(path: Path) -> None:
    """A small SentencePiece model with its own vocabulary (not Llama's 32000)."""
    import sentencepiece as spm

    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=gen).tolist()) for _ in range(400)]
    lines += [f"sentence number {i} about {WORDS[i % len(WORDS)]}" for i in range(400)]
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, vocab_size=VOCAB,
                                       model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                       character_coverage=1.0, hard_vocab_limit=True, minloglevel=2)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM saved by transformers: GQA, rope_theta 50000, an
    intermediate_size off the reference's rule, its own 700-piece tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=50000.0, max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="60KB")
    for d in ("single", "sharded"):
        train_tokenizer(root / d / "tokenizer.model")
    return root


def hf_model(path):
    return transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def build(path, **kw):
    return Llama.build(str(path), str(Path(path) / "tokenizer.model"), max_seq_len=64, max_batch_size=2,
                       device="cpu", dtype="float32", **kw)


def ours_logits(llama, tokens):
    return llama.model.forward(tokens, 0)


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_load_hf_matches_transformers(hf_dir, layout):
    path = hf_dir / layout
    if layout == "sharded":
        assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) > 2
    ours, theirs = build(path), hf_model(path)
    assert ours.model.params.ffn_hidden_dim == 100 and ours.model.params.rope_theta == 50000.0
    assert ours.tokenizer.n_words == VOCAB
    tokens = torch.tensor([ours.tokenizer.encode("北京 llama 你好 sky", bos=True, eos=False)])
    with torch.no_grad():
        want = theirs(tokens).logits
    torch.testing.assert_close(ours_logits(ours, tokens), want, rtol=1e-4, atol=1e-4)
    # greedy tokens: ours vs transformers' own generate
    out, _ = ours.generate(tokens.tolist(), max_gen_len=12, temperature=0)
    with torch.no_grad():
        ref = theirs.generate(tokens, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out[0] == ref[0, tokens.shape[1]:].tolist()[: len(out[0])] and len(out[0]) > 0


def test_meta_to_hf_runs_in_transformers(ckpts, build, tmp_path):
    out = tmp_path / "hf"
    convert.meta_to_hf(ckpts["gqa2"], out, TOKENIZER)
    theirs = hf_model(out)
    ours = build(ckpts["gqa1"])
    tokens = torch.tensor([ours.tokenizer.encode("Hello world, 你好", bos=True, eos=False)])
    with torch.no_grad():
        want = theirs(tokens).logits
    torch.testing.assert_close(ours_logits(ours, tokens), want, rtol=1e-4, atol=1e-4)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] == ours.model.params.ffn_hidden_dim and cfg["num_key_value_heads"] == 2


def test_hf_meta_hf_round_trip_is_bit_exact(hf_dir, tmp_path):
    src = hf_dir / "sharded"
    convert.hf_to_meta(src, tmp_path / "meta", shards=2)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert set(params) <= set(META_PARAM_KEYS) and params["rope_theta"] == 50000.0 and params["vocab_size"] == -1
    assert reference_hidden(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")) == 100
    convert.meta_to_hf(tmp_path / "meta", tmp_path / "hf", str(src / "tokenizer.model"))
    original = {}
    for f in src.glob("*.safetensors"):
        original.update(safetensors_torch.load_file(f))
    again = safetensors_torch.load_file(tmp_path / "hf" / "model.safetensors")
    assert original.keys() == again.keys()
    for k in original:
        assert torch.equal(original[k], again[k]), k
    a, b = json.loads((src / "config.json").read_text()), json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rms_norm_eps"):
        assert a[key] == b[key], key
    # and the Meta copy runs like the original
    meta = Llama.build(str(tmp_path / "meta"), str(tmp_path / "meta" / "tokenizer.model"), 64, 2, device="cpu",
                       dtype="float32")
    assert meta.text_completion(["北京"], temperature=0, max_gen_len=8) == build(src).text_completion(
        ["北京"], temperature=0, max_gen_len=8)


def test_check_tool_on_hf_dir(hf_dir, capsys):
    from llama.tools import check

    assert check.main([str(hf_dir / "sharded")]) == 0
    out = capsys.readouterr().out
    assert "Hugging Face LlamaForCausalLM" in out and "FFN 100" in out and "--nproc_per_node (any of): 1, 2" in out


def test_meta_params_keep_the_reference_rule_when_possible():
    from llama.config import meta_params

    p7 = meta_params({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "vocab_size": 32000,
                      "norm_eps": 1e-5, "rope_theta": 10000.0, "ffn_hidden_size": 11008})
    assert p7 == {"dim": 4096, "n_layers": 32, "n_heads": 32, "norm_eps": 1e-5, "vocab_size": -1, "multiple_of": 256}
    p70 = meta_params({"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 32000,
                       "norm_eps": 1e-5, "rope_theta": 10000.0, "ffn_hidden_size": 28672})
    assert (p70["multiple_of"], p70["ffn_dim_multiplier"], p70["n_kv_heads"]) == (4096, 1.3, 8)


@pytest.mark.multiproc
def test_two_processes_on_an_hf_dir(hf_dir, tmp_path):
    outs = []
    for nproc in (1, 2):
        out = tmp_path / f"{nproc}.json"
        res = torchrun(nproc, "tests/mp_worker.py", "--ckpt_dir", str(hf_dir / "sharded"), "--tokenizer_path",
                       str(hf_dir / "sharded" / "tokenizer.model"), "--out", str(out))
        assert res.returncode == 0, res.stderr[-3000:]
        outs.append(json.loads(out.read_text()))
    assert [t["tokens"] for t in outs[0]["text"]] == [t["tokens"] for t in outs[1]["text"]]


def test_errors(hf_dir, tmp_path):
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("hi")
    with pytest.raises(ck.CheckpointError, match="neither a Meta checkpoint .* nor a Hugging Face Llama folder"):
        Llama.build(str(neither), TOKENIZER, 64, 2, device="cpu")
    other = tmp_path / "other"
    shutil.copytree(hf_dir / "single", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ck.CheckpointError, match="GPT2LMHeadModel model, not LlamaForCausalLM"):
        build(other)
    missing = tmp_path / "missing"
    shutil.copytree(hf_dir / "sharded", missing)
    victim = sorted(missing.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ck.CheckpointError, match=f"names missing file.*{victim.name}"):
        build(missing)
    with pytest.raises(ck.CheckpointError, match="tokenizer has 32000 pieces but the model only 700"):
        Llama.build(str(hf_dir / "single"), TOKENIZER, 64, 2, device="cpu")


# The fields of Meta's reference ModelArgs that params.json may set (its max_batch_size and
# max_seq_len come from Llama.build), as listed in its llama/model.py.
REFERENCE_FIELDS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                    "norm_eps", "rope_theta"}


def reference_ffn(dim, multiple_of, ffn_dim_multiplier=None):
    """The reference FeedForward's hidden size, written out here from its description:
    2/3 of 4*dim, scaled by ffn_dim_multiplier, rounded up to a multiple of multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@pytest.mark.parametrize("source", ["gqa2", "mha"])
def test_meta_hf_meta_round_trip_gives_back_params_json(ckpts, tmp_path, source):
    src = Path(ckpts[source])
    convert.meta_to_hf(src, tmp_path / "hf", TOKENIZER)
    convert.hf_to_meta(tmp_path / "hf", tmp_path / "meta", shards=2 if source == "gqa2" else 1)
    assert (tmp_path / "meta" / "params.json").read_text() == (src / "params.json").read_text()


def test_hf_to_meta_params_load_in_the_references_model_args(hf_dir, tmp_path):
    """config.json from transformers (intermediate_size 100, off Meta's rule) -> params.json
    whose keys the reference's ModelArgs(**params) takes and whose FFN its formula gives."""
    convert.hf_to_meta(hf_dir / "single", tmp_path / "meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert set(params) <= REFERENCE_FIELDS and "ffn_hidden_size" not in params
    assert reference_ffn(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")) == 100
    assert params["rope_theta"] == 50000.0  # differs from the default, so it is written, as Code Llama's are
    for dim, hidden, rule in [(4096, 11008, (256, None)), (8192, 28672, (4096, 1.3)), (5120, 13824, (256, None))]:
        config = {"hidden_size": dim, "num_hidden_layers": 2, "num_attention_heads": 32, "intermediate_size": hidden,
                  "vocab_size": 32000}
        p = meta_params(params_from_hf(config))
        assert (p["multiple_of"], p.get("ffn_dim_multiplier")) == rule and "rope_theta" not in p
        assert reference_ffn(dim, p["multiple_of"], p.get("ffn_dim_multiplier")) == hidden
