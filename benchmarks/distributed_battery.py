"""PyTorch's own DistributedTest battery (torch.testing._internal.distributed.distributed_test) on
backend "ncl", against gloo registered as a plugin backend the same way (issue 22 item 6).

    python benchmarks/distributed_battery.py [--backends gloo_plugin ncl] [-k SUBSTRING] [--out FILE]
    python benchmarks/distributed_battery.py --backends ncl --passed-in EARLIER_OUTPUT   # gloo's passes only

For each backend a child process runs the battery's `_DistTestBase` (3 ranks, file://
initialisation, as torch's test_distributed_spawn.py does) with BACKEND set to that name, and
prints one line per test: `<backend> <test> passed|failed|skipped|error`, and at the end a
side-by-side table of the tests either passed.  Both backends are
plugins (`dist.Backend.register_backend`, listed in the battery's "plugin" feature set), so the
battery skips the same tests for both.  At the end: the tests gloo-as-plugin passes and "ncl"
does not, and the counts.  It is heavy (every test that is not skipped spawns 3 processes).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
import unittest

WORLD_SIZE = "3"
TEST_TIMEOUT_S = 90  # a deadlocked test fails after this (the battery's default is 300 s)


def _register_plugins() -> None:
    """Both backends as plugins, in this process and in every rank the battery spawns (they
    import this file again)."""
    import torch.distributed as dist
    from torch.distributed import ProcessGroupGloo
    from torch.testing._internal import common_distributed

    import ncl.torch  # noqa: F401  (registers "ncl")
    if "gloo_plugin" not in dist.Backend.backend_list:
        dist.Backend.register_backend("gloo_plugin", _gloo, devices=["cpu"])
    common_distributed.DistTestCases.backend_feature["plugin"] |= {"gloo_plugin", "ncl"}
    common_distributed.TIMEOUT_DEFAULT = TEST_TIMEOUT_S


def _gloo(store, rank, size, timeout):
    from torch.distributed import ProcessGroupGloo
    return ProcessGroupGloo(store, rank, size, timeout)


if os.environ.get("BACKEND"):  # a child (or a rank it spawned): the battery's class
    _register_plugins()
    from torch.testing._internal.distributed.distributed_test import DistributedTest, TestDistBackend

    class TestDistBackendWithSpawn(TestDistBackend, DistributedTest._DistTestBase):
        def setUp(self):
            super().setUp()
            self._spawn_processes()


class _Lines(unittest.TestResult):
    """One printed line per test as it ends."""

    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend

    def _line(self, test, outcome: str) -> None:
        print(f"{self.backend} {test.id().rsplit('.', 1)[-1]} {outcome}", flush=True)

    def addSuccess(self, test):
        self._line(test, "passed")

    def addFailure(self, test, err):
        self._line(test, "failed")

    def addError(self, test, err):
        self._line(test, "error")

    def addSkip(self, test, reason):
        self._line(test, "skipped")

    def addExpectedFailure(self, test, err):
        self._line(test, "passed")

    def addUnexpectedSuccess(self, test):
        self._line(test, "failed")


def _child(backend: str, pattern: str, names: list) -> None:
    suite = unittest.TestLoader().loadTestsFromTestCase(TestDistBackendWithSpawn)
    tests = [t for t in suite if pattern in t.id() and (not names or t.id().rsplit(".", 1)[-1] in names)]
    unittest.TestSuite(tests).run(_Lines(backend))


def _run(backend: str, pattern: str, names: list) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NCL_")}
    with tempfile.TemporaryDirectory() as tmp:
        env.update(BACKEND=backend, WORLD_SIZE=WORLD_SIZE, TEMP_DIR=tmp, NCL_TIMEOUT="60")
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", "-k", pattern, *names], env=env,
                                stdout=subprocess.PIPE, text=True)
        outcomes = {}
        for line in proc.stdout:
            parts = line.split()
            if len(parts) == 3 and parts[0] == backend:
                outcomes[parts[1]] = parts[2]
                print(line, end="", flush=True)
        proc.wait()
    return outcomes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", nargs="+", default=["gloo_plugin", "ncl"])
    ap.add_argument("-k", default="test_", help="run the tests whose name contains this")
    ap.add_argument("--out")
    ap.add_argument("--passed-in", metavar="FILE",
                    help="an earlier run's output: only the tests it shows passing on gloo_plugin, whose outcomes "
                         "there stand for gloo_plugin's")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("names", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(os.environ["BACKEND"], args.k, args.names)
        return
    start = time.monotonic()
    results, names = {}, []
    if args.passed_in:
        with open(args.passed_in) as f:
            earlier = [line.split() for line in f]
        results["gloo_plugin"] = {p[1]: p[2] for p in earlier if len(p) == 3 and p[0] == "gloo_plugin"}
        names = sorted(t for t, o in results["gloo_plugin"].items() if o == "passed")
    results.update({b: _run(b, args.k, names) for b in args.backends})
    lines = [f"DistributedTest battery, {WORLD_SIZE} ranks, torch {__import__('torch').__version__}, "
             f"{time.monotonic() - start:.0f} s"]
    for b, got in results.items():
        counts = {o: sum(1 for v in got.values() if v == o) for o in ("passed", "failed", "error", "skipped")}
        lines.append(f"{b}: " + ", ".join(f"{n} {o}" for o, n in counts.items()))
    if len(results) == 2:
        (ref, ref_got), (mine, mine_got) = results.items()
        missing = sorted(t for t, o in ref_got.items() if o == "passed" and mine_got.get(t) != "passed")
        lines.append(f"passed on {ref} but not on {mine}: {len(missing)}")
        lines += [f"  {t}: {mine_got.get(t, 'not run')}" for t in missing]
        both = sorted(t for t, o in ref_got.items() if o == "passed" and mine_got.get(t) == "passed")
        lines.append(f"passed on both: {len(both)}")
        shown = sorted(t for t in set(ref_got) | set(mine_got) if "passed" in (ref_got.get(t), mine_got.get(t)))
        width = max((len(t) for t in shown), default=4)
        lines.append(f"side by side, every test that passed on either:\n  {'test':<{width}}  {ref:<11}  {mine}")
        lines += [f"  {t:<{width}}  {ref_got.get(t, 'not run'):<11}  {mine_got.get(t, 'not run')}" for t in shown]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
