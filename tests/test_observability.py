"""Observability: NCL_DEBUG logs and the flight recorder, on real jobs started with ncl-run.

- NCL_DEBUG=INFO / TRACE: every line carries its rank; INFO says what each communicator
  decided at setup, TRACE names each call with the algorithm it took; without NCL_DEBUG a
  clean job prints nothing; a bad value is a clear error.
- The flight recorder keeps the last NCL_TRACE_BUFFER calls with sizes, algorithm, state and
  steps; on a dead peer or a timeout every survivor writes it to NCL_TRACE_DIR as Chrome
  trace JSON, and `python -m ncl.flight DIR` tells where each rank stopped.
"""
import glob
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ncl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.timeout(90)

CALLS = """
    import os, numpy as np, ncl
    comm = ncl.init()
    x = np.arange(1000, dtype=np.float32)
    comm.all_reduce(x)
    comm.all_gather(x)
    comm.barrier()
    comm.broadcast(x, root=1)
"""


def ncl_run(tmp_path, n, body, env=(), timeout=60):
    """Run `body` (a program) on n ranks; the finished process (stdout, stderr, returncode)."""
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent(body))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NCL_")}
    environ.update(env)
    return subprocess.run([sys.executable, "-m", "ncl.run", "-n", str(n), sys.executable, str(prog)],
                          capture_output=True, text=True, cwd=REPO, env=environ, timeout=timeout)


# ---- NCL_DEBUG ---------------------------------------------------------------------------------------
def test_info_logs_each_rank_setup(tmp_path):
    proc = ncl_run(tmp_path, 2, CALLS, {"NCL_DEBUG": "INFO"})
    assert proc.returncode == 0, proc.stderr
    ready = [line for line in proc.stderr.splitlines() if " ncl INFO ready:" in line]
    assert sorted(re.match(r"\[rank (\d)/2 world\] ", line).group(1) for line in ready) == ["0", "1"], proc.stderr
    for line in ready:
        assert re.search(r"segment [\d.]+ MiB .* 2 ranks on \d+ CPUs: .*single-copy reads: .*all_reduce: one_shot "
                         r"up to .*timeout 600 s; flight recorder 1024 calls; fingerprint checks on", line), line
    assert " TRACE " not in proc.stderr


def test_trace_logs_every_call_with_its_algorithm(tmp_path):
    proc = ncl_run(tmp_path, 2, CALLS, {"NCL_DEBUG": "TRACE", "NCL_ALGO": "two_shot"})
    assert proc.returncode == 0, proc.stderr
    for rank in (0, 1):
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"[rank {rank}/2 world]") and " TRACE " in ln]
        assert [re.search(r"TRACE (\w+) #(\d+)", ln).groups() for ln in lines] == [
            ("all_reduce", "1"), ("all_gather", "2"), ("barrier", "3"), ("broadcast", "4")], proc.stderr
        assert "1000 x float32 (3.906 KiB), sum -> two_shot, steps 2" in lines[0], lines[0]
        assert "-> staged, steps 1" in lines[1], lines[1]


def test_no_debug_no_output(tmp_path):
    proc = ncl_run(tmp_path, 2, CALLS)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", proc.stderr


def test_bad_debug_level_is_a_clear_error(tmp_path):
    proc = ncl_run(tmp_path, 1, CALLS, {"NCL_DEBUG": "verbose"})
    assert proc.returncode != 0
    assert "NCL_DEBUG='verbose' is not valid (must be one of WARN, INFO, TRACE)" in proc.stderr, proc.stderr


# ---- the flight recorder ---------------------------------------------------------------------------
def test_flight_record_lists_the_last_calls():
    env = {"NCL_TRACE_BUFFER": "3"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        comm = ncl.init()
    with comm:
        x = np.ones(256, np.int32)
        comm.all_reduce(x, op=ncl.MAX)
        comm.all_gather(x)
        comm.barrier()
        comm.reduce_scatter(np.ones((4, 8), np.float64))
        record = comm.flight_record()
    assert [(c["seq"], c["collective"]) for c in record] == [(2, "all_gather"), (3, "barrier"), (4, "reduce_scatter")]
    last = record[-1]
    assert (last["dtype"], last["count"], last["bytes"], last["op"], last["state"], last["status"]) == \
           ("float64", 32, 256, "sum", "done", "ok")
    assert last["duration_us"] > 0 and record[0]["begin_s"] <= last["begin_s"]


def test_flight_recorder_off():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NCL_TRACE_BUFFER", "0")
        comm = ncl.init()
    with comm:
        comm.all_reduce(np.ones(4, np.float32))
        assert comm.flight_record() == []


KILLED_MID_JOB = """
    import os, numpy as np, ncl
    comm = ncl.init()
    x = np.ones(1 << 20, np.float32)
    for i in range(5):
        comm.all_reduce(x)
    if comm.rank == 1:
        os.kill(os.getpid(), 9)
    comm.all_gather(x[:1000])
"""


def test_dead_peer_leaves_a_flight_record_on_every_survivor(tmp_path):
    trace_dir = tmp_path / "traces"
    proc = ncl_run(tmp_path, 3, KILLED_MID_JOB, {"NCL_TRACE_DIR": str(trace_dir), "NCL_DEBUG": "WARN"})
    assert proc.returncode == 128 + 9, proc.stderr
    files = sorted(glob.glob(str(trace_dir / "ncl-trace-*-world-rank*.json")))
    assert [f[-10:] for f in files] == ["rank0.json", "rank2.json"], files
    for path, rank in zip(files, (0, 2)):
        assert f"(flight record: {path})" in proc.stderr, proc.stderr
        assert re.search(rf"\[rank {rank}/3 world\] .* ncl WARNING all_gather failed: NclPeerError: .*rank 1 "
                         r"\(pid \d+\) died", proc.stderr), proc.stderr
        with open(path) as f:
            trace = json.load(f)
        calls = [e for e in trace["traceEvents"] if e["ph"] == "X"]
        assert [e["name"] for e in calls] == ["all_reduce"] * 5 + ["all_gather"]
        assert all(e["pid"] == rank and e["dur"] > 0 for e in calls)
        assert [e["args"]["state"] for e in calls] == ["done"] * 5 + ["failed"]
        assert calls[-1]["args"]["status"] == "peer failed" and calls[-1]["args"]["bytes"] == 4000
        info = trace["otherData"]
        assert info["rank"] == rank and info["size"] == 3 and "rank 1" in info["reason"]
        steps = info["posted_steps"]
        assert steps[1] < steps[0] == steps[2], steps  # the dead rank never posted the all_gather
    summary = subprocess.run([sys.executable, "-m", "ncl.flight", str(trace_dir)], capture_output=True, text=True,
                             timeout=30)
    assert summary.returncode == 0, summary.stderr
    rows = [ln.split() for ln in summary.stdout.splitlines() if ln.startswith("world")]
    assert [(r[1], r[2], r[3], r[4]) for r in rows] == [("0", "6", "all_gather", "failed"),
                                                        ("2", "6", "all_gather", "failed")], summary.stdout
    with open(trace_dir / "merged.json") as f:
        merged = json.load(f)
    assert {e["pid"] for e in merged["traceEvents"]} == {0, 2}


STUCK_RANK = """
    import time, numpy as np, ncl
    comm = ncl.init()
    comm.all_reduce(np.ones(8, np.float32))
    if comm.rank == 0:
        comm.broadcast(np.ones(8, np.float32), root=0)  # rank 1 never comes
    else:
        time.sleep(6)
"""


def test_timeout_leaves_a_flight_record_naming_the_stuck_call(tmp_path):
    trace_dir = tmp_path / "traces"
    proc = ncl_run(tmp_path, 2, STUCK_RANK, {"NCL_TRACE_DIR": str(trace_dir), "NCL_TIMEOUT": "1"})
    assert proc.returncode != 0
    assert "NclTimeoutError" in proc.stderr and "flight record:" in proc.stderr, proc.stderr
    (path,) = glob.glob(str(trace_dir / "*-rank0.json"))
    with open(path) as f:
        trace = json.load(f)
    last = [e for e in trace["traceEvents"] if e["ph"] == "X"][-1]
    assert (last["name"], last["args"]["root"], last["args"]["state"], last["args"]["status"]) == \
           ("broadcast", 0, "failed", "timeout")
    assert 0.9e6 < last["dur"] < 5e6, last["dur"]
    assert "waiting for ranks [1]" in trace["otherData"]["reason"]
