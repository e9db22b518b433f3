"""Hugging Face Llama checkpoints: read them as Meta's, and convert both ways.

A Hugging Face folder (config.json for LlamaForCausalLM; *.safetensors or
pytorch_model*.bin, single or sharded with an index) is presented as one whole Meta
shard: key names mapped, q/k rows put back in Meta's order (Hugging Face reorders them
for its rotate-half RoPE). Tensors are read memory-mapped and converted one at a time,
when loading asks for them, so loading, resharding and model parallel work as for Meta's
files.
"""

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from llama.config import META_PARAM_KEYS, ModelArgs, meta_params, params_from_hf
from llama.extras import needs
from llama.files import inside, regular_file
from llama.layout import CheckpointError

CONFIG = "config.json"

# Meta key (with {i} for the layer) <- Hugging Face key
KEY_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}


def is_hf_dir(ckpt_dir) -> bool:
    d = Path(ckpt_dir)
    return (d / CONFIG).is_file() and not any(d.glob("*.pth"))


def read_config(ckpt_dir) -> dict:
    """The folder's config.json, checked to describe a Llama model this library runs."""
    path = Path(ckpt_dir) / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {str(path)!r}: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(path)!r} should hold a JSON object (a Hugging Face model config)")
    archs = config.get("architectures") or []
    if "LlamaForCausalLM" not in archs and config.get("model_type") != "llama":
        raise CheckpointError(
            f"{str(path)!r} describes a {', '.join(map(str, archs)) or config.get('model_type', 'unknown')} model, "
            "not LlamaForCausalLM: this library runs Llama models only"
        )
    if config.get("rope_scaling"):
        raise CheckpointError(f"{str(path)!r} uses rope_scaling {config['rope_scaling']}, which is not supported")
    try:
        params = params_from_hf(config)
        ModelArgs.from_params(params)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} does not describe a Llama model: {e}") from None
    if config.get("head_dim") not in (None, params["dim"] // params["n_heads"]):
        raise CheckpointError(f"{str(path)!r}: head_dim {config['head_dim']} != hidden_size / num_attention_heads")
    return config


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> Hugging Face row order of a q or k projection: per head, the (real, imag)
    pairs of adjacent rows become a first half and a second half."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face -> Meta row order of a q or k projection."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _weight_file(d: Path, name, what: str) -> Path:
    path = inside(d, name) if isinstance(name, str) else None
    if path is None:
        raise CheckpointError(f"{what} in {str(d)!r} names {name!r}, which is not a file of that folder: "
                              "the index is damaged; download it again")
    if not path.exists():
        raise CheckpointError(f"{what} in {str(d)!r} names missing file(s): {name}")
    if not regular_file(path):
        raise CheckpointError(f"{str(path)!r} is not a regular file (a pipe, device or folder?)")
    return path


def weight_files(ckpt_dir) -> Dict[str, Path]:
    """{Hugging Face key: file holding it}, from an index or the single weights file; every file
    a regular file inside the folder."""
    d = Path(ckpt_dir)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = d / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_name} in {str(d)!r} is not a weight index ({e}): download it "
                                      "again") from None
            missing = sorted({f for f in weight_map.values() if isinstance(f, str) and inside(d, f) is not None
                              and not (d / f).exists()})
            if missing:
                raise CheckpointError(f"{index_name} in {str(d)!r} names missing file(s): {', '.join(missing)}")
            return {k: _weight_file(d, f, index_name) for k, f in weight_map.items()}
        if (d / single).exists():
            path = _weight_file(d, single, "the folder")
            return {k: path for k in _keys_of(path)}
    raise CheckpointError(
        f"{str(d)!r} has a config.json but no weights (model.safetensors, model-*.safetensors with an index, "
        "or pytorch_model*.bin)"
    )


def _safe_open(path: Path):
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(needs(f"reading {path.name}", "hf")) from None
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own SafetensorError for damaged files
        raise CheckpointError(f"cannot read {str(path)!r} ({path.stat().st_size} bytes): it is truncated or "
                              f"corrupt ({e}); download it again") from None


def _keys_of(path: Path) -> List[str]:
    if path.suffix == ".safetensors":
        with _safe_open(path) as f:
            return list(f.keys())
    return list(_load_bin(path).keys())


def _load_bin(path: Path) -> dict:
    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # an old, non-zip file cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged or foreign pickles
        raise CheckpointError(f"cannot read {str(path)!r}: it is truncated, corrupt or holds more than tensors "
                              f"({type(e).__name__}); download it again, or convert it to safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict of tensors")
    return state


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                       "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
                       "I64": torch.int64, "BOOL": torch.bool}


class HFState(Mapping):
    """A Hugging Face checkpoint as a Meta state dict, converted lazily, tensor by tensor."""

    def __init__(self, ckpt_dir, config: dict):
        self.config = config
        self.files = weight_files(ckpt_dir)
        self._open: Dict[Path, object] = {}
        self.tied = "lm_head.weight" not in self.files
        if self.tied and not config.get("tie_word_embeddings", False):
            raise CheckpointError(f"{str(ckpt_dir)!r}: lm_head.weight is missing from the weights")
        self.hf_key = {}
        for meta, hf in KEY_MAP.items():
            if "{i}" in meta:
                for i in range(config["num_hidden_layers"]):
                    self.hf_key[meta.format(i=i)] = hf.format(i=i)
            else:
                self.hf_key[meta] = hf
        if self.tied:
            self.hf_key["output.weight"] = "model.embed_tokens.weight"
        missing = [hf for hf in self.hf_key.values() if hf not in self.files]
        if missing:
            raise CheckpointError(f"{str(ckpt_dir)!r} lacks {len(missing)} weight(s), e.g. {missing[:3]}")
        self._last = (None, None)

    def _handle(self, path: Path):
        if path not in self._open:
            if path.suffix == ".safetensors":
                self._open[path] = _safe_open(path)
            else:
                self._open[path] = _load_bin(path)
        return self._open[path]

    def _raw(self, hf_key: str) -> torch.Tensor:
        handle = self._handle(self.files[hf_key])
        return handle.get_tensor(hf_key) if hasattr(handle, "get_tensor") else handle[hf_key]

    def shape_of(self, key: str) -> tuple:
        """The tensor's shape, without reading it."""
        hf = self.hf_key[key]
        handle = self._handle(self.files[hf])
        if hasattr(handle, "get_slice"):
            return tuple(handle.get_slice(hf).get_shape())
        return tuple(handle[hf].shape)

    def dtype_of(self, key: str) -> Optional[torch.dtype]:
        """The tensor's dtype, without reading it (None where the file format does not say)."""
        hf = self.hf_key[key]
        handle = self._handle(self.files[hf])
        if hasattr(handle, "get_slice"):
            return _SAFETENSORS_DTYPES.get(handle.get_slice(hf).get_dtype())
        return handle[hf].dtype

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._last[0] == key:
            return self._last[1]
        t = self._raw(self.hf_key[key])
        if key.endswith("attention.wq.weight"):
            t = _unpermute(t, self.config["num_attention_heads"])
        elif key.endswith("attention.wk.weight"):
            t = _unpermute(t, self.config.get("num_key_value_heads") or self.config["num_attention_heads"])
        self._last = (key, t)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.hf_key)

    def __len__(self) -> int:
        return len(self.hf_key)


def hf_config(params: dict, vocab_size: int, dtype: torch.dtype, max_position_embeddings: int = 4096) -> dict:
    """A Hugging Face LlamaForCausalLM config.json for ModelArgs-style `params`."""
    args = ModelArgs.from_params(params, vocab_size=vocab_size)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": max_position_embeddings,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).replace("torch.", ""),
        # Meta's params.json as it was, so that converting back gives the same file
        "meta_params": {k: v for k, v in params.items() if k in META_PARAM_KEYS},
    }


def _same_model(a: ModelArgs, b: ModelArgs) -> bool:
    fields = ("dim", "n_layers", "n_heads", "kv_heads", "ffn_hidden_dim", "norm_eps", "rope_theta")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def meta_params_of(config: dict) -> dict:
    """params.json for converting this Hugging Face folder to Meta's format: the one it came
    from (kept in config.json by `hf_config`) if it still describes the same model, else
    one worked out from config.json (`llama.config.meta_params`)."""
    derived = meta_params(params_from_hf(config))
    kept = config.get("meta_params")
    if isinstance(kept, dict):
        try:
            if _same_model(ModelArgs.from_params(kept), ModelArgs.from_params(derived)):
                return {k: v for k, v in kept.items() if k in META_PARAM_KEYS}  # in its own order
        except (TypeError, ValueError):
            pass
    return derived


def to_hf_state(meta_state: Mapping, params: dict) -> Dict[str, torch.Tensor]:
    """A whole Meta state dict -> Hugging Face keys and q/k row order (compact copies)."""
    args = ModelArgs.from_params(params)
    out = {}
    layer_key = re.compile(r"layers\.(\d+)\.(.*)")
    for key, t in meta_state.items():
        if key == "rope.freqs":
            continue
        m = layer_key.fullmatch(key)
        hf = KEY_MAP[f"layers.{{i}}.{m.group(2)}"].format(i=m.group(1)) if m else KEY_MAP[key]
        if key.endswith("attention.wq.weight"):
            t = _permute(t, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            t = _permute(t, args.kv_heads)
        out[hf] = t.contiguous().clone()
    return out
