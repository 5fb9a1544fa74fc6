"""ncl-perf moe: MoE dispatch and combine latency and bandwidth (DeepEP's benchmark shape), ncl
side by side with the same exchange written with mpi4py Alltoallv and torch gloo all_to_all_single.

    ncl-perf moe --hidden 2880 --experts 128 --topk 4 --tokens 1,16,128,1024,4096 -n 2,4,8

Tokens are per rank.  Bandwidth counts the rows that leave each rank (hidden x dtype bytes per
row; a token travels once per destination rank, not once per expert; the ids and weights that go
with it are not counted), averaged over ranks, divided by the slowest rank's mean time.
"""
import argparse
import os
import statistics
import sys
import tempfile
from typing import Dict, List

from tabulate import tabulate

from .. import launch
from . import report, runner

FIELDS = ["backend", "mode", "nranks", "tokens", "hidden", "experts", "topk", "dtype", "dispatch_us", "combine_us",
          "dispatch_gbps", "combine_gbps", "bytes", "received_rows", "wrong", "iters", "rounds", "spread"]


MODE_LABELS = {"low_latency": " LL", "fp8": " fp8"}  # the plot's, after the backend


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ncl-perf moe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=2880, help="row width (gpt-oss-120b: 2880)")
    p.add_argument("--experts", type=int, default=128, help="experts, in contiguous blocks over the ranks")
    p.add_argument("--topk", type=int, default=4, help="experts per token")
    p.add_argument("--tokens", type=runner.counts_parser("token counts", "1,16,128"), default=[1, 16, 128, 1024, 4096],
                   help="tokens per rank")
    p.add_argument("-n", "--nranks", type=runner.rank_counts, default=[2, 4, 8], help="rank counts")
    p.add_argument("-d", "--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--compare", type=runner.peers, default=["mpi", "gloo"], help="peers: mpi and/or gloo ('' none)")
    p.add_argument("--low-latency-max", type=int, default=128,
                   help="also time ncl's low-latency mode (max_tokens_per_rank) up to this many tokens (0: never)")
    p.add_argument("--fp8", action="store_true",
                   help="also time ncl's dispatch of fp8 rows (e4m3, a float32 scale per 128 values; bytes counted so)")
    p.add_argument("-w", "--warmup", type=int, default=3)
    p.add_argument("-i", "--iters", type=int, default=5, help="timed round trips per point (at least)")
    p.add_argument("--min-time", type=float, default=0.3, help="repeat a point until it lasts this many seconds")
    p.add_argument("--repeat", type=int, default=1, help="interleaved runs of every backend; the median is reported")
    p.add_argument("--timeout", type=float, default=600.0, help="NCL_TIMEOUT of the ranks (seconds)")
    p.add_argument("--csv")
    p.add_argument("--json")
    p.add_argument("--xlsx")
    p.add_argument("--plot", help="latency and bandwidth against tokens, into this PNG")
    return p


def _check(p: argparse.ArgumentParser, cfg) -> None:
    if cfg.hidden < 1 or cfg.experts < 1 or not 1 <= cfg.topk <= cfg.experts:
        p.error(f"need --hidden >= 1, --experts >= 1 and 1 <= --topk <= --experts (got {cfg.hidden}, {cfg.experts}, "
                f"{cfg.topk})")
    bad = [n for n in cfg.nranks if cfg.experts % n]
    if bad:
        p.error(f"--experts {cfg.experts} must divide by every rank count; it does not by {bad}")
    if cfg.warmup < 0 or cfg.iters < 1 or cfg.repeat < 1 or cfg.min_time < 0 or not cfg.timeout > 0:
        p.error("need -w >= 0, -i >= 1, --repeat >= 1, --min-time >= 0 and --timeout > 0")
    if cfg.low_latency_max < 0:
        p.error("--low-latency-max must be >= 0")
    for path in (cfg.csv, cfg.json, cfg.xlsx, cfg.plot):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"cannot write {path}: no such directory")
    if "mpi" in cfg.compare and not runner.mpiexec():
        p.error("--compare mpi needs mpi4py and an MPI launcher: pip install mpi4py mpich")
    try:
        import torch  # noqa: F401
    except ImportError:
        p.error("ncl-perf moe needs torch: pip install torch==2.13.0")
    # the largest point's buffers, per rank: input, up to N copies received, combine's output
    row = cfg.hidden * (2 if cfg.dtype == "bfloat16" else 4)
    worst = max(cfg.tokens) * row * (3 + 2 * min(cfg.topk, max(cfg.nranks)))
    total = worst * max(cfg.nranks)
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if total > avail:
        p.error(f"the largest point needs about {total / 2**30:.1f} GiB over all ranks; {avail / 2**30:.1f} GiB free")


def _line(row: dict) -> str:
    return (f"{row['backend']:>5} {row['mode']:>11} n={row['nranks']} tokens={row['tokens']:>5}  dispatch "
            f"{row['dispatch_us']:10.1f} us {row['dispatch_gbps']:6.2f} GB/s   combine {row['combine_us']:10.1f} us "
            f"{row['combine_gbps']:6.2f} GB/s   #wrong {row['wrong']}")


def median_rows(rows: List[dict]) -> List[dict]:
    """One row per (backend, mode, ranks, tokens): medians over rounds, spread = slowest/fastest total."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["backend"], r["mode"], r["nranks"], r["tokens"]), []).append(r)
    out = []
    for group in groups.values():
        row = dict(group[0], rounds=len(group), wrong=sum(r["wrong"] for r in group))
        for key in ("dispatch_us", "combine_us", "dispatch_gbps", "combine_gbps"):
            row[key] = statistics.median(r[key] for r in group)
        totals = [r["dispatch_us"] + r["combine_us"] for r in group]
        row["spread"] = max(totals) / min(totals) if min(totals) > 0 else 1.0
        row.pop("round", None)
        out.append(row)
    return out


def comparison(summary: List[dict], peers: List[str]) -> str:
    """Per rank count, per token count: each backend's times and peer/ncl ratios (> 1: ncl faster)."""
    at = {(r["backend"], r["mode"], r["nranks"], r["tokens"]): r for r in summary}
    tables = []
    for n in sorted({r["nranks"] for r in summary}):
        body = []
        for t in sorted({r["tokens"] for r in summary if r["nranks"] == n}):
            ncl = at.get(("ncl", "normal", n, t))
            if ncl is None:
                continue
            ll, fp8 = at.get(("ncl", "low_latency", n, t)), at.get(("ncl", "fp8", n, t))
            cells = [t, ncl["dispatch_us"], ncl["combine_us"], ncl["dispatch_gbps"], ncl["combine_gbps"],
                     ll["dispatch_us"] if ll else None, ll["combine_us"] if ll else None]
            heads = ["tokens", "ncl dispatch us", "ncl combine us", "ncl disp GB/s", "ncl comb GB/s",
                     "ncl-LL dispatch us", "ncl-LL combine us"]
            if fp8:  # the rows' bytes on the wire, fp8 over the dtype's
                cells += [fp8["dispatch_us"], fp8["combine_us"], fp8["bytes"] / ncl["bytes"] if ncl["bytes"] else None]
                heads += ["ncl-fp8 dispatch us", "ncl-fp8 combine us", "fp8/dtype bytes"]
            for peer in peers:
                r = at.get((peer, "normal", n, t))
                cells += [r["dispatch_us"] if r else None, r["combine_us"] if r else None,
                          r["dispatch_us"] / ncl["dispatch_us"] if r else None,
                          r["combine_us"] / ncl["combine_us"] if r else None]
                heads += [f"{peer} dispatch us", f"{peer} combine us", f"{peer}/ncl disp", f"{peer}/ncl comb"]
            body.append(cells)
        tables.append(f"# moe, {n} ranks: times (µs, slowest rank's mean), bandwidth, and peer time / ncl time "
                      f"(> 1: ncl faster)\n" + tabulate(body, heads, floatfmt=".3g", missingval="-"))
    return "\n\n".join(tables)


def draw(summary: List[dict], path: str) -> None:
    """Dispatch and combine latency against tokens, one line per backend and rank count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, phase in zip(axes, ("dispatch", "combine")):
        for key in sorted({(r["backend"], r["mode"], r["nranks"]) for r in summary},
                          key=lambda k: (k[0] != "ncl", k)):
            pts = sorted((r["tokens"], r[f"{phase}_us"]) for r in summary
                         if (r["backend"], r["mode"], r["nranks"]) == key)
            label = f"{key[0]}{MODE_LABELS.get(key[1], '')} np={key[2]}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if key[0] == "ncl" else "--", marker="o", ms=3,
                    label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per rank")
        ax.set_title(phase)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time (µs)")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = parser()
    cfg = p.parse_args(argv)
    _check(p, cfg)
    command = ["ncl-perf", "moe"] + (sys.argv[2:] if argv is None else list(argv))
    settings = {k: getattr(cfg, k) for k in ("hidden", "experts", "topk", "tokens", "dtype", "warmup", "iters",
                                              "min_time", "low_latency_max", "fp8")}
    backends = ["ncl"] + cfg.compare
    progress = runner.Progress(len(cfg.tokens) * len(backends) * len(cfg.nranks) * cfg.repeat)
    rows: List[dict] = []
    failed = 0
    try:
        for round_ in range(cfg.repeat):
            for n in cfg.nranks:
                for backend in backends:
                    progress.write(f"# moe {backend} on {n} ranks: hidden {cfg.hidden}, {cfg.experts} experts, "
                                   f"top-{cfg.topk}, {cfg.dtype}" + (f", round {round_ + 1}" if cfg.repeat > 1 else ""))

                    def on_row(row, round_=round_):
                        row.update(hidden=cfg.hidden, experts=cfg.experts, topk=cfg.topk, dtype=cfg.dtype,
                                   round=round_)
                        rows.append(row)
                        progress.write(_line(row))
                        progress.update(row["mode"] == "normal")

                    with tempfile.TemporaryDirectory(prefix="ncl-perf-") as tmp:
                        cmd = runner.launch_argv(backend, n, "ncl.perf.moe_worker", settings,
                                              os.path.join(tmp, "rendezvous"), timeout=cfg.timeout)
                        env = launch.own_modules_env(dict(os.environ, NCL_TIMEOUT=str(cfg.timeout)))
                        code = runner.run_worker(cmd, env, progress, on_row)
                    if code:
                        progress.write(f"# {backend} on {n} ranks failed (exit code {code})")
                    failed += code != 0
    finally:
        progress.close()
    summary = median_rows(rows)
    report.log(comparison(summary, cfg.compare))
    for path in report.write_files(rows, summary, cfg, command, report.machine_facts(), FIELDS, draw):
        report.log(f"# wrote {path}")
    wrong = sum(r["wrong"] for r in rows)
    if wrong:
        report.log(f"# {wrong} wrong rows: combine(dispatch(x)) differs from x times its routing weights")
    return 1 if failed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
