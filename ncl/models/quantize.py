"""Fake quantization: a weight or a cached key/value rounded to a low-precision format and straight
back, so a model keeps computing in its own dtype while carrying exactly the rounding error that
storing the format would (what accuracy measurements of a format need; none of the speed).

Weight formats (WEIGHT_FORMATS), each over the rows [out, in] of a linear weight:
    bf16   bfloat16 rounding (the reference the others are measured against)
    fp8    E4M3 with one float32 scale per output channel (row): amax / 448
    int8   symmetric, one scale per row: amax / 127, values rounded to -127..127
    mxfp4  OCP MXFP4: blocks of 32 along the row, each an E8M0 power-of-two scale (ncl.models.mxfp4)
A row's scale depends on the whole row, so QuantizedWeights rounds whole rows before it keeps a
rank's columns: the same full weight results whatever the tensor-parallel split.

KV cache formats (KV_FORMATS): bf16, and fp8 E4M3 with a scale of 1 (what serving engines do for an
uncalibrated fp8 cache), saturating at +-448; QuantizedKVCache wraps a model's KVCache so every
stored key and value is rounded.
"""
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from . import mxfp4
from .layers import KVCache

FP8_E4M3_MAX = 448.0  # the largest finite E4M3 value (the "fn" variant: no infinities)
INT8_MAX = 127        # symmetric: -128 is never used, so 0 sits in the middle


def _per_row_scale(w: torch.Tensor, top: float) -> torch.Tensor:
    amax = w.abs().amax(dim=-1, keepdim=True)                       # [out, 1]
    return torch.where(amax > 0, amax / top, torch.ones_like(amax))  # an all-zero row keeps scale 1


def fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest E4M3 value (ties to even), saturating at +-448; float32."""
    x = x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)  # older torch turns out-of-range casts into NaN
    return x.to(torch.float8_e4m3fn).float()


def fp8_per_channel(w: torch.Tensor) -> torch.Tensor:
    """w [..., in] with each row scaled to +-448, rounded to E4M3, scaled back (float32)."""
    w = w.float()
    scale = _per_row_scale(w, FP8_E4M3_MAX)
    return fp8_e4m3(w / scale) * scale


def int8_per_channel(w: torch.Tensor) -> torch.Tensor:
    """w [..., in] with each row scaled to +-127, rounded to integers (ties to even), scaled back."""
    w = w.float()
    scale = _per_row_scale(w, INT8_MAX)
    return torch.round(w / scale).clamp(-INT8_MAX, INT8_MAX) * scale


def mxfp4_blocks(w: torch.Tensor) -> torch.Tensor:
    """w [..., in] (in a multiple of 32) through MXFP4 encoding and decoding (float32)."""
    blocks, scales = mxfp4.encode(w.float())
    return mxfp4.decode(blocks, scales, torch.float32)


def bf16(w: torch.Tensor) -> torch.Tensor:
    return w.to(torch.bfloat16).float()


WEIGHT_FORMATS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "bf16": bf16, "fp8": fp8_per_channel, "int8": int8_per_channel, "mxfp4": mxfp4_blocks}
KV_FORMATS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"bf16": bf16, "fp8": fp8_e4m3}

# The linear weights of a Llama layer (Hugging Face names): quantized in a model's format.  The rest
# (embeddings, tied LM head, norms) stays in the reference format, as quantized checkpoints keep it.
LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                   "up_proj.weight", "down_proj.weight")


def _format(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} format {name!r}: the formats are {', '.join(table)}")
    return table[name]


class QuantizedWeights:
    """A weight source (ncl.models.weights) whose linear weights come fake-quantized to `fmt`, and
    every other tensor rounded to `rest` (bf16)."""

    def __init__(self, source, fmt: str, rest: str = "bf16"):
        self.source, self.fmt, self.rest = source, fmt, rest
        self._linear, self._other = _format(WEIGHT_FORMATS, fmt, "weight"), _format(WEIGHT_FORMATS, rest, "weight")

    def get(self, name: str, full_shape: Optional[Sequence[int]] = None, dim: Optional[int] = None, start: int = 0,
            stop: Optional[int] = None, *, dtype=torch.float32, **random_only) -> torch.Tensor:
        if not name.endswith(LINEAR_SUFFIXES):
            return self._other(self.source.get(name, full_shape, dim, start, stop, **random_only)).to(dtype)
        if dim in (None, 0, -2):  # whole rows: round them as they come
            return self._linear(self.source.get(name, full_shape, dim, start, stop, **random_only)).to(dtype)
        whole = self._linear(self.source.get(name, full_shape, None, **random_only))  # a row's scale needs all of it
        stop = whole.shape[-1] if stop is None else stop
        return whole[:, start:stop].to(dtype).contiguous()

    def __repr__(self) -> str:
        return f"QuantizedWeights({self.source!r}, {self.fmt!r})"


class QuantizedKVCache(nn.Module):
    """A KVCache (ncl.models.layers) that stores keys and values fake-quantized by `round`."""

    def __init__(self, cache: KVCache, round: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.cache, self.round = cache, round

    def update(self, positions, k: torch.Tensor, v: torch.Tensor):
        return self.cache.update(positions, self.round(k).to(k.dtype), self.round(v).to(v.dtype))


def quantize_kv_cache(model: nn.Module, fmt: str) -> None:
    """Make the KV caches of every attention layer of model store `fmt`: call it after setup_cache
    (which makes new, plain caches).  A cache already wrapped gets the new format instead."""
    round = _format(KV_FORMATS, fmt, "KV cache")
    owners = [m for m in model.modules() if not isinstance(m, QuantizedKVCache)
              and isinstance(getattr(m, "cache", None), (KVCache, QuantizedKVCache))]
    for module in owners:  # found first: wrapping while model.modules() walks would visit the wrappers
        cache = module.cache
        module.cache = QuantizedKVCache(cache.cache if isinstance(cache, QuantizedKVCache) else cache, round)


__all__ = ["WEIGHT_FORMATS", "KV_FORMATS", "fp8_e4m3", "fp8_per_channel", "int8_per_channel", "mxfp4_blocks",
           "QuantizedWeights", "QuantizedKVCache", "quantize_kv_cache"]
