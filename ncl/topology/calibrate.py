"""Calibrate this host's topology file and validate the model against measured times: the fit, from sweeps
that `ncl-topo calibrate` (ncl/topology/cli.py) measures with ncl-perf or reads from its JSON files.

    ncl-topo calibrate [--out topology/this-host.yaml] [--validate [FILE.json ...]]

This host's ranks are processes exchanging through a shared-memory segment, modelled as chips (one per
rank) on one "memory" switch that is also ncl's staging memory:
  - each rank's link to it: what one core copies (broadcast of 2 ranks, single copy through
    process_vm_readv: the reader alone copies S bytes);
  - the switch's aggregate: what all cores copy at once (all_gather of 2 ranks, both copying S);
  - latency: one step (broadcast of 8 B), split over the two links of a step;
  - cache: while the ranks' send and receive buffers fit the L3, copies run cache_speedup x faster
    (measured at 512 KiB-8 MiB against 64 MiB);
  - cpus: ranks beyond the CPU count time-share them (the latency stretches, the reductions share).
Validation predicts what ncl runs on this host (the algorithm ncl.tuning's thresholds pick, with the
default NCL_CMA_MIN_BYTES for all_gather / all_to_all) for all_reduce, all_gather and all_to_all at
2, 4 and 8 ranks from 64 KiB up, against a fresh short sweep or ncl-perf JSON files, and prints the
median absolute relative error (the target: at most 25%)."""
import datetime
import os
import statistics
from typing import Dict, List, Tuple

from .schema import SHIPPED_DIR

DEFAULT_OUT = os.path.join(SHIPPED_DIR, "this-host.yaml")
VALIDATED = ("all_reduce", "all_gather", "all_to_all")
MIN_VALIDATED = 64 << 10
CMA_MIN_BYTES = 32 << 10   # NCL_CMA_MIN_BYTES's default (ncl/env.py)
# the sweeps the fit takes, by name: (collective, ranks, smallest size, largest size, step factor)
SWEEPS = {"broadcast": ("broadcast", 2, "8", "64M", 4), "all_gather": ("all_gather", 2, "512K", "64M", 4),
          "broadcast8": ("broadcast", 8, "8", "512", 4)}
# validation: these collectives on these rank counts, from 64 KiB up
VALIDATION_SWEEPS = [(coll, n, "64K", "64M", 8) for coll in VALIDATED for n in (2, 4, 8)]


def best_of(runs: List[Dict[int, float]]) -> Dict[int, float]:
    """Per size, the fastest of several sweeps: the run least disturbed by other load."""
    return {s: min(r[s] for r in runs if s in r) for s in runs[0]}


def sweeps_from_rows(files: Dict[str, List[dict]]) -> Dict[str, Dict[int, float]]:
    """The sweeps of SWEEPS from the summary rows of ncl-perf JSON files ({path: rows}), each the best of
    the files that have it."""
    found: Dict[str, List[Dict[int, float]]] = {name: [] for name in SWEEPS}
    for rows in files.values():
        table: Dict[str, Dict[int, float]] = {}
        for r in rows:
            name = r.get("collective", "") + ("8" if r.get("nranks") == 8 else "" if r.get("nranks") == 2 else "?")
            if r.get("backend") == "ncl" and not r.get("in_place") and "time_us" in r and name in found:
                table.setdefault(name, {})[int(r["size"])] = float(r["time_us"])
        for name, t in table.items():
            found[name].append(t)
    for name, runs in found.items():
        if not runs:
            raise ValueError(f"--measured: none of {', '.join(files)} has an ncl sweep of {name} "
                             "(2 ranks; broadcast8: 8 ranks)")
    return {name: best_of(runs) for name, runs in found.items()}


def figures(sweeps: Dict[str, Dict[int, float]]) -> Dict[str, float]:
    """The host's figures (latency, copy rates in and out of cache) from the sweeps of SWEEPS ({size: µs})."""
    bc, bc8 = sweeps["broadcast"], sweeps["broadcast8"]
    ag = {s: t for s, t in sweeps["all_gather"].items() if s >= (512 << 10)}
    lat = min(t for s, t in bc.items() if s <= 512)  # the least disturbed: other load only adds
    big = max(bc)

    def rate(table, s, copies):  # GB/s of bytes copied
        return copies * s / max(table[s] - lat, 1e-3) / 1e3

    core = rate(bc, big, 1)
    core_cached = max(rate(bc, s, 1) for s in bc if (512 << 10) <= s <= (8 << 20))
    both = rate(ag, max(ag), 2)
    both_cached = max(rate(ag, s, 2) for s in ag if s <= (8 << 20))
    lat8 = min(t for s, t in bc8.items() if s <= 512)
    return {"latency_us": lat, "latency8_us": lat8, "core_gbps": core, "core_cached_gbps": core_cached,
            "all_gbps": both, "all_cached_gbps": both_cached}


def _l3_mib() -> float:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip().upper()
        return float(text[:-1]) / 1024 if text.endswith("K") else float(text.rstrip("M"))
    except (OSError, ValueError):
        return 32.0


def host_yaml(m: Dict[str, float], nchips: int = 8, source: str = "") -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    speedup = ((m["core_cached_gbps"] / m["core_gbps"]) * (m["all_cached_gbps"] / m["all_gbps"])) ** 0.5
    busy = max(1.0, m["latency8_us"] / m["latency_us"]) if nchips > cpus else 1.0
    slot = 4.0
    try:
        from .. import env
        slot = env.get("NCL_BUFFSIZE") / (1 << 20)
    except (ImportError, KeyError, TypeError):
        pass
    chips = ", ".join(f"rank{i}" for i in range(nchips))
    return f"""# This host ({cpus} CPUs), calibrated on {datetime.date.today().isoformat()} by
#   {source or 'ncl-topo calibrate'}
# Ranks are processes (chips rank0..rank{nchips - 1}) exchanging through ncl's shared-memory segment (the switch
# shm, also the staging memory ncl copies through in slots of NCL_BUFFSIZE).  Every figure is measured here:
#   latency          {m['latency_us']:.2f} us  one step: broadcast of 8-512 B on 2 ranks (fastest)
#   one core copies  {m['core_gbps']:.2f} GB/s (64 MiB; {m['core_cached_gbps']:.2f} GB/s in cache): broadcast on 2 ranks
#   all cores copy   {m['all_gbps']:.2f} GB/s (64 MiB; {m['all_cached_gbps']:.2f} GB/s in cache): all_gather on 2 ranks
#   cache            the L3 size; cache_speedup = geometric mean of the two in-cache / 64 MiB ratios
#   busy latency     {m['latency8_us']:.2f} us: broadcast of 8-512 B on 8 ranks (fastest); the factor over 2 ranks
# A reduction pass is costed like a copy (memory_bandwidth_gbps = one core's copy rate).
name: this-host
description: ranks as processes on this host ({cpus} CPUs), exchanging through shared memory
chips:
  - {{name: "rank{{i}}", count: {nchips}, memory_gib: 1, memory_bandwidth_gbps: {m['core_gbps']:.3f}}}
switches:
  - {{name: shm, kind: memory, staging: true, slot_mib: {slot:g}, bandwidth_gbps: {m['all_gbps']:.3f}}}
links:
  - {{a: "rank{{i}}", b: shm, count: {nchips}, bandwidth_gbps: {m['core_gbps']:.3f},
     latency_us: {m['latency_us'] / 2:.3f}, kind: shm}}
hosts:
  - {{name: this-host, chips: [{chips}], cpus: {cpus},
     cache_mib: {_l3_mib():g}, cache_speedup: {speedup:.3f}, busy_latency_factor: {busy:.3f}}}
"""


def ncl_algorithm(collective: str, nranks: int, nbytes: int) -> str:
    """The algorithm ncl runs for unregistered buffers (native/all_reduce.c, broadcast.c, all_to_all.c)."""
    if collective == "all_reduce":
        from .. import tuning
        one_shot_max, _, cma_min = tuning.thresholds(nranks)
        return "cma" if nbytes >= cma_min else "one_shot" if nbytes <= one_shot_max else "two_shot"
    if collective == "all_gather":
        return "cma" if nranks == 2 and nbytes // nranks >= CMA_MIN_BYTES else "direct"
    if collective == "all_to_all":
        return "cma" if nbytes // nranks >= CMA_MIN_BYTES else "direct"
    raise ValueError(f"no validation for {collective}")


def validation_rows(rows: List[dict]) -> List[Tuple[str, int, int, float]]:
    """(collective, ranks, bytes, µs) of the ncl rows worth validating, from ncl-perf summary rows."""
    out = []
    for r in rows:
        if (r.get("backend") == "ncl" and not r.get("in_place") and r.get("collective") in VALIDATED
                and r.get("size", 0) >= MIN_VALIDATED and "time_us" in r and r.get("nranks", 1) > 1):
            out.append((r["collective"], int(r["nranks"]), int(r["size"]), float(r["time_us"])))
    return out


def validate(topo, rows: List[Tuple[str, int, int, float]]) -> Tuple[str, float]:
    """A table of measured against predicted times, and the median absolute relative error."""
    from tabulate import tabulate
    table, errors = [], []
    for coll, n, size, measured in rows:
        algo = ncl_algorithm(coll, n, size)
        predicted = topo.predict(coll, size, n, algo) * 1e6
        err = (predicted - measured) / measured
        errors.append(abs(err))
        table.append([coll, n, size, algo, f"{measured:.1f}", f"{predicted:.1f}", f"{err:+.0%}"])
    if not errors:
        raise ValueError("no measured rows to validate against (all_reduce/all_gather/all_to_all, >= 64 KiB)")
    med = statistics.median(errors)
    text = tabulate(table, headers=["collective", "ranks", "bytes", "ncl algorithm", "measured µs", "predicted µs",
                                    "error"], tablefmt="github")
    return text + f"\n\nmedian absolute error {med:.1%} over {len(errors)} points (target <= 25%)", med
