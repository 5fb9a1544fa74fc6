"""ncl-run on its own: the environment each rank gets, output tagging, failure propagation,
signal forwarding, usage errors and /dev/shm cleanup.  Child programs are tiny `python -c`
scripts that do not use ncl, so these test only the launcher."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness import pid_alive
from ncl.launch import shm_prefix

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.timeout(60)


def ncl_run(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "ncl.run", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=50, **kwargs)


def test_every_rank_gets_its_environment():
    code = ("import os, json, sys; keys = ['NCL_RANK', 'NCL_WORLD_SIZE', 'NCL_LOCAL_RANK', 'NCL_UNIQUE_ID', 'RANK', "
            "'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'NCL_TIMEOUT']; "
            "sys.stdout.write(json.dumps({k: os.environ.get(k) for k in keys}) + '\\n')")
    proc = ncl_run("-n", "3", "--timeout", "7", "--", sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    envs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(int(e["NCL_RANK"]) for e in envs) == [0, 1, 2]
    for e in envs:
        assert e["NCL_RANK"] == e["RANK"] == e["NCL_LOCAL_RANK"] == e["LOCAL_RANK"]
        assert e["NCL_WORLD_SIZE"] == e["WORLD_SIZE"] == e["LOCAL_WORLD_SIZE"] == "3"
        assert e["MASTER_ADDR"] == "127.0.0.1" and e["NCL_TIMEOUT"] == "7.0"
    assert len({e["NCL_UNIQUE_ID"] for e in envs}) == 1 and len(envs[0]["NCL_UNIQUE_ID"]) == 32
    assert len({e["MASTER_PORT"] for e in envs}) == 1


def test_tag_output_prefixes_whole_lines():
    code = "import os, sys; r = os.environ['RANK']; print('out', r); print('err', r, file=sys.stderr)"
    proc = ncl_run("-n", "2", "--tag-output", sys.executable, "-c", code)
    assert proc.returncode == 0
    assert sorted(proc.stdout.splitlines()) == ["[0]: out 0", "[1]: out 1"]
    assert sorted(proc.stderr.splitlines()) == ["[0]: err 0", "[1]: err 1"]


def test_a_failing_rank_stops_the_others_and_sets_the_exit_code():
    code = ("import os, sys, time; r = int(os.environ['RANK']); os.write(1, f'{os.getpid()}\\n'.encode()); "
            "time.sleep(0.5); sys.exit(3) if r == 1 else time.sleep(60)")
    start = time.monotonic()
    proc = ncl_run("-n", "3", sys.executable, "-c", code)
    assert proc.returncode == 3
    assert time.monotonic() - start < 15
    assert "rank 1" in proc.stderr and "exited with code 3" in proc.stderr
    assert not any(pid_alive(int(pid)) for pid in proc.stdout.split())


def test_a_rank_killed_by_a_signal_gives_128_plus_the_signal():
    code = "import os, signal, time; os.environ['RANK'] == '0' and os.kill(os.getpid(), signal.SIGKILL); time.sleep(60)"
    proc = ncl_run("-n", "2", sys.executable, "-c", code)
    assert proc.returncode == 128 + signal.SIGKILL
    assert "SIGKILL" in proc.stderr


def test_sigterm_to_the_launcher_reaches_the_ranks():
    code = "import os, time; os.write(1, f'{os.getpid()}\\n'.encode()); time.sleep(60)"
    launcher = subprocess.Popen([sys.executable, "-m", "ncl.run", "-n", "2", sys.executable, "-c", code],
                                stdout=subprocess.PIPE, text=True, cwd=REPO)
    pids = [int(launcher.stdout.readline()) for _ in range(2)]
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=20) != 0
    assert not any(pid_alive(p) for p in pids)


def test_ranks_die_with_a_launcher_killed_by_sigkill():
    """kill -9 of ncl-run: its ranks were reparented and ran on; now the parent-death signal ends them."""
    code = "import os, time; os.write(1, f'{os.getpid()}\\n'.encode()); time.sleep(60)"
    launcher = subprocess.Popen([sys.executable, "-m", "ncl.run", "-n", "2", "--tag-output", sys.executable, "-c",
                                 code], stdout=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)
    pids = [int(launcher.stdout.readline().split(": ")[1]) for _ in range(2)]
    launcher.kill()
    launcher.wait(timeout=20)
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in pids)


def test_the_max_ranks_of_the_launcher_are_the_cores():
    from ncl._native import lib
    from ncl.job import MAX_RANKS
    assert MAX_RANKS == lib.NCL_MAX_RANKS


@pytest.mark.parametrize("on_sigterm, rank_code", [
    ("", -signal.SIGTERM),                                                   # killed by it
    ("signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); ", 0),          # stops cleanly
])
def test_a_signal_while_ranks_start_stops_the_started_and_starts_no_more(monkeypatch, on_sigterm, rank_code):
    """SIGTERM lands while rank 0 is being forked, before ncl-run holds its handle: rank 0 still
    gets it, ranks 1..3 are never started, and the job does not pass for having run even if rank 0
    stops cleanly (the launcher in-process, its Popen watched)."""
    from ncl import launch
    started, real_popen = [], subprocess.Popen

    def popen_then_sigterm(*a, **kw):
        proc = real_popen(*a, **dict(kw, stdout=subprocess.PIPE, text=True))
        started.append(proc)
        if len(started) == 1:
            assert proc.stdout.readline() == "ready\n"  # its handler, if any, is in place
            signal.raise_signal(signal.SIGTERM)  # forward() runs now, with rank 0 not yet in its list
        return proc
    monkeypatch.setattr(launch.subprocess, "Popen", popen_then_sigterm)
    program = f"import signal, sys, time; {on_sigterm}print('ready', flush=True); time.sleep(30)"
    try:
        code = launch.main(["-n", "4", sys.executable, "-c", program])
        assert len(started) == 1, f"{len(started)} ranks started after the launcher was told to stop"
        assert started[0].returncode == rank_code and code == 128 + signal.SIGTERM
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the launcher put its handlers back


@pytest.mark.parametrize("args, message", [
    (["-n", "0", "true"], "between 1 and 1024"),
    (["-n", "3000", "true"], "-n must be between 1 and 1024, not 3000"),  # before any of the 3000 starts
    (["-n", "2"], "no program"),
    (["-n", "4", "--hosts", "3", "true"], "--hosts"),
    (["-n", "2", "--topology", "/no/such/file.yaml", "true"], "neither a file nor one of"),
    (["-n", "x", "true"], "invalid int"),
])
def test_bad_usage_exits_2_with_a_message(args, message):
    proc = ncl_run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_leftover_segments_of_the_job_are_removed():
    """A rank that dies during setup may leave its segment behind: the launcher removes it."""
    code = ("import os, sys; uid = os.environ['NCL_UNIQUE_ID']; "
            "open(f'/dev/shm/ncl-{uid[:12]}-crash-during-setup', 'w').close(); sys.exit(1)")
    proc = ncl_run("-n", "2", sys.executable, "-c", code)
    assert proc.returncode == 1
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("ncl-") and f.endswith("crash-during-setup")]
    assert shm_prefix("0123456789abcdef") == "ncl-0123456789ab-"
