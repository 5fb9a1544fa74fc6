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
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .layers import KVCache, RMSNorm, apply_rope, attention
from .llama import Attention as LlamaAttention, DenseDecoder, FeedForward, as_group, config_from
from .weights import weight_source

SLIDING, FULL = "sliding_attention", "full_attention"  # Hugging Face's layer_types strings (as gpt-oss's)
EXAONE_ROPE = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def pattern_layer_types(n_layers: int, pattern="LLLG") -> tuple:
    """layer_types from Hugging Face's sliding_window_pattern: an int N (every N-th layer full) or a
    string of L (sliding) and G (full) repeated from layer 0, whose last layer is always full."""
    if isinstance(pattern, int):
        return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n_layers))
    types = [SLIDING if pattern[i % len(pattern)] == "L" else FULL for i in range(n_layers)]
    return tuple(types[:-1] + [FULL])


@dataclass
class ExaoneConfig:
    dim: int = 5120
    n_layers: int = 64
    n_heads: int = 40
    n_kv_heads: int = 8
    head_dim: int = 128
    ffn_dim: int = 27392
    vocab_size: int = 102400
    sliding_window: Optional[int] = 4096
    layer_types: Optional[tuple] = None   # per layer SLIDING or FULL; default LLLG repeated
    rope_theta: float = 1000000.0
    rope_scaling: Optional[dict] = field(default_factory=lambda: dict(EXAONE_ROPE))
    norm_eps: float = 1e-5
    max_seq_len: int = 131072
    tie_embeddings: bool = False

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ExaoneConfig.{name} must be a positive int, not {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be None or a positive int, not {self.sliding_window!r}")
        if self.layer_types is None:
            self.layer_types = pattern_layer_types(self.n_layers, 4 if self.sliding_window else 1)
        self.layer_types = tuple(self.layer_types)[:self.n_layers]  # fewer layers: the model's first ones
        if len(self.layer_types) != self.n_layers or set(self.layer_types) - {SLIDING, FULL}:
            raise ValueError(f"layer_types must give {SLIDING!r} or {FULL!r} for each of the {self.n_layers} layers")
        if self.sliding_window is None and SLIDING in self.layer_types:
            raise ValueError("sliding layers need a sliding_window")

    def window(self, layer: int) -> Optional[int]:
        """The window of layer `layer` (None: it attends to every position)."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def rotates(self, layer: int) -> bool:
        """Whether layer `layer` applies RoPE: with a sliding window, only its sliding layers do."""
        return self.sliding_window is None or self.layer_types[layer] == SLIDING

    @classmethod
    def from_hf(cls, hf: dict) -> "ExaoneConfig":
        """From a Hugging Face config.json (Exaone4ForCausalLM; rope_theta top-level or in rope_parameters)."""
        rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 1000000.0))
        n_layers, window = hf["num_hidden_layers"], hf.get("sliding_window")
        types = hf.get("layer_types")
        if types is None:  # older configs give only the pattern
            pattern = hf.get("sliding_window_pattern") or 4
            types = pattern_layer_types(n_layers, pattern) if window else (FULL,) * n_layers
        return cls(dim=hf["hidden_size"], n_layers=n_layers, n_heads=hf["num_attention_heads"],
                   n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
                   head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                   ffn_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"], sliding_window=window,
                   layer_types=tuple(types), rope_theta=float(theta),
                   rope_scaling=rope if rope.get("rope_type", "default") != "default" else None,
                   norm_eps=hf.get("rms_norm_eps", 1e-5), max_seq_len=hf.get("max_position_embeddings", 131072),
                   tie_embeddings=hf.get("tie_word_embeddings", False))

    def to_hf(self) -> dict:
        return {"architectures": ["Exaone4ForCausalLM"], "model_type": "exaone4", "hidden_size": self.dim,
                "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "intermediate_size": self.ffn_dim,
                "vocab_size": self.vocab_size, "sliding_window": self.sliding_window,
                "layer_types": list(self.layer_types), "rope_theta": self.rope_theta,
                "rope_scaling": self.rope_scaling, "rms_norm_eps": self.norm_eps,
                "max_position_embeddings": self.max_seq_len, "tie_word_embeddings": self.tie_embeddings,
                "hidden_act": "silu"}


EXAONE_CONFIGS = {
    # LGAI-EXAONE/EXAONE-4.0-32B config.json (Hugging Face), as published
    "exaone-4.0-32b": ExaoneConfig(),
    # for tests: 4 layers (LLLG: both kinds), a window of 4 positions, 2 KV heads (replicated at TP 4 and 8),
    # heads * head_dim (128) != dim (64), llama3 rope scaling that matters within the test's positions
    "exaone-tiny": ExaoneConfig(dim=64, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=16, ffn_dim=160, vocab_size=256,
                                sliding_window=4, max_seq_len=1024,
                                rope_scaling={**EXAONE_ROPE, "original_max_position_embeddings": 64}),
}


def param_count(cfg: ExaoneConfig) -> int:
    """Parameters of the whole model (all active for every token).  The model card of EXAONE-4.0-32B
    publishes 30.95B without embeddings and a model size of 32.0B; this gives 30,954,640,384 without
    the two (untied) embedding matrices and 32,003,216,384 in all."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    attention = 2 * cfg.dim * q + 2 * cfg.dim * kv + 2 * cfg.head_dim  # q, o; k, v; q_norm, k_norm
    layer = attention + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim         # gate, up, down; the two post-norms
    embeddings = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    return cfg.n_layers * layer + embeddings + cfg.dim                  # + the final norm


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


def _norm(source, name: str, size: int, eps: float, dtype) -> RMSNorm:
    norm = RMSNorm(size, eps, dtype=dtype)
    norm.weight = nn.Parameter(source.get(name, (size,), dtype=dtype, mean=1.0), requires_grad=False)
    return norm


class Attention(nn.Module):
    def __init__(self, cfg: ExaoneConfig, layer: int, group, source, dtype):
        super().__init__()
        prefix = f"model.layers.{layer}.self_attn"
        proj = LlamaAttention(cfg, prefix, group, source, dtype)  # q/k/v/o built and sharded exactly as Llama's
        self.wq, self.wk, self.wv, self.wo = proj.wq, proj.wk, proj.wv, proj.wo
        self.n_heads, self.n_kv_heads, self.head_dim = proj.n_heads, proj.n_kv_heads, proj.head_dim  # this rank's
        self.q_norm = _norm(source, f"{prefix}.q_norm.weight", cfg.head_dim, cfg.norm_eps, dtype)
        self.k_norm = _norm(source, f"{prefix}.k_norm.weight", cfg.head_dim, cfg.norm_eps, dtype)
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
        self.post_attention_layernorm = _norm(source, f"{p}.post_attention_layernorm.weight", cfg.dim, cfg.norm_eps,
                                              dtype)
        self.mlp = FeedForward(cfg, f"{p}.mlp", group, source, dtype)  # SwiGLU, the same tensor names as Llama's
        self.post_feedforward_layernorm = _norm(source, f"{p}.post_feedforward_layernorm.weight", cfg.dim,
                                                cfg.norm_eps, dtype)

    def forward(self, x, positions, cos, sin, start_pos: int):  # x: [B, T, D]
        h = x + self.post_attention_layernorm(self.attention(x, positions, cos, sin, start_pos))
        return h + self.post_feedforward_layernorm(self.mlp(h))  # [B, T, D]


class Exaone(DenseDecoder):
    """EXAONE 4.0 over a tensor-parallel group, with the interface of Llama (DenseDecoder).  Sliding
    layers keep every position in their KV cache too, their window applied by the mask.

    group: an ncl Communicator, torch ProcessGroup or tp.Group (None: TP = 1).  checkpoint: a Hugging
    Face directory (cfg None: its config.json) or any weight source; None: random weights from seed."""

    def __init__(self, cfg: Optional[ExaoneConfig] = None, group=None, *, dtype=torch.float32, seed: int = 0,
                 checkpoint=None):
        super().__init__()
        cfg = cfg if cfg is not None else config_from(ExaoneConfig, "Exaone", checkpoint)
        source = weight_source(seed, checkpoint)
        self._tables(cfg, group, source, dtype)
        self.layers = nn.ModuleList(Block(cfg, i, self.group, source=source, dtype=dtype) for i in range(cfg.n_layers))
        self.norm = _norm(source, "model.norm.weight", cfg.dim, cfg.norm_eps, dtype)


__all__ = ["ExaoneConfig", "EXAONE_CONFIGS", "Exaone", "param_count", "weight_shapes", "SLIDING", "FULL"]
