"""MXFP4 (OCP microscaling FP4): the format gpt-oss stores its expert weights in.

A weight row of K values is cut into K/32 blocks.  Each block keeps 32 FP4 E2M1 codes, two per
byte (16 uint8), and one shared E8M0 scale byte s meaning 2^(s - 127).  A code is 1 sign bit,
2 exponent bits and 1 mantissa bit: codes 0..7 are 0, .5, 1, 1.5, 2, 3, 4, 6 and codes 8..15 the
same values negated.  In a byte, the low nibble is the even element and the high nibble the odd
one (as in the gpt-oss Hugging Face checkpoints).  Storage is 4.25 bits per weight.

    blocks [..., K/32, 16] uint8, scales [..., K/32] uint8  <->  weight [..., K]

The matmul never holds the whole weight decoded: it decodes `tile_rows` output rows at a time
(a tile of the weight), multiplies, and drops the tile.  Bytes decode through a 256-entry table
of value pairs, one gather per byte.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

BLOCK = 32                 # values per block (one scale each)
BLOCK_BYTES = BLOCK // 2   # packed bytes per block
SCALE_BIAS = 127           # E8M0: 2^(s - 127); s = 255 is NaN
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_MAX = 6.0

_MIDPOINTS = [(a + b) / 2 for a, b in zip(FP4_VALUES[:7], FP4_VALUES[1:8])]  # 0.25, 0.75, ... 5: rounding boundaries
_PAIRS = {}  # dtype -> [256, 2] table: byte -> (value of its low nibble, value of its high nibble)


def _pairs(dtype: torch.dtype) -> torch.Tensor:
    if dtype not in _PAIRS:
        values = torch.tensor(FP4_VALUES, dtype=torch.float32)
        codes = torch.arange(256)
        _PAIRS[dtype] = torch.stack([values[codes & 0xF], values[codes >> 4]], dim=1).to(dtype)
    return _PAIRS[dtype]


def _check(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, not {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != BLOCK_BYTES or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} must be [..., G, {BLOCK_BYTES}] with scales [..., G], "
                         f"not {tuple(scales.shape)}")


def scale_values(scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """E8M0 bytes -> 2^(s - 127) (NaN for 255)."""
    out = torch.exp2(scales.to(torch.float32) - SCALE_BIAS)
    return out.masked_fill(scales == 255, float("nan")).to(dtype)


def decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[..., G, 16] uint8 blocks and [..., G] scales -> [..., G * 32] values of `dtype`.  In float32
    and bfloat16 (8 exponent bits) every product code x 2^(s-127) is exact, so they decode directly."""
    _check(blocks, scales)
    wide = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    pairs = F.embedding(blocks.int(), _pairs(wide))                        # [..., G, 16, 2]
    values = pairs.flatten(-2) * scale_values(scales, wide).unsqueeze(-1)  # [..., G, 32]
    return values.flatten(-2).to(dtype)                                    # [..., G * 32]


def encode(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[..., K] floats (K a multiple of 32) -> (blocks [..., K/32, 16] uint8, scales [..., K/32] uint8).
    Each block's scale is the smallest power of two that brings its largest |value| within 6; each
    value then rounds to the nearest E2M1 value (ties to the smaller magnitude)."""
    if weight.shape[-1] % BLOCK:
        raise ValueError(f"the last dimension ({weight.shape[-1]}) must be a multiple of {BLOCK}")
    w = weight.detach().to(torch.float32).contiguous().reshape(*weight.shape[:-1], -1, BLOCK)  # [..., G, 32]
    amax = w.abs().amax(dim=-1)                                                      # [..., G]
    exponent = torch.ceil(torch.log2(amax / FP4_MAX)).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    exponent = torch.where(amax > 0, exponent, torch.zeros_like(exponent)).clamp(-SCALE_BIAS, SCALE_BIAS)
    scaled = w * torch.exp2(-exponent).unsqueeze(-1)                                 # |scaled| <= 6
    magnitude = scaled.abs()
    code = torch.zeros(magnitude.shape, dtype=torch.uint8)                           # [..., G, 32] in 0..7:
    for boundary in _MIDPOINTS:                                                      # the rounding boundaries
        code += magnitude > boundary                                                 # below |value|
    code |= ((scaled < 0) & (code > 0)).to(torch.uint8) << 3                          # sign bit (never -0)
    code = code.reshape(*code.shape[:-1], BLOCK_BYTES, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)                                      # low nibble: even element
    scales = (exponent + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def matmul(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
           tile_rows: int = 1024) -> torch.Tensor:
    """x @ W^T (+ bias) for W [N, K] stored as blocks [N, K/32, 16] and scales [N, K/32]:
    x [..., K] -> [..., N] in x's dtype, decoding `tile_rows` rows of W at a time."""
    _check(blocks, scales)
    if blocks.dim() != 3:
        raise ValueError(f"matmul takes one weight: blocks [N, K/32, 16], not {tuple(blocks.shape)}")
    n, k = blocks.shape[0], blocks.shape[1] * BLOCK
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k}")
    flat = x.reshape(-1, k)                                                          # [T, K]
    out = torch.empty(flat.shape[0], n, dtype=x.dtype)                               # [T, N]
    for start in range(0, n, tile_rows):
        stop = min(start + tile_rows, n)
        tile = decode(blocks[start:stop], scales[start:stop], x.dtype)               # [rows, K]
        torch.matmul(flat, tile.t(), out=out[:, start:stop])
    if bias is not None:
        out += bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], n)


__all__ = ["BLOCK", "FP4_VALUES", "FP4_MAX", "scale_values", "decode", "encode", "matmul"]
