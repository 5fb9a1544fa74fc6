"""EXAONE 4.0 (LG AI Research, 32B): a Llama-shaped decoder with three changes, as Hugging Face's
modeling_exaone4.py implements them:

  * hybrid attention: layers repeat sliding, sliding, sliding, full ("LLLG"); sliding layers attend
    to the last `sliding_window` positions (this one included), full layers to every position;
  * no RoPE on the full layers (when the model has a sliding window at all: with sliding_window
    None every layer is full and every layer rotates);
  * QK-Reorder-Norm: q and k RMS-normed per head (one [head_dim] weight shared by the heads) right
    after their projections and before RoPE; no norm before attention or the MLP, instead one after
    each: h = x + norm1(attn(x)); out = h + norm2(mlp(h)).

Sharding is Llama's (ncl.models.llama): q/k/v and gate/up column-parallel, o and down row-parallel
(one all-reduce each per layer), KV heads split over TP or replicated when TP is a multiple of
them, the embedding and LM head vocabulary-parallel.  The per-head norms act within a head, so
every rank holds the whole [head_dim] weights and they need no communication.  Tensor names are
Hugging Face's (model.layers.{i}.self_attn.q_norm.weight, .post_feedforward_layernorm.weight, ...).
"""
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .configs import FULL, SLIDING, ExaoneConfig
from .layers import KVCache, apply_rope, attention
from .llama import Attention as LlamaAttention, DenseDecoder, FeedForward, as_group, loaded_norm
from .weights import weight_source


def weight_shapes(cfg: ExaoneConfig) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the model by its Hugging Face name, with its full shape."""
    d, hd, q, kv = cfg.dim, cfg.head_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.q_proj.weight": (q, d), f"{p}.self_attn.k_proj.weight": (kv, d),
                       f"{p}.self_attn.v_proj.weight": (kv, d), f"{p}.self_attn.o_proj.weight": (d, q),
                       f"{p}.self_attn.q_norm.weight": (hd,), f"{p}.self_attn.k_norm.weight": (hd,),
                       f"{p}.post_attention_layernorm.weight": (d,), f"{p}.mlp.gate_proj.weight": (cfg.ffn_dim, d),
                       f"{p}.mlp.up_proj.weight": (cfg.ffn_dim, d), f"{p}.mlp.down_proj.weight": (d, cfg.ffn_dim),
                       f"{p}.post_feedforward_layernorm.weight": (d,)})
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


class Attention(nn.Module):
    def __init__(self, cfg: ExaoneConfig, layer: int, group, source, dtype):
        super().__init__()
        prefix = f"model.layers.{layer}.self_attn"
        proj = LlamaAttention(cfg, prefix, group, source, dtype)  # q/k/v/o built and sharded exactly as Llama's
        self.wq, self.wk, self.wv, self.wo = proj.wq, proj.wk, proj.wv, proj.wo
        self.n_heads, self.n_kv_heads, self.head_dim = proj.n_heads, proj.n_kv_heads, proj.head_dim  # this rank's
        self.q_norm = loaded_norm(source, f"{prefix}.q_norm.weight", cfg.head_dim, cfg.norm_eps, dtype)
        self.k_norm = loaded_norm(source, f"{prefix}.k_norm.weight", cfg.head_dim, cfg.norm_eps, dtype)
        self.window, self.rotates = cfg.window(layer), cfg.rotates(layer)
        self.cache: Optional[KVCache] = None

    def forward(self, x, positions, cos, sin, start_pos: int):
        b, t, _ = x.shape                                                          # x: [B, T, D]
        q = self.q_norm(self.wq(x).view(b, t, self.n_heads, self.head_dim))        # [B, T, Hq, hd]
        k = self.k_norm(self.wk(x).view(b, t, self.n_kv_heads, self.head_dim))     # [B, T, Hkv, hd]
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        if self.rotates:
            q, k = apply_rope(q, cos, sin, positions), apply_rope(k, cos, sin, positions)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)                              # [B, start_pos + T, Hkv, hd]
        y = attention(q, k, v, start_pos=start_pos, window=self.window)            # [B, T, Hq, hd]
        return self.wo(y.reshape(b, t, self.n_heads * self.head_dim))              # all-reduce -> [B, T, D]


class Block(nn.Module):
    """Layer `index`: attention, then the MLP, each normed after it and added to the residual."""

    def __init__(self, cfg: ExaoneConfig, index: int, group=None, *, source=None, dtype=torch.float32, seed: int = 0):
        super().__init__()
        group, source = as_group(group), source or weight_source(seed)
        p = f"model.layers.{index}"
        self.attention = Attention(cfg, index, group, source, dtype)
        self.post_attention_layernorm = loaded_norm(source, f"{p}.post_attention_layernorm.weight", cfg.dim, cfg.norm_eps,
                                              dtype)
        self.mlp = FeedForward(cfg, f"{p}.mlp", group, source, dtype)  # SwiGLU, the same tensor names as Llama's
        self.post_feedforward_layernorm = loaded_norm(source, f"{p}.post_feedforward_layernorm.weight", cfg.dim,
                                                cfg.norm_eps, dtype)

    def forward(self, x, positions, cos, sin, start_pos: int):  # x: [B, T, D]
        h = x + self.post_attention_layernorm(self.attention(x, positions, cos, sin, start_pos))
        return h + self.post_feedforward_layernorm(self.mlp(h))  # [B, T, D]


class Exaone(DenseDecoder):
    """EXAONE 4.0 over a tensor-parallel group, with the interface of Llama (DenseDecoder).  Sliding
    layers keep every position in their KV cache too, their window applied by the mask.

    group: an ncl Communicator, torch ProcessGroup or tp.Group (None: TP = 1).  checkpoint: a Hugging
    Face directory (cfg None: its config.json) or any weight source; None: random weights from seed."""

    config_class = ExaoneConfig
    block = Block


__all__ = ["ExaoneConfig", "Exaone", "weight_shapes", "SLIDING", "FULL"]
