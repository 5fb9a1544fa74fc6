"""The fuzz harnesses of tests/fuzz (atheris), each run briefly, and a check that each can fail.

Each harness runs as its own process for a few seconds from its seeds (libFuzzer picks a new
random seed each time, printed as "INFO: Seed:"; a failure prints the input that broke the
contract); longer runs by hand: `python tests/fuzz/fuzz_X.py -max_total_time=600`.  No test
may leave a segment file in /dev/shm."""
import glob
import importlib
import os
import re
import subprocess
import sys
import time
import types

import pytest

# imported here first, so that importing a harness below does not instrument ncl in this process
import ncl.bootstrap  # noqa: F401
import ncl.perf.report  # noqa: F401

pytest.importorskip("atheris")

FUZZ = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz")
sys.path.insert(0, FUZZ)  # the harnesses import `common`

# seconds of fuzzing per harness: the segment's inputs mostly wait out their 0.05 s timeout
BUDGET = {"fuzz_tuning_file": 3, "fuzz_env_knobs": 3, "fuzz_sweep_json": 3, "fuzz_segment_header": 5}


@pytest.fixture(autouse=True)
def no_segment_left_behind():
    before = set(glob.glob("/dev/shm/ncl-fuzz*"))
    yield
    left = set(glob.glob("/dev/shm/ncl-fuzz*")) - before
    for path in left:  # do not let one failure pollute later runs
        os.unlink(path)
    assert not left, f"left in /dev/shm: {sorted(left)}"


@pytest.mark.parametrize("harness", sorted(BUDGET))
def test_harness_runs_clean(harness, tmp_path):
    """A few seconds of fuzzing find nothing: exit status 0 (libFuzzer's is 1 on a broken
    contract, 70 on an input that hangs for -timeout seconds)."""
    args = [sys.executable, os.path.join(FUZZ, f"{harness}.py"), f"-max_total_time={BUDGET[harness]}",
            "-timeout=10", f"-artifact_prefix={tmp_path}/", str(tmp_path / "corpus")]
    start = time.monotonic()
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=60 + BUDGET[harness])
    runs = re.search(r"Done (\d+) runs", proc.stderr)
    print(f"{harness}: {runs.group(1) if runs else '?'} executions in {time.monotonic() - start:.1f} s")
    assert proc.returncode == 0 and runs, proc.stderr[-4000:]
    assert int(runs.group(1)) >= 20, proc.stderr[-2000:]


def _stub_calibration(path=""):
    raise KeyError("all_reduce")


_stub_calibration.cache_clear = lambda: None


def _stub_raise(*args):
    raise KeyError("a contract-breaking stub")


def _segment_stub(status, delay=0.0):
    from ncl._native import lib
    return types.SimpleNamespace(NCL_OK=lib.NCL_OK, ncl_comm_destroy=lib.ncl_comm_destroy,
                                 ncl_comm_create=lambda *args: time.sleep(delay) or status)


@pytest.mark.parametrize("harness, target, stub, data, error", [
    ("fuzz_tuning_file", "tuning.calibration", _stub_calibration, b"\1", "KeyError: 'all_reduce'"),
    ("fuzz_env_knobs", "env.parse_bytes", _stub_raise, b"4M", "KeyError: 'a contract-breaking stub'"),
    ("fuzz_sweep_json", "report.load", _stub_raise, b"\1", "KeyError: 'a contract-breaking stub'"),
    ("fuzz_segment_header", "lib", lambda: _segment_stub(42), b"\0", "AssertionError: status 42"),
    ("fuzz_segment_header", "lib", lambda: _segment_stub(3, delay=0.6), b"\0", "AssertionError: attaching took"),
])
def test_harness_fails_on_a_broken_contract(harness, target, stub, data, error, monkeypatch):
    """The harness is no test that cannot fail: with its parser replaced by one that breaks the
    contract (raises something else, returns an unknown status, hangs), TestOneInput raises."""
    monkeypatch.setenv("NCL_TUNING_FILE", "")  # fuzz_tuning_file points it at its scratch file: restored after
    module = importlib.import_module(harness)
    if harness == "fuzz_segment_header":
        module.real_segment()  # with the real C core, before the stub replaces it
        stub = stub()
    owner, _, name = target.rpartition(".")
    monkeypatch.setattr(getattr(module, owner) if owner else module, name, stub)
    with pytest.raises((KeyError, AssertionError)) as info:
        module.TestOneInput(data)
    assert info.exconly().startswith(error), info.exconly()
