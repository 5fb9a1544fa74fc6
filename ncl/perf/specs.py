"""The collectives ncl-perf measures, in nccl-tests' conventions (see nccl-tests' doc/PERFORMANCE.md).

`size` is what nccl-tests calls size: the bytes of the larger side of the exchange on one rank
(all_gather and gather: the gathered output; reduce_scatter, scatter and all_to_all: the whole
input).  algbw = size / time; busbw = algbw * bus factor, the factor that makes busbw comparable
with the hardware's link bandwidth whatever the rank count.

Test data: rank r's element at global index i is ((r + i) mod 4) + 1, in the buffer's dtype.  Sums
and products of 8 ranks of those are exact in every dtype ncl supports (float16 and bfloat16
included; fp8 sums are exact in float32, and products beyond fp8's range overflow alike), so every
backend's result can be checked exactly against a numpy reference built in float64 (integers in
int64) and cast once, which is also ncl's rounding rule.
"""
from typing import Callable, Dict, List, NamedTuple, Optional

import numpy as np

from ..collectives import COLLECTIVES, GATHERS, SCATTERS
from ..dtypes import LISTED, numpy_dtype  # noqa: F401 (numpy_dtype: the workers' and tests' too)

OPS = ("sum", "prod", "min", "max", "avg")
DTYPES = LISTED


class Spec(NamedTuple):
    name: str
    bus_factor: Callable[[int], float]
    reduces: bool          # takes an op
    rooted: bool           # takes a root
    size_divisor: int      # 1, or n: size must split into n equal blocks
    in_count: Callable[[int, int], int]    # (count, n) -> elements in the send buffer
    out_count: Callable[[int, int], int]   # (count, n) -> elements in the recv buffer


def _same(c, n):
    return c


def _block(c, n):
    return c // n


def _spec(name: str) -> Spec:
    """ncl-perf's view of a collective of ncl/collectives.py: the `size` side is the larger buffer."""
    c = COLLECTIVES[name]
    return Spec(name, c.bus_factor, c.reduces, c.rooted, 0 if c.block_counted else 1,
                _block if c.shape == GATHERS else _same, _block if c.shape == SCATTERS else _same)


SPECS: Dict[str, Spec] = {name: _spec(name) for name in (
    "all_reduce", "reduce", "broadcast", "all_gather", "gather", "reduce_scatter", "scatter", "all_to_all")}


def sweep_sizes(cfg) -> List[int]:
    """-b, growing by -f (or --stepbytes) while <= -e; -e itself always ends the sweep."""
    size, out = cfg.min_bytes, []
    while size <= cfg.max_bytes:
        out.append(size)
        size = size * cfg.factor if cfg.factor > 1 else size + cfg.step
    if out[-1] != cfg.max_bytes:
        out.append(cfg.max_bytes)
    return out


def element_count(spec: Spec, size: int, itemsize: int, n: int) -> int:
    """Elements of the `size` side, rounded down to what splits into n equal blocks."""
    count = size // itemsize
    return count - count % n if spec.size_divisor == 0 else count


def pattern(rank, start: int, count: int) -> np.ndarray:
    """Rank `rank`'s values at global indices start .. start+count-1 (float64)."""
    return ((np.arange(start, start + count, dtype=np.int64) + np.asarray(rank)[..., None]) % 4 + 1).astype(np.float64)


def _reduce_period(n: int, op: str, dtype: np.dtype) -> np.ndarray:
    """The reduced values over ranks 0..n-1 for global index 0..3 (the data has period 4)."""
    rows = pattern(np.arange(n), 0, 4)  # (n, 4)
    if dtype.kind in "iu":
        ints = rows.astype(np.int64)
        total = {"sum": ints.sum(0), "prod": ints.prod(0), "min": ints.min(0), "max": ints.max(0),
                 "avg": np.trunc(ints.sum(0) / n).astype(np.int64)}[op]
        return total.astype(dtype)
    total = {"sum": rows.sum(0), "prod": rows.prod(0), "min": rows.min(0), "max": rows.max(0),
             "avg": rows.sum(0) / n}[op]
    return total.astype(dtype)


def _periodic(values: np.ndarray, start: int, count: int) -> np.ndarray:
    idx = np.arange(start, start + count) % 4
    return values[idx]


def send_data(spec: Spec, rank: int, n: int, count: int, root: int, dtype: np.dtype) -> Optional[np.ndarray]:
    """What rank `rank` sends; `count` is the element count of the `size` side."""
    m = spec.in_count(count, n)
    if spec.name in ("broadcast", "scatter") and rank != root:
        return None
    return pattern(rank, 0, m).astype(dtype)


def expected(spec: Spec, rank: int, n: int, count: int, root: int, op: str, dtype: np.dtype) -> Optional[np.ndarray]:
    """What rank `rank` must hold afterwards (None: nothing to check on this rank)."""
    name, m = spec.name, spec.out_count(count, n)
    if name == "all_reduce" or (name == "reduce" and rank == root):
        return _periodic(_reduce_period(n, op, dtype), 0, m)
    if name == "reduce_scatter":
        return _periodic(_reduce_period(n, op, dtype), rank * m, m)
    if name == "broadcast":
        return pattern(root, 0, m).astype(dtype)
    if name in ("all_gather", "gather") and (name == "all_gather" or rank == root):
        block = m // n
        return np.concatenate([pattern(r, 0, block) for r in range(n)]).astype(dtype)
    if name == "scatter":
        return pattern(root, rank * m, m).astype(dtype)
    if name == "all_to_all":
        block = m // n
        return np.concatenate([pattern(r, rank * block, block) for r in range(n)]).astype(dtype)
    return None


def wrong(result: Optional[np.ndarray], want: Optional[np.ndarray]) -> int:
    """Elements that differ (exactly: the test data makes every result exact; NaN, an fp8 overflow, equals NaN)."""
    if want is None:
        return 0
    if result is None or result.shape != want.shape:
        return int(want.size)
    if result.dtype.kind in "iu":
        return int(np.count_nonzero(result != want))
    a, b = result.astype(np.float64), want.astype(np.float64)
    return int(np.count_nonzero((a != b) & ~(np.isnan(a) & np.isnan(b))))
