"""ncl-bench kperf: a K-Perf evaluation of a server described by a topology file.

    ncl-bench kperf                                          # the default grid on the default topology
    ncl-bench kperf --topology pcie-gen5-8card,hgx-h200-8gpu --models llama-3.1-8b --out kperf

For each model x weight (and KV-cache) precision x chip count x (input, output) lengths x concurrency: a closed loop of C users
served by a simulated engine (ncl.bench.serving: continuous batching, chunked prefill, a paged KV cache
with preemption) whose every step is priced by the chip and link model (ncl.topology.inference): TTFT,
TPOT, ITL and end-to-end latency percentiles, output and total tok/s, requests/s, goodput under MLPerf's
server-scenario limits, and energy: each chip draws idle power plus (TDP - idle) x the share of the step it
is busy in compute- or memory-bound operators, the links their bytes at their energy per bit.
Chip counts: the fewest chips (a power of two) whose memory holds the weights and the longest request's
KV cache, and the whole server; --chips lists others.  The engine takes vLLM's defaults for the chip's
memory size (serving.EngineConfig).
"""
import argparse
import itertools
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ncl.topology.arch import Arch, Split
from ncl.topology.inference import Keys, Server

from . import serving

DEFAULT_MODELS = ["llama-3.1-8b", "llama-3.3-70b", "llama-3.1-405b", "exaone-4.0-32b"]
DEFAULT_PRECISIONS = ["bf16", "fp8", "mxfp4"]
DEFAULT_LENGTHS = [(128, 128), (128, 2048), (2048, 128), (2048, 2048)]
DEFAULT_CONCURRENCY = [1, 4, 16, 64, 256]
LARGE_MEMORY_GIB = 70   # vLLM's threshold for its larger batch defaults (serving.py's EngineConfig note)


class ServerSteps:
    """A Server as serving.StepModel: prices the simulator's steps and, after a run, their energy."""

    def __init__(self, server: Server):
        self.server = server
        free = server.memory_budget() - server.weight_bytes()
        per_token = server.kv_bytes(1, 1)
        self.kv_capacity_tokens = max(0, int(free // per_token)) if per_token > 0 else 0
        self.window = server.arch.sliding_window

    def _keys(self, decode_contexts: np.ndarray, prefill: Sequence[Tuple[int, int]]):
        """The step's attention kernels: its decodes', and its prompt chunks' (Server.step)."""
        keys = Keys.decode(decode_contexts, self.window)
        if not len(prefill):
            return keys
        new, cached = np.asarray(prefill, dtype=np.float64).T
        prompts = Keys.prefill(new, cached, self.window)
        return (keys, prompts) if len(decode_contexts) else prompts

    def step_time(self, decode_contexts: np.ndarray, prefill: Sequence[Tuple[int, int]]) -> float:
        tokens = len(decode_contexts) + sum(n for n, _ in prefill)
        sequences = len(decode_contexts) + len(prefill)
        return float(self.server.step(tokens, sequences, self._keys(decode_contexts, prefill)).seconds)

    def decode_step_times(self, decode_contexts: np.ndarray, n_steps: int) -> np.ndarray:
        n = len(decode_contexts)
        ctx = np.asarray(decode_contexts, dtype=np.float64)[None, :] + np.arange(n_steps)[:, None]  # [step, seq]
        keys = Keys.decode(ctx, self.window)
        return np.broadcast_to(self.server.step(n, n, keys).seconds, (n_steps,)).astype(np.float64)

    def energy(self, steps: serving.StepRecords, begin: float, end: float) -> Dict[str, float]:
        """Joules of the chips and links over the steps that start inside [begin, end), and the window's
        idle time at idle power.  The steps are priced again from their records, which keep sums, not each
        sequence: decodes at their mean context, a step's prompt tokens as one fresh prompt (an upper bound
        on the prefill's attention, and so on the busy share)."""
        s, chip, n = self.server, self.server.chip, self.server.nranks
        inside = (steps.start >= begin) & (steps.start < end)
        dec, ctx = steps.decode_seqs[inside], steps.decode_context_tokens[inside]
        pre = steps.prefill_tokens[inside]
        dur = steps.duration[inside]
        tokens, seqs = dec + pre, np.maximum(1, dec + steps.prefill_seqs[inside])
        mean_ctx = np.where(dec > 0, ctx / np.maximum(dec, 1), 0)
        window = np.minimum(mean_ctx, self.window) * dec if self.window else ctx
        keys = (Keys(ctx, window, ctx, window), Keys(pre * (pre + 1) / 2, pre * (pre + 1) / 2, pre, pre))
        cost = s.step(np.maximum(tokens, 1), seqs, keys)
        busy = np.minimum(cost.compute + cost.memory, dur)
        idle = chip.idle_w or 0.0
        chips = n * (idle * (end - begin) + (chip.tdp_w - idle) * float(np.sum(busy)))
        links = float(np.sum(tokens)) * s.link_joules_per_token()
        return {"chip_j": chips, "link_j": links, "busy_share": float(np.sum(busy) / max(end - begin, 1e-12))}


def engine_for(server: Server) -> serving.EngineConfig:
    if server.chip.memory_gib >= LARGE_MEMORY_GIB:
        return serving.EngineConfig(max_num_batched_tokens=8192, max_num_seqs=1024)
    return serving.EngineConfig()


def fewest_chips(topology, arch: Arch, precision: str, kv_precision: Optional[str], context: int) -> Optional[int]:
    """The fewest chips (a power of two up to the topology's) that hold the weights and one request of
    `context` tokens; None if even all of them do not."""
    n = 1
    while n <= topology.num_chips:
        split = Split(n, n if arch.moe else 1)
        if not split.problem(arch) and \
                Server(topology, arch, split, precision, kv_precision).fits(split.dp(arch), context):
            return n
        n *= 2
    return None


def plan(topology, models, precisions, kv_precisions, chips, lengths, concurrency) -> List[dict]:
    """Every point of the grid; configurations that cannot run come back with why.  kv_precisions: None
    for the default of each weight precision (fp8 with fp8 weights, else bf16)."""
    from ncl.models import get_config
    points = []
    for model, precision, kv in itertools.product(models, precisions, kv_precisions or [None]):
        arch = Arch.of(get_config(model), model)
        longest = max(i + o for i, o in lengths)
        least = fewest_chips(topology, arch, precision, kv, longest)
        counts = sorted({least, topology.num_chips} if chips is None else set(chips)) if least or chips else []
        base = dict(model=model, precision=precision, kv_precision=kv, topology=topology.name)
        if not counts:
            points.append(dict(base, chips=None, status="refused",
                               error=f"does not fit {topology.num_chips} chips of {topology.name} at {precision}"))
            continue
        for n, (i, o), c in itertools.product(counts, lengths, concurrency):
            points.append(dict(base, chips=n, input_len=i, output_len=o, concurrency=c, status="planned"))
    return points


def run_point(topology, point: dict, servers: dict) -> dict:
    from ncl.models import get_config
    key = (point["topology"], point["model"], point["precision"], point["kv_precision"], point["chips"])
    if key not in servers:
        arch = Arch.of(get_config(point["model"]), point["model"])
        n = point["chips"]
        split = Split(n, n if arch.moe else 1)
        why = split.problem(arch)
        servers[key] = why or ServerSteps(Server(topology, arch, split, point["precision"], point["kv_precision"]))
    steps = servers[key]
    if isinstance(steps, str):
        return dict(point, status="refused", error=steps)
    server = steps.server
    workload = serving.Workload(serving.ClosedLoop(point["concurrency"]), point["input_len"], point["output_len"])
    try:
        result = serving.simulate(steps, workload, engine_for(server), slo=serving.slo_for(point["model"]))
    except ValueError as exc:
        return dict(point, status="refused", error=str(exc))
    row = dict(point, status="ok", chip=server.chip.name, kv_precision=server.kv_precision,
               kv_capacity_tokens=steps.kv_capacity_tokens)
    row.update(result.row())
    begin, end = result.window
    e = steps.energy(result.steps, begin, end)
    joules = e["chip_j"] + e["link_j"]
    out_tokens = row["output_tok_s"] * (end - begin)
    row.update(power_w=joules / (end - begin), j_per_token=joules / out_tokens if out_tokens else math.nan,
               tok_s_per_w=row["output_tok_s"] / (joules / (end - begin)), busy_share=e["busy_share"],
               static_w=server.nranks * (server.chip.idle_w or 0.0))
    return row


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .predict import positive_ints
    p.add_argument("--topology", help="shipped names or YAML files, comma-separated (default: the default topology)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="model names, comma-separated")
    p.add_argument("--precision", default=",".join(DEFAULT_PRECISIONS), help="weight precisions, comma-separated")
    p.add_argument("--kv-precision", default="auto",
                   help="KV-cache precisions, comma-separated (bf16, fp8); auto: fp8 with fp8 weights, else bf16")
    p.add_argument("--chips", type=positive_ints("--chips"),
                   help="chip counts (default: the fewest that fit, and the whole server)")
    p.add_argument("--lengths", default=",".join(f"{i}/{o}" for i, o in DEFAULT_LENGTHS),
                   help="input/output token pairs, comma-separated")
    p.add_argument("--concurrency", type=positive_ints("--concurrency"), default=DEFAULT_CONCURRENCY,
                   help="concurrent users (a closed loop)")
    p.add_argument("--accuracy", help="a JSON file written by `python -m ncl.bench.accuracy --out`: its rows join "
                                      "the report (accuracy runs a real model here, minutes, so it is not rerun)")
    p.add_argument("--out", default="kperf-report", help="report directory (created)")


def _lengths(p, text: str) -> List[Tuple[int, int]]:
    out = []
    for part in (t.strip() for t in text.split(",") if t.strip()):
        try:
            i, o = (int(x) for x in part.split("/"))
        except ValueError:
            p.error(f"--lengths takes input/output pairs like 128/2048, not {part!r}")
        if i < 1 or o < 2:
            p.error(f"--lengths needs input >= 1 and output >= 2, not {part!r}")
        out.append((i, o))
    if not out:
        p.error("--lengths needs at least one input/output pair")
    return out


def check(p: argparse.ArgumentParser, args):
    from ncl.models import CONFIGS
    from ncl.topology import default_topology, load_topology
    from ncl.topology.chip import WEIGHT_BYTES
    from .predict import names
    args.models = names(p, "--models", args.models, CONFIGS)
    args.precision = names(p, "--precision", args.precision, WEIGHT_BYTES)
    args.kv_precision = None if args.kv_precision.strip() == "auto" else \
        names(p, "--kv-precision", args.kv_precision, ("bf16", "fp8"))
    args.lengths = _lengths(p, args.lengths)
    topologies = []
    for name in (args.topology.split(",") if args.topology else [None]):
        try:
            topo = load_topology(name.strip()) if name else default_topology()
        except (ValueError, OSError) as exc:
            p.error(f"--topology {name}: {exc}")
        chip = topo.spec.chips[0].type
        if chip is None or not chip.compute_tflops or not chip.tdp_w:
            p.error(f"topology {topo.name!r} has no chip type with compute rates and power: nothing to evaluate")
        if args.chips and max(args.chips) > topo.num_chips:
            p.error(f"--chips {max(args.chips)} exceeds the {topo.num_chips} chips of {topo.name}")
        topologies.append(topo)
    args.accuracy_rows = []
    if args.accuracy:
        import json
        try:
            with open(args.accuracy) as f:
                data = json.load(f)
            args.accuracy_rows = list(data["rows"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            p.error(f"--accuracy {args.accuracy}: not a file written by python -m ncl.bench.accuracy --out ({exc})")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        p.error(f"--out {args.out} exists and is not a directory")
    return topologies


def main(p: argparse.ArgumentParser, args, command: List[str]) -> int:
    from . import kperf_report
    from .report import Progress
    topologies = check(p, args)
    started = time.perf_counter()
    points = [q for t in topologies for q in plan(t, args.models, args.precision, args.kv_precision, args.chips,
                                                   args.lengths, args.concurrency)]
    progress = Progress(sum(q["status"] == "planned" for q in points))
    rows, servers = [], {}
    by_name = {t.name: t for t in topologies}
    try:
        for q in points:
            if q["status"] != "planned":
                rows.append(q)
                continue
            rows.append(run_point(by_name[q["topology"]], q, servers))
            progress.update(f"{q['model']} {q['precision']} n={q['chips']} c={q['concurrency']}")
            if len(rows) % 100 == 0:  # a line now and then also where no bar is drawn (a log, CI)
                progress.write(f"# {len(rows)} of {len(points)} points")
    finally:
        progress.close()
    elapsed = time.perf_counter() - started
    for path in kperf_report.write(os.path.abspath(args.out), rows, command, topologies, elapsed, args.accuracy_rows):
        sys.stdout.write(f"# wrote {path}\n")
    ok = sum(r["status"] == "ok" for r in rows)
    sys.stdout.write(f"# {ok} points simulated, {len(rows) - ok} refused, in {elapsed:.1f} s\n")
    return 0
