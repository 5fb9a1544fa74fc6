"""ncl-bench: how sharded Llama, EXAONE and gpt-oss inference scales on an NPU server.  The answer comes from
the chip and link model (predict, validate, kperf: nothing runs); the models also run sharded on local ranks
here (infer: correctness, traces, this host's times, each point predicted beside them).

    ncl-bench                                   # the main job: the prediction + a small real run -> ncl-bench-report/
    ncl-bench predict --model llama-3.1-405b --tp 1,2,4,8 --batch 1,8,32,max --input-len 128,2048 --output-len 128
    ncl-bench validate                          # published measurements predicted, with the error
    ncl-bench kperf                             # K-Perf: concurrent users, precision, energy
    ncl-bench infer --model llama-3.1-405b --layers 1 --tp 1,2,4,8 --batch 1,8 --input-len 128 --output-len 16
    ncl-bench infer --model gpt-oss-120b --layers 1 --tp ep --ep 1,2,4,8 --batch 8,32 --input-len 128
    ncl-bench params                            # every config's parameter counts
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

from .. import launch, supervisor
from . import metrics, report, sizing
from .predict import positive_ints

DEFAULT_OUT = "ncl-bench-report"
TRACE_BUFFER = 65536     # flight-record entries per communicator: a whole point's calls
KILL_GRACE_S = 10.0

# The quick default sweep: one full-width layer of each big model, small enough for a 2-core host.
# The real run of the main job: one full-width layer of each big model on 1 and 8 local ranks (the model runs,
# sharded, and records the collectives the prediction prices); the scaling itself is the prediction's.
QUICK = [
    dict(sweep="llama-3.1-405b", model="llama-3.1-405b", layers=1, splits=[(1, 1), (8, 1)],
         batch=[1], input_len=[16], output_len=[4]),
    # TP = EP: attention, embedding and LM head split with the experts (TP 1 would replicate the 2.3 GB
    # embedding and head on every rank)
    dict(sweep="gpt-oss-120b", model="gpt-oss-120b", layers=1, splits=[(1, 1), (8, 8)],
         batch=[8], input_len=[16], output_len=[4]),
]
QUICK_COLLECTIVES = ("all_reduce", "all_gather", "all_to_all")
# What the quick job predicts on the target (what the report leads with): both big models over 1-8 chips, at
# batch 1, 8, 32 and the largest that fits, at three length pairs; 405B in bf16, fp8 and MXFP4 (only MXFP4 fits
# eight 48 GB cards), gpt-oss as it ships.
QUICK_LENGTHS = [(128, 128), (2048, 128), (128, 2048)]
QUICK_PREDICTION = [
    dict(model="llama-3.1-405b", tp=[1, 2, 4, 8], precision=["bf16", "fp8", "mxfp4"], batch=[1, 8, 32, "max"],
         lengths=QUICK_LENGTHS),
    dict(model="gpt-oss-120b", tp="ep", ep=[1, 2, 4, 8], precision=["mxfp4"], batch=[1, 8, 32, "max"],
         lengths=QUICK_LENGTHS),
]


Progress = report.Progress
_ints = positive_ints


def _tp_sizes(text: str):
    return "ep" if text.strip() == "ep" else _ints("--tp")(text)


def splits_of(args) -> List[tuple]:
    """(tp, ep) of every point: every pair, or TP = EP with --tp ep."""
    return [(e, e) for e in args.ep] if args.tp == "ep" else list(itertools.product(args.tp, args.ep))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topology", help="target topology, a shipped name or a YAML file (None: NCL_TOPOLOGY, else "
                                      "ncl.topology's default)")
    p.add_argument("--dtype", choices=sorted(sizing.DTYPE_BYTES), default="bf16", help="weights and activations")
    p.add_argument("--out", default=DEFAULT_OUT, help="report directory (created)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed prefills of up to 128 prompt positions + 2 decode steps before timing")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per point before it is stopped")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    p.add_argument("--weights", choices=("fast", "seeded"), default="fast",
                   help="fast: a seeded random pattern for large tensors (seconds per 405B layer); seeded: "
                        "ncl.models' own seeded random weights (minutes per 405B layer)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ncl-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{infer,predict,validate,kperf,params,quick}")
    infer = sub.add_parser("infer", help="sweep one model over TP / EP sizes, batches and lengths",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    infer.add_argument("--model", required=True, help="a config name (ncl-bench params lists them)")
    infer.add_argument("--layers", type=int, help="run this many layers of the real width (None: all of them)")
    infer.add_argument("--tp", type=_tp_sizes, default=[1],
                       help="tensor-parallel sizes; 'ep': the same as --ep at every point (gpt-oss)")
    infer.add_argument("--ep", type=_ints("--ep"), default=[1], help="expert-parallel sizes (gpt-oss)")
    infer.add_argument("--batch", type=_ints("--batch"), default=[1], help="concurrent sequences")
    infer.add_argument("--input-len", type=_ints("--input-len"), default=[128], help="prompt tokens")
    infer.add_argument("--output-len", type=_ints("--output-len"), default=[16], help="decode steps")
    _common(infer)
    sub.add_parser("params", help="parameter counts of every model config")
    from . import predict, validate
    predict.add_arguments(sub.add_parser("predict", help="predict a grid from the chip and link model (runs nothing)",
                                         formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    validate.add_arguments(sub.add_parser("validate", help="predict published measurements and print the error",
                                          formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    from . import kperf
    kperf.add_arguments(sub.add_parser("kperf", help="a K-Perf evaluation: concurrent users, precision, energy",
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    quick = sub.add_parser("quick", help="the default sweep (what ncl-bench with no arguments runs)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(quick)
    return p


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def _models():
    try:
        import ncl.models as models
        return models
    except ImportError as exc:
        raise SystemExit(f"ncl-bench: ncl.models cannot be imported ({exc}); it needs torch: "
                         "pip install torch==2.13.0") from None


def resolve_topology(p: argparse.ArgumentParser, name_or_path: Optional[str]) -> Optional[str]:
    """What the workers load: the file's absolute path or a shipped name; None when no topology
    loads (then nothing is emulated or projected, and the report says so)."""
    if name_or_path:
        try:
            sizing.topology(name_or_path)
        except (ValueError, OSError) as exc:
            p.error(f"--topology {name_or_path}: {exc}")
        return os.path.abspath(name_or_path) if os.path.exists(name_or_path) else name_or_path
    try:
        topo = sizing.topology(None)
    except (ValueError, OSError) as exc:
        report.log(f"# no target topology ({exc}): emulated and projected columns stay empty")
        return None
    return None if topo is None else os.environ.get("NCL_TOPOLOGY") or topo.name


def _check_common(p: argparse.ArgumentParser, args) -> None:
    missing = [m for m in ("torch", "matplotlib", "openpyxl") if not _importable(m)]
    if missing:
        p.error(f"ncl-bench needs {', '.join(missing)}: pip install torch==2.13.0 matplotlib openpyxl "
                "(or the ncl[torch,bench] extras)")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, not {args.warmup}")
    if not args.timeout > 0:
        p.error(f"--timeout must be positive, not {args.timeout}")
    args.target = resolve_topology(p, args.topology)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        p.error(f"--out {args.out} exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        p.error(f"--out {args.out} cannot be created: {exc.strerror}")
    if not os.access(out, os.W_OK | os.X_OK):
        p.error(f"--out {args.out} is not writable")


def _check_infer(p: argparse.ArgumentParser, args) -> None:
    models = _models()
    if args.model not in models.CONFIGS:
        p.error(f"unknown model {args.model!r}; known: {', '.join(sorted(models.CONFIGS))}")
    full = sizing.config_value(sizing.model_config(args.model), "n_layers")
    if args.layers is None:
        args.layers = full
    if not 1 <= args.layers <= full:
        p.error(f"--layers must be in 1..{full} for {args.model}, not {args.layers}")
    cfg = sizing.model_config(args.model, args.layers)
    for (tp, ep), batch in itertools.product(splits_of(args), args.batch):
        why = sizing.split_problem(cfg, tp, ep, batch)
        if why:
            p.error(f"{args.model}: {why}")
    longest = max(args.input_len) + max(args.output_len) + 1
    limit = getattr(cfg, "max_seq_len", None)
    if limit and longest > limit:
        p.error(f"--input-len + --output-len ({longest}) exceed {args.model}'s {limit} positions")
    _check_common(p, args)


def plan(sweep: str, model: str, layers: int, splits, batch, input_len, output_len, args) -> List[dict]:
    """Every point of one sweep, smallest world first (efficiency compares against 1 rank); points
    that would not fit this host's memory come back refused, with the reason."""
    cfg = sizing.model_config(model, layers)
    points = []
    for b, i, o, (t, e) in itertools.product(batch, input_len, output_len, splits):
        n = sizing.world_size(cfg, t, e)
        point = dict(sweep=sweep, model=model, layers=layers, tp=t, ep=e, nranks=n, batch=b, input_len=i,
                     output_len=o, dtype=args.dtype, warmup=args.warmup, seed=args.seed, weights=args.weights,
                     topology=args.target)
        fp = sizing.footprint(cfg, t, e, n, sizing.local_batch(cfg, t, e, b), i + o + 1, args.dtype)
        point["est_host_gib"] = fp.host / 2 ** 30
        why = sizing.fits(fp)
        if why:
            point.update(status="refused", error=why)
        points.append(point)
    return sorted(points, key=report.point_order)


def _worker_config(point: dict) -> dict:
    keys = ("model", "layers", "tp", "ep", "batch", "input_len", "output_len", "dtype", "warmup", "seed", "topology",
            "weights")
    return {k: point[k] for k in keys}


def run_point(point: dict, timeout: float, log_path: str) -> dict:
    """Launch one point under ncl-run; the row (status ok), or the point with why it failed."""
    cmd = [sys.executable, "-m", "ncl.run", "-n", str(point["nranks"]), "--timeout", str(timeout), "--",
           sys.executable, "-m", "ncl.bench.worker", "--config", json.dumps(_worker_config(point))]
    env = launch.own_modules_env(os.environ)
    env.setdefault("NCL_TRACE_BUFFER", str(TRACE_BUFFER))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve each other on shared cores
    t0 = time.perf_counter()
    with open(log_path, "w") as log:  # a Ctrl-C stops the point's launcher and ranks (and is re-raised)
        done = supervisor.run(cmd, timeout=timeout, grace_s=KILL_GRACE_S, stdout=subprocess.PIPE, stderr=log, env=env)
    out = done.stdout
    code = f"timeout after {timeout:g} s" if done.code is None else done.code
    row = dict(point, wall_s=time.perf_counter() - t0)
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if code == 0 and results:
        row.update(results[-1], status="ok")
    else:
        with open(log_path) as f:
            tail = [ln.rstrip() for ln in f.readlines() if ln.strip()][-3:]
        row.update(status="failed", error=f"launcher exit code {code}: {' | '.join(tail)} (log: {log_path})")
    return row


def run_points(points: List[dict], args, progress: Progress) -> List[dict]:
    logs = os.path.join(os.path.abspath(args.out), "logs")
    os.makedirs(logs, exist_ok=True)
    rows = []
    progress.write(report.point_header())
    from . import predict
    target = getattr(args, "target", None)
    topo = sizing.topology(target) if target else None
    try:
        for k, point in enumerate(points):
            row = _run_planned(k, point, args, logs)
            predict.annotate([row], topo)  # the same point on the target, beside this host's measurement
            rows.append(row)
            progress.write(report.point_line(row))
            progress.update(f"{row['sweep']} n={row['nranks']}")
    except KeyboardInterrupt:  # at any moment of the loop: keep what was measured, mark the rest
        left = points[len(rows):]
        why = "not run: the sweep was interrupted (SIGINT)"
        rows += [dict(q, status="interrupted", error=why) for q in left]
        progress.write(f"# interrupted: {len(left)} of {len(points)} points not run; writing the report")
    return rows


def _run_planned(k: int, point: dict, args, logs: str) -> dict:
    """Point k run (or refused, if the memory it needs is not available now): its row."""
    available = sizing.available_bytes()  # again now: other processes may have taken memory since the plan
    if point.get("status") != "refused" and point["est_host_gib"] * 2 ** 30 > sizing.HOST_RESERVE * available:
        point.update(status="refused", error=f"needs ~{point['est_host_gib']:.1f} GiB but only "
                     f"{available / 2 ** 30:.1f} GiB is available now (limit {sizing.HOST_RESERVE:.0%})")
    if point.get("status") == "refused":
        return point
    label = f"{point['sweep']}-tp{point['tp']}-ep{point['ep']}-b{point['batch']}-" \
            f"i{point['input_len']}-o{point['output_len']}"
    return run_point(point, args.timeout, os.path.join(logs, f"{k:03d}-{label}.log"))


def run_collectives(args, progress: Progress) -> List[dict]:
    """A small ncl-perf sweep of each quick collective on 2 and 8 ranks, with the topology's
    prediction of each size beside the measured time."""
    topo = sizing.topology(args.target) if args.target else None
    rows = []
    progress.write(report.collective_header())
    with tempfile.TemporaryDirectory(prefix="ncl-bench-") as tmp:
        for coll in QUICK_COLLECTIVES:
            path = os.path.join(tmp, f"{coll}.json")
            cmd = [sys.executable, "-m", "ncl.perf.cli", coll, "-b", "64K", "-e", "4M", "-f", "8", "-n", "2,8",
                   "-w", "2", "-i", "5", "--min-time", "0", "--json", path]
            done = supervisor.run(cmd, timeout=args.timeout, grace_s=KILL_GRACE_S, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, env=launch.own_modules_env(os.environ))
            if done.code != 0 or not os.path.exists(path):
                why = f"timed out after {args.timeout:g} s" if done.code is None else f"exit code {done.code}"
                progress.write(f"# ncl-perf {coll} failed ({why}): {done.stderr[-300:]}")
                progress.update(coll)
                continue
            with open(path) as f:
                for r in json.load(f)["summary"]:
                    if "time_us" not in r or r.get("in_place"):
                        continue
                    r = dict(r, sweep="collectives")
                    if topo is not None:
                        r["emulated_us"] = sizing.fit_topology(topo, r["nranks"]).predict(
                            coll, r["size"], r["nranks"]) * 1e6
                    rows.append(r)
            progress.write(report.collective_lines([r for r in rows if r["collective"] == coll]))
            progress.update(coll)
    return rows


def predicted(topo, sweeps: List[dict]) -> List[dict]:
    """The prediction grid of each sweep on the target (none without a topology that has chip rates)."""
    from . import predict
    chip = topo.spec.chips[0].type if topo is not None else None
    if chip is None or not chip.compute_tflops:
        return []
    rows = []
    for s in sweeps:
        rows += predict.grid(topo, [s["model"]], s["tp"], s.get("ep"), s["precision"], s["batch"], s["lengths"])
    return rows


def _finish(args, rows: List[dict], collectives: List[dict], command: List[str], started: float,
            prediction_sweeps: List[dict]) -> int:
    topo = sizing.topology(args.target) if args.target else None
    prediction = predicted(topo, prediction_sweeps)
    if prediction:
        report.log(f"# predicted on {topo.name}: {len(prediction)} points (summary.md leads with them)")
    metrics.add_efficiency(rows)
    facts = report.machine_facts()
    facts["sweep_wall_s"] = round(time.perf_counter() - started, 1)
    for path in report.write_all(args.out, rows, collectives, command, facts, topo, args.dtype, prediction):
        report.log(f"# wrote {path}")
    bad = [r for r in rows if r.get("status") != "ok"]
    for r in bad:
        report.log(f"# {r['sweep']} tp={r['tp']} ep={r['ep']} batch={r['batch']}: {r['status']}: {r.get('error')}")
    if any(r.get("status") == "interrupted" for r in rows):
        return 130  # as a shell reports a run stopped by SIGINT
    return 1 if any(r.get("status") == "failed" for r in rows) else 0


def infer(p: argparse.ArgumentParser, args, command: List[str]) -> int:
    _check_infer(p, args)
    started = time.perf_counter()
    points = plan(args.model, args.model, args.layers, splits_of(args), args.batch, args.input_len,
                  args.output_len, args)
    if all(q.get("status") == "refused" for q in points):
        p.error(f"no point fits this host: {points[0]['error']} (try --layers 1, a smaller --batch or shorter "
                "--input-len)")
    progress = Progress(len(points))
    try:
        rows = run_points(points, args, progress)
    finally:
        progress.close()
    from ncl.models import get_config
    from ncl.topology.arch import Arch
    from .predict import run_precision
    tps = "ep" if args.tp == "ep" else args.tp
    precision = run_precision(Arch.of(get_config(args.model)), args.dtype)
    sweep = dict(model=args.model, tp=tps, ep=args.ep, precision=[precision], batch=args.batch,
                 lengths=list(itertools.product(args.input_len, args.output_len)))
    return _finish(args, rows, [], command, started, [sweep])


def quick(p: argparse.ArgumentParser, args, command: List[str]) -> int:
    _check_common(p, args)
    started = time.perf_counter()
    points = []
    for s in QUICK:
        points += plan(s["sweep"], s["model"], s["layers"], s["splits"], s["batch"], s["input_len"],
                       s["output_len"], args)
    progress = Progress(len(points) + len(QUICK_COLLECTIVES))
    try:
        collectives = run_collectives(args, progress)
        rows = run_points(points, args, progress)
    finally:
        progress.close()
    return _finish(args, rows, collectives, command, started, QUICK_PREDICTION)


def params() -> int:
    models = _models()
    report.log(report.params_table(models))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    quick_options = not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help"))
    args = p.parse_args(["quick"] + argv if quick_options else argv)  # `ncl-bench [--out DIR ...]`: the quick sweep
    command = ["ncl-bench"] + argv
    if args.command == "params":
        return params()
    if args.command == "predict":
        from . import predict
        return predict.main(p, args)
    if args.command == "validate":
        from . import validate
        return validate.main(p, args)
    if args.command == "kperf":
        from . import kperf
        return kperf.main(p, args, command)
    if args.command == "infer":
        return infer(p, args, command)
    return quick(p, args, command)


if __name__ == "__main__":
    sys.exit(main())
