"""Model parallelism as a transform of the plain model.

Each split layer becomes a wrapper around a *local* module (this rank's slice: an
`nn.Linear`, a quantized layer, a fused projection, an embedding) that adds fairscale's
collectives around it, split as Meta's shards are (`llama.layout.SPLIT_DIMS`). The
wrappers keep Meta's state-dict keys (`layers.0.attention.wq.weight`, not `...wq.local.weight`),
so loading is the same at every world size. Built on the meta device, nothing is allocated
before the weights load.
"""

from typing import Callable, List, Tuple

import torch
from fairscale.nn.model_parallel import mappings
from torch import nn

from llama.model import Transformer


def _drop_local(module, state_dict, prefix, local_metadata) -> None:
    """state_dict hook: `prefix.local.X` -> `prefix.X`."""
    inner = prefix + "local."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_local(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: `prefix.X` -> `prefix.local.X`."""
    inner = prefix + "local."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


class Sharded(nn.Module):
    """A local module between collectives; its weights keep the wrapped layer's names."""

    def __init__(self, local: nn.Module):
        super().__init__()
        self.local = local
        self.register_state_dict_post_hook(_drop_local)
        self.register_load_state_dict_pre_hook(_add_local)

    @property
    def weight(self) -> torch.Tensor:
        return self.local.weight

    def rewrap(self, local: nn.Module) -> "Sharded":
        """The same collectives around another local module."""
        raise NotImplementedError


class ColumnParallel(Sharded):
    """fairscale's ColumnParallelLinear: output features split; the input as it is, the outputs
    gathered if `gather_output`."""

    def __init__(self, local: nn.Module, gather_output: bool):
        super().__init__(local)
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(mappings.copy_to_model_parallel_region(x))
        return mappings.gather_from_model_parallel_region(y) if self.gather_output else y

    def rewrap(self, local: nn.Module) -> "ColumnParallel":
        return ColumnParallel(local, self.gather_output)


class RowParallel(Sharded):
    """fairscale's RowParallelLinear: input features split (the input already is); outputs summed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mappings.reduce_from_model_parallel_region(self.local(x))

    def rewrap(self, local: nn.Module) -> "RowParallel":
        return RowParallel(local)


class ParallelEmbedding(Sharded):
    """fairscale's ParallelEmbedding: the embedding dim split, the pieces gathered."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return mappings.gather_from_model_parallel_region(self.local(mappings.copy_to_model_parallel_region(tokens)))

    def rewrap(self, local: nn.Module) -> "ParallelEmbedding":
        return ParallelEmbedding(local)


def local_of(module: nn.Module) -> nn.Module:
    """The local module of a wrapper, or the module itself."""
    return module.local if isinstance(module, Sharded) else module


def map_local(module: nn.Module, fn: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """`fn` applied to the local module, inside the same collectives."""
    return module.rewrap(fn(module.local)) if isinstance(module, Sharded) else fn(module)


def join(modules: List[nn.Module], fn: Callable[[List[nn.Module]], nn.Module]) -> nn.Module:
    """One module from `fn` of the modules' local parts, inside the collectives they share."""
    first = modules[0]
    if any(type(m) is not type(first) for m in modules) or (
            isinstance(first, ColumnParallel) and any(m.gather_output != first.gather_output for m in modules)):
        raise ValueError("only layers split the same way can be joined")
    return map_local(first, lambda _: fn([local_of(m) for m in modules]))


def _linear(in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False, device="meta")


def _split(linear: nn.Linear, world_size: int, dim: int) -> nn.Linear:
    out_f, in_f = linear.out_features, linear.in_features
    return _linear(in_f, out_f // world_size) if dim == 0 else _linear(in_f // world_size, out_f)


def parallelize(model: Transformer, world_size: int) -> Transformer:
    """Splits a meta-device `model` for `world_size` ranks in place (nothing at one rank);
    returns it. Load this rank's shard afterwards with `load_state_dict(..., assign=True)`."""
    if world_size == 1:
        return model
    emb = model.tok_embeddings
    model.tok_embeddings = ParallelEmbedding(
        nn.Embedding(emb.num_embeddings, emb.embedding_dim // world_size, device="meta"))
    model.output = ColumnParallel(_split(model.output, world_size, 0), gather_output=True)
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        for mod, names in ((attn, ("wq", "wk", "wv")), (ffn, ("w1", "w3"))):
            for name in names:
                setattr(mod, name, ColumnParallel(_split(getattr(mod, name), world_size, 0), gather_output=False))
        attn.wo = RowParallel(_split(attn.wo, world_size, 1))
        ffn.w2 = RowParallel(_split(ffn.w2, world_size, 1))
        attn.n_local_heads //= world_size
        attn.n_local_kv_heads //= world_size
    return model


def linear_layers(model: Transformer) -> List[Tuple[nn.Module, str]]:
    """(parent, name) of every linear layer slot of the model (wrapped or not), in order."""
    slots = []
    for layer in model.layers:
        for parent in (layer.attention, layer.feed_forward):
            for name in ("wq", "wk", "wv", "wqkv", "wo", "w1", "w3", "w13", "w2"):
                if getattr(parent, name, None) is not None:
                    slots.append((parent, name))
    slots.append((model, "output"))
    return slots
