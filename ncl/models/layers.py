"""Architecture-neutral pieces of a decoder: RMSNorm, rotary embeddings (plain, llama3-scaled and
YaRN), a KV cache, and attention with grouped KV heads, optional sink logits and a sliding window.

Shapes: B batch, T new tokens, S keys (cached + new), H heads, D head dim.  Nothing here
communicates: tensor parallelism lives in the models, which hand these functions their local heads.

Rotary embeddings use the Hugging Face "rotate half" layout: a head's first D/2 features pair
with its last D/2 (feature i with i + D/2), which is how HF checkpoints store q and k projections.
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, *, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)  # as HF: normalise in float32, scale in the model's dtype


# ---- rotary position embeddings ------------------------------------------------------------------------------

def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1: wavelengths longer than original/low_freq_factor are stretched by `factor`, those
    shorter than original/high_freq_factor kept, and the band between interpolated smoothly."""
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    original = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 0 at the long end, 1 at the short end
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def _yarn_inv_freq(inv_freq: torch.Tensor, head_dim: int, theta: float, s: dict) -> torch.Tensor:
    """YaRN's "NTK by parts": dimensions that turn fewer than beta_slow times over the original
    context are interpolated (divided by factor), more than beta_fast times kept, a linear ramp between."""
    factor, original = float(s["factor"]), float(s["original_max_position_embeddings"])
    beta_fast, beta_slow = float(s.get("beta_fast", 32.0)), float(s.get("beta_slow", 1.0))

    def dim_of(rotations: float) -> float:  # the pair index that turns `rotations` times over the original context
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if high == low:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0.0, 1.0)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    return inv_freq / factor * (1 - keep) + inv_freq * keep


def rope_frequencies(head_dim: int, max_pos: int, theta: float,
                     scaling: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [max_pos, head_dim // 2] float32, for positions 0..max_pos-1.

    scaling: None; {"rope_type": "llama3", factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings}; or {"rope_type": "yarn", factor, beta_fast, beta_slow,
    original_max_position_embeddings, truncate (default True)}, whose cos and sin are also multiplied by
    the attention scaling 0.1 ln(factor) + 1 (so q.k grows by its square, as YaRN prescribes)."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, not {head_dim}")
    if max_pos < 0:
        raise ValueError(f"max_pos must be >= 0, not {max_pos}")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # [D/2]
    mscale = 1.0
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind == "yarn":
        inv_freq = _yarn_inv_freq(inv_freq, head_dim, theta, scaling)
        factor = float(scaling["factor"])
        mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    elif kind not in (None, "default"):
        raise ValueError(f"unknown rope scaling {kind!r}: the types are llama3 and yarn")
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)  # [max_pos, D/2]
    return (angles.cos() * mscale).float(), (angles.sin() * mscale).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated by the angles of positions ([T] or [B, T]); rotate-half pairing."""
    c, s = cos[positions], sin[positions]  # [T, D/2] or [B, T, D/2]
    if c.dim() == 2:
        c, s = c[None], s[None]
    c, s = c[:, :, None, :], s[:, :, None, :]  # [B or 1, T, 1, D/2]
    x1, x2 = x.float().chunk(2, dim=-1)  # [B, T, H, D/2] each
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


# ---- KV cache and attention ------------------------------------------------------------------------------------

class KVCache(nn.Module):
    """Keys and values of past positions, [max_batch, max_seq, n_kv_heads, head_dim] each."""

    def __init__(self, max_batch: int, max_seq: int, n_kv_heads: int, head_dim: int, dtype=torch.float32):
        super().__init__()
        if max_batch < 1 or max_seq < 1:
            raise ValueError(f"max_batch and max_seq must be >= 1, not {max_batch} and {max_seq}")
        shape = (max_batch, max_seq, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, positions: Union[torch.Tensor, int], k: torch.Tensor,
               v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, T, Hkv, D] at positions (a [T] range, or its first position); the keys and
        values of positions 0..last, [B, last + 1, Hkv, D]."""
        b, t = k.shape[:2]
        start = int(positions) if isinstance(positions, int) else int(positions[0])
        end = start + t
        if b > self.k.shape[0] or end > self.k.shape[1]:
            raise ValueError(f"the cache holds {self.k.shape[0]} sequences of {self.k.shape[1]} positions; "
                             f"asked for {b} sequences up to position {end}")
        self.k[:b, start:end] = k
        self.v[:b, start:end] = v
        return self.k[:b, :end], self.v[:b, :end]


def _mask(t: int, s: int, start_pos: int, window: Optional[int]) -> torch.Tensor:
    """[T, S] True where query i (at position start_pos + i) may see key j (at position j)."""
    q_pos = torch.arange(start_pos, start_pos + t)[:, None]
    k_pos = torch.arange(s)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window  # the last `window` positions, this one included
    return allowed


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, start_pos: int,
              sinks: Optional[torch.Tensor] = None, window: Optional[int] = None,
              scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention of q [B, T, Hq, D] over k, v [B, S, Hkv, D] (S = start_pos + T when the cache
    holds every past key), q head h reading KV head h // (Hq / Hkv).  sinks [Hq]: a learned logit per
    head that joins the softmax's denominator (its probability goes nowhere).  window: keys more than
    window - 1 positions behind the query are masked.  Returns [B, T, Hq, D]."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} KV heads evenly")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, not {window}")
    scale = d ** -0.5 if scale is None else scale
    allowed = _mask(t, s, start_pos, window)  # [T, S]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T or S, D]
    if sinks is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=hq != hkv)
        return out.transpose(1, 2)  # [B, T, Hq, D]
    k = k.repeat_interleave(hq // hkv, dim=1)  # [B, Hq, S, D]
    v = v.repeat_interleave(hq // hkv, dim=1)
    sink = sinks.float().view(1, hq, 1, 1)
    rows = max(1, _SCORES_BUDGET // max(1, b * hq * s))  # queries per chunk: bounds the [B, Hq, rows, S] scores
    out = []
    for i in range(0, t, rows):
        scores = (q[:, :, i:i + rows].float() @ k.float().transpose(-1, -2)) * scale  # [B, Hq, rows, S]
        scores = scores.masked_fill(~allowed[i:i + rows], float("-inf"))
        probs = torch.cat([scores, sink.expand(*scores.shape[:3], 1)], dim=-1).softmax(dim=-1)[..., :-1]
        out.append(probs.to(v.dtype) @ v)  # [B, Hq, rows, D]; the sink's share of the probability is dropped
    return torch.cat(out, dim=2).transpose(1, 2)  # [B, T, Hq, D]


_SCORES_BUDGET = 1 << 25  # float32 scores held at once by the sinks path (128 MiB)
