"""Tensor parallelism in Megatron's conventions: the communication mappings as autograd
functions, and the layers built from them.

A `group` is an ncl.Communicator or a torch.distributed ProcessGroup (any backend): `Group`
(ncl/group.py, shared with ncl.moe) gives both the same three collectives on tensors.

Mappings (forward / backward):
    copy_to_region              identity        / all-reduce
    reduce_from_region          all-reduce      / identity
    scatter_to_region           split last dim  / all-gather last dim
    gather_from_region          all-gather last dim / split last dim
    gather_from_sequence        all-gather dim 0 / reduce-scatter dim 0   (sequence parallel)
    reduce_scatter_to_sequence  reduce-scatter dim 0 / all-gather dim 0

Layers: ColumnParallelLinear (output features split), RowParallelLinear (input features
split), VocabParallelEmbedding (vocabulary rows split), ParallelLMHead (vocabulary split;
logits gathered, or an argmax with no all-gather).  Each has `from_full(module_or_weight, group)`
that keeps this rank's shard of a full layer, and `parallelize(model, plan, group)` swaps a
model's layers by an explicit plan.
"""
from typing import Dict, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ncl
from ..group import Group  # the layers take an ncl communicator or a torch group through it


def _mapping(name: str, forward, backward):
    """An autograd function: forward(group, x) on the way in, backward(group, grad) on the way back."""
    def fwd(ctx, x, group):
        ctx.group = group
        return forward(group, x)

    def bwd(ctx, grad):
        return backward(ctx.group, grad), None
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


def _identity(group: Group, t: torch.Tensor) -> torch.Tensor:
    return t.view_as(t)


def _summed(group: Group, t: torch.Tensor) -> torch.Tensor:
    return group.all_reduce(t.clone())  # never in place: autograd may still need t


_Copy = _mapping("_Copy", _identity, _summed)
_Reduce = _mapping("_Reduce", _summed, _identity)
_Scatter = _mapping("_Scatter", Group.split_last, Group.gather_last)
_Gather = _mapping("_Gather", Group.gather_last, Group.split_last)
_GatherSequence = _mapping("_GatherSequence", Group.all_gather, Group.reduce_scatter)
_ReduceScatterSequence = _mapping("_ReduceScatterSequence", Group.reduce_scatter, Group.all_gather)


def copy_to_region(x, group):
    return _Copy.apply(x, Group(group))


def reduce_from_region(x, group):
    return _Reduce.apply(x, Group(group))


def scatter_to_region(x, group):
    return _Scatter.apply(x, Group(group))


def gather_from_region(x, group):
    return _Gather.apply(x, Group(group))


def gather_from_sequence(x, group):
    return _GatherSequence.apply(x, Group(group))


def reduce_scatter_to_sequence(x, group):
    return _ReduceScatterSequence.apply(x, Group(group))


def _shard(size: int, group: Group, what: str) -> int:
    if size % group.size:
        raise ValueError(f"{what} ({size}) must divide by the tensor-parallel size {group.size}")
    return size // group.size


class _ParallelLinear(nn.Module):
    """What both linear layers share: building one from a full layer's weights."""
    split_dim = 0  # the weight's dimension split over the ranks (0: output features, 1: input)

    @classmethod
    def from_full(cls, full: Union[nn.Linear, torch.Tensor], group, *, bias: Optional[torch.Tensor] = None,
                  **kwargs):
        """This rank's shard of a full nn.Linear (or weight, and bias); kwargs go to the layer."""
        weight, bias = (full.weight, full.bias) if isinstance(full, nn.Linear) else (full, bias)
        layer = cls(weight.shape[1], weight.shape[0], group, bias=bias is not None, dtype=weight.dtype, **kwargs)
        g = layer.group
        with torch.no_grad():
            layer.weight.copy_(weight.chunk(g.size, dim=cls.split_dim)[g.rank])
            if bias is not None:  # split with the output features; whole when those are whole
                layer.bias.copy_(bias.chunk(g.size, dim=0)[g.rank] if cls.split_dim == 0 else bias)
        return layer


class ColumnParallelLinear(_ParallelLinear):
    """y = x W^T + b with W's rows (output features) split: this rank computes its slice of
    y; gather_output=True gathers the full y.  sequence_parallel: x arrives split along dim 0
    (the sequence) and is gathered first."""

    def __init__(self, in_features: int, out_features: int, group, *, bias: bool = True, gather_output: bool = False,
                 sequence_parallel: bool = False, dtype=None):
        super().__init__()
        self.group = Group(group)
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        local = _shard(out_features, self.group, "out_features")
        self.weight = nn.Parameter(torch.empty(local, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(local, dtype=dtype)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x):
        x = _GatherSequence.apply(x, self.group) if self.sequence_parallel else _Copy.apply(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        return _Gather.apply(y, self.group) if self.gather_output else y


class RowParallelLinear(_ParallelLinear):
    """y = x W^T + b with W's columns (input features) split: x arrives split along its last
    dim (input_is_parallel, as a ColumnParallelLinear leaves it) or is split here; the partial
    products are all-reduced (sequence_parallel: reduce-scattered along dim 0)."""
    split_dim = 1

    def __init__(self, in_features: int, out_features: int, group, *, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: bool = False, dtype=None):
        super().__init__()
        self.group = Group(group)
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features, _shard(in_features, self.group, "in_features"),
                                               dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x):
        if not self.input_is_parallel:
            x = _Scatter.apply(x, self.group)
        partial = F.linear(x, self.weight)
        y = (_ReduceScatterSequence if self.sequence_parallel else _Reduce).apply(partial, self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows (the vocabulary) are split: each rank looks up the ids in its
    range, zeros the others, and the all-reduce completes every row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group, *, dtype=None):
        super().__init__()
        self.group = Group(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        local = _shard(num_embeddings, self.group, "num_embeddings")
        self.start = self.group.rank * local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim, dtype=dtype))
        nn.init.normal_(self.weight)

    @classmethod
    def from_full(cls, full: Union[nn.Embedding, torch.Tensor], group) -> "VocabParallelEmbedding":
        weight = full.weight if isinstance(full, nn.Embedding) else full
        layer = cls(weight.shape[0], weight.shape[1], group, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight.chunk(layer.group.size, dim=0)[layer.group.rank])
        return layer

    def forward(self, ids):
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)
        return _Reduce.apply(rows, self.group)


def compress_all_reduces(model: nn.Module, compress: Optional[str]) -> nn.Module:
    """Make the forward sums of every RowParallelLinear and VocabParallelEmbedding in model go block-scaled
    in `compress` (ncl.compress: fp8, int8, mxfp4; None: exact again).  Their backward and the column
    layers are untouched; the group must be an ncl Communicator."""
    for layer in model.modules():
        if isinstance(layer, (RowParallelLinear, VocabParallelEmbedding)):
            layer.group = Group(layer.group.group, compress)
    return model


class ParallelLMHead(nn.Module):
    """logits = x E^T with the vocabulary split (E: vocab x hidden, as an embedding's weight).
    forward() gathers the full logits; argmax() finds the most likely token with two
    all-reduces of one value per row instead of gathering the vocabulary."""

    def __init__(self, hidden: int, vocab: int, group, *, dtype=None):
        super().__init__()
        self.group = Group(group)
        self.vocab = vocab
        local = _shard(vocab, self.group, "vocab")
        self.start = self.group.rank * local
        self.weight = nn.Parameter(torch.empty(local, hidden, dtype=dtype))
        nn.init.normal_(self.weight, std=hidden ** -0.5)

    @classmethod
    def from_full(cls, full: Union[nn.Linear, nn.Embedding, torch.Tensor], group) -> "ParallelLMHead":
        weight = full if isinstance(full, torch.Tensor) else full.weight
        layer = cls(weight.shape[1], weight.shape[0], group, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight.chunk(layer.group.size, dim=0)[layer.group.rank])
        return layer

    def forward(self, x):
        return _Gather.apply(F.linear(_Copy.apply(x, self.group), self.weight), self.group)

    @torch.no_grad()
    def argmax(self, x) -> torch.Tensor:
        """Token ids of the largest logit per row (the lowest id on ties), as torch.argmax."""
        logits = F.linear(x, self.weight).float()
        best, where = logits.max(dim=-1)
        top = _all_reduce_op(self.group, best, ncl.MAX)
        candidate = torch.where(best == top, where + self.start, torch.full_like(where, self.vocab))
        return _all_reduce_op(self.group, candidate, ncl.MIN)


def _all_reduce_op(group: Group, t: torch.Tensor, op) -> torch.Tensor:
    t = t.contiguous().clone()
    if group.size == 1:
        return t
    if group.is_ncl:
        return group.group.all_reduce(t, op)
    torch_op = {ncl.MAX: dist.ReduceOp.MAX, ncl.MIN: dist.ReduceOp.MIN}[op]
    dist.all_reduce(t, op=torch_op, group=group.group)
    return t


_STYLES = {"colwise": ColumnParallelLinear, "rowwise": RowParallelLinear, "embedding": VocabParallelEmbedding,
           "lm_head": ParallelLMHead}


def parallelize(model: nn.Module, plan: Dict[str, str], group, **options) -> nn.Module:
    """Replace the submodules named in plan ({"mlp.up": "colwise", "mlp.down": "rowwise",
    "embed": "embedding", "head": "lm_head"}) by their parallel versions, built from their
    full weights (each rank keeps its shard).  options (e.g. sequence_parallel=True) go to the
    linear layers.  Returns the model, changed in place; a name the model lacks is an error."""
    for name, style in plan.items():
        if style not in _STYLES:
            raise ValueError(f"plan[{name!r}] = {style!r}: the styles are {', '.join(_STYLES)}")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not hasattr(parent, child):
            raise ValueError(f"plan names {name!r}, which the model does not have")
        kwargs = options if style in ("colwise", "rowwise") else {}
        setattr(parent, child, _STYLES[style].from_full(getattr(parent, child), group, **kwargs))
    return model
