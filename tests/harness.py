"""Pools of live ranks for the multi-process tests, and the data and numpy references they share.

Starting Python processes per test is too slow, so a `RankPool` keeps `size` ranks alive (the
multiprocessing "spawn" context, one `ncl.init(rank, size, unique_id)` each) and serves
requests over one Pipe per rank: `(fn, args, kwargs)` runs `fn(comm, *args, **kwargs)` on every
rank and answers `("ok", result)` or `("err", type name, message, traceback, MRO names)`.
`fn` must be a module-level function (pickled by reference, imported again in the worker), so
everything it needs besides `comm` goes in its arguments.

A pool that timed out, lost a rank or saw a group failure (an NclError) is killed and marked
dead; the `pool_factory` fixture (conftest.py) then starts a fresh one for the next test.

References: every rank's data is a pure function of (seed, rank), so each worker recomputes
its peers' data and builds the expected result with numpy alone, independent of ncl.
"""
import glob
import hashlib
import json
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import subprocess
import sys
import time
import traceback
import zlib
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import ml_dtypes
import numpy as np

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


def _worker(rank: int, size: int, unique_id: str, env: Dict[str, str], conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for name in _CONTROLLED:
        os.environ.pop(name, None)
    os.environ.update(env)
    try:
        import ncl
        comm = ncl.init(rank=rank, size=size, unique_id=unique_id)
    except BaseException as exc:
        conn.send(_error_reply(exc))
        return
    conn.send(("ok", os.getpid()))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the parent went away
        except BaseException as exc:  # fn could not be unpickled (import error in the test module)
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

    def __init__(self, size: int, env: Optional[Dict[str, str]] = None, *, startup_timeout: float = 120):
        import ncl  # the parent only needs the unique id
        self.size = size
        self.env = {**DEFAULT_ENV, **(env or {})}
        self.unique_id = ncl.get_unique_id()
        self.dead = False
        self.calls = 0
        ctx = mp.get_context("spawn")
        self._conns, self._procs = [], []
        for r in range(size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(r, size, self.unique_id, self.env, child_end),
                               name=f"ncl-test-{size}-rank{r}", daemon=True)
            proc.start()
            child_end.close()
            self._conns.append(parent_end)
            self._procs.append(proc)
        replies, missing = self._collect(startup_timeout)
        errors = self._errors(replies)
        if errors or missing:
            self.kill()
            raise RuntimeError(f"pool of {size} ranks {self.env} failed to start: "
                               + "; ".join(map(str, errors)) + (f"; ranks {missing} never answered" if missing else ""))
        self.pids = [replies[r][1] for r in range(size)]

    def __repr__(self) -> str:
        return f"<RankPool size={self.size} env={self.env} {'dead' if self.dead else 'live'}>"

    # ---- requests -----------------------------------------------------------------------------
    def _collect(self, timeout: float):
        """Replies by rank, and the ranks that did not answer in time."""
        deadline = time.monotonic() + timeout
        pending = {conn: r for r, conn in enumerate(self._conns)}
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
                    self._procs[r].join(1)
                    replies[r] = ("err", "RankDied", f"rank {r} died (exit code {self._procs[r].exitcode})", "",
                                  ("RankDied",))
                if replies[r][0] != "ok":
                    deadline = min(deadline, time.monotonic() + GRACE_S)
        return replies, sorted(pending.values())

    @staticmethod
    def _errors(replies) -> List[RankError]:
        return [RankError(r, *rep[1:]) for r, rep in sorted(replies.items()) if rep[0] != "ok"]

    def _call(self, fn, args, kwargs, timeout: float):
        if self.dead:
            raise RuntimeError(f"{self!r} is dead")
        self.calls += 1
        try:
            for conn in self._conns:
                conn.send((fn, args, kwargs))
            replies, missing = self._collect(timeout)
        except BaseException:  # pytest-timeout, Ctrl-C, a broken pipe: ranks are in an unknown state
            self.kill()
            raise
        errors = self._errors(replies)
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
        for proc in self._procs:
            if proc.is_alive():
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self._procs:
            proc.join(10)
        for conn in self._conns:
            conn.close()
        self.dead = True

    def close(self, timeout: float = 30) -> List[str]:
        """Close every rank's communicator and join the workers; problems found, as text."""
        if self.dead:
            return []
        problems = []
        try:
            for conn in self._conns:
                conn.send("close")
            replies, missing = self._collect(timeout)
            problems += [f"{self!r} close: {e}" for e in self._errors(replies)]
            if missing:
                problems.append(f"{self!r} close: ranks {missing} did not answer within {timeout:g} s")
        except OSError as exc:
            problems.append(f"{self!r} close: {exc!r}")
        for proc in self._procs:
            proc.join(10)
        stuck = [r for r, p in enumerate(self._procs) if p.is_alive()]
        if stuck:
            problems.append(f"{self!r}: ranks {stuck} did not exit after close")
        self.kill()
        return problems

    def shm_leftovers(self) -> List[str]:
        """Files in /dev/shm named after this pool's unique id (the C core's prefix)."""
        return sorted(glob.glob(f"/dev/shm/ncl-{self.unique_id[:12]}*"))


# ---- data and numpy references ------------------------------------------------------------------
DTYPES = {
    "float32": np.dtype(np.float32), "float64": np.dtype(np.float64), "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16), "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8),
    "int32": np.dtype(np.int32), "int64": np.dtype(np.int64),
}
FLOATS = ("float32", "float64", "float16", "bfloat16")
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
    """The elementwise reduction strictly in rank order: float16/bfloat16 accumulate in float32
    and round once; AVG is sum / n (integers: the exact sum, truncated toward zero)."""
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
    """A numpy view of a numpy array or torch tensor (bfloat16 as ml_dtypes.bfloat16)."""
    if isinstance(x, np.ndarray):
        return x
    import torch
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()


def as_torch(a: np.ndarray):
    """A torch tensor sharing `a`'s memory (bfloat16 included)."""
    import torch
    if a.dtype == DTYPES["bfloat16"]:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
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


def pid_alive(pid: int) -> bool:
    """Whether a process runs (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"


# ---- whole programs on N ranks ---------------------------------------------------------------------
def ncl_run_argv(n: int, program: str, *args: str) -> List[str]:
    """The command that runs a Python program on n ranks with ncl-run."""
    return [sys.executable, "-m", "ncl.run", "-n", str(n), sys.executable, program, *args]


def program_failures(argv: Sequence[str], out_dir: str, n: int, env: Optional[Dict[str, str]] = None,
                     timeout: float = 280) -> List[str]:
    """Run a multi-rank program that writes out_dir/rank<r>.json ({"rank", "failures", ...});
    assert it succeeded and every rank reported; the failures of all ranks."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("NCL_", "PMI_"))}
    environ.update(env or {})
    proc = subprocess.run(list(argv), capture_output=True, text=True, env=environ, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = []
    for path in sorted(glob.glob(os.path.join(str(out_dir), "rank*.json"))):
        with open(path) as f:
            reports.append(json.load(f))
    assert sorted(r["rank"] for r in reports) == list(range(n)), proc.stderr[-3000:]
    return [f for r in reports for f in r["failures"]]
