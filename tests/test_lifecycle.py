"""Whole jobs under ncl-run: the issue's acceptance command, a rank killed with SIGKILL,
mismatched and missing ranks.  Each job is a real launcher with real ranks; every check
ends with /dev/shm holding nothing of the job's."""
import os
import re
import subprocess
import sys
import textwrap

import pytest

from harness import REPO, launch, spawn

pytestmark = pytest.mark.usefixtures("no_leftover_segments")


@pytest.mark.timeout(60)
def test_acceptance_all_reduce_five_ranks():
    code = "import ncl, numpy as np; c=ncl.init(); x=np.full(3, c.rank, np.float32); c.all_reduce(x); print(x)"
    rc, out, err, _ = launch(5, code)
    assert rc == 0, err
    # ranks share one stdout, so lines may interleave (as under mpirun): count them
    assert out.count("[10. 10. 10.]") == 5 and not out.replace("[10. 10. 10.]", "").strip(), out


KILL_ONE_RANK = """
    import os, signal, sys, time, numpy as np, ncl
    c = ncl.init()
    x = np.ones({nbytes} // 4, np.float32)
    try:
        for i in range(10**6):
            if c.rank == 1 and i == 3:
                t = time.monotonic()
                os.kill(os.getpid(), signal.SIGKILL)
            c.all_reduce(x)
            x[:] = 1
    except ncl.NclPeerError as e:
        sys.stdout.write(f"PeerError rank {{c.rank}} at {{time.monotonic():.3f}}: {{e}}\\n")
        raise SystemExit(7)
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("nbytes", [8, 1 << 20, 64 << 20])
def test_kill_9_mid_collective_every_survivor_raises(nbytes):
    """Rank 1 SIGKILLs itself in the middle of a stream of all_reduces; every survivor must
    raise NclPeerError naming rank 1 well before the (60 s) timeout."""
    codes, lines, seconds = spawn(4, KILL_ONE_RANK.format(nbytes=nbytes), env={"NCL_TIMEOUT": "60"})
    assert codes[1] == -9
    assert [codes[r] for r in (0, 2, 3)] == [7, 7, 7], lines
    assert len(lines) == 3 and all("rank 1 (pid" in line and "died" in line for line in lines), lines
    assert seconds < 10, f"detection took {seconds:.1f} s"


@pytest.mark.timeout(60)
def test_launcher_stops_the_job_when_a_rank_is_killed():
    rc, out, err, seconds = launch(4, KILL_ONE_RANK.format(nbytes=1 << 20))
    assert rc == 137, err
    assert "rank 1" in err and "SIGKILL" in err


@pytest.mark.timeout(60)
def test_mismatched_collectives_raise_on_every_rank():
    code = """
        import numpy as np, ncl
        c = ncl.init()
        x = np.zeros(3 if c.rank != 2 else 5, np.float32)
        try:
            c.all_reduce(x)
        except ncl.NclMismatchError as e:
            import sys; sys.stdout.write(f"mismatch {c.rank} {e}\\n")
    """
    rc, out, err, _ = launch(3, code)
    assert rc == 0, err
    lines = [line for line in out.splitlines() if line.startswith("mismatch")]
    assert sorted(int(line.split()[1]) for line in lines) == [0, 1, 2], out
    assert all(re.search(r"rank 2 called all_reduce\(float32, count=5", line) for line in lines), lines


@pytest.mark.timeout(60)
def test_missing_rank_times_out_with_its_name():
    code = """
        import time, numpy as np, ncl
        c = ncl.init(timeout=2)
        if c.rank == 2:
            time.sleep(6)   # never joins the barrier in time
        else:
            try:
                c.barrier()
            except ncl.NclTimeoutError as e:
                import sys; sys.stdout.write(f"timeout {c.rank} {e}\\n")
    """
    rc, out, err, _ = launch(3, code)
    lines = [line for line in out.splitlines() if line.startswith("timeout")]
    assert len(lines) == 2, (out, err)
    assert all("waiting for ranks [2]" in line for line in lines), lines


@pytest.mark.timeout(60)
def test_closed_communicator_refuses_use():
    import numpy as np

    import ncl
    comm = ncl.init()
    comm.close()
    with pytest.raises(ncl.NclStateError, match="closed"):
        comm.all_reduce(np.ones(2, np.float32))


FULL_SHM = """
    set -e
    mount -t tmpfs -o size=256k tmpfs /dev/shm
    code=0
    {python} -m ncl.run -n 2 {python} -c "import ncl; ncl.init()" || code=$?
    echo "exit $code"
    echo "left: $(ls /dev/shm | wc -l)"
"""


@pytest.mark.timeout(60)
def test_full_dev_shm_fails_clearly_and_leaves_nothing():
    """/dev/shm too small (a 256 KiB tmpfs in a private mount namespace): setup fails with a
    message saying how much is needed and how to raise it, and leaves nothing behind."""
    script = textwrap.dedent(FULL_SHM).format(python=sys.executable)
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=50, cwd=REPO)
    assert "exit 1" in proc.stdout and "left: 0" in proc.stdout, proc.stdout + proc.stderr
    assert re.search(r"NclSystemError: /dev/shm has 0\.\d MiB free but this communicator needs \d+\.\d MiB",
                     proc.stderr), proc.stderr
    assert "--shm-size" in proc.stderr, proc.stderr


FULL_SHM_EMPTY = """
    set -e
    mount -t tmpfs -o size=16m tmpfs /dev/shm
    code=0
    NCL_TIMEOUT=60 {python} -c '{code}' || code=$?
    echo "left: $(ls /dev/shm | wc -l)"
"""
EMPTY_TOO_LARGE = """
import subprocess, sys, time
import ncl
uid = ncl.get_unique_id()
rank_code = (
    "import sys, time, numpy as np, ncl; c = ncl.init(rank=int(sys.argv[1]), size=2, unique_id=sys.argv[2])\\n"
    "t = time.monotonic()\\n"
    "try:\\n"
    "    c.empty(16 << 20, np.uint8)\\n"
    "except ncl.NclError as e:\\n"
    "    print(f\\"rank {c.rank} {type(e).__name__} after {time.monotonic() - t:.2f} s: {e}\\", flush=True)\\n")
procs = [subprocess.Popen([sys.executable, "-c", rank_code, str(r), uid]) for r in range(2)]
sys.exit(max(p.wait(timeout=50) for p in procs))
"""


@pytest.mark.timeout(60)
def test_registered_memory_too_large_for_dev_shm():
    """comm.empty larger than /dev/shm's free space: rank 0 says why, the other rank learns it at
    once from rank 0 (not after NCL_TIMEOUT), and nothing is left behind."""
    script = textwrap.dedent(FULL_SHM_EMPTY).format(python=sys.executable, code=EMPTY_TOO_LARGE.replace("'", "'\\''"))
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=55, cwd=REPO)
    out = proc.stdout
    assert "left: 0" in out, out + proc.stderr
    assert re.search(r"rank 0 NclSystemError after \d\.\d\d s: /dev/shm has \d+\.\d MiB free but this registered "
                     r"buffer \(every rank's copy\) needs 32\.0 MiB; free space there, allocate less", out), out
    found = re.search(r"rank 1 NclPeerError after (\d+\.\d\d) s: .*rank 0 aborted the group: /dev/shm has", out)
    assert found and float(found.group(1)) < 5, out


def test_staging_larger_than_the_memory_fails_before_it_is_created():
    """NCL_BUFFSIZE=10G on 2 ranks was checked against /dev/shm only (larger than the RAM on some hosts), and
    each rank wrote its 10 GB; now a segment larger than the memory available is refused, naming the knob."""
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    env = dict(os.environ, NCL_BUFFSIZE=f"{kib // (1 << 20) + 2}G")  # one rank's staging alone exceeds it
    before = set(os.listdir("/dev/shm"))
    proc = subprocess.run([sys.executable, "-c", "import ncl; ncl.init()"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode != 0
    assert re.search(r"needs [\d.]+ MiB of shared memory, but the machine has [\d.]+ MiB of memory available; "
                     r"lower NCL_BUFFSIZE", proc.stderr), proc.stderr[-2000:]
    assert set(os.listdir("/dev/shm")) <= before
