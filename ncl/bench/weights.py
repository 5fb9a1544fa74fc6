"""A fast weight source for benchmarks (ncl.models' `checkpoint=` accepts any object with get()).

The models' own seeded random weights draw every value from its own generator stream (and
gpt-oss then encodes every expert into MXFP4): ~15 s per billion values here, minutes for one
405B or gpt-oss-120b layer, far more than the point's run.  Timing does not depend on the
values, so large tensors here come from one seeded random pattern of PATTERN values: element i
of the full tensor (row-major) is pattern[(i + offset(name)) % PATTERN].  A shard is still
exactly its slice of the same full tensor, whatever the split, so greedy tokens stay equal
across TP / EP sizes.  Small tensors (norms, biases, sinks, the MoE router: whose values decide
where tokens go) are the models' exact seeded random values.  MXFP4 expert weights are produced
directly as random FP4 codes with scales near 2^-7 (|w| <= 0.05), as a checkpoint would store them.
"""
import zlib
from typing import Optional, Sequence

import torch

from ncl.models.weights import RandomWeights

PATTERN = (1 << 20) + 7       # values in the pattern; odd, so rows of power-of-two length do not repeat it
SMALL = 1 << 22               # full tensors up to this many values: exact seeded random
MXFP4_SCALE = 120             # E8M0 byte: 2^(120 - 127) = 1/128
MXFP4_NAMES = ("gate_up_proj", "down_proj")


class _Stored:
    """What `name in source.files` asks of a checkpoint: experts' MXFP4 tensors are 'stored'."""

    def __contains__(self, name: str) -> bool:
        return name.endswith(("_blocks", "_scales")) and any(f".{n}_" in name for n in MXFP4_NAMES)


class FastWeights:
    def __init__(self, seed: int = 0, std: float = 0.02, config: Optional[dict] = None):
        self.seed, self.std = seed, std
        self.exact = RandomWeights(seed, std)
        self.files = _Stored()
        self.config = config or {}   # a checkpoint's config.json (gpt-oss compares it with the model's)
        self._patterns = {}

    def _pattern(self, dtype, std: float, mean: float) -> torch.Tensor:
        """The pattern twice over, so that any row of up to PATTERN values is one contiguous slice."""
        key = (dtype, std, mean)
        if key not in self._patterns:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 17)
            if dtype == torch.uint8:
                values = torch.randint(0, 256, (PATTERN,), generator=g, dtype=torch.uint8)
            else:
                values = (torch.randn(PATTERN, generator=g) * std + mean).to(dtype)
            self._patterns[key] = torch.cat([values, values])
        return self._patterns[key]

    def get(self, name: str, full_shape: Sequence[int], dim: Optional[int] = None, start: int = 0,
            stop: Optional[int] = None, *, dtype=torch.float32, std: Optional[float] = None,
            mean: float = 0.0) -> torch.Tensor:
        shape = tuple(int(n) for n in full_shape)
        numel = 1
        for n in shape:
            numel *= n
        std = self.std if std is None else std
        if name.endswith("_scales"):
            dim_stop = shape[dim] if stop is None else stop
            out_shape = list(shape)
            if dim is not None:
                out_shape[dim] = dim_stop - start
            return torch.full(out_shape, MXFP4_SCALE, dtype=torch.uint8)
        if numel <= SMALL and not name.endswith("_blocks"):
            return self.exact.get(name, shape, dim, start, stop, dtype=dtype, std=std, mean=mean)
        return self._slice(name, shape, dim, start, stop, dtype if not name.endswith("_blocks") else torch.uint8,
                           std, mean)

    def _slice(self, name, shape, dim, start, stop, dtype, std, mean) -> torch.Tensor:
        """The slice as runs of consecutive full-tensor elements (everything after `dim` is whole),
        each copied from the pattern in pieces of at most PATTERN values."""
        lo, hi = [0] * len(shape), list(shape)
        if dim is not None:
            dim %= len(shape)
            lo[dim], hi[dim] = start, shape[dim] if stop is None else stop
        out = torch.empty([b - a for a, b in zip(lo, hi)], dtype=dtype)
        if out.numel() == 0:
            return out
        pattern = self._pattern(dtype, std, mean)
        flat = out.view(-1)
        strides = [1] * len(shape)                       # row-major strides of the full tensor
        for k in range(len(shape) - 2, -1, -1):
            strides[k] = strides[k + 1] * shape[k + 1]
        last = -1 if dim is None else dim                # dims 0..last enumerate the runs
        run = strides[last] * (hi[last] - lo[last]) if dim is not None else out.numel()
        first = torch.zeros((), dtype=torch.int64) + sum(a * s for a, s in zip(lo, strides))
        for k in range(last):
            first = first.unsqueeze(-1) + torch.arange(hi[k] - lo[k], dtype=torch.int64) * strides[k]
        offset = zlib.crc32(name.encode())
        for r, f in enumerate(first.reshape(-1).tolist()):
            for k in range(0, run, PATTERN):
                n = min(PATTERN, run - k)
                o = (f + k + offset) % PATTERN
                flat[r * run + k:r * run + k + n] = pattern[o:o + n]
        return out

    def __repr__(self) -> str:
        return f"FastWeights(seed={self.seed}, std={self.std})"


def source_for(cfg, seed: int) -> FastWeights:
    """The fast source for a model config (with the config.json gpt-oss checks a source against)."""
    return FastWeights(seed, config=cfg.to_hf() if hasattr(cfg, "to_hf") else None)
