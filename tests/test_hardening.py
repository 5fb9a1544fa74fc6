"""Issue 21's table, row by row: what a hostile or careless user did, and what ncl does now.

Each test runs real ranks (no pool: most of these end a rank on purpose) and checks what every
rank reports; timings are generous bounds against hangs, never performance targets."""
import glob
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import ncl
from harness import REPO, launch, mapped_lines, pid_alive, spawn
from ncl import supervisor
from ncl.job import segment_key, segment_name, shm_prefix

pytestmark = pytest.mark.usefixtures("no_leftover_segments")

# Rank 0 is interrupted (a real SIGINT, default handler) while it waits in an all_reduce for rank 2, which
# never comes; rank 1 waits there too and must learn why at once.  The three print CLOCK_MONOTONIC
# times, one clock for every process of the host.
CTRL_C_IN_A_WAIT = """
    import datetime, os, signal, sys, threading, time, numpy as np, ncl
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the suite may run with SIGINT ignored
    if sys.argv[1:] == ["torch"]:
        import torch, torch.distributed as dist, ncl.torch
        dist.init_process_group("ncl", timeout=datetime.timedelta(seconds=30))
        rank, x, all_reduce = dist.get_rank(), torch.ones(4), dist.all_reduce
    else:
        c = ncl.init(timeout=30)
        rank, x, all_reduce = c.rank, np.ones(4), c.all_reduce
    if rank == 2:
        time.sleep(4)
        raise SystemExit(0)
    if rank == 0:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    try:
        all_reduce(x)
    except KeyboardInterrupt:
        sys.stdout.write(f"interrupted {time.monotonic():.3f}\\n")  # one write: lines of two ranks stay whole
        sys.stdout.flush()
        time.sleep(2)  # alive: rank 1 must learn it from the abort, not from a death
    except Exception as e:
        sys.stdout.write(f"peer error {time.monotonic():.3f} {type(e).__name__}: {e}\\n")
        sys.stdout.flush()
"""


def check_ctrl_c(lines):
    interrupted = [float(line.split()[1]) for line in lines if line.startswith("interrupted")]
    peer = [line for line in lines if line.startswith("peer error")]
    assert len(interrupted) == 1 and len(peer) == 1, lines
    assert re.search("NclPeerError: .*rank 0 aborted the group: .*KeyboardInterrupt", peer[0]), peer
    # (tens of ms here alone: a generous bound, far below the 30 s timeout they waited for before)
    assert float(peer[0].split()[2]) - interrupted[0] < 5.0, lines


@pytest.mark.timeout(60)
def test_ctrl_c_in_a_wait_interrupts_it_and_peers_learn_why_explicit_bootstrap():
    codes, lines, seconds = spawn(3, CTRL_C_IN_A_WAIT)
    assert codes == [0, 0, 0], lines
    check_ctrl_c(lines)


@pytest.mark.timeout(60)
def test_ctrl_c_in_a_wait_interrupts_it_and_peers_learn_why_under_ncl_run():
    rc, out, err, _ = launch(3, CTRL_C_IN_A_WAIT)
    assert rc == 0, err
    check_ctrl_c(out.splitlines())


def job(tmp_path, launcher, n, program, *, hosts=1, extra_env=None, timeout=45):
    """Run a program's text on n ranks under a launcher (ncl-run, mpiexec or torchrun, whose ranks run the
    program with the argument "torch"); returns supervisor.Finished and the seconds it took."""
    prog = str(tmp_path / "prog.py")
    with open(prog, "w") as f:
        f.write(textwrap.dedent(program))
    argv = {"ncl-run": [sys.executable, "-m", "ncl.run", "-n", str(n), "--hosts", str(hosts), sys.executable, prog],
            "mpiexec": [os.path.join(os.path.dirname(sys.executable), "mpiexec"), "-n", str(n), sys.executable, prog],
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), prog, "torch"]}
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("NCL_", "PMI_"))}
    environ.update(extra_env or {})
    start = time.monotonic()
    proc = supervisor.run(argv[launcher], timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=environ, cwd=REPO)
    return proc, time.monotonic() - start


@pytest.mark.timeout(120)
@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_ctrl_c_in_a_wait_interrupts_it_and_peers_learn_why_under(tmp_path, launcher):
    if launcher == "torchrun":
        pytest.importorskip("torch")
    proc, _ = job(tmp_path, launcher, 3, CTRL_C_IN_A_WAIT, timeout=110)
    assert proc.code == 0, proc.stderr[-3000:]
    check_ctrl_c(proc.stdout.splitlines())


@pytest.mark.timeout(60)
def test_an_exception_inside_with_init_tells_peers_it_failed_and_how():
    code = """
        import ncl
        try:
            with ncl.init(timeout=30) as c:
                if c.rank == 1:
                    raise LookupError("no such expert")
                c.barrier()
        except ncl.NclPeerError as e:
            print(f"peer error: {e}", flush=True)
        except LookupError:
            pass
    """
    codes, lines, _ = spawn(2, code)
    assert codes == [0, 0], lines
    assert len(lines) == 1 and "rank 1 aborted the group: it failed with LookupError: no such expert" in lines[0], \
        lines


@pytest.mark.timeout(60)
def test_an_abort_reason_from_shared_memory_is_printed_as_safe_text():
    code = """
        import ncl
        c = ncl.init(timeout=30)
        if c.rank == 1:
            c.abort("\\x1b]0;owned\\x07\\x1b[2J\\nfake line")
        else:
            try:
                c.barrier()
            except ncl.NclPeerError as e:
                print(f"peer error: {e}", flush=True)
    """
    codes, lines, _ = spawn(2, code)
    assert codes == [0, 0], lines
    assert len(lines) == 1, lines
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x0afake line" in lines[0], lines
    assert not re.search(r"[\x00-\x1f\x7f]", lines[0]), lines


@pytest.mark.timeout(60)
def test_a_rank_joining_a_group_whose_creator_died_fails_in_init_naming_it():
    creator = """
        import os, signal, threading, time, ncl
        threading.Thread(target=ncl.init, kwargs={"timeout": 30}, daemon=True).start()
        time.sleep(0.5)  # creating, and waiting in setup for rank 1
        os.kill(os.getpid(), signal.SIGKILL)
    """
    joiner = """
        import ncl
        try:
            ncl.init(timeout=30)
        except ncl.NclError as e:
            print(f"{type(e).__name__}: {e}", flush=True)
    """
    uid = ncl.get_unique_id()
    with supervisor.Group(new_session=False) as group:
        env = dict(os.environ, NCL_WORLD_SIZE="2", NCL_UNIQUE_ID=uid)
        first = group.start([sys.executable, "-c", textwrap.dedent(creator)], env=dict(env, NCL_RANK="0"))
        assert first.wait(timeout=30) == -signal.SIGKILL
        start = time.monotonic()
        second = group.start([sys.executable, "-c", textwrap.dedent(joiner)], env=dict(env, NCL_RANK="1"),
                             stdout=subprocess.PIPE, text=True)
        out = second.communicate(timeout=30)[0]
    assert re.fullmatch(rf"NclPeerError: .*rank 0 \(pid {first.pid}\) died\n", out), out
    assert time.monotonic() - start < 10


@pytest.mark.timeout(60)
def test_a_segment_removed_during_setup_is_reported_as_removed_at_once():
    code = """
        import ncl, time
        t = time.monotonic()
        try:
            ncl.init(timeout=30)
        except ncl.NclError as e:
            print(f"{time.monotonic() - t:.1f} s {type(e).__name__}: {e}", flush=True)
    """
    uid = ncl.get_unique_id()
    path = "/dev/shm" + segment_name(uid, "world")
    with supervisor.Group(new_session=False) as group:
        env = dict(os.environ, NCL_WORLD_SIZE="2", NCL_UNIQUE_ID=uid, NCL_RANK="0")
        rank0 = group.start([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                            text=True)
        for _ in range(3000):
            if os.path.exists(path):
                break
            time.sleep(0.01)
        os.unlink(path)  # another process of this user, before rank 1 opened it
        out = rank0.communicate(timeout=30)[0]
    assert "NclSystemError" in out and "was removed from /dev/shm" in out, out
    assert float(out.split()[0]) < 10, out


# A job of 2 ranks whose rank 1 comes 2 s late: setup is open that long.
LATE_JOINER = """
    import sys, time, numpy as np, ncl
    if sys.argv[1] == "1":
        time.sleep(2)
    c = ncl.init(timeout=30)
    x = np.arange(4.0) + 10 * c.rank
    c.all_reduce(x)
    print("result", x.tolist(), flush=True)
"""


def door_listed(key: str) -> bool:
    with open("/proc/net/unix") as f:
        return any(line.rstrip().endswith("@ncl-" + key[:32]) for line in f)


@pytest.mark.timeout(60)
def test_a_live_jobs_segment_is_reachable_by_no_name_and_its_door_refuses_strangers():
    """Issue 21's row: a process of this user listing /dev/shm during setup could open the segment and write
    garbage into staging.  Now the segment is a memfd handed to the ranks through a socket: /dev/shm holds
    only the rendezvous note (rank 0's pid: garbage there changes nothing), and a stranger knocking on the
    socket without the job's secret gets no descriptor; after setup nothing of the job is named at all."""
    uid = ncl.get_unique_id()
    key, prefix = segment_key(uid, "world"), os.path.join("/dev/shm", shm_prefix(uid))
    with supervisor.Group(new_session=False) as group:
        env = dict(os.environ, NCL_WORLD_SIZE="2", NCL_UNIQUE_ID=uid)
        ranks = [group.start([sys.executable, "-c", textwrap.dedent(LATE_JOINER), str(r)],
                             env=dict(env, NCL_RANK=str(r)), stdout=subprocess.PIPE, text=True) for r in (0, 1)]
        for _ in range(1000):  # rank 0 is set up and waits for rank 1
            if door_listed(key) and glob.glob(prefix + "*"):
                break
            time.sleep(0.01)
        found = glob.glob(prefix + "*")
        assert found == ["/dev/shm" + segment_name(uid, "world")], found  # the note, nothing else
        assert os.path.getsize(found[0]) <= 4096
        with open(found[0], "r+b") as f:  # what the hostile user did to the segment, done to the note
            f.write(b"\xff" * 4096)
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # knocks and says nothing: dropped after 1 s
        silent.settimeout(10)
        silent.connect("\0ncl-" + key[:32])
        for ticket in (b"\0" * 32, found[0][-32:].encode(), key[:32].encode()):  # none is the ticket
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stranger:
                stranger.settimeout(10)
                stranger.connect("\0ncl-" + key[:32])
                stranger.sendall(ticket + (1).to_bytes(4, "little"))
                data, fds, _, _ = socket.recv_fds(stranger, 4, 4)
                assert fds == [] and data != b"\0\0\0\0", (ticket, data, fds)
        outs = [rank.communicate(timeout=40)[0] for rank in ranks]
        assert silent.recv(4) == b"", "rank 0 answered a knock that showed nothing"
        silent.close()
    assert outs == ["result [10.0, 12.0, 14.0, 16.0]\n"] * 2, outs
    assert glob.glob(prefix + "*") == [] and not door_listed(key)


STOPPED_HOST = """
    import os, signal, sys, numpy as np, ncl
    c = ncl.init()
    x = np.ones(4)
    c.all_reduce(x)
    if c.rank == 3:
        os.kill(os.getpid(), signal.SIGSTOP)  # stopped, not dead: MPI_Finalize would wait for it
    try:
        c.all_reduce(x)
    except ncl.NclError as e:
        print(f"rank {c.rank} {type(e).__name__}: {e}", flush=True)
        raise
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("launcher", ["mpiexec", "ncl-run"])
def test_a_stopped_rank_on_another_host_does_not_hang_the_job_at_exit(tmp_path, launcher):
    before = set(glob.glob("/dev/shm/mpich_shm_*"))
    proc, seconds = job(tmp_path, launcher, 4, STOPPED_HOST, hosts=2, extra_env={"NCL_HOSTS": "2", "NCL_TIMEOUT": "5"})
    assert proc.code is not None and seconds < 5 + 10 + 5, f"the job hung ({seconds:.0f} s): {proc.stderr[-3000:]}"
    assert proc.code != 0
    # MPI_Abort skips MPICH's cleanup: its segment must not outlive the job either (others' jobs may map theirs)
    mapped = {line.split()[-1] for maps in glob.glob("/proc/[0-9]*/maps") for line in mapped_lines(maps)}
    assert set(glob.glob("/dev/shm/mpich_shm_*")) - before - mapped == set()
    assert re.search(r"rank 0 NclTimeoutError: .*over MPI .*timed out after 5.0 s", proc.stdout), proc.stdout


@pytest.mark.timeout(60)
def test_processes_a_rank_leaves_behind_end_with_the_job():
    """`sleep 77 &` in a rank, and one more in a session of its own: both used to outlive a successful job."""
    code = """
        import subprocess
        left = [subprocess.Popen(["sleep", "77"]), subprocess.Popen(["sleep", "78"], start_new_session=True)]
        print(*(p.pid for p in left), flush=True)
    """
    rc, out, err, seconds = launch(2, code)
    pids = [int(pid) for pid in out.split()]
    assert rc == 0 and len(pids) == 4, (out, err)
    assert not [pid for pid in pids if pid_alive(pid)]
    assert "ncl-run: stopped 4 processes the ranks left running" in err, err
    assert seconds < 30
