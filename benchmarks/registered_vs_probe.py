"""Registered ncl buffers (comm.empty) beside the C probe of the same all-reduce, np=2, float32.

    python benchmarks/registered_vs_probe.py --sizes 1M,16M,64M --repeat 3 [--out results/registered_vs_probe.txt]

Compiles probe_all_reduce.c (cc -O3 -march=native), then runs, in interleaved rounds, the probe
and `ncl-perf all_reduce -R 1 --min-time 0.2` (out of place, both buffers registered) on the same sizes, and
prints each one's median busbw and their ratio (issue 24's target: ncl >= 80% of the probe).
This host's speed drifts by 2-4x over minutes, so only the ratio within one run means anything.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from tabulate import tabulate

from ncl.env import parse_bytes

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe_all_reduce.c")
# Each side's measurement lasts as long: the probe's MIN_SECONDS.  ncl-perf's own default (0.05 s) is
# 28 calls at 16 MiB, of which the first 7 were still learn.c's early duels (calls 10-17 of a size).
PROBE_MIN_SECONDS = 0.2


def build(where: str) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        sys.exit("registered_vs_probe: no C compiler (cc) on PATH to build the probe")
    exe = os.path.join(where, "probe")
    subprocess.run([cc, "-O3", "-march=native", "-o", exe, PROBE], check=True)
    return exe


def probe_busbw(exe: str, sizes) -> dict:
    out = subprocess.run([exe, *map(str, sizes)], check=True, capture_output=True, text=True, timeout=600).stdout
    return {int(b): float(bw) for b, _, bw in (line.split() for line in out.splitlines())}


def ncl_busbw(sizes, where: str) -> dict:
    """{size: busbw} of ncl's out-of-place all_reduce on registered buffers, one sweep per size."""
    got = {}
    for size in sizes:
        path = os.path.join(where, "ncl.json")
        subprocess.run(["ncl-perf", "all_reduce", "-R", "1", "-b", str(size), "-e", str(size), "-n", "2", "-c", "0",
                        "--min-time", str(PROBE_MIN_SECONDS),
                        "--json", path], check=True, capture_output=True, timeout=600)
        with open(path) as f:
            rows = json.load(f)["rows"]
        got[size] = next(r["busbw"] for r in rows if not r["in_place"] and "busbw" in r)
    return got


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1M,16M,64M", help="comma-separated sizes")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds (medians reported)")
    p.add_argument("--out", help="also write the table here")
    args = p.parse_args(argv)
    sizes = [parse_bytes(s) for s in args.sizes.split(",")]
    runs = {"probe": {s: [] for s in sizes}, "ncl": {s: [] for s in sizes}}
    with tempfile.TemporaryDirectory(prefix="ncl-probe-") as where:
        exe = build(where)
        for _ in range(args.repeat):
            for name, measure in (("probe", lambda: probe_busbw(exe, sizes)), ("ncl", lambda: ncl_busbw(sizes, where))):
                for size, bw in measure().items():
                    runs[name][size].append(bw)
    rows = []
    for s in sizes:
        probe, ours = statistics.median(runs["probe"][s]), statistics.median(runs["ncl"][s])
        rows.append([s, probe, ours, 100 * ours / probe])
    text = (f"# {' '.join(['python', 'benchmarks/registered_vs_probe.py'] + (argv or sys.argv[1:]))}\n"
            f"# np=2 float32 out-of-place, medians of {args.repeat} interleaved rounds (busbw GB/s)\n"
            + tabulate(rows, ["size (B)", "C probe busbw", "ncl registered busbw", "ncl / probe (%)"],
                       floatfmt=".2f"))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
