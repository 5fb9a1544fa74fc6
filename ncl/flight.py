"""The flight recorder: each communicator keeps this rank's last NCL_TRACE_BUFFER calls (the
C core records them, native/flight.c).  On a timeout, a dead peer or a mismatch, every rank
that notices writes its record into NCL_TRACE_DIR as Chrome trace JSON (chrome://tracing,
https://ui.perfetto.dev), with each rank's step counter read from the shared segment, so the
files together show which call each rank was in and who was behind.

    python -m ncl.flight DIR          # one table of where every rank stopped, and DIR/merged.json
"""
import argparse
import glob
import json
import os
import socket
import sys
import time
import zlib
from typing import Any, Dict, List, Optional

from . import dtypes, log
from ._native import ffi, lib


_STORES = {1: "streaming", 2: "ordinary"}  # ncl_flight_entry.stores (0: not an all_reduce)


def _name(fn, code: int) -> Optional[str]:
    return ffi.string(fn(code)).decode() if code >= 0 else None


def entries(group, emulator=None) -> List[Dict[str, Any]]:
    """This rank's recorded calls on `group` (a shared-memory backend, ncl/shm.py), oldest first
    (empty when NCL_TRACE_BUFFER=0), with each call's cost on the emulated interconnect when an
    emulator (ncl/emulation.py) costed them."""
    if group.closed:
        return []
    cap = group.options.flight_entries
    raw = ffi.new("ncl_flight_entry[]", max(cap, 1))
    n = lib.ncl_flight_entries(group.handle, raw, cap)
    now = lib_now()
    out = []
    for e in raw[0:n]:
        dtype = dtypes.NAMES[e.dtype] if e.dtype >= 0 else None
        coll = ffi.string(lib.ncl_coll_name(e.coll)).decode()
        out.append({
            "seq": e.seq, "collective": coll, "dtype": dtype, "count": e.count, "bytes": dtypes.nbytes(e.count, e.dtype),
            "op": _name(lib.ncl_op_name, e.op),
            ("peer" if coll in ("send", "recv") else "root"): e.root if e.root >= 0 else None,
            "algorithm": ffi.string(e.algorithm).decode() if e.algorithm else None,
            "stores": _STORES.get(e.stores),  # all_reduce's, as learn.c chose them
            "state": "running" if e.status < 0 else "done" if e.status == 0 else "failed",
            "status": _name(lib.ncl_status_name, e.status),
            "first_step": e.first_step, "steps": e.steps,
            "begin_s": e.t_begin, "duration_us": ((e.t_end if e.t_end else now) - e.t_begin) * 1e6,
        })
    if emulator is not None:  # the call on the emulated interconnect
        for entry in out:
            cost = emulator.of_seq(entry["seq"])
            entry["target_algorithm"], entry["emulated_us"] = (cost[0], cost[1] * 1e6) if cost else (None, None)
    return out


class Traced:
    """A backend whose every call is logged (NCL_DEBUG=TRACE): what the Call says (collective,
    count, dtype, bytes, op) and what the backend decided (call number, algorithm, steps, time)."""

    def __init__(self, backend, logger):
        self.backend, self.logger = backend, logger

    def run(self, call) -> None:
        self.backend.run(call)
        what = f"{call.count} x {dtypes.NAMES[call.dtype]} ({log.size_text(call.nbytes)})" \
            if call.dtype >= 0 else ""
        op = f", {_name(lib.ncl_op_name, call.op)}" if call.op >= 0 else ""
        decided = self.backend.last_call()
        if decided is None:
            self.logger.log(log.TRACE, "%s %s%s done", call.collective, what, op)
            return
        seq, algorithm, steps, seconds = decided
        self.logger.log(log.TRACE, "%s #%d %s%s -> %s, steps %d, %.1f us", call.collective, seq, what, op, algorithm,
                     steps, seconds * 1e6)


def lib_now() -> float:
    """The C core's clock (CLOCK_MONOTONIC seconds), which the entries' times use."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def chrome_trace(group, reason: str = "", emulator=None) -> Dict[str, Any]:
    """This rank's record on `group` as a Chrome trace: one complete event per call (process =
    rank, thread = communicator), the state of the group in otherData."""
    world_rank = int(os.environ.get("NCL_RANK", group.rank))
    tid = zlib.crc32(group.label.encode()) & 0x7FFFFFFF
    events: List[Dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": world_rank, "tid": tid, "args": {"name": f"rank {world_rank}"}},
        {"ph": "M", "name": "thread_name", "pid": world_rank, "tid": tid, "args": {"name": group.label}},
    ]
    calls = entries(group, emulator)
    for call in calls:
        events.append({"name": call["collective"], "cat": "ncl", "ph": "X", "pid": world_rank, "tid": tid,
                       "ts": call["begin_s"] * 1e6, "dur": call["duration_us"],
                       "args": {k: v for k, v in call.items() if k not in ("begin_s", "duration_us")}})
    steps = ffi.new("uint32_t[]", group.size)
    if not group.closed:
        lib.ncl_comm_peer_steps(group.handle, steps)
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {
        "reason": reason, "communicator": group.label, "job": group.unique_id[:12], "rank": group.rank,
        "size": group.size, "world_rank": world_rank, "host": socket.gethostname(), "pid": os.getpid(),
        "posted_steps": list(steps), "calls_recorded": len(calls), "written_s": lib_now()}}


def dump(group, directory: str, reason: str = "", emulator=None) -> str:
    """Write this rank's record on `group` into `directory`; returns the file's path."""
    os.makedirs(directory, exist_ok=True)
    label = group.label.replace("/", ".")
    path = os.path.join(directory, f"ncl-trace-{group.unique_id[:12]}-{label}-rank{group.rank}.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(chrome_trace(group, reason, emulator), f)
    os.replace(tmp, path)  # readers never see half a file
    return path


def load(path: str) -> Dict[str, Any]:
    """A rank file written by dump(); ValueError naming the file if it is not one (truncated,
    not JSON, or another shape)."""
    try:
        with open(path, "rb") as f:
            trace = json.load(f)
        info = trace["otherData"] if isinstance(trace, dict) else None
        if not (isinstance(info, dict) and isinstance(trace.get("traceEvents"), list)
                and all(isinstance(e, dict) and isinstance(e.get("args", {}), dict) for e in trace["traceEvents"])
                and isinstance(info.get("communicator"), str) and isinstance(info.get("rank"), int)
                and isinstance(info.get("reason"), str) and isinstance(info.get("posted_steps"), list)):
            raise ValueError("not the shape dump() writes (traceEvents, otherData with communicator, rank, "
                             "reason, posted_steps)")
        return trace
    except (OSError, ValueError, RecursionError) as exc:  # json's errors and UnicodeError are ValueErrors
        raise ValueError(f"{path} is not a flight record written by ncl: {exc}") from None


def _last_call(trace: Dict[str, Any]) -> Dict[str, Any]:
    calls = [e.get("args", {}) for e in trace["traceEvents"] if e.get("ph") == "X"]
    return calls[-1] if calls else {}


def summarize(directory: str) -> List[Dict[str, Any]]:
    """One row per dumped rank file in `directory`: the call it stopped in, and how far it got."""
    rows = []
    for path in sorted(glob.glob(os.path.join(directory, "ncl-trace-*.json"))):
        trace = load(path)
        info, last = trace["otherData"], _last_call(trace)
        rows.append({"communicator": info["communicator"], "rank": info["rank"], "seq": last.get("seq"),
                     "collective": last.get("collective"), "state": last.get("state"),
                     "steps done": last.get("steps"), "posted steps": info["posted_steps"],
                     "reason": info["reason"][:100], "file": os.path.basename(path)})
    return sorted(rows, key=lambda r: (r["communicator"], r["rank"]))


def merge(directory: str, out: str) -> int:
    """All rank files of `directory` as one Chrome trace in `out`; returns the number of files."""
    files = sorted(glob.glob(os.path.join(directory, "ncl-trace-*.json")))
    events, others = [], []
    for path in files:
        trace = load(path)
        events += trace["traceEvents"]
        others.append(trace["otherData"])
    with open(out, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"ranks": others}}, f)
    return len(files)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ncl.flight",
                                     description="Where each rank stopped, from the flight records in DIR.")
    parser.add_argument("directory", help="the NCL_TRACE_DIR of the failed job")
    parser.add_argument("-o", "--out", help="merged Chrome trace (default: DIR/merged.json)")
    args = parser.parse_args(argv)
    try:
        rows = summarize(args.directory)
    except ValueError as exc:
        parser.error(str(exc))
    if not rows:
        print(f"no flight records (ncl-trace-*.json) in {args.directory}", file=sys.stderr)
        return 1
    from tabulate import tabulate
    print(tabulate(rows, headers="keys"))
    out = args.out or os.path.join(args.directory, "merged.json")
    print(f"\n{merge(args.directory, out)} rank files merged into {out} (open in https://ui.perfetto.dev)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
