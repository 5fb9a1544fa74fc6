"""Algorithm choice, in one place (as NCCL's tuning.cc): a cost model, latency plus bytes
over bandwidth, per algorithm and rank count, calibrated on this host.

The model is evaluated once per communicator, into the size thresholds the C core applies on
every call (so the per-call path stays a comparison in C):
    one_shot_max_bytes   all_reduce: one-shot up to here, two-shot above
    direct_min_bytes     registered buffers: the direct (in-place reading) path from here up
NCL_ALGO forces an all_reduce algorithm instead.
"""
import math
from typing import Dict, Tuple

from . import env
from ._native import lib

ALGORITHMS = {"one_shot": lib.NCL_ALGO_ONE_SHOT, "two_shot": lib.NCL_ALGO_TWO_SHOT, "direct": lib.NCL_ALGO_DIRECT}

# (latency in µs, ns per byte of message) per algorithm and rank count, fitted to
# `ncl-perf all_reduce` sweeps with NCL_ALGO forced (benchmarks/results/calibration.md).
# Rank counts between the calibrated ones use the next larger one.
CALIBRATION: Dict[str, Dict[int, Tuple[float, float]]] = {
    "one_shot": {2: (2.0, 0.060), 4: (20.0, 0.20), 8: (60.0, 0.45)},
    "two_shot": {2: (3.0, 0.070), 4: (35.0, 0.12), 8: (100.0, 0.20)},
    "direct": {2: (4.0, 0.045), 4: (45.0, 0.07), 8: (130.0, 0.10)},
}


def predict_us(algorithm: str, nbytes: int, nranks: int) -> float:
    """Modelled time of one all_reduce of nbytes on nranks local ranks."""
    table = CALIBRATION[algorithm]
    n = min((k for k in table if k >= nranks), default=max(table))
    latency, per_byte = table[n]
    return latency + per_byte * nbytes / 1e3


def _crossover(cheap_small: str, cheap_large: str, nranks: int) -> int:
    """Smallest size at which `cheap_large` is modelled no slower than `cheap_small`."""
    a = CALIBRATION[cheap_small][min((k for k in CALIBRATION[cheap_small] if k >= nranks),
                                     default=max(CALIBRATION[cheap_small]))]
    b = CALIBRATION[cheap_large][min((k for k in CALIBRATION[cheap_large] if k >= nranks),
                                     default=max(CALIBRATION[cheap_large]))]
    if b[1] >= a[1]:
        return 1 << 62 if b[0] > a[0] else 0
    return max(0, math.ceil((b[0] - a[0]) * 1e3 / (a[1] - b[1])))


def thresholds(nranks: int) -> Tuple[int, int]:
    """(one_shot_max_bytes, direct_min_bytes) for a communicator of nranks; the knobs
    NCL_ONE_SHOT_MAX_BYTES and NCL_DIRECT_MIN_BYTES override the model."""
    one_shot_max = _crossover("one_shot", "two_shot", nranks)
    direct_min = max(_crossover("one_shot", "direct", nranks),
                     min(one_shot_max, _crossover("two_shot", "direct", nranks)))
    forced = env.get("NCL_ONE_SHOT_MAX_BYTES"), env.get("NCL_DIRECT_MIN_BYTES")
    return (one_shot_max if forced[0] is None else forced[0]), (direct_min if forced[1] is None else forced[1])


def forced_all_reduce_algorithm() -> int:
    """NCL_ALGO, checked; NCL_ALGO_AUTO when unset."""
    name = env.get("NCL_ALGO")
    if not name:
        return lib.NCL_ALGO_AUTO
    if name not in ALGORITHMS:
        raise ValueError(f"NCL_ALGO={name!r} is not an all_reduce algorithm; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]
