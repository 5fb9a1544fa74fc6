"""Fixtures shared by the multi-process tests: a session-wide cache of live rank pools."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import harness` from any rootdir

from harness import RankPool  # noqa: E402


@pytest.fixture(scope="session")
def pool_factory():
    """pool_factory(size, env_items=()) -> a live RankPool, cached by (size, env).

    A pool killed by a test (timeout, dead rank, group failure) is replaced by a fresh one.
    At the end of the session every pool closes its communicators and joins its workers, and
    /dev/shm must hold nothing named after any pool's unique id."""
    pools = {}
    retired = []

    def get(size: int, env_items=()) -> RankPool:
        key = (size, tuple(sorted(dict(env_items).items())))
        pool = pools.get(key)
        if pool is None or pool.dead:
            if pool is not None:
                retired.append(pool)
            pool = pools[key] = RankPool(size, dict(key[1]))
        return pool

    yield get
    problems = []
    for pool in list(pools.values()) + retired:
        problems += pool.close()
        leftovers = pool.shm_leftovers()
        if leftovers:
            problems.append(f"{pool!r} left {leftovers} in /dev/shm")
            for path in leftovers:  # do not let one failure pollute later runs
                os.unlink(path)
    assert not problems, "\n".join(problems)


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (minutes, many GB) run only with NCL_SLOW=1."""
    if os.environ.get("NCL_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set NCL_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
