"""ncl-perf: its numpy references, and whole sweeps through the command line (real ranks).

The sweeps check every result while they time (-c 1), so a wrong collective or a wrong
reference shows as a non-zero #wrong and a failing exit code.  Only torch's gloo is compared
here (torch is in the test install; MPI arrives with issue 5's CI)."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ncl.perf import specs

QUICK = ["-w", "1", "-i", "2", "--min-time", "0"]


@pytest.mark.parametrize("name", sorted(specs.SPECS))
@pytest.mark.parametrize("n", (1, 3, 4))
def test_expected_matches_a_direct_computation(name, n):
    """specs.expected (periodic shortcuts) against stacking every rank's send_data."""
    spec, count, root = specs.SPECS[name], 24, n - 1
    for dtype_name, op in (("float32", "sum"), ("int8", "max"), ("bfloat16", "prod"), ("int32", "avg")):
        dtype = specs.numpy_dtype(dtype_name)
        sends = [specs.send_data(spec, r, n, count, root, dtype) for r in range(n)]
        full = [specs.send_data(spec, r, n, count, r, dtype) for r in range(n)]  # every rank's data, as root
        stacked = np.stack([s.astype(np.float64) for s in full])
        reduced = {"sum": stacked.sum(0), "max": stacked.max(0), "prod": stacked.prod(0),
                   "avg": np.trunc(stacked.sum(0) / n)}[op]
        m = spec.out_count(count, n)
        for rank in range(n):
            got = specs.expected(spec, rank, n, count, root, op, dtype)
            if name == "all_reduce" or (name == "reduce" and rank == root):
                want = reduced
            elif name == "reduce_scatter":
                want = reduced[rank * m:(rank + 1) * m]
            elif name == "broadcast":
                want = full[root]
            elif name == "all_gather" or (name == "gather" and rank == root):
                want = np.concatenate([s for s in sends])
            elif name == "scatter":
                want = full[root][rank * m:(rank + 1) * m]
            elif name == "all_to_all":
                want = np.concatenate([full[r][rank * (m // n):(rank + 1) * (m // n)] for r in range(n)])
            else:
                want = None
            if want is None:
                assert got is None
            else:
                np.testing.assert_array_equal(got.astype(np.float64), np.asarray(want, np.float64).astype(dtype)
                                              .astype(np.float64), err_msg=f"{name} {dtype_name} {op} rank {rank}")


def _perf(args, tmp_path, timeout=120):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "ncl.perf.cli", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.timeout(180)
def test_sweep_prints_checks_and_writes_every_file(tmp_path):
    code, out, err = _perf(["all_reduce", "-b", "8", "-e", "4K", "-f", "8", "-n", "2", *QUICK, "--csv", "r.csv",
                            "--json", "r.json", "--xlsx", "r.xlsx", "--plot", "r.png"], tmp_path)
    assert code == 0, out + err
    assert "#wrong" in out and "busbw" in out and "Avg bus bandwidth" in out
    rows = list(csv.DictReader(line for line in (tmp_path / "r.csv").open() if not line.startswith("#")))
    assert sorted({int(r["size"]) for r in rows}) == [8, 64, 512, 4096]  # -e ends the sweep
    assert {r["in_place"] for r in rows} == {"False", "True"} and all(r["wrong"] == "0" for r in rows)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["command"][:2] == ["ncl-perf", "all_reduce"] and report["machine"]["cpus_usable"] >= 1
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "r.xlsx").stat().st_size > 0


@pytest.mark.timeout(120)
def test_a_folder_named_ncl_in_the_working_directory_is_not_imported(tmp_path):
    """ncl-perf run from a directory that holds a folder named ncl (the parent of a clone): its
    ranks (`python -m ...`) import the installed package, not the folder (with an editable install
    the folder won and every rank failed: module 'ncl' has no attribute 'init')."""
    (tmp_path / "ncl").mkdir()
    as_console_script = "import sys; sys.path.pop(0); from ncl.perf.cli import main; sys.exit(main())"  # no cwd
    proc = subprocess.run([sys.executable, "-c", as_console_script, "all_reduce", "-b", "8", "-e", "8", "-n", "2",
                           *QUICK], cwd=tmp_path, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0 and "Avg bus bandwidth" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(specs.SPECS))
def test_every_collective_verifies_on_three_ranks(tmp_path, name):
    args = [name, "-b", "96", "-e", "96K", "-f", "1024", "-n", "3", "-r", "1", *QUICK, "-d", "int32"]
    code, out, err = _perf(args + (["-o", "max"] if specs.SPECS[name].reduces else []), tmp_path)
    assert code == 0 and "#wrong total 0" in out, out + err


@pytest.mark.timeout(300)
def test_compare_with_gloo_prints_ratios(tmp_path):
    code, out, err = _perf(["all_gather", "-b", "64", "-e", "64K", "-f", "1024", "-n", "2", *QUICK, "--compare",
                            "gloo", "--repeat", "2"], tmp_path, timeout=240)
    assert code == 0, out + err
    assert "time ratio ncl / peer" in out and "ncl/gloo" in out and "median over rounds" in out


@pytest.mark.timeout(300)
def test_compare_with_deepspeed_checks_its_shm_all_reduce_or_says_why_not(tmp_path):
    """DeepSpeed's in-place shm all_reduce is checked like any peer; where DeepSpeed is not installed
    the sweep still runs ncl and says why the peer was skipped."""
    import importlib.util
    code, out, err = _perf(["all_reduce", "-b", "8", "-e", "64K", "-f", "8192", "-n", "2", "-d", "bfloat16", *QUICK,
                            "--compare", "deepspeed", "--json", "r.json"], tmp_path, timeout=280)
    assert code == 0, out + err
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    peer = [r for r in rows if r["backend"] == "deepspeed"]
    assert {r["backend"] for r in rows} >= {"ncl"}
    if not importlib.util.find_spec("deepspeed"):
        assert "--compare deepspeed: skipped" in out and not peer
        return
    measured = [r for r in peer if "time_us" in r]
    if not measured:  # installed but its op cannot build here: the reason is printed
        assert "deepspeed: not measured:" in out, out
        return
    assert sorted(r["size"] for r in measured) == [8, 65536] and all(r["in_place"] and r["wrong"] == 0
                                                                     for r in measured)
    assert all("unsupported" in r for r in peer if not r["in_place"]) and "ncl/deepspeed" in out


@pytest.mark.timeout(120)
def test_the_c_probe_builds_and_checks_its_own_all_reduce(tmp_path):
    """benchmarks/probe_all_reduce.c (the reference registered buffers are held to) sums
    correctly: it checks its result and exits non-zero when wrong."""
    import shutil
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "probe_all_reduce.c")
    subprocess.run([cc, "-O2", "-o", str(tmp_path / "probe"), source], check=True)
    proc = subprocess.run([str(tmp_path / "probe"), "4096", "65600"], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert [int(fields[0]) for fields in lines] == [4096, 65600] and all(float(f[1]) > 0 for f in lines)


@pytest.mark.parametrize("args, message", [
    (["all_reduce", "-b", "1K", "-e", "8"], "larger than -e"),
    (["all_gather", "-o", "max"], "takes no reduction op"),
    (["all_reduce", "-n", "0"], "must be >= 1"),
    (["all_reduce", "-r", "2", "-n", "2"], "not a rank"),
    (["all_reduce", "--compare", "nccl"], "mpi, gloo and/or deepspeed"),
    (["all_reduce", "-b", "12Q"], "not a size"),
    (["moe", "--experts", "6", "-n", "4"], "must divide by every rank count"),
    (["moe", "--experts", "8", "--topk", "9"], "1 <= --topk <= --experts"),
    (["moe", "--tokens", "0"], "counts must be >= 1"),
    (["moe", "--compare", "nccl"], "mpi and/or gloo"),
])
def test_bad_arguments_fail_before_any_rank_starts(tmp_path, args, message):
    code, out, err = _perf(args, tmp_path, timeout=60)
    assert code == 2 and message in err, err


@pytest.mark.timeout(300)
def test_moe_sweep_checks_every_backend_and_writes_files(tmp_path):
    """ncl (both modes), MPI and gloo run the same dispatch/combine; each checks combine(dispatch)
    against its tokens times their routing weights, so a wrong exchange fails the sweep."""
    pytest.importorskip("mpi4py")
    code, out, err = _perf(["moe", "--hidden", "40", "--experts", "6", "--topk", "2", "--tokens", "1,33", "-n", "3",
                            "-w", "1", "-i", "2", "--min-time", "0", "--low-latency-max", "33", "-d", "float32",
                            "--csv", "m.csv", "--json", "m.json", "--plot", "m.png"], tmp_path, timeout=280)
    assert code == 0, out + err
    rows = list(csv.DictReader(line for line in (tmp_path / "m.csv").open() if not line.startswith("#")))
    assert sorted((r["backend"], r["mode"], r["tokens"]) for r in rows) == sorted(
        (b, m, t) for b, m in (("ncl", "normal"), ("ncl", "low_latency"), ("mpi", "normal"), ("gloo", "normal"))
        for t in ("1", "33"))
    assert all(r["wrong"] == "0" and float(r["dispatch_us"]) > 0 and float(r["combine_us"]) > 0 for r in rows)
    assert "mpi/ncl disp" in out and "gloo/ncl comb" in out
    assert json.loads((tmp_path / "m.json").read_text())["command"][:2] == ["ncl-perf", "moe"]
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_moe_check_counts_a_wrong_combine():
    import torch
    from ncl.perf import moe_worker
    x, w = torch.randn(5, 8), torch.tensor([[0.25, 0.75]] * 5)
    assert moe_worker._wrong_rows(x, x.clone(), w) == 0
    y = x.clone()
    y[3, 2] += 0.5
    assert moe_worker._wrong_rows(x, y, w) == 1
    assert moe_worker._wrong_rows(x, x * 0.75, w) == 5  # a rank's share missing


@pytest.mark.timeout(200)
def test_topology_columns_are_the_link_models_cost_of_the_swept_call(tmp_path):
    from ncl.topology import load_topology
    code, out, err = _perf(["all_reduce", "-b", "1M", "-e", "4M", "-f", "4", "-n", "3", "--topology", "pcie-gen5-8card",
                            *QUICK, "--csv", "t.csv"], tmp_path)
    assert code == 0, out + err
    topo = load_topology("pcie-gen5-8card")
    rows = [r for r in csv.DictReader(line for line in (tmp_path / "t.csv").open() if not line.startswith("#"))]
    for r in rows:
        size = int(r["size"])
        assert r["target_algorithm"] == topo.best_algorithm("all_reduce", size, 3)
        assert float(r["emulated_us"]) == pytest.approx(topo.predict("all_reduce", size, 3) * 1e6, rel=1e-9)


@pytest.mark.timeout(300)
def test_compared_backends_take_turns_size_by_size(tmp_path):
    """--compare runs the backends' ranks at once and gives them turns (ncl/perf/lockstep.py): every
    size's rounds of every backend come before the next size, the first backend rotating by turn;
    --interleave sweep keeps whole sweeps in turn (all of ncl's first round before gloo's)."""
    base = ["all_reduce", "-b", "8", "-e", "64", "-f", "8", "-n", "2", *QUICK, "--compare", "gloo", "--repeat", "2"]
    code, out, err = _perf(base + ["--json", "turns.json"], tmp_path, timeout=240)
    assert code == 0, out + err
    rows = json.loads((tmp_path / "turns.json").read_text())["rows"]
    turns = [(r["size"], r["backend"], r["round"]) for r in rows if not r["in_place"]]  # one per turn
    assert [t[0] for t in turns] == sorted(t[0] for t in turns) == [8] * 4 + [64] * 4
    assert [t[1] for t in turns[:4]] == ["ncl", "gloo", "gloo", "ncl"]  # the first backend rotates
    assert all(r.get("wrong", 0) == 0 for r in rows) and {t[2] for t in turns} == {0, 1}
    code, out, err = _perf(base + ["--interleave", "sweep", "--json", "sweeps.json"], tmp_path, timeout=240)
    assert code == 0, out + err
    rows = json.loads((tmp_path / "sweeps.json").read_text())["rows"]
    assert [(r["backend"], r["round"]) for r in rows[:5]] == [("ncl", 0)] * 4 + [("gloo", 0)]


@pytest.mark.timeout(240)
def test_calibrate_gives_the_algorithms_turns_and_leaves_out_one_that_cannot_run(tmp_path):
    """python -m ncl.perf.calibrate: every algorithm's ranks take turns size by size; with NCL_CMA=0
    the cma ranks fail at their first call, and the rest still make a table that ncl.tuning loads
    (cma absent: never chosen)."""
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, "-m", "ncl.perf.calibrate", "-n", "2", "-e", "2K", "--repeat", "2",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=200,
                          env=dict(os.environ, NCL_CMA="0"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cma on 2 ranks stopped" in proc.stdout and "median µs of 2 turns" in proc.stdout, proc.stdout
    data = json.loads(out.read_text())
    assert sorted(data["all_reduce"]) == ["direct", "one_shot", "two_shot"]
    assert all([s for s, _ in data["measured_us"][a]["2"]] == [8, 32, 128, 512, 2048] for a in data["all_reduce"])
    code = ("import sys; from ncl import tuning; t = tuning.calibration(sys.argv[1]); "
            "print(sorted(a for a, by_n in t.items() if 2 in by_n))")
    listed = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=60)
    assert listed.stdout.strip() == "['direct', 'one_shot', 'two_shot']", listed.stdout + listed.stderr


def test_a_rank_waiting_for_its_turn_stops_when_ncl_perf_closes_the_gate(tmp_path):
    from ncl.perf import lockstep
    os.mkfifo(tmp_path / "0")
    held = os.open(tmp_path / "0", os.O_RDWR)  # as ncl-perf holds it
    turns = lockstep.Turns(str(tmp_path), 0)
    os.write(held, lockstep.GO * 2)
    assert turns.next() and turns.next()
    os.close(held)
    assert not turns.next()  # the end of the pipe: no more turns, no hang
    turns.close()
    assert lockstep.order(["a", "b", "c"], 4) == ["b", "c", "a"]


def test_the_first_turn_waits_until_every_backend_is_ready(tmp_path):
    """A backend that takes a while to set up (DeepSpeed builds its op) is ready before any backend's
    first turn: no turn is timed beside another backend's start."""
    from ncl.perf import lockstep
    rows, lines = [], []
    worker = ("import json, pathlib, sys, time\nfrom ncl.perf import lockstep\n"
              "time.sleep(float(sys.argv[1])); print('setting up')\n"
              "pathlib.Path(sys.argv[3], 'ready').write_text(repr(time.time())); lockstep.say_ready(0)\n"
              "turns = lockstep.Turns(sys.argv[2], 0)\n"
              "while turns.next():\n"
              "    for _ in range(2): print(json.dumps({'at': time.time()}), flush=True)\n")
    scratches = {}

    def command(backend, gate, scratch):
        scratches[backend] = scratch
        return [sys.executable, "-c", worker, "1.5" if backend == "slow" else "0", gate, scratch], dict(os.environ)

    def ready_at(backend):  # read while the scratch directory exists
        return float(open(os.path.join(scratches[backend], "ready")).read())

    def on_row(backend, turn, row):
        rows.append((row["at"], ready_at("slow")))

    codes = lockstep.run(["fast", "slow"], 1, [(8, 0), (64, 0)], command, on_row, lines.append)
    assert codes == {"fast": 0, "slow": 0}, (codes, lines)
    assert len(rows) == 8 and lines.count("setting up") == 2, (rows, lines)
    assert all(at >= ready for at, ready in rows), rows  # fails without the wait


def test_turns_end_when_every_launcher_has_ended(tmp_path):
    """Launchers that exit before their first turn lose their turns; ncl-perf reports their codes
    instead of waiting (or failing) for rows that never come."""
    from ncl.perf import lockstep
    rows, lines = [], []

    def command(backend, gate, scratch):
        return [sys.executable, "-c", f"print('{backend} gives up'); raise SystemExit(3)"], dict(os.environ)

    codes = lockstep.run(["a", "b"], 2, [(8, 0), (64, 0)], command, lambda b, t, r: rows.append(r), lines.append)
    assert codes == {"a": 3, "b": 3} and not rows and sorted(lines) == ["a gives up", "b gives up"]
