"""Model parallelism as a transform of the plain model.

Swaps each layer of a `Transformer` for fairscale's parallel layer with this
rank's slice of the weight, split as Meta's shards are (`checkpoint.SPLIT_DIMS`).
The layers keep fairscale's forward passes and collectives; they are built on the
meta device so that nothing is allocated or initialised before the weights load.
"""

from typing import Callable

import torch
from fairscale.nn.model_parallel import layers as fs
from fairscale.nn.model_parallel import mappings
from torch import nn

from llama.model import Transformer


def _meta_weight(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class ColumnParallelLinear(fs.ColumnParallelLinear):
    """fairscale's ColumnParallelLinear (output features split), built without allocating."""

    def __init__(self, linear: nn.Linear, world_size: int, gather_output: bool):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.gather_output = gather_output
        self.output_size_per_partition = self.out_features // world_size
        self.weight = _meta_weight(self.output_size_per_partition, self.in_features)
        self.bias = None


class RowParallelLinear(fs.RowParallelLinear):
    """fairscale's RowParallelLinear (input features split), built without allocating."""

    def __init__(self, linear: nn.Linear, world_size: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.input_is_parallel = True
        self.input_size_per_partition = self.in_features // world_size
        self.weight = _meta_weight(self.out_features, self.input_size_per_partition)
        self.bias = None


class ParallelEmbedding(fs.ParallelEmbedding):
    """fairscale's ParallelEmbedding (embedding dim split), built without allocating."""

    def __init__(self, embedding: nn.Embedding, world_size: int):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse, self._weight = False, False, None
        self.embedding_dim_per_partition = self.embedding_dim // world_size
        self.weight = _meta_weight(self.num_embeddings, self.embedding_dim_per_partition)


def column_parallel(local: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, gather_output: bool) -> torch.Tensor:
    """fairscale's ColumnParallelLinear around `local` (this rank's product, output features
    split): the input as it is, the outputs gathered if `gather_output`."""
    y = local(mappings.copy_to_model_parallel_region(x))
    return mappings.gather_from_model_parallel_region(y) if gather_output else y


def row_parallel(local: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fairscale's RowParallelLinear around `local` (input features split): outputs summed."""
    return mappings.reduce_from_model_parallel_region(local(x))


def parallelize(model: Transformer, world_size: int, at_one: bool = False) -> Transformer:
    """Splits a meta-device `model` for `world_size` ranks in place; returns it.

    One rank keeps the plain layers unless `at_one`: then it gets fairscale's layers too,
    as the reference builds its model on one GPU (needs fairscale's model parallel set up).
    Load this rank's shard afterwards with `load_state_dict(..., assign=True)`.
    """
    if world_size == 1 and not at_one:
        return model
    model.tok_embeddings = ParallelEmbedding(model.tok_embeddings, world_size)
    model.output = ColumnParallelLinear(model.output, world_size, gather_output=True)
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        attn.wq = ColumnParallelLinear(attn.wq, world_size, gather_output=False)
        attn.wk = ColumnParallelLinear(attn.wk, world_size, gather_output=False)
        attn.wv = ColumnParallelLinear(attn.wv, world_size, gather_output=False)
        attn.wo = RowParallelLinear(attn.wo, world_size)
        ffn.w1 = ColumnParallelLinear(ffn.w1, world_size, gather_output=False)
        ffn.w3 = ColumnParallelLinear(ffn.w3, world_size, gather_output=False)
        ffn.w2 = RowParallelLinear(ffn.w2, world_size)
        attn.n_local_heads //= world_size
        attn.n_local_kv_heads //= world_size
    return model
