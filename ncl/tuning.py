"""Algorithm choice, in one place (as NCCL's tuning.cc): a cost model, latency plus bytes
over bandwidth, per algorithm and rank count, calibrated on this host.

`calibration.json` (written by `python -m ncl.perf.calibrate`; NCL_TUNING_FILE names another)
holds, for each all_reduce algorithm and rank count, (latency µs, ns per byte) fitted to
measured sweeps.  A communicator turns the model into two size thresholds when it is created,
which the C core applies on every call (so the per-call path stays a comparison in C):
    one_shot_max_bytes   staged all_reduce: one-shot up to here, two-shot above
    direct_min_bytes     registered buffers: the direct (in-place reading) paths from here up
    cma_min_bytes        all_reduce of unregistered buffers: the two-shot through process_vm_readv
                         from here up (when the kernel allows it between the ranks)
Rank counts between calibrated ones use the next larger one.  NCL_ALGO forces an all_reduce
algorithm; NCL_ONE_SHOT_MAX_BYTES and NCL_DIRECT_MIN_BYTES override the thresholds.
"""
import functools
import json
import os
from typing import Dict, Tuple

from . import env
from ._native import lib

ALGORITHMS = {"one_shot": lib.NCL_ALGO_ONE_SHOT, "two_shot": lib.NCL_ALGO_TWO_SHOT, "direct": lib.NCL_ALGO_DIRECT,
              "cma": lib.NCL_ALGO_CMA}
NEVER = 1 << 62
_PACKAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibration.json")


@functools.lru_cache(maxsize=None)
def calibration(path: str = "") -> Dict[str, Dict[int, Tuple[float, float]]]:
    """{algorithm: {nranks: (latency µs, ns per byte)}} from the calibration file."""
    path = path or env.get("NCL_TUNING_FILE") or _PACKAGED
    try:
        with open(path) as f:
            table = json.load(f)["all_reduce"]
        # an algorithm the file does not know is never chosen
        never = {1: (float(NEVER), 0.0)}
        return {algo: {int(n): (float(v[0]), float(v[1])) for n, v in table[algo].items()} if algo in table else never
                for algo in ALGORITHMS}
    except (OSError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"cannot read the tuning file {path}: {exc}; "
                         "write one with `python -m ncl.perf.calibrate --out FILE`") from None


def predict_us(algorithm: str, nbytes: int, nranks: int) -> float:
    """Modelled time of one all_reduce of nbytes on nranks local ranks."""
    table = calibration()[algorithm]
    n = min((k for k in table if k >= nranks), default=max(table))
    latency, per_byte = table[n]
    return latency + per_byte * nbytes / 1e3


def _first_size_where(better) -> int:
    """Smallest size (bytes) from which `better(size)` holds for good, by a doubling scan and a
    bisection; NEVER if it does not hold at 2**40."""
    if better(1):
        return 0
    hi = 1
    while hi < (1 << 40) and not better(hi):
        hi *= 2
    if not better(hi):
        return NEVER
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if better(mid) else (mid, hi)
    return hi


def thresholds(nranks: int) -> Tuple[int, int, int]:
    """(one_shot_max_bytes, direct_min_bytes, cma_min_bytes) for a communicator of nranks."""
    def staged(s):
        return min(predict_us("one_shot", s, nranks), predict_us("two_shot", s, nranks))

    one_shot_max = _first_size_where(lambda s: predict_us("two_shot", s, nranks) < predict_us("one_shot", s, nranks))
    direct_min = _first_size_where(lambda s: predict_us("direct", s, nranks) < staged(s))
    cma_min = _first_size_where(lambda s: predict_us("cma", s, nranks) < staged(s))
    forced = env.get("NCL_ONE_SHOT_MAX_BYTES"), env.get("NCL_DIRECT_MIN_BYTES")
    return (one_shot_max if forced[0] is None else forced[0]), (direct_min if forced[1] is None else forced[1]), \
        cma_min


def forced_all_reduce_algorithm() -> int:
    """NCL_ALGO, checked; NCL_ALGO_AUTO when unset."""
    name = env.get("NCL_ALGO")
    if not name:
        return lib.NCL_ALGO_AUTO
    if name not in ALGORITHMS:
        raise ValueError(f"NCL_ALGO={name!r} is not an all_reduce algorithm; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]
