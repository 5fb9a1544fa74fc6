"""What ncl-perf prints and writes: nccl-tests-style rows, comparison tables, files and plots."""
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Dict, List, Optional

from tabulate import tabulate

from ..dtypes import NCCL_TESTS_NAMES
from .specs import SPECS



def add_bandwidths(row: dict, collective: str) -> dict:
    """algbw and busbw (GB/s, 1e9 bytes) of a measured row (and of its emulated time)."""
    if "time_us" in row:
        algbw = row["size"] / row["time_us"] / 1e3 if row["time_us"] > 0 else 0.0
        row["algbw"] = algbw
        row["busbw"] = algbw * SPECS[collective].bus_factor(row["nranks"])
    if row.get("emulated_us"):
        row["emulated_busbw"] = row["size"] / row["emulated_us"] / 1e3 * SPECS[collective].bus_factor(row["nranks"])
    return row


def header(collective: str, backend: str, nranks: int, cfg) -> str:
    spec = SPECS[collective]
    hosts = getattr(cfg, "hosts", 1) > 1 and backend == "ncl"
    extra = "    memcpy  bound" if collective == "all_reduce" and backend == "ncl" and not hosts else ""
    extra += "     intra     inter" if hosts else ""
    topology = getattr(cfg, "topology", None) if backend == "ncl" else None
    emulated = "  emulated  em.busbw  target algo" if topology else ""
    title = (f"# {backend} {collective}: {nranks} ranks, {cfg.dtype}"
             f"{', op ' + cfg.op if spec.reduces else ''}{', root ' + str(cfg.root % nranks) if spec.rooted else ''}"
             f"{', registered buffers' if cfg.registered and backend == 'ncl' else ''}"
             f"{f', {cfg.hosts} emulated hosts (MPI between them)' if hosts else ''}"
             f"{f'; emulated on {topology} (out-of-place)' if topology else ''}")
    return "\n".join([
        title,
        "#" + " " * 54 + "out-of-place" + " " * 24 + "in-place",
        "#       size         count      type   redop    root     time   algbw   busbw  #wrong"
        "     time   algbw   busbw  #wrong" + extra + emulated,
        "#        (B)    (elements)                               (us)  (GB/s)  (GB/s)        "
        "     (us)  (GB/s)  (GB/s)        " + ("      (us)      (us)" if hosts else "      (us)    (%)" if extra else "")
        + ("      (us)    (GB/s)" if topology else ""),
    ])


def _half(row: Optional[dict]) -> str:
    if row is None or "unsupported" in row:
        return f"{'n/a':>9s}{'':8s}{'':8s}{'':8s}"
    return f"{row['time_us']:9.2f}{row['algbw']:8.2f}{row['busbw']:8.2f}{row['wrong']:8d}"


def line(collective: str, out_place: dict, in_place: dict, cfg) -> str:
    """One nccl-tests row: both placements of one size."""
    spec = SPECS[collective]
    first = out_place or in_place
    root = cfg.root % first["nranks"] if spec.rooted else -1
    text = (f" {first['size']:12d}  {first['count']:12d}  {NCCL_TESTS_NAMES.get(cfg.dtype, cfg.dtype):>8s}  "
            f"{cfg.op if spec.reduces else 'none':>6s}  {root:6d}" + _half(out_place) + _half(in_place))
    if "memcpy_us" in (out_place or {}) and "inter_us" not in out_place:
        text += f"  {out_place['memcpy_us']:8.2f}  {100 * out_place['memcpy_us'] / out_place['time_us']:5.1f}"
    if "inter_us" in (out_place or {}):
        text += f"  {out_place['intra_us']:8.2f}  {out_place['inter_us']:8.2f}"
    emulated = out_place if out_place and "emulated_us" in out_place else in_place
    if emulated and "emulated_us" in emulated:
        text += f"  {emulated['emulated_us']:8.2f}  {emulated.get('emulated_busbw', 0.0):8.2f}  " \
                f"{emulated['target_algorithm']}"
    return text


def average_busbw(rows: List[dict]) -> float:
    values = [r["busbw"] for r in rows if "busbw" in r]
    return sum(values) / len(values) if values else 0.0


def _comparable(rows: List[dict], backend: str, nranks: int, size: int, in_place: bool) -> Optional[dict]:
    for r in rows:
        if (r["backend"], r["nranks"], r["size"], r["in_place"]) == (backend, nranks, size, in_place) \
                and "time_us" in r:
            return r
    return None


def comparison(rows: List[dict], collective: str, peers: List[str]) -> str:
    """Time ratio ncl / peer per size and rank count (below 1: ncl is faster), on the same
    placement (out-of-place where the peer has it, else in place); the ncl time shown beside
    each peer is the one its ratio uses."""
    tables = []
    for n in sorted({r["nranks"] for r in rows}):
        body = []
        for size in sorted({r["size"] for r in rows if r["nranks"] == n}):
            cells = [size]
            for peer in peers:
                for in_place in (False, True):
                    other = _comparable(rows, peer, n, size, in_place)
                    ours = _comparable(rows, "ncl", n, size, in_place)
                    if other and ours:
                        break
                if other and ours:
                    cells += ["in" if in_place else "out", ours["time_us"], other["time_us"],
                              ours["time_us"] / other["time_us"], ours["busbw"], other["busbw"]]
                else:
                    cells += [None] * 6
            body.append(cells)
        heads = ["size (B)"]
        for peer in peers:
            heads += ["placement", "ncl us", f"{peer} us", f"ncl/{peer}", "ncl busbw", f"{peer} busbw"]
        tables.append(f"# {collective}, {n} ranks: time ratio ncl / peer (< 1: ncl faster)\n"
                      + tabulate(body, heads, floatfmt=".3g", missingval="-"))
    return "\n\n".join(tables)


def machine_facts() -> Dict[str, object]:
    """What a reader needs to compare runs: host, CPU, libraries, commit."""
    facts: Dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpus_online": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
    }
    try:
        with open("/proc/cpuinfo") as f:
            facts["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        with open("/proc/meminfo") as f:
            facts["memory_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    for module in ("numpy", "torch", "mpi4py"):
        try:
            facts[module] = __import__(module).__version__
        except ImportError:
            facts[module] = None
    try:
        import ncl
        facts["ncl"], facts["ncl_kernel_isa"] = ncl.__version__, ncl.kernel_isa()
        here = os.path.dirname(os.path.abspath(ncl.__file__))
        facts["ncl_commit"] = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                             text=True, timeout=5).stdout.strip() or None
    except (ImportError, OSError, subprocess.SubprocessError):
        pass
    facts["env"] = {k: v for k, v in os.environ.items() if k.startswith("NCL_")}
    return facts


FIELDS = ["backend", "collective", "nranks", "size", "count", "dtype", "op", "root", "in_place", "time_us", "algbw",
          "busbw", "wrong", "iters", "memcpy_us", "intra_us", "inter_us", "emulated_us", "emulated_busbw",
          "target_algorithm", "rounds", "spread", "unsupported"]


def median_rows(rows: List[dict]) -> List[dict]:
    """One row per (backend, ranks, size, placement): the median time over the rounds, the
    spread (max/min) beside it, every round's #wrong summed."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["backend"], r["nranks"], r["size"], r["in_place"]), []).append(r)
    out = []
    for group in groups.values():
        timed = sorted((r for r in group if "time_us" in r), key=lambda r: r["time_us"])
        if not timed:
            out.append(dict(group[0]))
            continue
        row = dict(timed[(len(timed) - 1) // 2], rounds=len(timed), wrong=sum(r.get("wrong", 0) for r in group),
                   spread=timed[-1]["time_us"] / timed[0]["time_us"] if timed[0]["time_us"] > 0 else 1.0)
        row.pop("round", None)
        out.append(row)
    return out


def median_table(summary: List[dict], collective: str) -> str:
    """Per backend and rank count: median time, busbw and the spread over the rounds."""
    body = [[r["backend"], r["nranks"], r["size"], "in" if r["in_place"] else "out", r["time_us"], r["busbw"],
             r["spread"], r["wrong"]] for r in summary if "time_us" in r]
    body.sort(key=lambda b: (b[0] != "ncl", b[0], b[1], b[3], b[2]))
    return (f"# {collective}: median over rounds (spread = slowest / fastest round)\n"
            + tabulate(body, ["backend", "ranks", "size (B)", "placement", "time us", "busbw", "spread", "#wrong"],
                       floatfmt=".3g"))


def write_files(rows: List[dict], summary: List[dict], cfg, command: List[str], facts: dict,
                fields: List[str] = FIELDS, draw=None) -> List[str]:
    """The files cfg asks for (json, csv, xlsx, plot); draw(summary, path) draws the plot
    (default: busbw and time against size)."""
    written = []
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"command": command, "machine": facts, "settings": vars(cfg), "rows": rows, "summary": summary},
                      f, indent=1)
        written.append(cfg.json)
    if cfg.csv:
        with open(cfg.csv, "w", newline="") as f:
            f.write(f"# command: {' '.join(command)}\n# machine: {json.dumps(facts)}\n")
            w = csv.DictWriter(f, fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(summary)
        written.append(cfg.csv)
    if cfg.xlsx:
        import openpyxl
        book = openpyxl.Workbook()
        sheet = book.active
        sheet.title = "results"
        sheet.append(fields)
        for r in summary:
            sheet.append([r.get(k) for k in fields])
        about = book.create_sheet("run")
        about.append(["command", " ".join(command)])
        for k, v in facts.items():
            about.append([k, json.dumps(v) if isinstance(v, dict) else v])
        book.save(cfg.xlsx)
        written.append(cfg.xlsx)
    if cfg.plot:
        if draw is None:
            plot(summary, cfg.plot, f"{cfg.collective} ({cfg.dtype})")
        else:
            draw(summary, cfg.plot)
        written.append(cfg.plot)
    return written


def plot(rows: List[dict], path: str, title: str) -> None:
    """busbw and latency against size, one line per backend and rank count (out-of-place
    where measured, else in place)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (bw_ax, lat_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for backend in sorted({r["backend"] for r in rows}, key=lambda b: (b != "ncl", b)):
        for n in sorted({r["nranks"] for r in rows}):
            for in_place in (False, True):
                pts = sorted((r["size"], r["busbw"], r["time_us"]) for r in rows if r["backend"] == backend
                             and r["nranks"] == n and r["in_place"] == in_place and "time_us" in r and r["size"])
                if pts:
                    break
            if not pts:
                continue
            label = f"{backend} np={n}{' (in place)' if in_place else ''}"
            style = "-" if backend == "ncl" else "--"
            sizes = [p[0] for p in pts]
            bw_ax.plot(sizes, [p[1] for p in pts], style, marker="o", ms=3, label=label)
            lat_ax.plot(sizes, [p[2] for p in pts], style, marker="o", ms=3, label=label)
    for ax, ylabel in ((bw_ax, "bus bandwidth (GB/s)"), (lat_ax, "time (µs)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("size (bytes)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    lat_ax.set_yscale("log")
    bw_ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_sweep(data) -> None:
    """What `main` reads of a saved sweep, with the types it needs (times positive: ratios
    divide by them)."""
    _check(isinstance(data, dict), "not a JSON object")
    _check(isinstance(data.get("command"), list) and all(isinstance(a, str) for a in data["command"]),
           "'command' is not a list of strings")
    machine, cfg, summary = data.get("machine"), data.get("settings"), data.get("summary")
    _check(isinstance(machine, dict) and all(isinstance(machine.get(k, ""), str) for k in ("date", "cpu")),
           "'machine' is not an object with string 'date' and 'cpu'")
    _check(isinstance(cfg, dict) and isinstance(cfg.get("collective"), str), "'settings' has no 'collective'")
    _check(isinstance(cfg.get("repeat", 1), int), "'settings' has a 'repeat' that is not an integer")
    compare = cfg.get("compare", [])
    _check(isinstance(compare, list) and all(isinstance(p, str) for p in compare),
           "'settings' has a 'compare' that is not a list of backend names")
    _check(isinstance(summary, list) and all(isinstance(r, dict) for r in summary), "'summary' is not a list of rows")
    numbers = ("busbw", "spread") if cfg.get("repeat", 1) > 1 else ("busbw",)
    for i, r in enumerate(summary):
        _check(isinstance(r.get("backend"), str) and isinstance(r.get("in_place"), bool)
               and all(isinstance(r.get(k), int) and not isinstance(r[k], bool) for k in ("nranks", "size")),
               f"summary row {i} lacks backend, nranks, size or in_place")
        if "time_us" in r:
            _check(_is_number(r["time_us"]) and r["time_us"] > 0 and all(_is_number(r.get(k)) for k in numbers)
                   and isinstance(r.get("wrong"), int),
                   f"summary row {i} lacks a positive time_us, or {', '.join(numbers)} or wrong")
    json.dumps(data, ensure_ascii=False).encode()  # UnicodeEncodeError for a string no terminal can print


def load(path: str) -> dict:
    """A sweep saved by `ncl-perf --json`; ValueError naming the file if it is not one."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
        _check_sweep(data)
        return data
    except (OSError, ValueError, RecursionError) as exc:  # json's errors and UnicodeError are ValueErrors
        raise ValueError(f"{path} is not a sweep saved by ncl-perf --json: {exc}") from None


def main(argv=None) -> int:
    """`python -m ncl.perf.report RESULT.json...`: the tables of saved sweeps, again."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m ncl.perf.report", description=main.__doc__)
    p.add_argument("json", nargs="+", help="files written by ncl-perf --json")
    for path in p.parse_args(argv).json:
        try:
            data = load(path)
        except ValueError as exc:
            p.error(str(exc))
        cfg = data["settings"]
        log(f"$ {' '.join(data['command'])}\n# {data['machine'].get('date')} on {data['machine'].get('cpu')}")
        if cfg.get("repeat", 1) > 1:
            log(median_table(data["summary"], cfg["collective"]))
        if cfg.get("compare"):
            log(comparison(data["summary"], cfg["collective"], cfg["compare"]))
        log("")
    return 0


if __name__ == "__main__":
    sys.exit(main())
