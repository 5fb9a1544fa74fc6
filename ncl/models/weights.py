"""Seeded random weights, generated shard by shard.

A full tensor is defined tile by tile: its last two dimensions cut into tiles of TILE x TILE (a
1-d tensor into runs of TILE * TILE), every leading dimension into single entries (one expert of a
stacked [E, out, in] tensor at a time).  Each tile comes from its own torch.Generator, seeded by a
stable hash (zlib.crc32, never hash(), which is salted per process) of (seed, name, tile index).  A
slice generates only the tiles it overlaps, so the full tensor is the same whichever way it is
split, and no rank materialises more than its slice plus one tile.

A weight source is anything with `get(name, full_shape, dim, start, stop, *, dtype, std, mean)` giving
full[name] restricted to start:stop along dim (dim None: the whole tensor): `RandomWeights` here,
`ncl.models.checkpoint.CheckpointWeights` for a Hugging Face directory; `weight_source` picks one.
"""
import itertools
import zlib
from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .checkpoint import CheckpointWeights

TILE = 256


def shard_range(size: int, index: int, parts: int, what: str = "dimension") -> Tuple[int, int]:
    """[start, stop) of part `index` of `parts` equal parts of size."""
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"shard index {index} is out of range for {parts} parts")
    if size % parts:
        raise ValueError(f"the {what} ({size}) must divide by the number of shards ({parts})")
    step = size // parts
    return index * step, (index + 1) * step


def _tile_sizes(shape: Sequence[int]) -> Tuple[int, ...]:
    if len(shape) == 1:
        return (TILE * TILE,)
    return (1,) * (len(shape) - 2) + (TILE, TILE)


def _tile_seed(seed: int, name: str, tile: Tuple[int, ...]) -> int:
    key = f"{seed}|{name}|{','.join(map(str, tile))}".encode()
    return zlib.crc32(key) | zlib.crc32(key + b"#") << 32  # 64 bits: no two tiles of a model share a stream


def random_slice(name: str, full_shape: Sequence[int], dim: Optional[int], start: int, stop: int, *, seed: int,
                 std: float, mean: float = 0.0, dtype=torch.float32) -> torch.Tensor:
    """full[name][..., start:stop (along dim), ...] of the seeded random tensor; dim None: the whole tensor."""
    shape = tuple(int(n) for n in full_shape)
    if not shape or any(n < 0 for n in shape):
        raise ValueError(f"{name}: full_shape must be a non-empty shape, not {tuple(full_shape)}")
    lo, hi = [0] * len(shape), list(shape)
    if dim is not None:
        if not -len(shape) <= dim < len(shape):
            raise ValueError(f"{name}: dim {dim} is out of range for a {len(shape)}-d tensor")
        dim %= len(shape)
        if not 0 <= start <= stop <= shape[dim]:
            raise ValueError(f"{name}: slice {start}:{stop} is out of range for dimension {dim} of {shape}")
        lo[dim], hi[dim] = start, stop
    out = torch.empty([b - a for a, b in zip(lo, hi)], dtype=dtype)
    if out.numel() == 0:
        return out
    tiles = _tile_sizes(shape)
    ranges = [range(a // t, (b - 1) // t + 1) for a, b, t in zip(lo, hi, tiles)]  # tiles overlapping the slice
    for tile in itertools.product(*ranges):
        t0 = [i * t for i, t in zip(tile, tiles)]                      # the tile's corner in the full tensor
        t1 = [min(a + t, n) for a, t, n in zip(t0, tiles, shape)]
        g = torch.Generator().manual_seed(_tile_seed(seed, name, tile))
        values = torch.randn([b - a for a, b in zip(t0, t1)], generator=g)  # the whole tile, float32
        a = [max(x, y) for x, y in zip(t0, lo)]                          # the overlap, in full coordinates
        b = [min(x, y) for x, y in zip(t1, hi)]
        src = tuple(slice(x - y, z - y) for x, y, z in zip(a, t0, b))
        dst = tuple(slice(x - y, z - y) for x, y, z in zip(a, lo, b))
        out[dst] = values[src] * std + mean
    return out


def random_shard(name: str, full_shape: Sequence[int], shard_dim: Optional[int], index: int, parts: int, *,
                 seed: int, std: float, mean: float = 0.0, dtype=torch.float32) -> torch.Tensor:
    """Part `index` of `parts` equal parts along shard_dim (None: the whole tensor) of the seeded
    random tensor full[name] ~ N(mean, std^2); the same full tensor for any `parts`."""
    if shard_dim is None:
        return random_slice(name, full_shape, None, 0, 0, seed=seed, std=std, mean=mean, dtype=dtype)
    if not -len(full_shape) <= shard_dim < len(full_shape):
        raise ValueError(f"{name}: shard_dim {shard_dim} is out of range for a {len(full_shape)}-d tensor")
    start, stop = shard_range(full_shape[shard_dim], index, parts, f"{name} dimension {shard_dim}")
    return random_slice(name, full_shape, shard_dim, start, stop, seed=seed, std=std, mean=mean, dtype=dtype)


class RandomWeights:
    """The weight source of seeded random weights (std: the default for matrices)."""

    def __init__(self, seed: int = 0, std: float = 0.02):
        self.seed, self.std = seed, std

    def get(self, name: str, full_shape: Sequence[int], dim: Optional[int] = None, start: int = 0,
            stop: Optional[int] = None, *, dtype=torch.float32, std: Optional[float] = None,
            mean: float = 0.0) -> torch.Tensor:
        stop = (full_shape[dim] if stop is None else stop) if dim is not None else 0
        return random_slice(name, full_shape, dim, start, stop, seed=self.seed,
                            std=self.std if std is None else std, mean=mean, dtype=dtype)

    def __repr__(self) -> str:
        return f"RandomWeights(seed={self.seed}, std={self.std})"


class TensorWeights:
    """The weight source of a dict of full tensors {name: tensor} (tests; models built in memory)."""

    def __init__(self, tensors):
        self.tensors = tensors

    def get(self, name: str, full_shape: Optional[Sequence[int]] = None, dim: Optional[int] = None, start: int = 0,
            stop: Optional[int] = None, *, dtype=torch.float32, **random_only) -> torch.Tensor:
        if name not in self.tensors:
            raise ValueError(f"no tensor {name!r}")
        t = self.tensors[name]
        if full_shape is not None and tuple(t.shape) != tuple(full_shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, the model expects {tuple(full_shape)}")
        if dim is not None:
            t = t.narrow(dim, start, (t.shape[dim] if stop is None else stop) - start)
        return t.to(dtype).clone()


def weight_source(seed: int = 0, checkpoint=None):
    """The weights of `checkpoint`: a Hugging Face directory, or any weight source (an object with
    get()); None: seeded random weights."""
    if checkpoint is None:
        return RandomWeights(seed)
    if hasattr(checkpoint, "get") and not isinstance(checkpoint, (str, bytes)):
        return checkpoint
    return CheckpointWeights(checkpoint)


def load_shard(dir: str, name: str, shard_dim: Optional[int], index: int, parts: int,
               dtype=torch.float32) -> torch.Tensor:
    """Part `index` of `parts` equal parts along shard_dim (None: the whole tensor) of a checkpoint's tensor."""
    source = CheckpointWeights(dir)
    if shard_dim is None:
        return source.get(name, dtype=dtype)
    shape = source.shape(name)
    start, stop = shard_range(shape[shard_dim], index, parts, f"{name} dimension {shard_dim}")
    return source.get(name, None, shard_dim, start, stop, dtype=dtype)


class _SkipInit(TorchFunctionMode):
    """Turns torch.nn.init's initialisers into no-ops: a layer's own torch.empty weight is then never
    written, so its pages are never touched (nor is torch's meta-device machinery imported)."""
    NAMES = {"kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "normal_", "uniform_",
             "trunc_normal_", "zeros_", "ones_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in self.NAMES:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def with_weight(layer_class, weight: torch.Tensor, *args, **kwargs):
    """A layer (a ncl.torch.tp layer, nn.Linear, ...) built by layer_class(*args, **kwargs) without
    initialising its weight, then given `weight`, the shard generated or read for it (no gradient)."""
    with _SkipInit():
        layer = layer_class(*args, **kwargs)
    if tuple(layer.weight.shape) != tuple(weight.shape):
        raise ValueError(f"{layer_class.__name__} expects a weight of shape {tuple(layer.weight.shape)}, "
                         f"not {tuple(weight.shape)}")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer
