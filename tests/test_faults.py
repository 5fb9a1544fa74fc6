"""Fault injection: SIGKILL one rank of four at a random moment of a random collective of a
random size (8 B to 64 MiB), from outside, so the kill lands anywhere: in a copy, a wait, a
single-copy read, the last arrival's reduction.  Every survivor must raise NclPeerError naming
the dead rank within 10 s, and /dev/shm must hold nothing of the job's afterwards.

The ranks are started directly (no launcher: ncl-run would stop the survivors itself, see
test_lifecycle.py for that path).  Each survivor prints the wall-clock time it caught the error;
the slowest detection over all trials is printed (pytest -s shows it)."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from harness import REPO, start_ranks
from ncl import supervisor

pytestmark = pytest.mark.usefixtures("no_leftover_segments")

COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "gather", "reduce_scatter", "scatter", "all_to_all")
SIZES = (8, 4096, 256 << 10, 4 << 20, 64 << 20)
N = 4
SLOWEST = []

RANK = """
    import sys, time, numpy as np, ncl
    c = ncl.init()
    n, name, count = c.size, sys.argv[1], max(int(sys.argv[2]) // 4 // c.size * c.size, c.size)
    x = np.ones(count, np.float32)
    calls = {
        "all_reduce": lambda: c.all_reduce(x),
        "reduce": lambda: c.reduce(x, root=0),
        "broadcast": lambda: c.broadcast(x, root=0),
        "all_gather": lambda: c.all_gather(x[: count // n], out=out_full),
        "gather": lambda: c.gather(x[: count // n], root=0, out=out_full if c.rank == 0 else None),
        "reduce_scatter": lambda: c.reduce_scatter(x, out=out_part),
        "scatter": lambda: c.scatter(x, root=0, out=out_part),
        "all_to_all": lambda: c.all_to_all(x, out=out_full),
    }
    out_full, out_part = np.empty(count, np.float32), np.empty(count // n, np.float32)
    calls[name]()
    sys.stdout.write("started\\n"); sys.stdout.flush()
    try:
        while True:
            calls[name]()
            x[:] = 1
    except ncl.NclPeerError as e:
        sys.stdout.write(f"caught {time.time():.6f} {e}\\n")
        raise SystemExit(7)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(16))
def test_kill_9_at_a_random_moment(seed):
    rng = random.Random(seed)
    name, nbytes, victim = rng.choice(COLLECTIVES), rng.choice(SIZES), rng.randrange(N)
    with supervisor.Group(new_session=False) as group:
        procs = start_ranks(group, N, [sys.executable, "-c", textwrap.dedent(RANK), name, str(nbytes)],
                            {"NCL_TIMEOUT": "60"}, cwd=REPO, stdout=subprocess.PIPE, text=True)
        for p in procs:
            assert p.stdout.readline().strip() == "started"
        time.sleep(rng.uniform(0, 0.3))
        killed_at = time.time()
        os.kill(procs[victim].pid, signal.SIGKILL)
        outs = {r: p.communicate(timeout=30)[0] for r, p in enumerate(procs) if r != victim}
    where = f"seed {seed}: {name} of {nbytes} B, rank {victim} killed"
    latencies = []
    for r, out in outs.items():
        assert procs[r].returncode == 7, f"{where}: rank {r} exited {procs[r].returncode}: {out}"
        line = next(ln for ln in out.splitlines() if ln.startswith("caught"))
        assert f"rank {victim} (pid {procs[victim].pid}) died" in line, f"{where}: {line}"
        latencies.append(float(line.split()[1]) - killed_at)
    assert max(latencies) < 10, f"{where}: slowest survivor took {max(latencies):.2f} s"
    SLOWEST.append(max(latencies))
    print(f"\n{where}: survivors raised after {min(latencies) * 1e3:.0f}-{max(latencies) * 1e3:.0f} ms; "
          f"slowest so far {max(SLOWEST) * 1e3:.0f} ms over {len(SLOWEST)} kills")
