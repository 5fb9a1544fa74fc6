"""Calibrate the all_reduce cost model on this host:

    python -m ncl.perf.calibrate [-n 2,4,8] [--out FILE]

For every rank count and algorithm (one_shot and two_shot through staging, direct on
registered buffers) it runs ncl-perf sweeps with the algorithm forced (NCL_ALGO), interleaved
over --repeat rounds (this host's speed drifts 2-4x over minutes), fits time = latency + bytes
x per_byte to each point's median (see `fit`), and writes the table that ncl.tuning loads: by
default into this user's cache for this host (ncl.tuning.user_cache_path()), which every later
communicator on the host uses unless NCL_TUNING_FILE names another file.  `--out
ncl/calibration.json` replaces the shipped default instead.
"""
import argparse
import json
import os
import statistics
import sys
from typing import Dict, List, Tuple

from .. import tuning
from . import cli, report, runner

ALGORITHMS = tuple(tuning.ALGORITHMS)
SMALL = 1024


def fit(points: List[Tuple[int, float]]) -> Tuple[float, float]:
    """(latency µs, ns per byte): the latency is the median time of the messages up to 1 KiB,
    the per-byte cost the least-squares slope of the rest with that latency fixed (a single
    least-squares line is dominated by one end of a 8 B - 64 MiB sweep)."""
    small = sorted(t for s, t in points if s <= SMALL)
    latency = small[len(small) // 2] if small else 0.0
    large = [(s, t - latency) for s, t in points if s > SMALL]
    num = sum(s * t for s, t in large)
    den = sum(s * s for s, _ in large)
    per_byte = max(0.0, num / den * 1e3) if den else 0.0
    return float(latency), float(per_byte)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ncl.perf.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--nranks", type=runner.rank_counts, default=[2, 4, 8])
    p.add_argument("-b", "--minbytes", default="8")
    p.add_argument("-e", "--maxbytes", default="64M")
    p.add_argument("--out", default=None, help="default: this host's file in the user cache, "
                   "$XDG_CACHE_HOME/ncl/tuning-<host fingerprint>.json (~/.cache/ncl/... without XDG_CACHE_HOME)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the fit uses each point's median")
    args = p.parse_args(argv)
    table: Dict[str, Dict[str, List[float]]] = {a: {} for a in ALGORITHMS}
    measured: Dict[str, Dict[str, list]] = {}
    progress = runner.Progress(len(ALGORITHMS) * len(args.nranks) * args.repeat)
    for n in args.nranks:
        times: Dict[str, Dict[int, List[float]]] = {a: {} for a in ALGORITHMS}
        for _ in range(args.repeat):  # interleaved, so that a slow minute hits every algorithm alike
            for algo in ALGORITHMS:
                cfg = cli.parser().parse_args(["all_reduce", "-b", args.minbytes, "-e", args.maxbytes, "-f", "4",
                                               "-n", str(n), "-c", "0", "-R", "1" if algo == "direct" else "0"])
                rows: List[dict] = []
                if cli.run_backend("ncl", n, cfg, rows, progress, extra_env={"NCL_ALGO": algo}) != 0:
                    return 1
                for r in rows:
                    if not r["in_place"] and "time_us" in r:
                        times[algo].setdefault(r["size"], []).append(r["time_us"])
        for algo in ALGORITHMS:
            points = [(size, statistics.median(ts)) for size, ts in sorted(times[algo].items())]
            latency, per_byte = fit(points)
            table[algo][str(n)] = [round(latency, 3), round(per_byte, 5)]
            measured.setdefault(algo, {})[str(n)] = points
            worst = max(abs(latency + per_byte * s / 1e3 - t) / t for s, t in points)
            progress.write(f"# {algo} np={n}: {latency:.2f} us + {per_byte:.4f} ns/B (worst point off by {worst:.0%})")
    progress.close()
    out = save(args.out or tuning.user_cache_path(),
               {"command": ["python", "-m", "ncl.perf.calibrate"] + (sys.argv[1:] if argv is None else argv),
                "machine": report.machine_facts(), "all_reduce": table, "measured_us": measured})
    print(f"# wrote {out}")
    return 0


def save(path: str, data: dict) -> str:
    """Write a calibration whole or not at all (a file half written would stop every later
    communicator on the host), creating its directory; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(partial, path)
    return path


if __name__ == "__main__":
    sys.exit(main())
