"""gpt-oss (OpenAI's open-weight mixture-of-experts models), sharded by ncl.

A decoder of `n_layers` blocks, each: RMSNorm -> attention (grouped KV heads, a learned sink logit
per head, YaRN RoPE; every other layer attends to a sliding window of 128 positions) -> residual ->
RMSNorm -> mixture of experts (a router linear with bias picks the top 4 of 128 experts per token,
weighted by the softmax over the 4 chosen logits; each expert a clamped SwiGLU FFN with biases, its
weights stored in MXFP4) -> residual.  Untied embedding and LM head.  Tensor names and layouts are
those of the Hugging Face checkpoints (model.layers.{i}.mlp.experts.gate_up_proj_blocks: [E, 2I, D/32,
16], the gate_up rows interleaved gate, up, gate, up, ...).

Sharding over a world group of N ranks (an ncl.Communicator or a torch ProcessGroup), tp x ep:
  * attention tensor-parallel over groups of `tp` consecutive ranks: q heads split (ColumnParallel q,
    RowParallel o), KV heads split with them, or replicated when tp exceeds them (each rank keeps the
    one KV head its q heads read); sinks split with their heads; embedding and LM head vocab-parallel
    over the TP group (whole on every rank when tp = 1).  The N/tp groups are data-parallel: each is
    given its own batch (tp = 1: every rank its own).
  * experts over groups of `ep` consecutive ranks, in contiguous blocks (ncl.moe's convention).
    The ranks of a TP group hold the same tokens: each routes and dispatches only its 1/tp slice of
    them (no duplicated expert work), and the TP group all-gathers the combined rows afterwards.
Every rank creates only its own shard of every weight (seeded random, or read from a checkpoint).
Experts stay in MXFP4 (4.25 bits a weight) and are decoded inside their matmuls (ncl.models.mxfp4).

    model = GptOss(GPT_OSS_CONFIGS["gpt-oss-tiny"], comm, tp=4, ep=4, dtype=torch.float32)
    logits = model(tokens, start_pos=0)      # [B, T, vocab] float32 on every rank
"""
from dataclasses import replace
from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import moe
from ..torch import tp as tpl
from . import mxfp4
from .checkpoint import read_config
from .configs import FULL, GPT_OSS_CONFIGS, SLIDING, GptOssConfig, gpt_oss_param_count as param_count  # noqa: F401 (names of this model)
from .layers import KVCache, RMSNorm, apply_rope, attention, rope_frequencies
from .weights import RandomWeights, weight_source, with_weight

def _subgroup(group, size: int, what: str):
    """The group of `size` consecutive ranks this rank belongs to (None for size 1; the group itself for N)."""
    world = tpl.Group(group)
    if size < 1 or world.size % size:
        raise ValueError(f"{what} ({size}) must divide the number of ranks ({world.size})")
    if size == 1:
        return None
    if size == world.size:
        return group
    if world.is_ncl:
        return group.split(world.rank // size, world.rank)
    import torch.distributed as dist  # every rank must create every subgroup, in the same order
    subgroups = [dist.new_group(list(range(c * size, (c + 1) * size))) for c in range(world.size // size)]
    return subgroups[world.rank // size]


def _rank_size(group) -> Tuple[int, int]:
    if group is None:
        return 0, 1
    g = tpl.Group(group)
    return g.rank, g.size


def _holding(make, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> nn.Module:
    """make() built without initialising its weight (weights.with_weight), then given the weight
    (and bias) of this rank, generated or read for it."""
    layer = with_weight(make, weight)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


# ---- attention ------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, cfg: GptOssConfig, layer: int, source, tp_group, dtype):
        super().__init__()
        rank, size = _rank_size(tp_group)
        if cfg.n_heads % size:
            raise ValueError(f"tp ({size}) must divide the {cfg.n_heads} attention heads")
        if cfg.n_kv_heads % size and size % cfg.n_kv_heads:
            raise ValueError(f"tp ({size}) must divide the {cfg.n_kv_heads} KV heads, or be a multiple of them "
                             f"(KV heads replicated)")
        p, hd, d = f"model.layers.{layer}.self_attn.", cfg.head_dim, cfg.dim
        self.head_dim, self.n_heads = hd, cfg.n_heads // size                     # local q heads
        self.n_kv_heads = max(cfg.n_kv_heads // size, 1)                          # local KV heads
        self.window = cfg.sliding_window if cfg.layer_types[layer] == SLIDING else None
        q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd

        def get(name, shape, dim=None, start=0, stop=None, **kw):
            return source.get(p + name, shape, dim, start, stop, dtype=dtype, **kw)
        # this rank's rows of q (its heads), and of k and v: its KV heads, or the one its q heads share
        q0, q1 = rank * self.n_heads * hd, (rank + 1) * self.n_heads * hd
        first_kv = (rank * self.n_heads) // (cfg.n_heads // cfg.n_kv_heads)
        k0, k1 = first_kv * hd, (first_kv + self.n_kv_heads) * hd
        if tp_group is None:
            q_layer, kv_layer, o_layer = partial(nn.Linear, d, q), partial(nn.Linear, d, kv), partial(nn.Linear, q, d)
        else:
            q_layer = partial(tpl.ColumnParallelLinear, d, q, tp_group)
            kv_layer = partial(tpl.ColumnParallelLinear, d, kv, tp_group) if cfg.n_kv_heads % size == 0 else \
                partial(nn.Linear, d, k1 - k0)  # KV heads replicated: a plain layer of the one this rank reads
            o_layer = partial(tpl.RowParallelLinear, q, d, tp_group)
        self.q_proj = _holding(q_layer, get("q_proj.weight", (q, d), 0, q0, q1), get("q_proj.bias", (q,), 0, q0, q1))
        self.k_proj = _holding(kv_layer, get("k_proj.weight", (kv, d), 0, k0, k1), get("k_proj.bias", (kv,), 0, k0, k1))
        self.v_proj = _holding(kv_layer, get("v_proj.weight", (kv, d), 0, k0, k1), get("v_proj.bias", (kv,), 0, k0, k1))
        self.o_proj = _holding(o_layer, get("o_proj.weight", (d, q), 1, q0, q1), get("o_proj.bias", (d,)))
        sinks = get("sinks", (cfg.n_heads,), 0, rank * self.n_heads, (rank + 1) * self.n_heads, std=0.5)
        self.register_buffer("sinks", sinks.float())                              # [local heads] logits
        self.cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape                                                          # x [B, T, D]
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)                 # [B, T, Hl, hd]
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)              # [B, T, Hkv_l, hd]
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        positions = torch.arange(start_pos, start_pos + t)
        q, k = apply_rope(q, cos, sin, positions), apply_rope(k, cos, sin, positions)
        if self.cache is not None:
            k, v = self.cache.update(positions, k, v)                              # [B, start_pos + T, Hkv_l, hd]
        out = attention(q, k, v, start_pos=start_pos, sinks=self.sinks, window=self.window)  # [B, T, Hl, hd]
        return self.o_proj(out.reshape(b, t, self.n_heads * self.head_dim))        # [B, T, D]


# ---- mixture of experts ---------------------------------------------------------------------------------------

def clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """[..., 2I] with gate and up interleaved -> [..., I]: (up + 1) * gate * sigmoid(alpha * gate), the
    gate clamped above at limit and up to [-limit, limit]."""
    gate, up = gate_up[..., 0::2].clamp(max=limit), gate_up[..., 1::2].clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(alpha * gate))


class MXFP4Experts(nn.Module):
    """Experts first .. first + count - 1 of a layer, weights in MXFP4 (decoded one expert at a time
    inside the matmul, a tile of rows at a time; never all at once)."""

    def __init__(self, cfg: GptOssConfig, layer: int, first: int, count: int, source, dtype):
        super().__init__()
        self.first, self.count = first, count
        self.alpha, self.limit = cfg.swiglu_alpha, cfg.swiglu_limit
        d, inner, e = cfg.dim, cfg.expert_dim, cfg.n_experts
        p = f"model.layers.{layer}.mlp.experts."
        for name, out_f, in_f in (("gate_up_proj", 2 * inner, d), ("down_proj", d, inner)):
            blocks, scales = _load_mxfp4(source, p + name, (e, out_f, in_f), first, first + count)
            self.register_buffer(f"{name}_blocks", blocks)                         # [count, out, in/32, 16] uint8
            self.register_buffer(f"{name}_scales", scales)                         # [count, out, in/32] uint8
            self.register_buffer(f"{name}_bias", source.get(p + name + "_bias", (e, out_f), 0, first, first + count,
                                                            dtype=dtype))          # [count, out]

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [R, D], idx [R, k] global expert ids (-1 or another rank's: skipped), weights [R, k] ->
        [R, D]: per row, the weighted sum of its chosen local experts' outputs."""
        out = torch.zeros_like(x)
        for j in range(self.count):
            rows, slot = (idx == self.first + j).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            h = mxfp4.matmul(x[rows], self.gate_up_proj_blocks[j], self.gate_up_proj_scales[j],
                             self.gate_up_proj_bias[j])                            # [n, 2I]
            h = clamped_swiglu(h, self.alpha, self.limit)                          # [n, I]
            y = mxfp4.matmul(h, self.down_proj_blocks[j], self.down_proj_scales[j], self.down_proj_bias[j])
            out.index_add_(0, rows, y * weights[rows, slot].unsqueeze(1).to(y.dtype))  # [n, D]
        return out


def _load_mxfp4(source, name: str, full_shape, start: int, stop: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Experts start:stop of a stacked [E, out, in] weight as MXFP4 (blocks, scales): read as stored
    from a checkpoint's name_blocks / name_scales, or encoded from a dense checkpoint tensor ([E, in,
    out], as Hugging Face's dequantized layout) or from seeded random values, one expert at a time."""
    files = getattr(source, "files", None)  # a checkpoint's tensor names (CheckpointWeights.files)
    e, out_f, in_f = full_shape
    if files is not None and name + "_blocks" in files:
        blocks = source.get(name + "_blocks", (e, out_f, in_f // mxfp4.BLOCK, mxfp4.BLOCK // 2), 0, start, stop,
                            dtype=torch.uint8)
        scales = source.get(name + "_scales", (e, out_f, in_f // mxfp4.BLOCK), 0, start, stop, dtype=torch.uint8)
        return blocks, scales
    blocks = torch.empty(stop - start, out_f, in_f // mxfp4.BLOCK, mxfp4.BLOCK // 2, dtype=torch.uint8)
    scales = torch.empty(stop - start, out_f, in_f // mxfp4.BLOCK, dtype=torch.uint8)
    for j, expert in enumerate(range(start, stop)):
        if files is not None:
            dense = source.get(name, (e, in_f, out_f), 0, expert, expert + 1, dtype=torch.float32).transpose(1, 2)
        else:
            dense = source.get(name, full_shape, 0, expert, expert + 1, dtype=torch.float32)   # [1, out, in]
        blocks[j:j + 1], scales[j:j + 1] = mxfp4.encode(dense)
    return blocks, scales


class MoE(nn.Module):
    def __init__(self, cfg: GptOssConfig, layer: int, source, tp_group, ep_buffer: Optional[moe.Buffer], dtype):
        super().__init__()
        ep_rank, ep = (0, 1) if ep_buffer is None else (ep_buffer.group.rank, ep_buffer.group.size)
        if cfg.n_experts % ep:
            raise ValueError(f"ep ({ep}) must divide the {cfg.n_experts} experts")
        self.n_experts, self.top_k, self.tp_group, self.ep_buffer = cfg.n_experts, cfg.top_k, tp_group, ep_buffer
        p = f"model.layers.{layer}.mlp.router."
        self.router = _holding(partial(nn.Linear, cfg.dim, cfg.n_experts),                 # replicated
                               source.get(p + "weight", (cfg.n_experts, cfg.dim), dtype=dtype),
                               source.get(p + "bias", (cfg.n_experts,), dtype=dtype))
        per = cfg.n_experts // ep
        self.experts = MXFP4Experts(cfg, layer, ep_rank * per, per, source, dtype)
        self.routing = None  # the last dispatch's [sender, receiver] row counts (an ncl EP group's)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                                            # [n, D]
        n = flat.shape[0]
        tp_rank, tp = _rank_size(self.tp_group)
        rows = -(-n // tp)                                                         # this rank's slice: ceil(n/tp)
        mine = F.pad(flat, (0, 0, 0, rows * tp - n))[tp_rank * rows:(tp_rank + 1) * rows]  # [rows, D]
        top, idx = self.router(mine).topk(self.top_k, dim=-1)                      # [rows, k]
        weights = top.float().softmax(dim=-1).to(x.dtype)                          # softmax over the chosen k
        padding = torch.arange(tp_rank * rows, (tp_rank + 1) * rows) >= n
        idx = idx.masked_fill(padding.unsqueeze(1), -1)                            # padding rows go nowhere
        if self.ep_buffer is None:
            y = self.experts(mine, idx, weights)
        else:
            recv_x, recv_idx, recv_w, handle = self.ep_buffer.dispatch(mine, idx, weights, num_experts=self.n_experts)
            self.routing = handle.rank_matrix  # [sender, receiver] rows of this dispatch, for tracing
            y = self.ep_buffer.combine(self.experts(recv_x, recv_idx, recv_w), handle)  # [rows, D]
        if tp > 1:
            y = tpl.Group(self.tp_group).all_gather(y)[:n]                         # [n, D]
        return y.view(shape)


# ---- the model ------------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, cfg: GptOssConfig, layer: int, source, tp_group, ep_buffer, dtype):
        super().__init__()
        p = f"model.layers.{layer}."
        self.input_layernorm = _norm(cfg, source, p + "input_layernorm.weight", dtype)
        self.self_attn = Attention(cfg, layer, source, tp_group, dtype)
        self.post_attention_layernorm = _norm(cfg, source, p + "post_attention_layernorm.weight", dtype)
        self.mlp = MoE(cfg, layer, source, tp_group, ep_buffer, dtype)

    def forward(self, x, start_pos, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), start_pos, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


def _norm(cfg: GptOssConfig, source, name: str, dtype) -> RMSNorm:
    weight = source.get(name, (cfg.dim,), dtype=dtype, std=0.1, mean=1.0)
    return _holding(partial(RMSNorm, cfg.dim, cfg.norm_eps), weight)


def _check_checkpoint(cfg: GptOssConfig, stored: GptOssConfig) -> None:
    """The model may run the checkpoint's first layers only (n_layers smaller); all else must match."""
    same = replace(stored, n_layers=cfg.n_layers, layer_types=stored.layer_types[:cfg.n_layers],
                   max_seq_len=cfg.max_seq_len)
    if cfg.n_layers > stored.n_layers or same != cfg:
        raise ValueError(f"the checkpoint's config ({stored}) does not match the model's ({cfg})")


class GptOss(nn.Module):
    """gpt-oss over `group` (None: one process), attention TP over `tp` ranks, experts over `ep` ranks
    (both default to the whole group).  forward() takes this rank's batch: the same tokens on the ranks
    of a TP group, each data-parallel group (tp < N) its own, of any size; every rank makes the same
    sequence of calls (the MoE exchanges are collective over the EP group).  Weights: read from
    `checkpoint` (a Hugging Face directory; cfg None: its config.json), else seeded random
    N(0, init_std^2) (norm weights N(1, 0.1^2), sinks N(0, 0.5^2)), each rank generating only its shard."""

    def __init__(self, cfg: Optional[GptOssConfig], group=None, *, tp: Optional[int] = None, ep: Optional[int] = None,
                 dtype=torch.bfloat16, seed: int = 0, checkpoint=None, init_std: float = 0.02):
        super().__init__()
        if cfg is None:
            if checkpoint is None:
                raise ValueError("GptOss needs a config, or a checkpoint directory to read one from")
            cfg = GptOssConfig.from_hf(read_config(checkpoint))
        n = 1 if group is None else tpl.Group(group).size
        tp, ep = n if tp is None else tp, n if ep is None else ep
        for what, size in (("tp", tp), ("ep", ep)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1 or n % size:
                raise ValueError(f"{what} must be a positive int dividing the number of ranks ({n}), not {size!r}")
        if cfg.n_heads % tp or (cfg.n_kv_heads % tp and tp % cfg.n_kv_heads):
            raise ValueError(f"tp ({tp}) must divide the {cfg.n_heads} heads and divide or be a multiple of the "
                             f"{cfg.n_kv_heads} KV heads")
        if cfg.n_experts % ep:
            raise ValueError(f"ep ({ep}) must divide the {cfg.n_experts} experts")
        if cfg.vocab_size % tp:
            raise ValueError(f"tp ({tp}) must divide the vocabulary ({cfg.vocab_size})")
        source = RandomWeights(seed, init_std) if checkpoint is None else weight_source(seed, checkpoint)
        if checkpoint is not None:
            _check_checkpoint(cfg, GptOssConfig.from_hf(source.config, cfg.name))
        self.config, self.group, self.dtype, self.tp, self.ep = cfg, group, dtype, tp, ep
        self.tp_group = None if group is None else _subgroup(group, tp, "tp")
        self.ep_group = None if group is None else _subgroup(group, ep, "ep")
        self.ep_buffer = None if self.ep_group is None else moe.Buffer(self.ep_group)  # every layer's MoE exchanges
        tp_rank, _ = _rank_size(self.tp_group)
        v, d = cfg.vocab_size, cfg.dim
        rows = (tp_rank * v // tp, (tp_rank + 1) * v // tp)
        g = self.tp_group
        embed = partial(tpl.VocabParallelEmbedding, v, d, g) if g else partial(nn.Embedding, v, d)
        head = partial(tpl.ParallelLMHead, d, v, g) if g else partial(nn.Linear, d, v, bias=False)
        self.embed_tokens = _holding(embed, source.get("model.embed_tokens.weight", (v, d), 0, *rows, dtype=dtype))
        self.lm_head = _holding(head, source.get("lm_head.weight", (v, d), 0, *rows, dtype=dtype))
        self.layers = nn.ModuleList(Block(cfg, i, source, self.tp_group, self.ep_buffer, dtype)
                                    for i in range(cfg.n_layers))
        self.norm = _norm(cfg, source, "model.norm.weight", dtype)
        self.cos = self.sin = None

    def setup_cache(self, max_batch: int, max_seq: int) -> None:
        """KV caches for max_batch sequences (this rank's batch) of up to max_seq positions."""
        if max_seq > self.config.max_seq_len:
            raise ValueError(f"max_seq ({max_seq}) exceeds the model's {self.config.max_seq_len} positions")
        for block in self.layers:
            a = block.self_attn
            a.cache = KVCache(max_batch, max_seq, a.n_kv_heads, a.head_dim, dtype=self.dtype)
        self._rope(max_seq)

    def _rope(self, positions: int) -> None:
        if self.cos is None or self.cos.shape[0] < positions:
            c = self.config
            self.cos, self.sin = rope_frequencies(c.head_dim, positions, c.rope_theta, c.rope_scaling)

    def _hidden(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], not {tuple(tokens.shape)}")
        cached = self.layers[0].self_attn.cache is not None
        if start_pos and not cached:
            raise ValueError("start_pos > 0 needs the KV cache: call setup_cache first")
        self._rope(start_pos + tokens.shape[1])
        x = self.embed_tokens(tokens)                                              # [B, T, D]
        for block in self.layers:
            x = block(x, start_pos, self.cos, self.sin)
        return self.norm(x)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """tokens [B, T] at positions start_pos.. -> logits [B, T, vocab] float32 (the full vocabulary)."""
        return self.lm_head(self._hidden(tokens, start_pos)).float()

    @torch.no_grad()
    def next_tokens(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """The greedy next token of each sequence: [B] int64 (the vocab-parallel argmax under TP)."""
        last = self._hidden(tokens, start_pos)[:, -1]                              # [B, D]
        if self.tp_group is None:
            return self.lm_head(last).float().argmax(dim=-1)
        return self.lm_head.argmax(last)


def hf_tensors(cfg: GptOssConfig, seed: int = 0, dtype=torch.float32, init_std: float = 0.02) -> dict:
    """The full tensors of the seeded random model GptOss(cfg, seed=seed, init_std=init_std) under their
    Hugging Face names, experts as MXFP4 blocks and scales: what write_checkpoint takes (small models)."""
    model = GptOss(cfg, dtype=dtype, seed=seed, init_std=init_std)
    names = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    out = {}
    for key, t in model.state_dict().items():
        out[names.get(key, "model." + key)] = t.to(dtype) if t.is_floating_point() else t
    return out


__all__ = ["GptOssConfig", "GPT_OSS_CONFIGS", "GptOss", "param_count", "clamped_swiglu", "hf_tensors"]
