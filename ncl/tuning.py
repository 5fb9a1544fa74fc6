"""Algorithm choice, in one place (as NCCL's tuning.cc): a cost model, latency plus bytes
over bandwidth, per algorithm and rank count, calibrated on this host.

Which calibration, first found wins (`tuning_file`):
    1. NCL_TUNING_FILE, when set;
    2. this host's, in the user's cache: $XDG_CACHE_HOME/ncl/tuning-<host fingerprint>.json
       (~/.cache/ncl/... without XDG_CACHE_HOME), written by `python -m ncl.perf.calibrate`;
    3. the shipped default, `calibration.json` beside this module.
The shipped default is safe on any host because every algorithm gives the same bits (all_reduce
adds in rank order whatever the path) and the core falls back where one is unavailable (CMA,
registered memory): a calibration only decides speed, and the shipped one is a real measurement
(a 2-CPU VM), a better guess than invented constants.  Nothing is measured at first use: a
calibration runs ncl-perf sweeps on several rank counts for minutes, too long to hide in a
first ncl.init (and the library does not start tools).

A calibration holds, for each all_reduce algorithm and rank count, the median times measured
from 8 B to 64 MiB and a fitted (latency µs, ns per byte); the model interpolates between the measured
sizes (a single latency + bandwidth line misfits the middle sizes by up to 2x here) and
extrapolates beyond them with the fitted cost per byte.  A communicator turns the model into
size thresholds when it is created, which the C core applies on every call (so the per-call
path stays a comparison in C):
    one_shot_max_bytes   staged all_reduce: one-shot up to here, two-shot above
    direct_min_bytes     registered buffers: the direct (in-place reading) paths from here up
    cma_min_bytes        all_reduce of unregistered buffers: the two-shot through process_vm_readv
                         from here up (when the kernel allows it between the ranks)
Rank counts between calibrated ones use the next larger one.  NCL_ALGO forces an all_reduce
algorithm; NCL_ONE_SHOT_MAX_BYTES and NCL_DIRECT_MIN_BYTES override the thresholds.
`options` hands the thresholds and the other NCL_* knobs to the C core when a communicator is created.
"""
import bisect
import functools
import hashlib
import json
import os
import platform
from typing import Dict, List, Optional, Tuple

from . import env
from ._native import ffi, kernel_isa, lib

# all_reduce's algorithms by the core's names (auto excluded: it is the core's choice among these)
ALGORITHMS = {ffi.string(lib.ncl_algo_name(a)).decode(): a for a in range(lib.NCL_ALGO_ONE_SHOT, lib.NCL_NUM_ALGOS)}
NEVER = 1 << 62
_PACKAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibration.json")


def host_fingerprint() -> str:
    """What a calibration depends on, hashed: the CPU model, the CPUs online, the architecture and
    the reduction kernels' ISA.  Not the host name: identical machines sharing a home directory
    share one calibration, and a container's new name keeps it."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    facts = f"{model}|{os.cpu_count()}|{platform.machine()}|{kernel_isa()}"
    return hashlib.sha256(facts.encode()).hexdigest()[:16]


def user_cache_path() -> str:
    """Where this host's calibration lives for this user (XDG's cache directory)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # unset, or relative (which the XDG spec says to ignore)
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ncl", f"tuning-{host_fingerprint()}.json")


def tuning_file() -> str:
    """The calibration in use: NCL_TUNING_FILE, else this host's in the user cache, else the shipped one."""
    explicit = env.get("NCL_TUNING_FILE")
    if explicit:
        return explicit
    cached = user_cache_path()
    return cached if os.path.isfile(cached) else _PACKAGED


@functools.lru_cache(maxsize=None)
def calibration(path: str = "") -> Dict[str, Dict[int, List[Tuple[float, float]]]]:
    """{algorithm: {nranks: [(bytes, µs), ...]}}: the measured medians, and beyond the largest
    a point extrapolated with the fitted cost per byte (path: default tuning_file())."""
    path = path or tuning_file()
    try:
        with open(path) as f:
            data = json.load(f)
        table = {}
        for algo in ALGORITHMS:
            fits = data["all_reduce"].get(algo)
            if not fits:  # an algorithm the file does not know (or has no rank count of) is never chosen
                table[algo] = {1: [(0.0, float(NEVER)), (1.0, float(NEVER))]}
                continue
            table[algo] = {}
            for n, (_, per_byte) in fits.items():
                points = sorted((float(s), float(t)) for s, t in data["measured_us"][algo][n])
                far = points[-1][0] * 1024
                table[algo][int(n)] = points + [(far, points[-1][1] + float(per_byte) * (far - points[-1][0]) / 1e3)]
        return table
    # what a malformed file makes open, json (nesting too deep included) or the table raise
    except (OSError, ValueError, RecursionError, KeyError, IndexError, TypeError, AttributeError, OverflowError) as exc:
        raise ValueError(f"cannot read the tuning file {path}: {exc}; "
                         "write one with `python -m ncl.perf.calibrate --out FILE`") from None


def predict_us(algorithm: str, nbytes: int, nranks: int) -> float:
    """Modelled time of one all_reduce of nbytes on nranks local ranks: the calibrated
    latency + bandwidth curve, interpolated between measured sizes."""
    table = calibration()[algorithm]
    points = table[min((k for k in table if k >= nranks), default=max(table))]
    sizes = [p[0] for p in points]
    i = bisect.bisect_left(sizes, nbytes)
    if i == 0:
        return points[0][1]
    if i == len(points):
        return points[-1][1]
    (s0, t0), (s1, t1) = points[i - 1], points[i]
    return t0 + (t1 - t0) * (nbytes - s0) / (s1 - s0)


def _from_size_on(better) -> int:
    """The size from which `better(size)` holds up to 2**40 (found at the last crossing, so a
    candidate that wins only at tiny sizes by a latency within the noise is not taken); NEVER if
    it does not hold at 2**40."""
    top = 40
    if not better(1 << top):
        return NEVER
    k = top
    while k > 0 and better(1 << (k - 1)):
        k -= 1
    if k == 0:
        return 0
    lo, hi = 1 << (k - 1), 1 << k  # not better at lo, better at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if better(mid) else (mid, hi)
    return hi


# Two-shot within this of one-shot counts as no slower: ties go to the algorithm whose traffic per
# rank stays flat as the ranks grow.  Without it a 1% tie at the largest size measured (np=4: 64 MiB,
# 26.7 against 26.4 ms) kept one-shot up to 88 MB though two-shot was 0.58-0.85 of it from 8 KiB to
# 32 MiB (ncl/calibration.json, 2026-12-05), since the crossing is found from the top.
TIE = 0.03


def thresholds(nranks: int) -> Tuple[int, int, int]:
    """(one_shot_max_bytes, direct_min_bytes, cma_min_bytes) for a communicator of nranks."""
    one_shot_max = _from_size_on(
        lambda s: predict_us("two_shot", s, nranks) < predict_us("one_shot", s, nranks) * (1 + TIE))

    def staged(s):  # what the core runs for s bytes without registered memory or CMA
        return predict_us("one_shot" if s < one_shot_max else "two_shot", s, nranks)

    cma_from = _from_size_on(lambda s: predict_us("cma", s, nranks) < staged(s))
    # direct reads in place what cma first copies through the kernel: never later than cma would (a
    # calibration from another mode of the host said otherwise at np=2; learn.c corrects the rest)
    direct_min = min(_from_size_on(lambda s: predict_us("direct", s, nranks) < staged(s)), cma_from)
    # cma is never where all_reduce starts (learn.c still tries it): since the staging ring, two-shot
    # with the stores learn.c picks beat it at 16 MiB in both of the host's modes (np=2 in place
    # 1.3 against 1.8 ms fast, 1.5 against 5.4 slow; out of place 1.9-2.1 against 2.2-2.4 fast, 2.3
    # against 2.4 slow; np=8 13-15 against 16-18 ms), and starting from cma hid that from the first
    # duel in slow minutes, where two-shot's ordinary stores are 5x slower than its streaming ones
    # (benchmarks/results/staging_ring.md)
    cma_min = NEVER
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


def options(nranks: int, timeout: Optional[float] = None, host_ranks: Optional[int] = None):
    """The C core's options, from the NCL_* knobs and the cost model; every rank must use the
    same sizes.  host_ranks: processes of the job on this machine (default: NCL_LOCAL_WORLD_SIZE
    from ncl-run, else nranks); more than the CPUs means no spinning."""
    opts = ffi.new("ncl_options *")
    opts.host_ranks = max(nranks, host_ranks or env.get("NCL_LOCAL_WORLD_SIZE") or nranks)
    opts.one_shot_max_bytes, opts.direct_min_bytes, opts.cma_all_reduce_min_bytes = thresholds(nranks)
    opts.cma_min_bytes = env.get("NCL_CMA_MIN_BYTES") if env.get("NCL_CMA") else 0
    opts.staging_bytes = env.get("NCL_BUFFSIZE")
    opts.p2p_bytes = env.get("NCL_P2P_BUFFSIZE")
    opts.timeout_s = env.get("NCL_TIMEOUT") if timeout is None else timeout
    opts.spin_us = env.get("NCL_SPIN_US")
    opts.yield_us = env.get("NCL_YIELD_US")
    opts.flight_entries = env.get("NCL_TRACE_BUFFER")
    opts.verify_calls = env.get("NCL_CHECK_CALLS")
    opts.streaming = ("auto", "on", "off").index(env.get("NCL_STREAMING"))
    env.get("NCL_KERNEL_ISA")  # the C core reads it; a bad value is refused here, before any rank communicates
    for field, minimum in (("staging_bytes", 4096), ("p2p_bytes", 4096)):
        if getattr(opts, field) < minimum:
            knob = "NCL_BUFFSIZE" if field == "staging_bytes" else "NCL_P2P_BUFFSIZE"
            raise ValueError(f"{knob} must be at least {minimum} bytes, not {getattr(opts, field)}")
    if not opts.timeout_s > 0:
        raise ValueError(f"NCL_TIMEOUT (or timeout=) must be > 0 seconds, not {opts.timeout_s}")
    return opts
