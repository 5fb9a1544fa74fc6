"""Llama 3.x (8B, 70B, 405B): grouped-query attention, llama3-scaled rotary embeddings, SwiGLU, sharded
over a tensor-parallel group with the ncl.torch.tp layers.

Sharding (TP = the group's size): query heads split over the ranks; KV heads split when they divide
by TP, otherwise (TP > n_kv_heads) each rank holds the one KV head its query heads read.  q/k/v and
w1/w3 are column-parallel, wo and w2 row-parallel (one all-reduce each per layer), the embedding and
LM head vocabulary-parallel.  Weights carry their Hugging Face names and come from a weight source
(ncl.models.weights): seeded random, generated slice by slice, or a checkpoint directory read slice by
slice; either way a rank only ever allocates its own shard.
"""
from typing import Dict, Optional, Tuple

import torch
from torch import nn

import ncl
from ncl.torch.tp import ColumnParallelLinear, Group, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding

from .configs import LlamaConfig
from .layers import KVCache, RMSNorm, apply_rope, attention, rope_frequencies
from .weights import shard_range, weight_source, with_weight

def alone() -> "Group":
    """A group of one rank (this process), for TP = 1 without a launcher; made once per process."""
    global _ALONE
    if _ALONE is None:
        _ALONE = Group(ncl.init(rank=0, size=1, unique_id=ncl.get_unique_id()))
    return _ALONE


_ALONE = None


def as_group(group) -> Group:
    """An ncl Communicator, a torch ProcessGroup, a tp.Group or None (TP = 1) as a tp.Group."""
    return alone() if group is None else Group(group)


def column(source, name: str, in_features: int, out_features: int, group: Group, dtype) -> ColumnParallelLinear:
    """The column-parallel layer of weight `name` [out, in]: this rank's rows (output features)."""
    rows = shard_range(out_features, group.rank, group.size, f"{name} rows")
    weight = source.get(name, (out_features, in_features), 0, *rows, dtype=dtype)
    return with_weight(ColumnParallelLinear, weight, in_features, out_features, group, bias=False)


def row(source, name: str, in_features: int, out_features: int, group: Group, dtype) -> RowParallelLinear:
    """The row-parallel layer of weight `name` [out, in]: this rank's columns (input features)."""
    cols = shard_range(in_features, group.rank, group.size, f"{name} columns")
    weight = source.get(name, (out_features, in_features), 1, *cols, dtype=dtype)
    return with_weight(RowParallelLinear, weight, in_features, out_features, group, bias=False)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, prefix: str, group: Group, source, dtype):
        super().__init__()
        tp, d, hd = group.size, cfg.dim, cfg.head_dim
        self.n_heads, self.head_dim = cfg.n_heads // tp, hd  # this rank's query heads
        if cfg.n_kv_heads % tp and tp % cfg.n_kv_heads:
            raise ValueError(f"{cfg.n_kv_heads} KV heads can neither be split over nor replicated to {tp} ranks "
                             "(one of the two numbers must divide the other)")
        self.wq = column(source, f"{prefix}.q_proj.weight", d, cfg.n_heads * hd, group, dtype)
        self.wo = row(source, f"{prefix}.o_proj.weight", cfg.n_heads * hd, d, group, dtype)
        if cfg.n_kv_heads % tp == 0:  # KV heads split like the query heads
            self.n_kv_heads = cfg.n_kv_heads // tp
            self.wk = column(source, f"{prefix}.k_proj.weight", d, cfg.n_kv_heads * hd, group, dtype)
            self.wv = column(source, f"{prefix}.v_proj.weight", d, cfg.n_kv_heads * hd, group, dtype)
        else:  # replicated (TP a multiple of the KV heads): this rank computes the one KV head its query heads read
            self.n_kv_heads = 1
            kv = group.rank * self.n_heads // (cfg.n_heads // cfg.n_kv_heads)
            k, v = (source.get(f"{prefix}.{n}_proj.weight", (cfg.n_kv_heads * hd, d), 0, kv * hd, (kv + 1) * hd,
                               dtype=dtype) for n in "kv")
            self.wk = with_weight(nn.Linear, k, d, hd, bias=False)
            self.wv = with_weight(nn.Linear, v, d, hd, bias=False)
        self.cache: Optional[KVCache] = None

    def forward(self, x, positions, cos, sin, start_pos: int):
        b, t, _ = x.shape                                          # x: [B, T, D]
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)     # [B, T, Hq, hd]
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim)  # [B, T, Hkv, hd]
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin, positions), apply_rope(k, cos, sin, positions)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)              # [B, start_pos + T, Hkv, hd]
        y = attention(q, k, v, start_pos=start_pos)                # [B, T, Hq, hd]
        return self.wo(y.reshape(b, t, self.n_heads * self.head_dim))  # all-reduce -> [B, T, D]


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig, prefix: str, group: Group, source, dtype):
        super().__init__()
        self.w1 = column(source, f"{prefix}.gate_proj.weight", cfg.dim, cfg.ffn_dim, group, dtype)
        self.w3 = column(source, f"{prefix}.up_proj.weight", cfg.dim, cfg.ffn_dim, group, dtype)
        self.w2 = row(source, f"{prefix}.down_proj.weight", cfg.ffn_dim, cfg.dim, group, dtype)

    def forward(self, x):                                          # x: [B, T, D]
        h = nn.functional.silu(self.w1(x)) * self.w3(x)            # [B, T, ffn / TP]
        return self.w2(h)                                          # all-reduce -> [B, T, D]


def loaded_norm(source, name: str, size: int, eps: float, dtype) -> RMSNorm:
    """An RMSNorm of `size` whose weight is the source's tensor `name` (random ones centred on 1)."""
    norm = RMSNorm(size, eps, dtype=dtype)
    norm.weight = nn.Parameter(source.get(name, (size,), dtype=dtype, mean=1.0), requires_grad=False)
    return norm


class TransformerBlock(nn.Module):
    """Layer `index` of a Llama: attention and feed-forward, each after an RMSNorm, each a residual."""

    def __init__(self, cfg: LlamaConfig, index: int, group=None, *, source=None, dtype=torch.float32, seed: int = 0):
        super().__init__()
        group, source = as_group(group), source or weight_source(seed)
        prefix = f"model.layers.{index}"
        self.attention_norm = loaded_norm(source, f"{prefix}.input_layernorm.weight", cfg.dim, cfg.norm_eps, dtype)
        self.attention = Attention(cfg, f"{prefix}.self_attn", group, source, dtype)
        self.ffn_norm = loaded_norm(source, f"{prefix}.post_attention_layernorm.weight", cfg.dim, cfg.norm_eps, dtype)
        self.feed_forward = FeedForward(cfg, f"{prefix}.mlp", group, source, dtype)

    def forward(self, x, positions, cos, sin, start_pos: int):  # x: [B, T, D]
        h = x + self.attention(self.attention_norm(x), positions, cos, sin, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))           # [B, T, D]


class DenseDecoder(nn.Module):
    """What a dense decoder of tensor-parallel blocks shares (Llama, EXAONE): the vocabulary-parallel
    embedding and LM head, the KV caches, rotary tables, the forward pass and the constructor.  A
    subclass names its `config_class` and its `block` (built as block(cfg, layer, group, source=,
    dtype=), taking (h, positions, cos, sin, start_pos), with an `attention` holding a `cache`).

    model.forward(tokens [B, T], start_pos) -> logits [B, T, vocab] (float32, the full vocabulary on
    every rank); model.next_tokens(tokens, start_pos) -> [B] greedy, with no vocabulary all-gather.
    After setup_cache(max_batch, max_seq) calls continue a sequence from start_pos; without a cache
    every call is a whole sequence (start_pos 0)."""

    config_class: type
    block: type

    def __init__(self, cfg=None, group=None, *, dtype=torch.float32, seed: int = 0, checkpoint=None):
        super().__init__()
        cfg = cfg if cfg is not None else config_from(self.config_class, type(self).__name__, checkpoint)
        source = weight_source(seed, checkpoint)
        self._tables(cfg, group, source, dtype)
        self.layers = nn.ModuleList(self.block(cfg, i, self.group, source=source, dtype=dtype)
                                    for i in range(cfg.n_layers))
        self.norm = loaded_norm(source, "model.norm.weight", cfg.dim, cfg.norm_eps, dtype)

    def _tables(self, cfg, group, source, dtype) -> None:
        """The embedding and LM head: this rank's rows of the vocabulary (one tensor when tied)."""
        self.config, self.group, self.dtype = cfg, as_group(group), dtype
        g = self.group
        if cfg.n_heads % g.size:
            raise ValueError(f"{cfg.n_heads} attention heads do not split over {g.size} ranks")
        vocab_rows = shard_range(cfg.vocab_size, g.rank, g.size, "vocab_size")
        embed = source.get("model.embed_tokens.weight", (cfg.vocab_size, cfg.dim), 0, *vocab_rows, dtype=dtype)
        self.tok_embeddings = with_weight(VocabParallelEmbedding, embed, cfg.vocab_size, cfg.dim, g)
        head = embed if cfg.tie_embeddings else source.get("lm_head.weight", (cfg.vocab_size, cfg.dim), 0,
                                                           *vocab_rows, dtype=dtype)
        self.output = with_weight(ParallelLMHead, head, cfg.dim, cfg.vocab_size, g)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch = self.max_seq = 0
        self._cos = self._sin = None

    def setup_cache(self, max_batch: int, max_seq: int) -> None:
        """A KV cache for max_batch sequences of up to max_seq positions (this rank's KV heads)."""
        if max_seq > self.config.max_seq_len:
            raise ValueError(f"max_seq {max_seq} exceeds the model's max_seq_len {self.config.max_seq_len}")
        for layer in self.layers:
            a = layer.attention
            a.cache = KVCache(max_batch, max_seq, a.n_kv_heads, a.head_dim, self.dtype)
        self.max_batch, self.max_seq = max_batch, max_seq
        self._rope(max_seq)

    def _rope(self, n: int):
        if self._cos is None or self._cos.shape[0] < n:
            c = self.config
            self._cos, self._sin = rope_frequencies(c.head_dim, max(n, self.max_seq), c.rope_theta, c.rope_scaling)
        return self._cos, self._sin

    def hidden(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """The final normed hidden states [B, T, D]."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an int tensor [batch, seq], not {tokens.dtype} {tuple(tokens.shape)}")
        b, t = tokens.shape
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in 0..{self.config.vocab_size - 1}")
        if start_pos < 0:
            raise ValueError(f"start_pos must be >= 0, not {start_pos}")
        if self.max_seq == 0 and start_pos != 0:
            raise ValueError("start_pos > 0 needs a KV cache: call setup_cache(max_batch, max_seq) first")
        if self.max_seq and (b > self.max_batch or start_pos + t > self.max_seq):
            raise ValueError(f"{b} sequences up to position {start_pos + t} exceed the cache "
                             f"({self.max_batch} x {self.max_seq})")
        positions = torch.arange(start_pos, start_pos + t)
        cos, sin = self._rope(start_pos + t)
        h = self.tok_embeddings(tokens)                            # [B, T, D]
        for layer in self.layers:
            h = layer(h, positions, cos, sin, start_pos)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        return self.output(self.hidden(tokens, start_pos)).float()  # all-gather -> [B, T, vocab]

    @torch.no_grad()
    def next_tokens(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        return self.output.argmax(self.hidden(tokens, start_pos)[:, -1])  # [B]


def config_from(cls, name: str, checkpoint):
    """A model's config read from a checkpoint directory's config.json (when no config is given)."""
    if checkpoint is None or (not isinstance(checkpoint, (str, bytes)) and not hasattr(checkpoint, "__fspath__")):
        raise ValueError(f"{name} needs a config, or a checkpoint directory to read one from")
    from .checkpoint import read_config
    return cls.from_hf(read_config(checkpoint))


class Llama(DenseDecoder):
    """Llama 3.x over a tensor-parallel group (see DenseDecoder for the interface).

    group: an ncl Communicator, torch ProcessGroup or tp.Group (None: TP = 1).  checkpoint: a Hugging
    Face directory (cfg None: its config.json) or any weight source; None: random weights from seed."""

    config_class = LlamaConfig
    block = TransformerBlock


def weight_shapes(cfg: LlamaConfig) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the model by its Hugging Face name, with its full shape."""
    hd, d = cfg.head_dim, cfg.dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (d,), f"{p}.post_attention_layernorm.weight": (d,),
                       f"{p}.self_attn.q_proj.weight": (cfg.n_heads * hd, d),
                       f"{p}.self_attn.k_proj.weight": (cfg.n_kv_heads * hd, d),
                       f"{p}.self_attn.v_proj.weight": (cfg.n_kv_heads * hd, d),
                       f"{p}.self_attn.o_proj.weight": (d, cfg.n_heads * hd),
                       f"{p}.mlp.gate_proj.weight": (cfg.ffn_dim, d), f"{p}.mlp.up_proj.weight": (cfg.ffn_dim, d),
                       f"{p}.mlp.down_proj.weight": (d, cfg.ffn_dim)})
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes
