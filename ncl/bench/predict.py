"""ncl-bench predict: sharded inference on a server described by a topology file, from the chip and link
model (ncl.topology.predict), in seconds and without running anything.

    ncl-bench predict --model llama-3.1-405b --tp 1,2,4,8 --batch 1,8,32,max --input-len 128,2048 --output-len 128
    ncl-bench predict --topology hgx-h200-8gpu --model llama-3.1-405b --tp 8 --precision fp8 --batch max --json
"""
import argparse
import itertools
import json
import math
import sys
import time
from typing import Dict, List

from ncl.topology import predict as model_predict
from ncl.topology.arch import Arch, Split
from ncl.topology.chip import WEIGHT_BYTES
from ncl.topology.inference import Server

COLUMNS = [("model", "model"), ("tp", "TP"), ("ep", "EP"), ("pp", "PP"), ("chips", "chips"), ("precision", "prec"),
           ("batch", "batch"), ("input_len", "in"), ("output_len", "out"), ("ttft_ms", "TTFT ms"),
           ("tpot_ms", "TPOT ms"), ("output_tok_s", "out tok/s"), ("scaling_eff", "eff"), ("bound", "bound"),
           ("comm_share", "comm"), ("memory_share", "mem"), ("compute_share", "compute"), ("fits", "fits"),
           ("max_batch", "max batch"), ("tpot_floor_ms", "TPOT floor ms")]


def positive_ints(flag: str, allow_max: bool = False):
    def parse(text: str):
        out = []
        for t in (x.strip() for x in text.split(",")):
            if not t:
                continue
            if allow_max and t == "max":
                out.append("max")
                continue
            try:
                v = int(t)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag} takes integers like 8 or 1,2,4"
                                                 f"{' or max' if allow_max else ''}, not {text!r}") from None
            if v < 1:
                raise argparse.ArgumentTypeError(f"{flag} values must be >= 1, not {text!r}")
            out.append(v)
        if not out:
            raise argparse.ArgumentTypeError(f"{flag} needs at least one value, not {text!r}")
        return sorted(set(out), key=lambda v: (v == "max", 0 if v == "max" else v))
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topology", help="a shipped name or a YAML file (default: NCL_TOPOLOGY, else pcie-gen5-8card)")
    p.add_argument("--model", required=True, help="config names, comma-separated (ncl-bench params lists them)")
    p.add_argument("--tp", default="1", help="tensor-parallel sizes, comma-separated ('ep': equal to --ep)")
    p.add_argument("--ep", type=positive_ints("--ep"), help="expert-parallel sizes (MoE models; default: = TP)")
    p.add_argument("--pp", type=positive_ints("--pp"), default=[1],
                   help="pipeline stages, each on TP (x EP) chips (default 1)")
    p.add_argument("--precision", default="bf16", help=f"weights: {', '.join(WEIGHT_BYTES)} (comma-separated)")
    p.add_argument("--kv-precision", choices=("bf16", "fp8"), help="KV cache (default: fp8 with fp8 weights, else bf16)")
    p.add_argument("--input-len", type=positive_ints("--input-len"), default=[128], help="prompt tokens")
    p.add_argument("--output-len", type=positive_ints("--output-len"), default=[128], help="generated tokens")
    p.add_argument("--batch", type=positive_ints("--batch", allow_max=True), default=[1],
                   help="concurrent sequences; max: the largest batch whose weights and KV cache fit")
    p.add_argument("--overlap", action="store_true", help="communication overlapped with compute (default: not)")
    p.add_argument("--compress", choices=("fp8", "int8", "mxfp4"),
                   help="the activations' all-reduces block-scaled in this format (ncl.compress; default: not)")
    p.add_argument("--chunk-tokens", type=int, default=model_predict.CHUNK_TOKENS, help="prefill tokens per step")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")


def splits_for(arch: Arch, tps, eps) -> List[Split]:
    """The splits of a sweep: every TP size with each EP size (MoE; EP = TP when eps is None), or TP
    alone (dense); tps == "ep": TP = EP at every EP size."""
    if tps == "ep":
        return [Split(e, e) for e in eps]
    return [Split(tp, e) for tp in tps for e in ((eps or [tp]) if arch.moe else [1])]


def grid(topology, models, tps, eps, precisions, batches, lengths, kv_precision=None, overlap=False,
         chunk_tokens=model_predict.CHUNK_TOKENS, compress=None, pps=(1,)) -> List[dict]:
    """One row per model x split x pipeline depth x precision x batch x (input, output) length pair; splits
    that cannot shard a model and batches that do not fit come back refused, with why."""
    from ncl.models import get_config
    result = []
    for model in models:
        arch = Arch.of(get_config(model), model)
        for split, pp, precision in itertools.product(splits_for(arch, tps, eps), pps, precisions):
            why = split.problem(arch) or (f"pp {pp} is more stages than the {arch.n_layers} layers"
                                          if pp > arch.n_layers else None)
            server = None if why else Server(topology, arch, split, precision, kv_precision, overlap, compress, pp)
            for batch, (i, o) in itertools.product(batches, lengths):
                row = dict(model=model, tp=split.tp, ep=split.ep, pp=pp, chips=split.world(arch) * pp,
                           precision=precision,
                           kv_precision=server.kv_precision if server else None, input_len=i, output_len=o,
                           topology=topology.name, chip=server.chip.name if server else None, batch=batch,
                           requested_batch=batch, status="refused", error=why)
                if server is not None:
                    try:
                        row.update(model_predict.point(server, batch, i, o, chunk_tokens), status="ok", error=None)
                    except ValueError as exc:
                        row.update(error=str(exc))
                    if row["batch"] == 0:
                        row.update(status="refused", error="the weights alone do not fit the chips")
                result.append(row)
    add_efficiency(result)
    return result


def run_precision(arch: Arch, dtype: str) -> str:
    """The weight precision a run of ncl.models holds: its dtype, but MoE experts stay in MXFP4 (gpt-oss)."""
    return "mxfp4" if arch.moe else dtype


def annotate(rows: List[dict], topology) -> None:
    """Give each measured ncl-bench infer row the prediction of the same point on the target topology
    (pred_* columns): the model's whole depth at the run's batch, lengths and precision."""
    from ncl.models import get_config
    servers = {}
    for r in rows:
        if r.get("status") != "ok" or topology is None or not getattr(topology.spec.chips[0].type, "compute_tflops", None):
            continue
        key = (r["model"], r["tp"], r["ep"], r["dtype"])
        if key not in servers:
            arch = Arch.of(get_config(r["model"]), r["model"])
            try:
                servers[key] = Server(topology, arch, Split(r["tp"], r["ep"] if arch.moe else 1),
                                      run_precision(arch, r["dtype"]))
            except ValueError:
                servers[key] = None
        if servers[key] is None:
            continue
        # the run prefills, then decodes output_len steps: output_len + 1 tokens in the model's terms
        p = model_predict.point(servers[key], r["batch"], r["input_len"], r["output_len"] + 1)
        r.update(pred_ttft_ms=p["ttft_ms"], pred_tpot_ms=p["tpot_ms"], pred_output_tok_s=p["output_tok_s"],
                 pred_bound=p["bound"], pred_comm_share=p["comm_share"], pred_fits=p["fits"],
                 pred_max_batch=p["max_batch"], chip=servers[key].chip.name)


def add_efficiency(result: List[dict]) -> None:
    """Strong scaling against the 1-chip row of the same model, precision, batch request and lengths."""
    def key(r):
        return r["model"], r["precision"], r["requested_batch"], r["input_len"], r["output_len"]
    base = {key(r): r for r in result if r["chips"] == 1 and r.get("status") == "ok"}
    for r in result:
        b = base.get(key(r))
        if r.get("status") == "ok" and b and b["output_tok_s"] > 0:
            r["scaling_eff"] = r["output_tok_s"] / (r["chips"] * b["output_tok_s"])


def table(result: List[dict], tablefmt: str = "simple") -> str:
    from tabulate import tabulate

    def cell(r, k):
        v = r.get(k)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if k.endswith("share") or k == "scaling_eff":
            return f"{100 * v:.0f}%"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return v
    body = [[cell(r, k) for k, _ in COLUMNS] if r.get("status") == "ok" else
            [cell(r, k) for k, _ in COLUMNS[:9]] + [f"refused: {r['error']}"] + [""] * (len(COLUMNS) - 10)
            for r in result]
    return tabulate(body, headers=[h for _, h in COLUMNS], disable_numparse=True, tablefmt=tablefmt)


def _num(v: float) -> str:
    """Three significant digits, never an exponent."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def pivot(result: List[dict], tablefmt: str = "github") -> str:
    """A compact view of one model's grid at one length pair: a row per precision and batch, per chip count
    the TPOT and the output tok/s with the scaling efficiency; then what bounds the largest split.  A
    time marked * is a configuration whose weights and KV cache do not fit the chips (as if they did)."""
    from tabulate import tabulate
    chips = sorted({r["chips"] for r in result})
    rows: Dict[tuple, Dict[int, dict]] = {}
    for r in result:
        rows.setdefault((r["precision"], str(r["requested_batch"])), {})[r["chips"]] = r
    body = []
    for (precision, batch), by in rows.items():
        line = [precision, batch]
        for n in chips:
            r = by.get(n)
            if r is None or r.get("status") != "ok":
                line += ["-", "-"]
                continue
            mark = "" if r["fits"] else "*"
            eff = f" ({100 * r['scaling_eff']:.0f}%)" if r.get("scaling_eff") is not None else ""
            line += [f"{_num(r['tpot_ms'])}{mark}", f"{_num(r['output_tok_s'])}{eff}"]
        last = by.get(chips[-1], {})
        line.append(f"{last.get('bound', '-')} ({100 * last['comm_share']:.0f}% comm)" if last.get("status") == "ok"
                    else "-")
        body.append(line)
    headers = ["prec", "batch"] + [h for n in chips for h in (f"{n} chips: TPOT ms", "out tok/s (eff)")]
    return tabulate(body, headers=headers + [f"bound at {chips[-1]}"], tablefmt=tablefmt, disable_numparse=True)


def names(p: argparse.ArgumentParser, flag: str, text: str, known) -> List[str]:
    """A comma-separated list of known names (models, precisions), or a usage error naming the flag."""
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in values if x not in known]
    if bad or not values:
        p.error(f"{flag} takes {', '.join(sorted(known))}; unknown: {', '.join(bad) or repr('')}")
    return values


def check(p: argparse.ArgumentParser, args):
    from ncl.models import CONFIGS
    args.model = names(p, "--model", args.model, CONFIGS)
    args.precision = names(p, "--precision", args.precision, WEIGHT_BYTES)
    if args.tp.strip() == "ep":
        if not args.ep:
            p.error("--tp ep needs --ep")
        args.tp = "ep"
    else:
        try:
            args.tp = positive_ints("--tp")(args.tp)
        except argparse.ArgumentTypeError as exc:
            p.error(str(exc))
    if args.chunk_tokens < 1:
        p.error(f"--chunk-tokens must be >= 1, not {args.chunk_tokens}")
    from ncl.topology import default_topology, load_topology
    try:
        topology = load_topology(args.topology) if args.topology else default_topology()
    except (ValueError, OSError) as exc:
        p.error(f"--topology {args.topology}: {exc}")
    chip = next((c for c in topology.spec.chips if c.name == topology.spec.placement[0]), None)
    if chip is None or chip.type is None or not chip.type.compute_tflops:
        p.error(f"topology {topology.name!r} describes no chip type with compute rates: nothing to predict with")
    for precision in args.precision:
        try:
            chip.type.compute_precision(precision)
        except ValueError as exc:
            p.error(str(exc))
    return topology


def main(p: argparse.ArgumentParser, args) -> int:
    topology = check(p, args)
    started = time.perf_counter()
    lengths = list(itertools.product(args.input_len, args.output_len))
    result = grid(topology, args.model, args.tp, args.ep, args.precision, args.batch, lengths, args.kv_precision,
                  args.overlap, args.chunk_tokens, args.compress, args.pp)
    if args.json:
        json.dump(result, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
        return 0
    chip = result[0].get("chip") if result else None
    sys.stdout.write(f"# ncl-bench predict on {topology.name} ({chip}); {len(result)} points in "
                     f"{time.perf_counter() - started:.2f} s; times are per request (static batch: TTFT, TPOT "
                     "= mean decode step), out tok/s over the whole batch\n")
    sys.stdout.write(table(result) + "\n")
    return 0
