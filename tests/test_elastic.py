"""Elastic groups (ncl/elastic.py): revoke, and shrink after a failure.

Ranks are started directly (no launcher, so nobody stops them but the test), and under
ncl-run --elastic (which keeps the survivors running).  Each rank contributes old_rank + 1 to its all_reduces, so the expected sum
on a group is the sum over the old ranks it holds: the ranks learn who is in the new group from
an all_gather on it and check the sum and the membership against what the test killed.
The kill test prints the time from the SIGKILL to the first correct call on the shrunk group
(pytest -s shows it)."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from harness import REPO, launch, spawn, start_ranks
from ncl import supervisor

pytestmark = pytest.mark.usefixtures("no_leftover_segments")
N = 4

# On a group, `calls` all_reduces whose sum must be that of the old ranks it holds.
CHECK = """
    import sys, time, numpy as np, ncl

    def check(c, old, calls):
        members = c.all_gather(np.array([old], np.int64)).tolist()
        assert members == sorted(members) and members[c.rank] == old, members
        for i in range(calls):
            x = np.full(1000, old + 1 + i, np.float64)
            c.all_reduce(x)
            want = sum(m + 1 + i for m in members)
            assert (x == want).all(), (x[:3], want)
            if i == 0:
                first = time.time()
        return members, first
"""

KILLED = CHECK + """
    c = ncl.init()
    old = c.rank
    x = np.ones(4096, np.float32)
    sys.stdout.write("started\\n"); sys.stdout.flush()
    try:
        while True:
            c.all_reduce(x)
            assert (x == N).all()
            x[:] = 1
    except ncl.NclPeerError as e:
        caught = time.time()
        failed = c.failed_ranks()
    new = c.shrink()
    assert c.closed and new.size == N - 1
    members, first = check(new, old, 100)
    print(f"rank {old}: failed {failed}, new rank {new.rank} of {new.size} {members}, caught {caught:.6f} "
          f"first {first:.6f}", flush=True)
    new.close()
""".replace("N - 1", str(N - 1)).replace("== N", f"== {N}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", [0, 2])
def test_survivors_of_a_kill_shrink_and_go_on(victim):
    with supervisor.Group(new_session=False) as group:
        procs = start_ranks(group, N, [sys.executable, "-c", textwrap.dedent(KILLED)], {"NCL_TIMEOUT": "30"},
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
        for p in procs:
            assert p.stdout.readline().strip() == "started"
        time.sleep(0.2)
        killed_at = time.time()
        os.kill(procs[victim].pid, signal.SIGKILL)
        outs = {r: p.communicate(timeout=60)[0] for r, p in enumerate(procs) if r != victim}
    survivors = [r for r in range(N) if r != victim]
    firsts = []
    for r, out in outs.items():
        assert procs[r].returncode == 0, f"rank {r} exited {procs[r].returncode}: {out}"
        fields = out.split()
        assert f"rank {r}: failed [{victim}], new rank {survivors.index(r)} of {N - 1} {survivors}," in out, out
        firsts.append(float(fields[fields.index("first") + 1]))
    took = max(firsts) - killed_at
    print(f"\nrank {victim} of {N} killed: the {N - 1} survivors shrank and their first correct all_reduce on the "
          f"shrunk group came {took * 1e3:.0f} ms after the kill (100 correct calls each)")
    assert took < 10, f"the survivors took {took:.2f} s"


REVOKED = CHECK + """
    c = ncl.init()
    old = c.rank
    x = np.ones(4096, np.float32)
    try:
        if old == 0:
            time.sleep(0.3)
            c.revoke()
            print("revoked", flush=True)
        else:
            while True:
                c.all_reduce(x)
    except ncl.NclPeerError as e:
        assert "revoked the communicator" in str(e), e
        print("pending call failed:", e, flush=True)
    try:
        c.all_reduce(x)
    except ncl.NclStateError as e:
        assert "revoked the communicator" in str(e), e
        print("later call failed", flush=True)
    for bad, kind in (([N], ValueError), (["1"], TypeError)):
        try:
            c.shrink(exclude=bad)
        except kind:
            pass
        else:
            raise AssertionError(f"shrink(exclude={bad}) did not raise {kind}")
    new = c.shrink(exclude=[1])
    if old == 1:
        assert new is None and not c.closed
        c.close()
    else:
        members, _ = check(new, old, 10)
        print(f"rank {old}: new rank {new.rank} {members}", flush=True)
        new.close()
""".replace("[N]", f"[{N}]")


@pytest.mark.timeout(120)
def test_revoke_fails_every_call_and_the_group_shrinks():
    codes, lines, _ = spawn(N, REVOKED, env={"NCL_TIMEOUT": "30"})
    assert codes == [0] * N, "\n".join(lines)
    assert sum("pending call failed" in ln for ln in lines) == N - 1, lines
    assert sum(ln == "later call failed" for ln in lines) == N, lines
    for old, new_rank in ((0, 0), (2, 1), (3, 2)):
        assert f"rank {old}: new rank {new_rank} [0, 2, 3]" in lines, lines


FROM_A_THREAD = """
    import threading, time, numpy as np, ncl
    c = ncl.init()
    x = np.ones(16, np.float32)
    if c.rank == 0:  # a watchdog thread revokes while the main thread waits for rank 1, which is late
        threading.Timer(0.3, c.revoke).start()
        t = time.monotonic()
        try:
            c.all_reduce(x)
        except ncl.NclStateError as e:
            print(f"rank 0: pending call failed after {time.monotonic() - t:.1f} s: {e}", flush=True)
    else:
        time.sleep(3)
        try:
            c.all_reduce(x)
        except ncl.NclPeerError as e:
            print(f"rank 1: late call failed: {e}", flush=True)
"""


@pytest.mark.timeout(120)
def test_revoke_from_another_thread_ends_this_ranks_pending_call():
    # an NclStateError on rank 0 (not the NclPeerError rank 1's leaving would give 3 s later) shows that its
    # own wait ended when it revoked
    codes, lines, _ = spawn(2, FROM_A_THREAD, env={"NCL_TIMEOUT": "30"})
    assert codes == [0, 0], lines
    assert any(ln.startswith("rank 0: pending call failed") and "left the group meanwhile: it revoked" in ln
               for ln in lines), lines
    assert any(ln.startswith("rank 1: late call failed") and "rank 0 revoked the communicator" in ln
               for ln in lines), lines


RACE = CHECK + """
    import os, random, signal
    c = ncl.init()
    old = c.rank
    second, delay = int(sys.argv[1]), float(sys.argv[2])
    x = np.ones(4096, np.float32)
    sys.stdout.write("started\\n"); sys.stdout.flush()
    try:
        while True:
            c.all_reduce(x)
    except ncl.NclPeerError:
        pass
    if old == second:  # the second failure: before, during or after its part in the shrink
        import threading
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
    for attempt in range(3):
        try:
            c = c.shrink()
            members, _ = check(c, old, 20)
        except ncl.NclError as e:
            print(f"rank {old}: attempt {attempt}: {type(e).__name__}: {e}", flush=True)
            continue
        print(f"rank {old}: group {members}", flush=True)
        break
    else:
        raise SystemExit(7)
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", range(int(os.environ.get("NCL_TEST_RACES", "3"))))
def test_a_shrink_racing_a_second_failure(seed):
    rng = random.Random(seed)
    first, second = rng.sample(range(N), 2)
    delay = (0.0, 0.005, 0.05)[seed % 3]
    with supervisor.Group(new_session=False) as group:
        procs = start_ranks(group, N, [sys.executable, "-c", textwrap.dedent(RACE), str(second), str(delay)],
                            {"NCL_TIMEOUT": "10"}, cwd=REPO, stdout=subprocess.PIPE, text=True)
        for p in procs:
            assert p.stdout.readline().strip() == "started"
        time.sleep(0.1)
        os.kill(procs[first].pid, signal.SIGKILL)
        outs = {r: p.communicate(timeout=120)[0] for r, p in enumerate(procs) if r not in (first, second)}
    left = sorted(outs)
    groups = [f"group {left}", f"group {sorted(left + [second])}"]  # the second may die after the checked calls
    where = f"seed {seed}: rank {first} killed, then rank {second} after {delay * 1e3:g} ms"
    for r, out in outs.items():
        # a clear error is allowed (exit 7, each attempt's error printed); a wrong sum, a group without a
        # survivor, survivors in different groups or a hang is not
        assert procs[r].returncode in (0, 7), f"{where}: rank {r} exited {procs[r].returncode}: {out}"
        if procs[r].returncode == 0:
            assert any(f"rank {r}: {g}\n" in out for g in groups), f"{where}: {out}"
        else:
            assert out.count("attempt") == 3, f"{where}: {out}"
    finals = {out.strip().splitlines()[-1].split(": ", 1)[1] for r, out in outs.items() if procs[r].returncode == 0}
    assert len(finals) <= 1, f"{where}: the survivors ended in different groups: {outs}"
    print(f"\n{where}:\n" + "".join(outs.values()))


UNDER_NCL_RUN = CHECK + """
    import os, signal
    c = ncl.init()
    old, survivors_exit = c.rank, int(os.environ["SURVIVORS_EXIT"])
    x = np.ones(64, np.float32)
    try:
        for i in range(10_000):
            if old == 1 and i == 20:
                os.kill(os.getpid(), signal.SIGKILL)
            c.all_reduce(x)
            x[:] = 1
    except ncl.NclPeerError:
        pass
    c = c.shrink()
    members, _ = check(c, old, 10)
    sys.stdout.write(f"rank {old}: group {members}\\n")  # one write: the ranks share ncl-run's stdout
    sys.stdout.flush()
    c.close()
    raise SystemExit(survivors_exit)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("survivors_exit", [0, 3])
def test_ncl_run_elastic_keeps_the_survivors_running(survivors_exit):
    code, out, err, _ = launch(3, UNDER_NCL_RUN, extra=("--elastic",),
                               env={"NCL_TIMEOUT": "30", "SURVIVORS_EXIT": str(survivors_exit)})
    assert code == survivors_exit, (code, out, err)
    assert sorted(out.splitlines()) == ["rank 0: group [0, 2]", "rank 2: group [0, 2]"], (out, err)
    assert "rank 1 (pid" in err and "--elastic: the other 2 ranks go on" in err, err


def test_ncl_run_elastic_refuses_hosts():
    code, _, err, _ = launch(2, "pass", extra=("--elastic", "--hosts", "2"))
    assert code == 2 and "--elastic needs one host" in err, err


class _NotOnOneHost:
    """Stands for a backend other than shared memory (a multi-host one)."""
    rank, size, label, options, recorder, single_host = 0, 2, "fake", None, None, False

    def run(self, call):
        raise AssertionError("shrink ran a call")

    abort = close = lambda self, *reason: None


def test_shrink_checks_before_anything_moves():
    import ncl
    from ncl.comm import Communicator
    with pytest.raises(NotImplementedError, match="multi-host"):
        Communicator(_NotOnOneHost()).shrink()
    comm = ncl.init(0, 1, ncl.get_unique_id())
    for bad, kind in (([1], ValueError), ([-1], ValueError), ([0.0], TypeError), ([True], TypeError), (3, TypeError),
                      ("1", TypeError)):
        with pytest.raises(kind):
            comm.shrink(exclude=bad)
    assert comm.failed_ranks() == [] and not comm.closed
    solo = comm.shrink()
    assert comm.closed and comm.failed_ranks() == [] and (solo.rank, solo.size) == (0, 1)
    x = np.arange(5.0)
    assert (solo.all_reduce(x) == np.arange(5.0)).all()
    assert solo.shrink(exclude=[0]) is None and not solo.closed
    solo.revoke()
    with pytest.raises(ncl.NclStateError, match="revoked"):
        solo.all_reduce(x)
    solo.close()


TORCH_ABORT = """
    import time, torch, torch.distributed as dist, ncl, ncl.torch
    dist.init_process_group("ncl")
    x = torch.ones(8)
    dist.all_reduce(x)
    if dist.get_rank() == 0:
        time.sleep(0.3)
        dist.distributed_c10d._abort_process_group()  # torch's abort: revokes the group's communicator
    else:
        dist.all_reduce(x)  # raises, and ncl-run exits with this rank's code
"""


@pytest.mark.timeout(120)
def test_torch_abort_revokes_the_communicator():
    pytest.importorskip("torch")
    code, out, err, _ = launch(2, TORCH_ABORT, env={"NCL_TIMEOUT": "30"})
    assert code == 1, (out, err)
    assert "NclPeerError: all_reduce: rank 0 aborted the group: it revoked the communicator" in err, (out, err)


TORCH_SHRINK = """
    import os, signal, sys, torch, torch.distributed as dist, ncl, ncl.torch
    dist.init_process_group("ncl", pg_options=ncl.torch.Options(compress="int8"))
    old = dist.get_rank()
    evens = dist.new_group([0, 2])  # destroyed with the default group's shrink, as torch does
    x = torch.ones(64)
    try:
        for i in range(10_000):
            if old == 1 and i == 20:
                os.kill(os.getpid(), signal.SIGKILL)
            dist.all_reduce(x)
            x.fill_(1)
    except ncl.NclPeerError:
        pass
    try:  # torch's own shrink_group needs a C++ backend (see ncl/torch/elastic.py)
        dist.shrink_group([1])
    except RuntimeError as e:
        refused = "torch refused"
    group = ncl.torch.shrink_group()  # the default group, without the dead rank
    assert dist.distributed_c10d._get_default_group() is group and group.options.compress == "int8"
    assert dist.get_process_group_ranks(group) == [0, 2] and evens not in dist.distributed_c10d._world.pg_map
    members = [None] * group.size()
    dist.all_gather_object(members, old)
    for i in range(10):
        t = torch.full((100,), float(old + 1 + i), dtype=torch.float64)  # float64: not compressed
        dist.all_reduce(t)
        assert (t == sum(m + 1 + i for m in members)).all(), (t[:3], members)
    sys.stdout.write(f"rank {old}: {refused}, now rank {dist.get_rank()} of {dist.get_world_size()} {members}\\n")
    sys.stdout.flush()
    dist.destroy_process_group()
"""


@pytest.mark.timeout(120)
def test_torch_survivors_of_a_kill_shrink_the_default_group():
    pytest.importorskip("torch")
    code, out, err, _ = launch(3, TORCH_SHRINK, extra=("--elastic",), env={"NCL_TIMEOUT": "30"})
    assert code == 0, (code, out, err)
    assert sorted(out.splitlines()) == [f"rank {r}: torch refused, now rank {i} of 2 [0, 2]"
                                        for i, r in enumerate((0, 2))], (out, err)
