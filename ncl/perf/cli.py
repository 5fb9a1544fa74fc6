"""ncl-perf: nccl-tests-style sweeps of one collective over message sizes, on local ranks it
starts itself, optionally side by side with MPI (mpi4py, under mpiexec), torch's gloo and
DeepSpeed's shared-memory all-reduce.

    ncl-perf all_reduce -b 8 -e 64M -f 4 -n 2,8 --compare mpi,gloo --csv out.csv --plot out.png
    ncl-perf all_reduce -b 8 -e 16M -f 8 -d bfloat16 --compare deepspeed --repeat 3
    ncl-perf moe --hidden 2880 --experts 128 --topk 4 --tokens 1,16,128 -n 2,4,8   (ncl/perf/moe.py)
"""
import argparse
import importlib.util
import os
import sys
import tempfile
from typing import Dict, List, Optional

from .. import launch
from ..env import parse_bytes
from . import lockstep, report, specs
from .runner import Progress, launch_argv, mpiexec, peers_parser, rank_counts, run_worker


def _size(text: str) -> int:
    try:
        value = parse_bytes(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 8, 64K, 16M, 1G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"sizes must be >= 0, not {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ncl-perf", description=__doc__.split("\n\n")[0],
                                epilog="ncl-perf moe --help: MoE dispatch/combine (ncl/perf/moe.py)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("collective", choices=sorted(specs.SPECS))
    p.add_argument("-b", "--minbytes", dest="min_bytes", type=_size, default=8, help="smallest size")
    p.add_argument("-e", "--maxbytes", dest="max_bytes", type=_size, default=64 << 20, help="largest size")
    p.add_argument("-f", "--stepfactor", dest="factor", type=int, default=2, help="multiply the size by this")
    p.add_argument("--stepbytes", dest="step", type=_size, default=0, help="add this instead (with -f 1)")
    p.add_argument("-n", "--nranks", type=rank_counts, default=[2], help="rank counts, e.g. 8 or 2,4,8")
    p.add_argument("-d", "--datatype", dest="dtype", choices=specs.DTYPES, default="float32")
    p.add_argument("-o", "--op", choices=specs.OPS, default="sum")
    p.add_argument("-r", "--root", type=int, default=0)
    p.add_argument("-w", "--warmup_iters", dest="warmup", type=int, default=5)
    p.add_argument("-i", "--iters", type=int, default=20, help="timed calls per size (at least)")
    p.add_argument("--min-time", type=float, default=0.05,
                   help="repeat small sizes until one measurement lasts this many seconds (0: exactly -i)")
    p.add_argument("-c", "--check", type=int, choices=(0, 1), default=1, help="verify results")
    p.add_argument("-R", "--registered", type=int, choices=(0, 1), default=0,
                   help="1: ncl buffers from comm.empty (registered, no staging copies)")
    p.add_argument("--compare", type=peers_parser("mpi", "gloo", "deepspeed"), default=[],
                   help="also run the sweep through mpi, gloo and/or deepspeed (its shm inference_all_reduce)")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure every point this many times, interleaved, and report the median time "
                        "(this host's speed drifts by 2-4x over minutes: interleaving keeps ratios fair)")
    p.add_argument("--interleave", choices=("size", "sweep"), default=None,
                   help="size: all backends' ranks run at once and take turns size by size (rounds of a size "
                        "back to back), so each size is compared within seconds; sweep: whole sweeps in turn "
                        "(default: size with --compare, else sweep)")
    p.add_argument("--hosts", type=int, default=1,
                   help="ncl: split the ranks into this many emulated hosts that talk over MPI (ncl-run --hosts)")
    p.add_argument("--timeout", type=float, default=300.0, help="NCL_TIMEOUT of the ranks (seconds)")
    p.add_argument("--topology", help="ncl: also cost every call on this emulated interconnect (a topology file or "
                                      "shipped name; ncl-run --topology) and print its emulated time")
    p.add_argument("--emulate", choices=("account", "pace"), default="account",
                   help="with --topology: account (emulated time beside wall time) or pace (calls last at least "
                        "their emulated time)")
    p.add_argument("--csv", help="write every row to this CSV file")
    p.add_argument("--json", help="write rows, command line and machine facts to this JSON file")
    p.add_argument("--xlsx", help="write a spreadsheet")
    p.add_argument("--plot", help="draw busbw and time against size into this PNG")
    return p


def _check(p: argparse.ArgumentParser, cfg) -> None:
    if cfg.min_bytes > cfg.max_bytes:
        p.error(f"-b {cfg.min_bytes} is larger than -e {cfg.max_bytes}")
    if cfg.factor < 1 or (cfg.factor == 1 and cfg.step <= 0):
        p.error("use -f >= 2, or -f 1 with --stepbytes > 0")
    if cfg.factor > 1 and cfg.min_bytes == 0:
        p.error("-b 0 with a step factor never grows: give -b >= 1")
    if cfg.warmup < 0 or cfg.iters < 1 or cfg.repeat < 1:
        p.error("-w must be >= 0, -i >= 1 and --repeat >= 1")
    if cfg.min_time < 0 or not cfg.timeout > 0:
        p.error("--min-time must be >= 0 and --timeout > 0")
    if cfg.root < 0 or any(cfg.root >= n for n in cfg.nranks):
        p.error(f"-r {cfg.root} is not a rank of every -n {cfg.nranks}")
    if specs.SPECS[cfg.collective].reduces is False and cfg.op != "sum":
        p.error(f"{cfg.collective} takes no reduction op")
    for path in (cfg.csv, cfg.json, cfg.xlsx, cfg.plot):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"cannot write {path}: no such directory")
    if cfg.topology:
        try:
            from ..topology import load_topology
            chips = load_topology(cfg.topology).num_chips
        except (ValueError, OSError) as exc:
            p.error(f"--topology {cfg.topology}: {exc}")
        if max(cfg.nranks) > chips:
            p.error(f"--topology {cfg.topology} has {chips} chips, fewer than -n {max(cfg.nranks)}")
        if cfg.hosts > 1:
            p.error("--topology and --hosts: the emulated interconnect costs one host's communicator only")
    if cfg.interleave is None:
        cfg.interleave = "size" if cfg.compare else "sweep"
    if cfg.hosts < 1 or any(n % cfg.hosts for n in cfg.nranks):
        p.error(f"--hosts {cfg.hosts} must divide every -n {cfg.nranks}")
    if ("mpi" in cfg.compare or cfg.hosts > 1) and not mpiexec():
        p.error("--compare mpi and --hosts need mpi4py and an MPI launcher: pip install mpi4py mpich "
                "(or Debian's mpich), so that mpiexec is on PATH")
    if "gloo" in cfg.compare:
        try:
            import torch.distributed  # noqa: F401
        except ImportError:
            p.error("--compare gloo needs torch: pip install torch==2.13.0")
    if "deepspeed" in cfg.compare and not all(importlib.util.find_spec(m) for m in ("torch", "deepspeed")):
        report.log("# --compare deepspeed: skipped, DeepSpeed (or torch) is not installed: "
                   "DS_BUILD_OPS=0 pip install 'ncl[peers]'")
        cfg.compare.remove("deepspeed")


def _command(backend: str, n: int, cfg, rendezvous: str, **turns) -> List[str]:
    """A backend's launcher; turns: the gate and rounds of --interleave size (ncl/perf/lockstep.py)."""
    settings = {k: getattr(cfg, k) for k in ("collective", "min_bytes", "max_bytes", "factor", "step", "dtype", "op",
                                              "root", "warmup", "iters", "min_time", "check", "registered")}
    settings["registered"] = bool(cfg.registered) and backend == "ncl"
    settings["memcpy"] = backend == "ncl"
    settings.update(turns)
    return launch_argv(backend, n, "ncl.perf.worker", settings, rendezvous, cfg.hosts, cfg.timeout, cfg.topology,
                       cfg.emulate)


def _env(backend: str, n: int, cfg, extra_env: Optional[dict] = None) -> dict:
    env = launch.own_modules_env(dict(os.environ, NCL_TIMEOUT=str(cfg.timeout), **(extra_env or {})))
    if backend == "deepspeed":  # its op segfaults unless told how many ranks share this host
        env["LOCAL_SIZE"] = str(n)
    return env


def _record(row: dict, cfg, n: int, round_: int, rows: List[dict]) -> None:
    row.update(collective=cfg.collective, dtype=cfg.dtype, op=cfg.op, root=cfg.root % n, round=round_)
    report.add_bandwidths(row, cfg.collective)
    rows.append(row)


def run_backend(backend: str, n: int, cfg, rows: List[dict], progress, round_: int = 0,
                extra_env: Optional[dict] = None) -> int:
    """Run one sweep; print nccl-tests rows as sizes complete.  Returns the launcher's code."""
    with tempfile.TemporaryDirectory(prefix="ncl-perf-") as tmp:
        cmd = _command(backend, n, cfg, os.path.join(tmp, "rendezvous"))
        env = _env(backend, n, cfg, extra_env)
        progress.write(report.header(cfg.collective, backend, n, cfg)
                       + (f"\n# round {round_ + 1} of {cfg.repeat}" if cfg.repeat > 1 else ""))
        pending = {}
        mine = []

        def on_row(row):
            nonlocal pending
            _record(row, cfg, n, round_, rows)
            mine.append(row)
            pending[row["in_place"]] = row
            if len(pending) == 2:
                progress.write(report.line(cfg.collective, pending[False], pending[True], cfg))
                pending = {}
                progress.update(1)

        code = run_worker(cmd, env, progress, on_row)
        if code == 0:
            progress.write(f"# Avg bus bandwidth    : {report.average_busbw(mine):.3f} GB/s "
                           f"(#wrong total {sum(r.get('wrong', 0) for r in mine)})\n")
        else:
            progress.write(f"# {backend} sweep on {n} ranks failed (exit code {code})\n")
        return code


def turn_launcher(backend: str, n: int, cfg, gate: str, scratch: str, extra_env: Optional[dict] = None):
    """(argv, env) of a backend's launcher that runs cfg's sweep a size at a time, when lockstep.run
    gives it the turn (gate: its pipes; scratch: a directory of its own)."""
    return (_command(backend, n, cfg, os.path.join(scratch, "rendezvous"), gate=gate, rounds=cfg.repeat),
            _env(backend, n, cfg, extra_env))


def run_turns(backends: List[str], n: int, cfg, rows: List[dict], progress) -> int:
    """--interleave size: every backend's ranks at once, taking turns size by size (ncl/perf/lockstep.py);
    prints each pair of rows as it comes, the backend and round before it.  The failed backends' count."""
    turns = [(size, r) for size in specs.sweep_sizes(cfg) for r in range(cfg.repeat)]
    for b in backends:
        progress.write(report.header(cfg.collective, b, n, cfg))
    progress.write(f"# turns: each size {cfg.repeat} time(s) per backend, the backends in turn "
                   f"(the first rotating), a backend's ranks asleep while another runs")
    pending: Dict[str, dict] = {}

    def command(b: str, gate: str, scratch: str):
        return turn_launcher(b, n, cfg, gate, scratch)

    def on_row(b: str, turn: tuple, row: dict):
        _record(row, cfg, n, turn[1], rows)
        half = pending.setdefault(b, {})
        half[row["in_place"]] = row
        if len(half) == 2:
            progress.write(f"# {b} round {turn[1] + 1}\n" + report.line(cfg.collective, half[False], half[True], cfg))
            pending.pop(b)
            progress.update(1)

    codes = lockstep.run(backends, n, turns, command, on_row, progress.write)
    for b, code in codes.items():
        if code:
            progress.write(f"# {b} on {n} ranks failed (exit code {code})")
    return sum(1 for code in codes.values() if code)


def sweep_times(collective: str, n: int, lo: str, hi: str, factor: int, quick: bool = True) -> Dict[int, float]:
    """{size: µs} of a quiet ncl sweep (out-of-place rows) on n local ranks: ncl-perf called from
    Python (ncl-topo calibrate measures this host with it)."""
    argv = [collective, "-b", lo, "-e", hi, "-f", str(factor), "-n", str(n), "-c", "0"]
    if quick:
        argv += ["-w", "2", "-i", "5", "--min-time", "0.02"]
    cfg = parser().parse_args(argv)
    rows: List[dict] = []
    with open(os.devnull, "w") as quiet:
        saved, sys.stdout = sys.stdout, quiet
        try:
            code = run_backend("ncl", n, cfg, rows, Progress(0))
        finally:
            sys.stdout = saved
    if code != 0:
        raise RuntimeError(f"the {collective} sweep on {n} ranks failed (exit code {code})")
    return {r["size"]: r["time_us"] for r in rows if not r["in_place"] and "time_us" in r}


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["moe"]:  # MoE dispatch/combine has its own options (ncl/perf/moe.py)
        from . import moe
        return moe.main(args[1:])
    p = parser()
    cfg = p.parse_args(argv)
    _check(p, cfg)
    command = ["ncl-perf"] + (sys.argv[1:] if argv is None else list(argv))
    backends = ["ncl"] + cfg.compare
    progress = Progress(len(specs.sweep_sizes(cfg)) * len(backends) * len(cfg.nranks) * cfg.repeat)
    rows: List[dict] = []
    failed = 0
    try:
        if cfg.interleave == "size":
            for n in cfg.nranks:
                failed += run_turns(backends, n, cfg, rows, progress)
        else:
            for round_ in range(cfg.repeat):
                for n in cfg.nranks:
                    for backend in backends:
                        failed += run_backend(backend, n, cfg, rows, progress, round_) != 0
    finally:
        progress.close()
    summary = report.median_rows(rows) if cfg.repeat > 1 else rows
    if cfg.repeat > 1:
        report.log(report.median_table(summary, cfg.collective))
    if cfg.compare:
        report.log(report.comparison(summary, cfg.collective, cfg.compare))
    for path in report.write_files(rows, summary, cfg, command, report.machine_facts()):
        report.log(f"# wrote {path}")
    wrong = sum(r.get("wrong", 0) for r in rows)
    if wrong:
        report.log(f"# {wrong} wrong elements: results differ from the numpy reference")
    return 1 if failed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
