"""The model's configuration: `ModelArgs`, built from params.json or a Hugging Face
config.json, checked, and every size derived from it (shapes, parameter and byte counts).

Pure: no files are read here (`llama.checkpoint` reads them).
"""

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from llama.layout import (DEFAULT_GROUP, QuantSpec, is_quantized_layer, layer_keys, spec_from_params,
                          stored_form)

MAX_LAYERS = 1024  # far above any Llama (70B has 80); a bound so a corrupt params.json fails fast
MAX_WIDTH = 1 << 17


@dataclass
class ModelArgs:
    """Model configuration; field names are those of Meta's params.json."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # -1: taken from the tokenizer
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # Code Llama sets 1e6
    ffn_hidden_size: Optional[int] = None  # set: the SwiGLU hidden size as it is (Hugging Face's intermediate_size)
    quantization: Optional[Dict[str, Any]] = None  # a quantized checkpoint's {"mode": "int8"|"int4", ...}

    max_batch_size: int = 32
    max_seq_len: int = 2048

    @classmethod
    def from_params(cls, params: Dict[str, Any], **overrides: Any) -> "ModelArgs":
        """ModelArgs from a params.json dict (warning about keys it does not know), checked."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            warnings.warn(f"params.json keys not used by this model: {', '.join(unknown)}")
        kwargs = {k: v for k, v in params.items() if k in known}
        kwargs.update(overrides)
        args = cls(**kwargs)
        args.validate()
        return args

    def validate(self) -> None:
        """Raises ValueError naming the first field that no Llama model can have."""
        def integer(name, lo, hi=MAX_WIDTH, allow=()):
            v = getattr(self, name)
            if v in allow and not isinstance(v, bool):
                return
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer from {lo} to {hi}, got {v!r}")

        def positive(name, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")

        integer("dim", 1)
        integer("n_layers", 1, MAX_LAYERS)
        integer("n_heads", 1, self.dim if isinstance(self.dim, int) else MAX_WIDTH)
        integer("n_kv_heads", 1, self.n_heads, allow=(None,))
        integer("vocab_size", 1, 1 << 22, allow=(-1,))
        integer("multiple_of", 1)
        integer("ffn_hidden_size", 1, allow=(None,))
        positive("ffn_dim_multiplier", optional=True)
        positive("norm_eps")
        positive("rope_theta")
        integer("max_batch_size", 1, 1 << 16)
        integer("max_seq_len", 1, 1 << 22)
        if self.dim % self.n_heads or self.head_dim % 2:
            raise ValueError(f"dim={self.dim} must be n_heads={self.n_heads} heads of an even size")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}")
        if not 1 <= self.ffn_hidden_dim <= 8 * MAX_WIDTH:
            raise ValueError(f"the feed-forward size works out to {self.ffn_hidden_dim}: check multiple_of "
                             f"and ffn_dim_multiplier")
        spec_from_params(self.quantization)

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (n_heads when params.json has no n_kv_heads)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size, by the reference's rule (unless ffn_hidden_size gives it)."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return reference_hidden(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def quant_spec(self) -> Optional[QuantSpec]:
        """How a quantized checkpoint's linear layers are stored (None: float weights)."""
        return spec_from_params(self.quantization)


def reference_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """The reference's SwiGLU hidden size for `dim`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# -- Hugging Face config.json <-> Meta params.json --------------------------------------------------

HF_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def params_from_hf(config: dict) -> dict:
    """ModelArgs fields (params.json style) from a Hugging Face LlamaForCausalLM config; raises
    ValueError naming a missing key."""
    missing = [k for k in HF_REQUIRED if k not in config]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    params = {
        "dim": config["hidden_size"],
        "n_layers": config["num_hidden_layers"],
        "n_heads": config["num_attention_heads"],
        "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "vocab_size": config["vocab_size"],
        "norm_eps": config.get("rms_norm_eps", 1e-5),
        "rope_theta": config.get("rope_theta", 10000.0),
        "ffn_hidden_size": config["intermediate_size"],
    }
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("rope_theta") is not None:  # newer transformers layout
        params["rope_theta"] = rope["rope_theta"]
    return params


# (multiple_of, ffn_dim_multiplier) of Meta's own releases, tried first.
_META_FFN_RULES = ((256, None), (4096, 1.3), (1024, 1.3), (256, 1.3), (1024, None), (4096, None))
# The only keys Meta's reference ModelArgs takes from params.json (plus rope_theta, as Code Llama's).
META_PARAM_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                   "ffn_dim_multiplier", "norm_eps", "rope_theta")


def ffn_rule(dim: int, hidden: int) -> Tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) for which the reference's rule gives `hidden` at `dim`."""
    for multiple_of, mult in _META_FFN_RULES:
        if reference_hidden(dim, multiple_of, mult) == hidden:
            return multiple_of, mult
    base = int(2 * (4 * dim) / 3)
    if hidden >= base:
        return hidden, None  # one multiple of `hidden` covers the base size
    # a multiplier below 1, nudged until int(mult * base) lands on hidden
    mult = round(hidden / base, 6)
    for _ in range(100):
        got = reference_hidden(dim, 1, mult)
        if got == hidden:
            return 1, mult
        mult = round(mult + (1e-6 if got < hidden else -1e-6), 6)
    raise ValueError(f"no multiple_of / ffn_dim_multiplier gives a feed-forward of {hidden} at dim {dim}")


def meta_params(params: dict) -> dict:
    """params.json for Meta's format, that Meta's own reference reads unchanged: only the keys
    its ModelArgs takes, the feed-forward size as multiple_of / ffn_dim_multiplier."""
    args = ModelArgs.from_params(params)
    out = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads}
    if args.kv_heads != args.n_heads:
        out["n_kv_heads"] = args.kv_heads
    multiple_of, mult = ffn_rule(args.dim, args.ffn_hidden_dim)
    out["multiple_of"] = multiple_of
    if mult is not None:
        out["ffn_dim_multiplier"] = mult
    out["norm_eps"] = args.norm_eps
    if args.rope_theta != 10000.0:
        out["rope_theta"] = args.rope_theta
    out["vocab_size"] = -1
    return out


def choose_group(dim: int, hidden_dim: int, group: int = DEFAULT_GROUP, world_size: int = 1) -> int:
    """`group`, or the largest power of two below it that splits both input sizes (dim for
    wq..w3 and output, hidden_dim for w2) into whole groups on each of `world_size` ranks.

    E.g. 7B's FFN (11008 = 86 x 128) takes groups of 128 on 1 or 2 ranks, of 32 on 8.
    """
    if not isinstance(group, int) or group < 1 or group & (group - 1):
        raise ValueError(f"group_size must be a power of two, got {group!r}")
    while group > 1 and (dim % (group * world_size) or hidden_dim % (group * world_size)):
        group //= 2
    return group


# -- sizes ---------------------------------------------------------------------------------------


def expected_shapes(args: ModelArgs) -> Dict[str, tuple]:
    """The whole (unsharded) shape of every float weight the model needs, by Meta's key."""
    d, hd, h = args.dim, args.head_dim, args.ffn_hidden_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,), "output.weight": (args.vocab_size, d)}
    per_layer = ((args.n_heads * hd, d), (args.kv_heads * hd, d), (args.kv_heads * hd, d), (d, args.n_heads * hd),
                 (h, d), (d, h), (h, d), (d,), (d,))
    for i in range(args.n_layers):
        shapes.update(zip(layer_keys(i), per_layer))
    return shapes


def stored_shapes(args: ModelArgs, spec: Optional[QuantSpec] = None) -> Dict[str, Tuple[tuple, Optional[torch.dtype]]]:
    """{key: (shape, dtype or None for any float dtype)} of the tensors a checkpoint of `args`
    holds: float weights, or with `spec` (default: the checkpoint's own) their quantized form."""
    spec = spec or args.quant_spec
    out = {}
    for key, shape in expected_shapes(args).items():
        if spec is not None and is_quantized_layer(key):
            out.update(stored_form(key, shape, spec))
        else:
            out[key] = (shape, None)
    return out


def param_count(args: ModelArgs) -> int:
    """Weights in the model (float), counted from `expected_shapes`."""
    return sum(math.prod(s) for s in expected_shapes(args).values())


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def weight_bytes(args: ModelArgs, dtype: torch.dtype, spec: Optional[QuantSpec] = None, world_size: int = 1,
                 loading: bool = False) -> int:
    """Bytes of the weights per process, float tensors in `dtype`, linear layers in `spec`'s
    form if given; `loading`: plus the float32 workspace of quantizing the largest weight."""
    elem = element_size(dtype)
    total = sum(math.prod(shape) * (element_size(stored) if stored is not None else elem)
                for shape, stored in stored_shapes(args, spec).values())
    workspace = 0
    if loading and spec is not None:
        largest = max(math.prod(s) for k, s in expected_shapes(args).items() if is_quantized_layer(k))
        workspace = 4 * 4 * largest // world_size  # the weight in float32 and a few temporaries
    return total // world_size + workspace


def kv_cache_bytes(args: ModelArgs, dtype: torch.dtype, max_batch_size: int, max_seq_len: int) -> int:
    """Bytes of the whole model's KV cache (all processes together)."""
    return 2 * args.n_layers * max_batch_size * max_seq_len * args.kv_heads * args.head_dim * element_size(dtype)
