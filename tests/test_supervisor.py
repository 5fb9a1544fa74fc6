"""ncl/supervisor.py on its own: a failed rank is named and the others stopped within the grace period, a rank
that ignores SIGTERM is killed after it, SIGINT or SIGTERM to a supervisor reaps every rank (its launcher's too),
and no signal that lands while a rank is forked leaves it behind.  The ranks are tiny `python -c` programs."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from harness import pid_alive, popen_then_signal
from ncl import supervisor
from ncl.job import get_unique_id, shm_prefix

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.timeout(90)
# a rank that says its pid (and with IGNORE_TERM, that it ignores SIGTERM), then sleeps
SLEEPER = "import os, signal, sys, time; {}print(os.getpid(), flush=True); time.sleep(60)"
IGNORE_TERM = "signal.signal(signal.SIGTERM, signal.SIG_IGN); "


def sleeper(group, ignore_term=False):
    proc = group.start([sys.executable, "-c", SLEEPER.format(IGNORE_TERM if ignore_term else "")],
                       stdout=subprocess.PIPE, text=True)
    assert int(proc.stdout.readline()) == proc.pid  # running, its handlers in place
    return proc


@pytest.mark.parametrize("new_session", [True, False])
def test_a_failing_rank_is_named_and_the_others_stop_within_the_grace_period(new_session):
    with supervisor.Group(new_session=new_session, grace_s=2.0) as group:
        procs = [sleeper(group), sleeper(group, ignore_term=True)]
        group.start([sys.executable, "-c", "import sys, time; time.sleep(0.3); sys.exit(3)"])
        codes = group.wait(timeout=30)
        failed = group.first_failure()
        assert codes[:2] == [None, None] and codes[2] == 3
        assert failed == (2, group.procs[2].pid, 3) and failed.status == 3
        assert str(failed) == f"rank 2 (pid {failed.pid}) exited with code 3"
        start = time.monotonic()
        group.stop()
        took = time.monotonic() - start
    assert 2.0 <= took < 6.0, took  # the one that ignores SIGTERM is killed when the grace period ends
    assert [p.returncode for p in procs] == [-signal.SIGTERM, -signal.SIGKILL]
    assert not any(pid_alive(p.pid) for p in procs)


def test_a_rank_killed_by_a_signal_is_described_with_it():
    with supervisor.Group() as group:
        proc = sleeper(group)
        os.kill(proc.pid, signal.SIGKILL)
        group.wait(timeout=30)
        failed = group.first_failure()
    assert failed.status == 128 + signal.SIGKILL and "killed by signal SIGKILL" in str(failed)


def test_the_job_shared_memory_goes_with_the_group():
    uid = get_unique_id()
    path = f"/dev/shm/{shm_prefix(uid)}left-by-a-rank"
    with supervisor.Group(job_id=uid) as group:
        group.start([sys.executable, "-c", f"open({path!r}, 'w').close()"])
        assert group.wait(timeout=30) == [0] and group.first_failure() is None
        assert group.leftovers() == [path]
    assert not os.path.exists(path)


# A supervisor in its own interpreter: two ranks, one of which ignores SIGTERM and starts a child of its own
# (it must go with its rank's process group); every pid is printed before the test signals the supervisor.
SUPERVISOR = textwrap.dedent("""
    import subprocess, sys, time
    from ncl import supervisor
    rank = "import os, signal, subprocess, sys, time; {}c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print(os.getpid(), c.pid, flush=True); time.sleep(60)"
    with supervisor.Group(forward=FORWARD, grace_s=1.0) as group:
        for ignore in ("", "signal.signal(signal.SIGTERM, signal.SIG_IGN); "):
            proc = group.start([sys.executable, "-c", rank.format(ignore)], stdout=subprocess.PIPE, text=True)
            print(proc.stdout.readline(), end="", flush=True)
        print("ready", flush=True)
        group.wait()
        failed = group.first_failure()
    sys.exit(failed.status if failed else 0)
""")


@pytest.mark.parametrize("forward", [False, True])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_supervisor_reaps_every_rank(forward, signum):
    # a shell starts background jobs with SIGINT ignored, and Python keeps that: give it the default, as a
    # terminal's Ctrl-C finds it
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISOR.replace("FORWARD", str(forward))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[2] == "ready\n", lines + [proc.stderr.read()]
        pids = [int(p) for line in lines[:2] for p in line.split()]
        proc.send_signal(signum)
        if forward and signum == signal.SIGINT:
            time.sleep(0.5)
            proc.send_signal(signum)  # the second Ctrl-C kills the rank that ignores SIGTERM
        proc.communicate(timeout=30)
        # as it would have without a group (a launcher exits with its first failure's code instead)
        assert proc.returncode == (128 + signum if forward else -signum), proc.returncode
        deadline = time.monotonic() + 5  # the ranks' children are reaped by init, not by the supervisor
        while any(map(pid_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if pid_alive(p)], f"left running of {pids}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_while_a_rank_is_forked_stops_it(monkeypatch):
    """SIGINT lands after Popen has forked, before the group holds the handle: the group still has the rank
    (the signal is held over the fork) and stops it when the KeyboardInterrupt leaves the block."""
    started = []
    monkeypatch.setattr(subprocess, "Popen", popen_then_signal(signal.SIGINT, started))
    try:
        with pytest.raises(KeyboardInterrupt), supervisor.Group() as group:
            group.start([sys.executable, "-c", SLEEPER.format("")])
            pytest.fail("the Ctrl-C was lost")
        assert group.procs == started and started[0].returncode == -signal.SIGTERM
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_forwarded_signal_while_a_rank_is_forked_reaches_it_and_no_rank_starts_after(monkeypatch):
    started, real_popen = [], subprocess.Popen

    def popen_then_sigterm(*a, **kw):
        proc = real_popen(*a, **kw)
        started.append(proc)
        assert int(proc.stdout.readline()) == proc.pid
        signal.raise_signal(signal.SIGTERM)
        return proc
    monkeypatch.setattr(subprocess, "Popen", popen_then_sigterm)
    try:
        with supervisor.Group(forward=True) as group:
            assert group.start([sys.executable, "-c", SLEEPER.format("")], stdout=subprocess.PIPE) is started[0]
            assert group.start([sys.executable, "-c", SLEEPER.format("")], stdout=subprocess.PIPE) is None
            assert group.wait(timeout=30) == [-signal.SIGTERM] and group.signals == [signal.SIGTERM]
        assert len(started) == 1
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the group put the handlers back
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_second_ctrl_c_cuts_the_grace_period_short():
    """While stop waits out the grace period of a rank that ignores SIGTERM, another Ctrl-C kills it at once
    (and still reaches the caller)."""
    with supervisor.Group(grace_s=30.0) as group:
        proc = sleeper(group, ignore_term=True)
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            group.stop()
        assert time.monotonic() - start < 10 and proc.returncode == -signal.SIGKILL


def test_signals_held_delivers_a_ctrl_c_when_the_block_ends():
    inside = []
    with pytest.raises(KeyboardInterrupt):
        with supervisor.signals_held():
            signal.raise_signal(signal.SIGINT)
            inside.append("not cut short")
    assert inside == ["not cut short"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with supervisor.signals_held():  # nothing held: the block ends quietly
        pass


def test_run_stops_the_whole_session_at_the_timeout():
    """run() at its timeout takes down the process and what it started (a launcher's ranks)."""
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(60)'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(c.pid, flush=True); "
            "print('to stderr', file=sys.stderr); time.sleep(60)")
    done = supervisor.run([sys.executable, "-c", code], timeout=2.0, grace_s=1.0, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    assert done.code is None and done.stderr == "to stderr\n"
    child = int(done.stdout)
    deadline = time.monotonic() + 5
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child)
    finished = supervisor.run([sys.executable, "-c", "print('out'); raise SystemExit(4)"], stdout=subprocess.PIPE)
    assert finished == (4, "out\n", "")


@pytest.mark.timeout(60)
def test_adopted_orphans_are_stopped_and_other_children_left_alone():
    """ncl-run's group (adopt_orphans) stops what its ranks leave running, but not the children this process
    had before (a launcher run inside pytest once stopped and reaped the test's rank pools)."""
    mine = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(1); sys.exit(5)"])
    with supervisor.Group(adopt_orphans=True) as group:
        rank = group.start([sys.executable, "-c", "import subprocess; print(subprocess.Popen(['sleep', '77']).pid)"],
                           stdout=subprocess.PIPE, text=True)
        orphan = int(rank.stdout.readline())  # (the orphan holds the pipe open: no communicate)
        group.wait(30)
    assert group.orphans == [orphan] and not pid_alive(orphan)
    assert mine.wait(timeout=30) == 5  # still this process's to reap, with its own status
