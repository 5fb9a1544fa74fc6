"""ncl-topo: look at a topology file, predict collectives on it, calibrate this host's.

    ncl-topo show pcie-gen5-8card [--png out.png]
    ncl-topo predict pcie-gen5-8card --collective all_reduce -b 8 -e 1G [-f 4] [--csv out.csv]
    ncl-topo calibrate [--out topology/this-host.yaml] [--validate [FILE.json ...]]
"""
import argparse
import csv
import os
import sys
from typing import List

from . import calibrate, graph
from .core import BUS_FACTOR, Topology, load_topology
from .schema import load as load_spec, shipped_names

SCALED = (16, 32, 64, 128, 256, 512, 1024)


def _size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = int(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 8, 64K, 16M, 1G)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1 byte, not {text!r}")
    return value


def _topology(text: str) -> Topology:
    try:
        return load_topology(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _counts(text: str) -> List[int]:
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"chip counts look like 16,64,1024, not {text!r}") from None
    if not counts or min(counts) < 2:
        raise argparse.ArgumentTypeError(f"chip counts must be >= 2, not {text!r}")
    return counts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ncl-topo", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    names = ", ".join(shipped_names())
    s = sub.add_parser("show", help="summary, ring and tree, and a PNG drawing")
    s.add_argument("topology", type=_topology, help=f"a file, or one of: {names}")
    s.add_argument("--png", help="draw the topology into this PNG file")
    s.add_argument("-n", "--nranks", type=int, help="ring and tree over the first n chips (default: all)")
    q = sub.add_parser("predict", help="predicted time and busbw per size, on 2..N chips and scaled out")
    q.add_argument("topology", type=_topology, help=f"a file, or one of: {names}")
    q.add_argument("--collective", "-c", default="all_reduce", choices=sorted(BUS_FACTOR))
    q.add_argument("-b", "--minbytes", type=_size, default=8)
    q.add_argument("-e", "--maxbytes", type=_size, default=1 << 30)
    q.add_argument("-f", "--stepfactor", type=int, default=4)
    q.add_argument("-a", "--algorithm", help="force an algorithm (default: the cheapest by the model)")
    q.add_argument("--scaled", type=_counts, default=list(SCALED), help="scaled-out chip counts (16,...,1024)")
    q.add_argument("--no-scaled", action="store_true", help="only the file's own chips")
    q.add_argument("--csv", help="also write every row to this CSV file")
    c = sub.add_parser("calibrate", help="measure this host's shared-memory link and write its topology file")
    c.add_argument("--out", default=calibrate.DEFAULT_OUT)
    c.add_argument("--validate", nargs="*", metavar="FILE.json",
                   help="then compare predictions with measured all_reduce/all_gather/all_to_all times: "
                        "ncl-perf JSON files, or a fresh short sweep when none are given")
    c.add_argument("--no-measure", action="store_true", help="validate the existing --out file without measuring")
    c.add_argument("--measured", nargs="+", metavar="FILE.json",
                   help="take the 2-rank broadcast and all_gather sweeps from these ncl-perf JSON files "
                        "instead of measuring (for a host too busy to measure now)")
    c.add_argument("--repeat", type=int, default=3, help="measure each sweep this many times, keep the fastest")
    return p


def calibrate_host(args) -> int:
    """`ncl-topo calibrate`: this host's sweeps, measured with ncl-perf or read from its JSON files, fitted
    (ncl/topology/calibrate.py) and written; then the model against measured times."""
    from ..perf.cli import sweep_times  # ncl-perf, a tool beside this one: only this command needs it
    from ..perf.report import load      # the checked reader of ncl-perf --json files
    if not args.no_measure:
        print("# measuring this host (broadcast and all_gather on 2 ranks) ..." if not args.measured else
              f"# this host's figures from {', '.join(args.measured)}", flush=True)
        if args.measured:
            sweeps = calibrate.sweeps_from_rows({path: load(path)["summary"] for path in args.measured})
        else:  # each the best of --repeat: other load only slows a run down
            sweeps = {name: calibrate.best_of([sweep_times(*sweep) for _ in range(args.repeat)])
                      for name, sweep in calibrate.SWEEPS.items()}
        m = calibrate.figures(sweeps)
        source = " ".join(["ncl-topo calibrate"] + (["--measured"] + args.measured if args.measured else []))
        with open(args.out, "w") as f:
            f.write(calibrate.host_yaml(m, source=source))
        print("# " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()))
        print(f"# wrote {args.out}")
    if args.validate is None:
        return 0
    if args.validate:
        rows = calibrate.validation_rows([r for path in args.validate for r in load(path)["summary"]])
    else:
        rows = [(coll, n, size, t) for coll, n, lo, hi, factor in calibrate.VALIDATION_SWEEPS
                for size, t in sorted(sweep_times(coll, n, lo, hi, factor).items())]
    text, med = calibrate.validate(Topology(load_spec(args.out)), rows)  # as written now, never cached
    print(text)
    return 0 if med <= 0.25 else 1


def show(args) -> int:
    topo: Topology = args.topology
    spec = topo.spec
    n = args.nranks or topo.num_chips
    ring, tree = topo.ring(n), topo.tree(n)
    g = topo.model.g
    print(f"{spec.name}: {spec.description}")
    print(f"  file      {spec.path}")
    print(f"  chips     {len(spec.chips)}: " + ", ".join(sorted({_chip_text(c) for c in spec.chips})))
    print(f"  switches  {len(spec.switches)}: " + ", ".join(f"{s.name} ({s.kind}"
                                                              + (f", {s.bandwidth_gbps:g} GB/s aggregate" if
                                                                 s.bandwidth_gbps else "") + ")"
                                                              for s in spec.switches[:12])
          + (" ..." if len(spec.switches) > 12 else ""))
    kinds = {}
    for lk in spec.links:
        kinds.setdefault((lk.kind or "link", lk.bandwidth_gbps, lk.latency_us), []).append(lk)
    print(f"  links     {len(spec.links)}: " + "; ".join(f"{len(v)} x {k[0]} {k[1]:g} GB/s/dir {k[2]:g} us"
                                                    for k, v in kinds.items()))
    for h in spec.hosts[:8]:
        print(f"  host      {h.name}: {len(h.chips)} chips" + (f", NICs {', '.join(h.nics)}" if h.nics else "")
              + (f", {h.cpus} CPUs" if h.cpus else ""))
    for c in spec.measured.values():
        print(f"  measured  {c.collective} on {c.ranks} ranks, {len(c.sizes)} sizes "
              f"({c.sizes[0]} B .. {c.sizes[-1]} B), priced from it: {c.source}")
    per_byte, lat = g.hop_cost(ring)
    print(f"  bottleneck: the ring's slowest link direction moves {1 / per_byte / 1e9:.1f} GB/s per ring flow"
          if per_byte else "  bottleneck: none (one chip)")
    print(f"  ring ({n} chips, {lat * 1e6:.1f} us around): " + " -> ".join(ring) + (f" -> {ring[0]}" if ring else ""))
    many = topo.rings(n)
    if len(many) > 1:
        print(f"  rings: {len(many)} at once, each with 1/{len(many)} of the bytes, leaving each host through "
              "different chips: " + "; ".join(f"{r[0]} -> {r[1]} -> ..." for r in many))
    print(f"  tree (depth {graph.depth(tree)}): " + ", ".join(f"{c}<-{p}" for c, p in tree.items() if p))
    if args.png:
        from .draw import draw
        draw(spec, args.png, ring)
        print(f"# wrote {args.png}")
    return 0


def _chip_text(c) -> str:
    peak = ", ".join(f"{k} {v:g}" for k, v in c.compute_tflops.items())
    return f"{c.memory_gib:g} GiB at {c.memory_bandwidth_gbps:g} GB/s" + (f" ({peak} TFLOP/s)" if peak else "")


def predict(args, p: argparse.ArgumentParser) -> int:
    from tabulate import tabulate
    topo: Topology = args.topology
    if args.minbytes > args.maxbytes:
        p.error(f"-b {args.minbytes} is larger than -e {args.maxbytes}")
    if args.stepfactor < 2:
        p.error(f"-f must be >= 2, not {args.stepfactor}")
    if args.algorithm and args.algorithm not in topo.algorithms(args.collective, 2):
        p.error(f"{args.collective} has no algorithm {args.algorithm!r} on {topo.name}; "
                f"choose one of {', '.join(topo.algorithms(args.collective, 2))}")
    if args.csv and not os.path.isdir(os.path.dirname(os.path.abspath(args.csv))):
        p.error(f"cannot write {args.csv}: no such directory")
    sizes = []
    s = args.minbytes
    while s <= args.maxbytes:
        sizes.append(s)
        s *= args.stepfactor
    if sizes[-1] != args.maxbytes:
        sizes.append(args.maxbytes)
    counts = [(n, topo) for n in range(2, topo.num_chips + 1)]
    if not args.no_scaled:
        for n in args.scaled:
            if n <= topo.num_chips:
                continue
            try:
                counts.append((n, topo.scaled(n)))
            except ValueError as exc:
                print(f"# scaled({n}): {exc}", file=sys.stderr)
    rows = []
    for n, t in counts:
        table = []
        for size in sizes:
            if args.algorithm and args.algorithm not in t.algorithms(args.collective, n):
                continue
            algo = args.algorithm or t.best_algorithm(args.collective, size, n)
            sec = t.predict(args.collective, size, n, algo)
            algbw = size / sec / 1e9 if sec else 0.0
            busbw = algbw * BUS_FACTOR[args.collective](n)
            table.append([size, f"{sec * 1e6:.2f}", f"{algbw:.2f}", f"{busbw:.2f}", algo])
            rows.append(dict(topology=t.name, chips=n, collective=args.collective, size=size, time_us=sec * 1e6,
                             algbw=algbw, busbw=busbw, algorithm=algo))
        print(f"\n# {args.collective} on {n} chips of {t.name}")
        print(tabulate(table, headers=["size", "time (us)", "algbw (GB/s)", "busbw (GB/s)", "algorithm"],
                       tablefmt="plain", disable_numparse=True))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"# wrote {args.csv}")
    return 0


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command == "show":
        if args.nranks is not None and not 1 <= args.nranks <= args.topology.num_chips:
            p.error(f"-n {args.nranks} must be between 1 and the {args.topology.num_chips} chips of the topology")
        return show(args)
    if args.command == "predict":
        return predict(args, p)
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        p.error(f"cannot write {args.out}: no such directory")
    if args.no_measure and not os.path.isfile(args.out):
        p.error(f"--no-measure needs an existing {args.out}")
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, not {args.repeat}")
    for path in (args.validate or []) + (args.measured or []):
        if not os.path.isfile(path):
            p.error(f"no such file {path}")
    return calibrate_host(args)


if __name__ == "__main__":
    sys.exit(main())
