"""Algorithm choice, in one place (as NCCL's tuning.cc).  For now a size threshold; the
cost model calibrated on this host replaces it (issue 3)."""
from . import env
from ._native import lib

ALGORITHMS = {"one_shot": lib.NCL_ALGO_ONE_SHOT, "two_shot": lib.NCL_ALGO_TWO_SHOT}
ONE_SHOT_MAX_BYTES = 32 << 10  # below this one step beats two (latency over bandwidth)


def forced_all_reduce_algorithm() -> int:
    """NCL_ALGO, checked; NCL_ALGO_AUTO when unset."""
    name = env.get("NCL_ALGO")
    if not name:
        return lib.NCL_ALGO_AUTO
    if name not in ALGORITHMS:
        raise ValueError(f"NCL_ALGO={name!r} is not an all_reduce algorithm; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def all_reduce_algorithm(nbytes: int, nranks: int, forced: int) -> int:
    if forced != lib.NCL_ALGO_AUTO:
        return forced
    return lib.NCL_ALGO_ONE_SHOT if nbytes <= ONE_SHOT_MAX_BYTES else lib.NCL_ALGO_TWO_SHOT
