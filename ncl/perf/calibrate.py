"""Calibrate the all_reduce cost model on this host:

    python -m ncl.perf.calibrate [-n 2,4,8] [--out FILE]

For every rank count it starts one ncl-perf sweep per algorithm (one_shot, two_shot and cma
through staging, direct on registered buffers), each forced by NCL_ALGO in ranks of its own, and
gives them turns size by size, --repeat rounds of each size in a row, the first rotating
(ncl-perf --interleave size's machinery, ncl/perf/lockstep.py): this host's speed flips 2-4x
within seconds, and whole sweeps run one after another compared sizes measured in different
modes (two calibrations made so, hours apart, put one-shot's limit at 4 ranks at 4.3 KB and at
"never", and direct's at 2 ranks at "never" and 4.5 MB, 2026-12).  An algorithm this host
cannot run (cma without process_vm_readv) is left out of the table, which ncl.tuning reads as
never chosen.  It fits time = latency + bytes x per_byte to each point's median (see `fit`),
and writes the table that ncl.tuning loads: by
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

from tabulate import tabulate

from .. import tuning
from . import cli, lockstep, report, runner, specs

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


def _sweep(n: int, args, algo: str = ""):
    """ncl-perf's settings for one algorithm's sweep on n ranks (registered buffers for direct)."""
    return cli.parser().parse_args(["all_reduce", "-b", args.minbytes, "-e", args.maxbytes, "-f", "4", "-n", str(n),
                                    "-c", "0", "--repeat", str(args.repeat), "-R", "1" if algo == "direct" else "0"])


def _sizes(args) -> List[int]:
    """The sizes every sweep measures (the same at every rank count)."""
    return specs.sweep_sizes(_sweep(2, args))


def _times(n: int, args, progress) -> Dict[str, Dict[int, List[float]]]:
    """{algorithm: {size: out-of-place µs of each round}} on n ranks, the algorithms taking turns."""
    times: Dict[str, Dict[int, List[float]]] = {a: {} for a in ALGORITHMS}
    sizes = _sizes(args)
    turns = [(size, r) for size in sizes for r in range(args.repeat)]

    def command(algo: str, gate: str, scratch: str):
        return cli.turn_launcher("ncl", n, _sweep(n, args, algo), gate, scratch, {"NCL_ALGO": algo})

    def on_row(algo: str, turn: tuple, row: dict):
        if row["in_place"]:
            progress.update(1)
        elif "time_us" in row:
            times[algo].setdefault(row["size"], []).append(row["time_us"])

    for algo, code in lockstep.run(list(ALGORITHMS), n, turns, command, on_row, progress.write).items():
        if code:
            progress.write(f"# {algo} on {n} ranks stopped (exit code {code}): its sizes after that are left out")
    body = [[size] + [statistics.median(times[a][size]) if size in times[a] else None for a in ALGORITHMS]
            for size in sizes]
    progress.write(f"# all_reduce on {n} ranks, out of place, float32: median µs of {args.repeat} turns\n"
                   + tabulate(body, ["size (B)"] + list(ALGORITHMS), floatfmt=".1f", missingval="-"))
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ncl.perf.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--nranks", type=runner.rank_counts, default=[2, 4, 8])
    p.add_argument("-b", "--minbytes", default="8")
    p.add_argument("-e", "--maxbytes", default="64M")
    p.add_argument("--out", default=None, help="default: this host's file in the user cache, "
                   "$XDG_CACHE_HOME/ncl/tuning-<host fingerprint>.json (~/.cache/ncl/... without XDG_CACHE_HOME)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the fit uses each point's median")
    args = p.parse_args(argv)
    table: Dict[str, Dict[str, List[float]]] = {}
    measured: Dict[str, Dict[str, list]] = {}
    progress = runner.Progress(len(ALGORITHMS) * len(args.nranks) * len(_sizes(args)) * args.repeat)
    for n in args.nranks:
        for algo, by_size in _times(n, args, progress).items():
            if not by_size:
                continue
            points = [(size, statistics.median(ts)) for size, ts in sorted(by_size.items())]
            latency, per_byte = fit(points)
            table.setdefault(algo, {})[str(n)] = [round(latency, 3), round(per_byte, 5)]
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
