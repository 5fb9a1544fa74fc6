"""Pools of live ranks for the multi-process tests and the benchmarks, and the data and numpy references the
tests share.

Starting Python processes per test is too slow, so a `RankPool` keeps `size` ranks alive (started by the
supervisor's Group, ncl/supervisor.py, in multiprocessing's "spawn" context; one `ncl.init(rank, size,
unique_id)` each) and serves requests over one Pipe per rank: `(fn, args, kwargs)` runs `fn(comm, *args,
**kwargs)` on every rank and answers `("ok", result)` or `("err", type name, message, traceback, MRO names)`.
`fn` must be a module-level function (pickled by reference, imported again in the worker), so
everything it needs besides `comm` goes in its arguments.

With local_rank0 (the benchmarks: pytest-benchmark times code in the pytest process only), rank 0 is
`pool.comm`, in this process, and the caller runs rank 0's part itself between `send` and `collect`.

A pool that timed out, lost a rank or saw a group failure (an NclError) is killed and marked
dead; `Pools` (the `pool_factory` fixture, conftest.py, and the benchmarks' `rank_group`) then starts a fresh
one for the next test.

References: every rank's data is a pure function of (seed, rank), so each worker recomputes
its peers' data and builds the expected result with numpy alone, independent of ncl.
"""
import contextlib
import glob
import hashlib
import json
import multiprocessing.connection as mpc
import os
import signal
import subprocess
import sys
import textwrap
import time
import traceback
import zlib
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence

import ml_dtypes
import numpy as np

from ncl import supervisor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Most pools use tiny staging so that a few thousand elements already span many chunks.
SMALL_STAGING = (("NCL_BUFFSIZE", "8192"), ("NCL_P2P_BUFFSIZE", "4096"))
DEFAULT_ENV = {"NCL_TIMEOUT": "60"}
# Knobs the harness owns: cleared in workers before the pool's env is applied (the others,
# e.g. NCL_KERNEL_ISA or NCL_SPIN_US, pass through so CI can sweep them over the whole suite).
_CONTROLLED = ("NCL_RANK", "NCL_WORLD_SIZE", "NCL_LOCAL_RANK", "NCL_UNIQUE_ID", "NCL_BUFFSIZE",
               "NCL_P2P_BUFFSIZE", "NCL_ALGO", "NCL_TIMEOUT")
# After the first rank fails, how long the others get to answer before the pool is killed
# (they are often blocked in a collective the failed rank never entered).
GRACE_S = 10.0


class RankError(NamedTuple):
    rank: int
    type_name: str
    message: str
    traceback: str
    mro: tuple          # names of the exception's classes, most derived first

    def is_a(self, name: str) -> bool:
        return name in self.mro

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.type_name}: {self.message}"


def _error_reply(exc: BaseException):
    return ("err", type(exc).__name__, str(exc), traceback.format_exc(), tuple(c.__name__ for c in type(exc).__mro__))


@contextlib.contextmanager
def scoped_environ(values: Mapping[str, str], remove: Sequence[str] = _CONTROLLED):
    """os.environ without `remove` and with `values`, restored afterwards (ncl reads its knobs
    when a communicator is created, so this only needs to last through ncl.init)."""
    saved = {name: os.environ.get(name) for name in set(remove) | set(values)}
    try:
        for name in remove:
            os.environ.pop(name, None)
        os.environ.update(values)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _worker(rank: int, size: int, unique_id: str, env: Dict[str, str], controlled: Sequence[str], conn,
            abort_on_load_error: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for name in controlled:
        os.environ.pop(name, None)
    os.environ.update(env)
    try:
        import ncl
        conn.send(("ok", os.getpid()))  # started; now join the group
        comm = ncl.init(rank=rank, size=size, unique_id=unique_id)
    except BaseException as exc:
        conn.send(_error_reply(exc))
        return
    conn.send(("ok", None))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the parent went away
        except BaseException as exc:  # fn could not be unpickled (import error in the test module)
            if abort_on_load_error:
                comm.abort()  # a local rank 0 is about to wait for this rank: let it fail now
            conn.send(_error_reply(exc))
            continue
        if request == "close":
            try:
                comm.close()
                reply = ("ok", None)
            except BaseException as exc:
                reply = _error_reply(exc)
            conn.send(reply)
            return
        fn, args, kwargs = request
        try:
            reply = ("ok", fn(comm, *args, **kwargs))
        except BaseException as exc:
            reply = _error_reply(exc)
        try:
            conn.send(reply)
        except Exception as exc:  # an unpicklable result
            conn.send(_error_reply(exc))


class RankPool:
    """`size` live ranks of one communicator; see the module docstring."""

    def __init__(self, size: int, env: Optional[Dict[str, str]] = None, *, startup_timeout: float = 120,
                 local_rank0: bool = False, controlled: Sequence[str] = _CONTROLLED):
        import ncl  # the parent only needs the unique id (and with local_rank0, its rank)
        self.size = size
        self.env = {**DEFAULT_ENV, **(env or {})}
        self.unique_id = ncl.get_unique_id()
        self.dead = False
        self.calls = 0
        self.comm = None
        self.controlled = tuple(controlled)  # knobs cleared before env applies; the other NCL_* pass through
        self._group = supervisor.Group(new_session=False, job_id=self.unique_id)
        self._conns: Dict[int, Any] = {}  # remote rank -> its end of the pipe
        for r in range(1 if local_rank0 else 0, size):
            parent_end, child_end = mpc.Pipe()
            self._group.start_function(_worker, r, size, self.unique_id, self.env, self.controlled, child_end,
                                       local_rank0, name=f"ncl-test-{size}-rank{r}")
            child_end.close()
            self._conns[r] = parent_end
        try:
            started, missing = self.collect(startup_timeout)  # every worker has imported ncl
            errors = self.errors(started)
            if not errors and not missing:
                if local_rank0:
                    self._join_here(ncl)
                joined, missing = self.collect(startup_timeout)  # and joined the group
                errors = self.errors(joined)
        except BaseException:
            self.kill()
            raise
        if errors or missing:
            self.kill()
            raise RuntimeError(f"pool of {size} ranks {self.env} failed to start: "
                               + "; ".join(map(str, errors)) + (f"; ranks {missing} never answered" if missing else ""))
        self.pids = [os.getpid()] * local_rank0 + [started[r][1] for r in self._conns]

    def _join_here(self, ncl) -> None:
        """Rank 0's ncl.init in this process; if it fails, the error names what the other ranks said."""
        try:
            with scoped_environ(self.env, self.controlled):
                self.comm = ncl.init(rank=0, size=self.size, unique_id=self.unique_id)
        except Exception as exc:
            replies, missing = self.collect(GRACE_S)
            said = [str(e) for e in self.errors(replies)] + [f"ranks {missing} silent"] * bool(missing)
            raise RuntimeError(f"{self!r}: rank 0 could not join: {exc!r}; " + "; ".join(said)) from exc

    def __repr__(self) -> str:
        return f"<RankPool size={self.size} env={self.env} {'dead' if self.dead else 'live'}>"

    # ---- requests -----------------------------------------------------------------------------
    def send(self, fn, args=(), kwargs=None) -> None:
        """Ask every remote rank to run fn(comm, *args, **kwargs)."""
        for conn in self._conns.values():
            conn.send((fn, args, kwargs or {}))

    def collect(self, timeout: float):
        """One reply from each remote rank by rank, and the ranks that did not answer in time; after an
        error reply the others get GRACE_S more."""
        deadline = time.monotonic() + timeout
        pending = {conn: r for r, conn in self._conns.items() if not conn.closed}
        replies: Dict[int, tuple] = {}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for conn in mpc.wait(list(pending), timeout=left):
                r = pending.pop(conn)
                try:
                    replies[r] = conn.recv()
                except (EOFError, OSError):
                    code = self._group.code(list(self._conns).index(r), wait_s=1)
                    replies[r] = ("err", "RankDied", f"rank {r} died (exit code {code})", "", ("RankDied",))
                if replies[r][0] != "ok":
                    deadline = min(deadline, time.monotonic() + GRACE_S)
        return replies, sorted(pending.values())

    @staticmethod
    def errors(replies) -> List[RankError]:
        return [RankError(r, *rep[1:]) for r, rep in sorted(replies.items()) if rep[0] != "ok"]

    def _call(self, fn, args, kwargs, timeout: float):
        if self.dead:
            raise RuntimeError(f"{self!r} is dead")
        assert self.comm is None, "run() serves pools of remote ranks only: with local_rank0, use send and collect"
        self.calls += 1
        try:
            self.send(fn, args, kwargs)
            replies, missing = self.collect(timeout)
        except BaseException:  # pytest-timeout, Ctrl-C, a broken pipe: ranks are in an unknown state
            self.kill()
            raise
        errors = self.errors(replies)
        if missing or any(e.is_a("NclError") or e.type_name == "RankDied" for e in errors):
            self.kill()  # a rank is stuck or the communicator is broken: the next test gets a fresh pool
        return replies, errors, missing

    def run(self, fn, *args, timeout: float = 60, **kwargs) -> List[Any]:
        """fn(comm, *args, **kwargs) on every rank; the per-rank results, in rank order."""
        replies, errors, missing = self._call(fn, args, kwargs, timeout)
        where = f"{fn.__name__} on {self.size} ranks"
        if errors:
            text = "\n".join(f"--- {e}\n{e.traceback}" for e in errors)
            if missing:
                text += f"\n--- ranks {missing} did not answer within {GRACE_S:.0f} s after that (pool killed)"
            raise AssertionError(f"{where}: {len(errors)} rank(s) failed:\n{text}")
        if missing:
            raise TimeoutError(f"{where}: ranks {missing} did not answer within {timeout:g} s (deadlock?)")
        return [replies[r][1] for r in range(self.size)]

    def run_expect_error(self, fn, *args, timeout: float = 60, **kwargs) -> List[RankError]:
        """fn on every rank, where every rank must raise; the per-rank errors."""
        replies, errors, missing = self._call(fn, args, kwargs, timeout)
        where = f"{fn.__name__} on {self.size} ranks"
        if missing:
            raise TimeoutError(f"{where}: ranks {missing} did not answer within {timeout:g} s (deadlock?); "
                               f"errors so far: {'; '.join(map(str, errors))}")
        ok = [r for r, rep in sorted(replies.items()) if rep[0] == "ok"]
        if ok:
            raise AssertionError(f"{where}: ranks {ok} returned {[replies[r][1] for r in ok]} instead of raising")
        return errors

    # ---- lifetime -----------------------------------------------------------------------------
    def kill(self) -> None:
        """Stop everything now (after a failure): abort a local rank 0, SIGKILL and reap the others."""
        if self.comm is not None:
            self.comm.abort()
            self.comm.close()
            self.comm = None
        self._group.kill()
        for conn in self._conns.values():
            conn.close()
        self.dead = True

    def close(self, timeout: float = 30) -> List[str]:
        """Close every rank's communicator and join the workers; problems found, as text."""
        if self.dead:
            return []
        problems = []
        try:
            for conn in self._conns.values():
                conn.send("close")
            if self.comm is not None:
                self.comm.close()
            replies, missing = self.collect(timeout)
            problems += [f"{self!r} close: {e}" for e in self.errors(replies)]
            if missing:
                problems.append(f"{self!r} close: ranks {missing} did not answer within {timeout:g} s")
        except Exception as exc:
            problems.append(f"{self!r} close: {exc!r}")
        deadline = time.monotonic() + 10
        codes = [self._group.code(i, wait_s=max(0.0, deadline - time.monotonic())) for i in range(len(self._conns))]
        stuck = [r for r, code in zip(self._conns, codes) if code is None]
        if stuck:
            problems.append(f"{self!r}: ranks {stuck} did not exit after close")
        self.kill()
        return problems

    def shm_leftovers(self) -> List[str]:
        """Files in /dev/shm named after this pool's unique id (the C core's prefix)."""
        return self._group.leftovers()


class Pools:
    """Live pools cached by (size, env), a dead one replaced by a fresh one (`make(size, env)`); `close()`
    closes them all at the end of a session and returns the problems met, shared memory left behind included
    (removed, so that one failure does not pollute later runs)."""

    def __init__(self, make: Callable[[int, Dict[str, str]], Any]):
        self.make = make
        self.live: Dict[tuple, Any] = {}
        self.retired: List[Any] = []

    def get(self, size: int, env: Optional[Mapping[str, str]] = None):
        key = (size, tuple(sorted(dict(env or {}).items())))
        pool = self.live.get(key)
        if pool is None or pool.dead:
            if pool is not None:
                self.retired.append(pool)
            pool = self.live[key] = self.make(size, dict(key[1]))
        return pool

    def close(self) -> List[str]:
        problems = []
        for pool in [*self.live.values(), *self.retired]:
            problems += pool.close()
            leftovers = pool.shm_leftovers()
            if leftovers:
                problems.append(f"{pool!r} left {leftovers} in /dev/shm")
                for path in leftovers:
                    os.unlink(path)
        return problems


def popen_then_signal(signum: int, started: list, real_popen=subprocess.Popen):
    """A stand-in for subprocess.Popen that starts the process, keeps it in `started`, then raises `signum`
    in this process: a signal that lands after the fork and before the caller holds the handle."""
    def popen(*a, **kw):
        proc = real_popen(*a, **kw)
        started.append(proc)
        signal.raise_signal(signum)
        return proc
    return popen


def pid_alive(pid: int) -> bool:
    """Whether a process runs (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"


# ---- data and numpy references ------------------------------------------------------------------
DTYPES = {
    "float32": np.dtype(np.float32), "float64": np.dtype(np.float64), "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16), "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8),
    "int32": np.dtype(np.int32), "int64": np.dtype(np.int64),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn), "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}
FLOATS = ("float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
OPS = ("SUM", "PROD", "MIN", "MAX", "AVG")
_BINARY = {"SUM": np.add, "AVG": np.add, "PROD": np.multiply, "MIN": np.minimum, "MAX": np.maximum}


def case_seed(*parts: Any) -> int:
    """A seed that differs per case and is the same in every process (unlike hash())."""
    return zlib.crc32(repr(parts).encode())


def rank_data(seed: int, rank: int, shape: Sequence[int], dtype: str, op: Optional[str] = None) -> np.ndarray:
    """Rank `rank`'s data for a case: distinct per rank, reproducible anywhere.  Ranges keep
    float sums and products finite; PROD gets small ints; AVG of int64 keeps the exact sum in
    range (the other integer ranges are full: SUM/PROD wrap exactly as the numpy reference does)."""
    rng = np.random.default_rng(seed * 1000 + rank)
    shape = tuple(shape)
    dt = DTYPES[dtype]
    if dtype in FLOATS:
        if op == "PROD":
            v = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
        else:
            v = rng.uniform(-100.0, 100.0, shape)
        return v.astype(dt)
    info = np.iinfo(dt)
    if op == "PROD":
        return rng.integers(max(info.min, -3), 4, shape).astype(dt)
    if op == "AVG" and dtype == "int64":
        return rng.integers(-(1 << 40), 1 << 40, shape, dtype=np.int64)
    return rng.integers(info.min, info.max, shape, dtype=dt, endpoint=True)


def reference_reduce(datas: Sequence[np.ndarray], op: str) -> np.ndarray:
    """The elementwise reduction strictly in rank order: float16/bfloat16 and the fp8 types
    accumulate in float32 and round once (fp8: ml_dtypes' rounding, the core's rule); AVG is sum / n
    (integers: the exact sum, truncated toward zero)."""
    dt = datas[0].dtype
    n = len(datas)
    if dt.kind in "iu":
        if op == "AVG":
            total = np.zeros(datas[0].shape, np.int64)
            for d in datas:
                total = total + d.astype(np.int64)
            return np.where(total >= 0, total // n, -((-total) // n)).astype(dt)
        acc = datas[0].copy()
        for d in datas[1:]:
            acc = _BINARY[op](acc, d)
        return acc
    wide = dt if dt in (np.dtype(np.float32), np.dtype(np.float64)) else np.dtype(np.float32)
    acc = datas[0].astype(wide)
    for d in datas[1:]:
        acc = _BINARY[op](acc, d.astype(wide))
    if op == "AVG":
        acc = acc / wide.type(n)
    return acc.astype(dt)


def as_numpy(x: Any) -> np.ndarray:
    """A numpy view of a numpy array or torch tensor (bfloat16 and fp8 as ml_dtypes' types)."""
    if isinstance(x, np.ndarray):
        return x
    name = str(x.dtype).removeprefix("torch.")
    if name in ML_DTYPE_NAMES:
        return x.view(_torch_bits(x.element_size())).numpy().view(DTYPES[name])
    return x.numpy()


ML_DTYPE_NAMES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")  # numpy has them through ml_dtypes only


def _torch_bits(itemsize: int):
    import torch
    return {1: torch.uint8, 2: torch.int16}[itemsize]


def as_torch(a: np.ndarray):
    """A torch tensor sharing `a`'s memory (bfloat16 and fp8 included)."""
    import torch
    if a.dtype.name in ML_DTYPE_NAMES:
        return torch.from_numpy(a.view(f"i{a.itemsize}")).view(getattr(torch, a.dtype.name))
    return torch.from_numpy(a)


def garbage_like(a: np.ndarray, shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """An output buffer full of 0xAB bytes, so that unwritten elements show."""
    out = np.empty(a.shape if shape is None else tuple(shape), a.dtype)
    out.view(np.uint8)[...] = 0xAB
    return out


def mismatch(label: str, got: Any, want: np.ndarray) -> Optional[str]:
    """None when got equals want bitwise (dtype, shape and bytes); else a readable line."""
    g = as_numpy(got) if got is not None else None
    if g is None or g.dtype != want.dtype or g.shape != want.shape:
        desc = "None" if g is None else f"{g.dtype}{g.shape}"
        return f"{label}: got {desc}, want {want.dtype}{want.shape}"
    unsigned = f"u{want.dtype.itemsize}"
    bad = np.flatnonzero(np.ascontiguousarray(g).view(unsigned).ravel() != np.ascontiguousarray(want).view(unsigned).ravel())
    if bad.size == 0:
        return None
    i = bad[0]
    gv, wv = g.ravel()[i], want.ravel()[i]
    if want.dtype.itemsize == 2 and want.dtype.kind not in "iu":
        gv, wv = float(gv), float(wv)
    return f"{label}: {bad.size} of {want.size} elements differ, first at flat index {i}: got {gv!r}, want {wv!r}"


def digest(x: Any) -> str:
    return hashlib.sha1(np.ascontiguousarray(as_numpy(x)).tobytes()).hexdigest()


def report(failures: Sequence[str], limit: int = 25) -> str:
    """Failures as an assertion message: the first `limit`, then how many more."""
    lines = list(failures[:limit])
    if len(failures) > limit:
        lines.append(f"... and {len(failures) - limit} more")
    return f"{len(failures)} failure(s):\n" + "\n".join(lines)


# ---- whole programs on N ranks ---------------------------------------------------------------------
def start_ranks(group: supervisor.Group, n: int, argv: Sequence[str], env: Optional[Dict[str, str]] = None,
                **popen) -> List[subprocess.Popen]:
    """n ranks of argv started by the test itself, with no launcher (so nobody stops the survivors of a failure
    but the test: leaving the group's block does), each with its NCL_RANK and the job's NCL_UNIQUE_ID."""
    import ncl
    uid = ncl.get_unique_id()
    return [group.start(list(argv), env=dict(os.environ, NCL_RANK=str(r), NCL_WORLD_SIZE=str(n), NCL_UNIQUE_ID=uid,
                                              **(env or {})), **popen)
            for r in range(n)]


def mapped_lines(maps_path):
    """The lines of a /proc/<pid>/maps file; none if the process ended meanwhile."""
    try:
        with open(maps_path) as f:
            return f.readlines()
    except OSError:
        return []


def ncl_files():
    return {f for f in os.listdir("/dev/shm") if f.startswith("ncl-")}


def spawn(n, code, *, timeout=60, env=None):
    """Start n ranks directly (no launcher, so nobody stops the survivors for us); return
    their (exit codes, stdout lines, seconds)."""
    with supervisor.Group(new_session=False) as group:
        procs = start_ranks(group, n, [sys.executable, "-c", textwrap.dedent(code)], env, stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
        start = time.monotonic()
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], "".join(outs).splitlines(), time.monotonic() - start


def launch(n, code, *, timeout=60, env=None, extra=()):
    """Run `code` on n ranks under ncl-run; return (exit code, stdout, stderr, seconds)."""
    full_env = dict(os.environ, **(env or {}))
    cmd = [sys.executable, "-m", "ncl.run", "-n", str(n), *extra, sys.executable, "-c", textwrap.dedent(code)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start


def ncl_run_argv(n: int, program: str, *args: str) -> List[str]:
    """The command that runs a Python program on n ranks with ncl-run."""
    return [sys.executable, "-m", "ncl.run", "-n", str(n), sys.executable, program, *args]


def program_failures(argv: Sequence[str], out_dir: str, n: int, env: Optional[Dict[str, str]] = None,
                     timeout: float = 280) -> List[str]:
    """Run a multi-rank program that writes out_dir/rank<r>.json ({"rank", "failures", ...});
    assert it succeeded and every rank reported; the failures of all ranks."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("NCL_", "PMI_"))}
    environ.update(env or {})
    proc = supervisor.run(list(argv), timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ)
    assert proc.code is not None, f"timed out after {timeout:g} s (job stopped): {proc.stderr[-4000:]}"
    assert proc.code == 0, proc.stderr[-4000:]
    reports = []
    for path in sorted(glob.glob(os.path.join(str(out_dir), "rank*.json"))):
        with open(path) as f:
            reports.append(json.load(f))
    assert sorted(r["rank"] for r in reports) == list(range(n)), proc.stderr[-3000:]
    return [f for r in reports for f in r["failures"]]
