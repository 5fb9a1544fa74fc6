"""Fixtures shared by the multi-process tests: a session-wide cache of live rank pools; the fast tier."""
import glob
import multiprocessing.process
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import harness` from any rootdir

from harness import Pools, RankPool, mapped_lines, ncl_files  # noqa: E402

# The fast tier, `pytest -m fast` (under 30 s alone): the tests that start no ranks (no rank pool, no ncl-run,
# no mpiexec; a test may run one short helper interpreter, as test_imports does for a fresh `import ncl`).
# Listed by module, so that a new test of a listed module joins the tier; each module names its tests that
# start ranks, which stay out (as does any test using pool_factory).  Under -m fast a listed test that starts
# ranks fails and says so (_fast_tests_start_no_ranks), so the list cannot silently go stale.
FAST_MODULES = {
    "test_imports.py": (),
    "test_call.py": (),
    "test_packaging.py": (),
    "test_topology.py": (),
    "test_parsers.py": (),
    "test_scratch.py": (),
    "test_mxfp4.py": (),
    "test_serving.py": (),
    "test_args.py": (),        # its pool tests stay out by their fixture
    "test_properties.py": (),  # likewise
    "test_kernels.py": ("test_every_instruction_set_gives_the_same_bits",),  # one interpreter per ISA
    "test_llama.py": ("test_tensor_parallel_llama_equals_tp1",),
    "test_exaone.py": ("test_tensor_parallel_exaone_equals_tp1",),
    "test_gpt_oss.py": ("test_sharded_model_equals_the_single_process_model",),
    "test_predict.py": ("test_a_dense_models_calls_are_the_predicted_list",
                        "test_a_moe_models_calls_are_the_predicted_list_given_the_runs_routing"),
}
_LAUNCHERS = ("ncl.run", "ncl-run", "mpiexec")


def pytest_configure(config):
    """The user's cache stays out of the tests: a fresh XDG_CACHE_HOME for the session, which every
    rank process inherits, so that ncl.tuning finds no per-host calibration there (tests see the
    shipped one unless they set their own) and nothing a test writes reaches the real home."""
    config._ncl_cache_home = os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ncl-test-cache-")
    # Ctrl-C as Python has it, however pytest was started: a background job (CI's `&`, nohup) inherits SIGINT
    # ignored, and the tests of Ctrl-C handling raise SIGINT in this process and in the ones it starts (which
    # get the default disposition at exec once this process handles SIGINT rather than ignores it)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "_ncl_cache_home", ""), ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    """Marks the fast tier; tests marked slow (minutes, many GB) run only with NCL_SLOW=1."""
    slow = None if os.environ.get("NCL_SLOW") == "1" else pytest.mark.skip(reason="slow: set NCL_SLOW=1 to run it")
    for item in items:
        rank_tests = FAST_MODULES.get(item.path.name)
        if (rank_tests is not None and item.name.split("[")[0] not in rank_tests
                and "pool_factory" not in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.fast)
        if slow is not None and "slow" in item.keywords:
            item.add_marker(slow)


@pytest.fixture(autouse=True)
def _fast_tests_start_no_ranks(request, monkeypatch):
    """In the fast tier, starting ranks fails the test, naming where to list it."""
    if request.node.get_closest_marker("fast") is None:
        yield
        return

    def refuse(what: str):
        pytest.fail(f"{request.node.nodeid} is in the fast tier but starts {what}: name it among its module's "
                    "tests that start ranks in FAST_MODULES (tests/conftest.py)", pytrace=False)

    popen_init = subprocess.Popen.__init__

    def popen(self, args, *rest, **kwargs):
        words = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        if any(launcher in str(w) for w in words for launcher in _LAUNCHERS):
            refuse(f"ranks ({' '.join(map(str, words))})")
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", lambda self: refuse("a multiprocessing process"))
    yield


@pytest.fixture
def no_leftover_segments():
    """For modules of whole jobs (`pytestmark = pytest.mark.usefixtures(...)`): the test's jobs left nothing
    in /dev/shm."""
    before = ncl_files()
    yield
    # Other jobs on the machine (other test runs) have a segment in /dev/shm while they set up: a leak is a file
    # that stays, mapped by no process.
    left, deadline = ncl_files() - before, time.monotonic() + 2
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left &= ncl_files()
    mapped = {line.rsplit("/", 1)[-1].strip() for maps in glob.glob("/proc/[0-9]*/maps") for line in mapped_lines(maps)
              if "/dev/shm/ncl-" in line}
    assert left - mapped == set(), "a job left shared-memory segments behind"


@pytest.fixture(scope="session")
def pool_factory():
    """pool_factory(size, env_items=()) -> a live RankPool, cached by (size, env).

    A pool killed by a test (timeout, dead rank, group failure) is replaced by a fresh one.
    At the end of the session every pool closes its communicators and joins its workers, and
    /dev/shm must hold nothing named after any pool's unique id."""
    pools = Pools(RankPool)
    yield pools.get
    problems = pools.close()
    assert not problems, "\n".join(problems)
