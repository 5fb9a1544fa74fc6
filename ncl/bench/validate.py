"""ncl-bench validate: predict every published measurement of a data file and print the error.

    ncl-bench validate                                  # the shipped file (ncl/bench/data/published.yaml)
    ncl-bench validate --markdown benchmarks/results/validation.md
    ncl-bench validate --calibrate                      # re-fit each chip type's one efficiency from its point

A point whose id a chip type names as `calibrated_from` fixed that chip's `calibrated_field`; it is marked
calibration and left out of the error statistics, which cover the predictions only.
"""
import argparse
import dataclasses
import math
import os
import statistics
import sys
from typing import List, Optional

from ncl.topology import load_topology
from ncl.topology import predict as model_predict
from ncl.topology.arch import Arch, Split
from ncl.topology.inference import Server

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "published.yaml")
REQUIRED = ("id", "system", "topology", "metric", "value", "source", "date")
METRICS = ("output_tok_s", "tpot_ms", "ttft_ms", "busbw_gbs")
TARGET = "median absolute error <= 15%, none worse than 40%, >= 8 points on >= 3 chip types"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=DATA, help="YAML file of published points")
    p.add_argument("--markdown", help="also write the report as Markdown to this file")
    p.add_argument("--calibrate", action="store_true",
                   help="fit each chip type's calibrated_field to its calibrated_from point and print the values")
    p.add_argument("--write", action="store_true",
                   help="with --calibrate: write the fitted values into the shipped chip files (topology/chips/)")


def load(path: str) -> dict:
    import yaml
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read it: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise ValueError(f"{path}: must be a mapping with a list `points`")
    for k, pt in enumerate(data["points"]):
        missing = [f for f in REQUIRED if f not in pt]
        if missing:
            raise ValueError(f"{path}: points[{k}] lacks {', '.join(missing)}")
        if pt["metric"] not in METRICS:
            raise ValueError(f"{path}: points[{k}].metric must be one of {', '.join(METRICS)}, not {pt['metric']!r}")
        if not isinstance(pt["value"], (int, float)) or pt["value"] <= 0:
            raise ValueError(f"{path}: points[{k}].value must be a positive number, not {pt['value']!r}")
        for field in ("max_seqs", "replicas", "pp"):
            if field in pt and not (type(pt[field]) is int and pt[field] >= 1):
                raise ValueError(f"{path}: points[{k}].{field} must be an integer >= 1, not {pt[field]!r}")
        if pt.get("admission", "on_demand") not in model_predict.ADMISSION:
            raise ValueError(f"{path}: points[{k}].admission must be one of {', '.join(model_predict.ADMISSION)}, "
                             f"not {pt['admission']!r}")
    return data


def server_for(pt: dict, chip=None) -> Server:
    from ncl.models import get_config
    topology = load_topology(pt["topology"])
    arch = Arch.of(get_config(pt["model"]), pt["model"])
    server = Server(topology, arch, Split(int(pt.get("tp", 1)), int(pt.get("ep", 1))), pt["precision"],
                    pt.get("kv_precision"), pp=pt.get("pp", 1))  # kv unstated: fp8 with fp8 weights, else bf16
    if chip is not None:
        server.chip = chip
    return server


def predict(pt: dict, chip=None) -> float:
    """The model's value of the point's metric."""
    if pt["metric"] == "busbw_gbs":
        topology = load_topology(pt["topology"])
        n, size = int(pt["chips"]), int(pt["size"])
        return topology.busbw(pt["collective"], size, n, topology.predict(pt["collective"], size, n))
    server = server_for(pt, chip)
    i, o, c = int(pt["input_len"]), int(pt["output_len"]), pt["concurrency"]
    admission = pt.get("admission", "on_demand")
    # `replicas` identical copies of the model (data parallel) share the point's requests evenly; each copy
    # is one server, so throughput adds up and per-request latencies are one copy's.
    replicas = int(pt.get("replicas", 1))
    per_copy = c if c == "max" else max(1, int(c) // replicas)
    if c != "max" and pt.get("batching") == "static":
        row = model_predict.static_batch(server, per_copy, i, o)
    elif c == "max":
        row = model_predict.max_throughput(server, i, o, max_seqs=int(pt.get("max_seqs", model_predict.MAX_SEQS)),
                                           admission=admission)
    elif per_copy == 1:
        row = model_predict.static_batch(server, 1, i, o)
    else:  # c requests kept in flight: continuous batching with c running
        row = model_predict.max_throughput(server, i, o, max_seqs=per_copy, admission=admission)
    value = float(row[pt["metric"]])
    return value * replicas if pt["metric"] == "output_tok_s" else value


def calibration_points() -> dict:
    """point id -> the chip types it calibrates (from the shipped chip library)."""
    from ncl.topology.schema import library_chip_type, shipped_chip_types
    out = {}
    for name in shipped_chip_types():
        chip = library_chip_type(name)
        if chip.calibrated_from:
            out.setdefault(chip.calibrated_from, []).append(chip)
    return out


def fit(pt: dict, chip) -> float:
    """The value of chip.calibrated_field that makes the point's prediction equal its published value
    (bisection on (0.05, 1]; throughput rises and latency falls with either efficiency)."""
    lower_is_better = pt["metric"].endswith("_ms")

    def error(v):
        got = predict(pt, dataclasses.replace(chip, **{chip.calibrated_field: v}))
        return (pt["value"] - got) if lower_is_better else (got - pt["value"])
    lo, hi = 0.05, 1.0
    if error(hi) < 0:
        return hi  # even peak rates fall short: the field stays at its ceiling
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if error(mid) >= 0 else (mid, hi)
    return hi


def write_field(chip: str, field: str, value: str) -> None:
    """Set one top-level field of a shipped chip file, keeping its comments and sources."""
    import re
    from ncl.topology import schema
    path = os.path.join(schema.CHIPS_DIR, chip + ".yaml")
    with open(path) as f:
        text = f.read()
    text, n = re.subn(rf"^{field}: .*$", f"{field}: {value}", text, flags=re.M)
    if n != 1:
        raise ValueError(f"{path}: no single top-level {field} to set")
    with open(path, "w") as f:
        f.write(text)
    schema.forget_chip_types()


def rows(data: dict) -> List[dict]:
    calibrations = calibration_points()
    out = []
    for pt in data["points"]:
        got = predict(pt)
        role = "calibration" if pt["id"] in calibrations else "prediction"
        out.append(dict(pt, predicted=got, error=(got - pt["value"]) / pt["value"], role=role))
    return out


def summary(result: List[dict]) -> dict:
    preds = [r for r in result if r["role"] == "prediction"]
    errors = [abs(r["error"]) for r in preds]
    chips = sorted({load_topology(r["topology"]).spec.chips[0].type.name for r in preds})
    median = statistics.median(errors) if errors else float("nan")
    worst = max(errors) if errors else float("nan")
    return {"points": len(preds), "chip_types": chips, "median_abs_error": median, "max_abs_error": worst,
            "met": bool(errors) and median <= 0.15 and worst <= 0.40 and len(preds) >= 8 and len(chips) >= 3}


def _value(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def markdown(result: List[dict], data: dict, command: List[str]) -> str:
    from tabulate import tabulate
    s = summary(result)
    head = ["point", "system", "model", "prec", "in/out", "conc.", "metric", "published", "predicted", "error",
            "role"]
    body = [[r["id"], r["system"], r.get("model", r.get("collective", "")), r.get("precision", ""),
             f"{r['input_len']}/{r['output_len']}" if "input_len" in r else "", str(r.get("concurrency", "")),
             r["metric"], _value(r["value"]), _value(r["predicted"]), f"{100 * r['error']:+.1f}%", r["role"]]
            for r in result]
    lines = [f"Command: `{' '.join(command)}`", "",
             tabulate(body, headers=head, tablefmt="github", disable_numparse=True), "",
             f"**Predictions: {s['points']} points on {len(s['chip_types'])} chip types "
             f"({', '.join(s['chip_types'])}); median absolute error {100 * s['median_abs_error']:.1f}%, "
             f"worst {100 * s['max_abs_error']:.1f}%.** Target: {TARGET}: {'met' if s['met'] else 'NOT met'}.", "",
             "Sources and assumptions:", ""]
    lines += [f"- `{r['id']}` ({r['date']}, {r.get('stack', '')}): {r['source']}" +
              (f"; assumed: {r['assume']}" if r.get("assume") else "") for r in result]
    if data.get("not_predicted"):
        lines += ["", "Not predicted:", ""]
        lines += [f"- `{n['id']}` ({n['value']}, {n['source']}): {n['why']}" for n in data["not_predicted"]]
    return "\n".join(lines) + "\n"


def main(p: argparse.ArgumentParser, args, command: Optional[List[str]] = None) -> int:
    try:
        data = load(args.data)
    except ValueError as exc:
        p.error(str(exc))
    command = command or ["ncl-bench", "validate"]
    if args.calibrate:
        by_id = {pt["id"]: pt for pt in data["points"]}
        for pid, chips in calibration_points().items():
            if pid not in by_id:
                p.error(f"chip type {chips[0].name} is calibrated from {pid!r}, which {args.data} does not hold")
            for chip in chips:
                value = fit(by_id[pid], chip)
                sys.stdout.write(f"{chip.name}: {chip.calibrated_field} = {value:.3f} "
                                 f"(from {pid}; the file has {getattr(chip, chip.calibrated_field):.3f})\n")
                if args.write:
                    write_field(chip.name, chip.calibrated_field, f"{value:.3f}")
        return 0
    result = rows(data)
    text = markdown(result, data, command)
    sys.stdout.write(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0 if not math.isnan(summary(result)["median_abs_error"]) else 1
