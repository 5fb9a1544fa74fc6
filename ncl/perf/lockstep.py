"""Backends that take turns size by size (ncl-perf --interleave size), both sides of the turn.

This host's speed flips between modes within seconds, so a whole sweep of one backend and then
one of another compare sizes measured in different modes.  Here every backend's ranks start at
once and each waits on a pipe of its own (a FIFO per rank, read in a blocking call: no CPU spent)
until ncl-perf gives it its turn: for each size and round every backend in turn runs that one
size (out of place, then in place) while the others sleep, the first backend rotating by round
and size so that none always runs first.  The first turn waits until every backend says it is
ready (its ranks started, its library loaded): DeepSpeed builds its op with g++ at first use, and
the first backend's first turns ran beside that build (ncl 8 B at 6 µs in round 1, 2 in round 3).
A backend whose launcher exits early loses its remaining turns; the others go on.
"""
import contextlib
import json
import os
import subprocess
import tempfile
from typing import Callable, Dict, List

from .. import supervisor

GO = b"go\n"
READY = {"ready": True}  # the line a backend's rank 0 prints once its ranks are set up


def say_ready(rank: int) -> None:
    """The worker's side of READY (rank 0 prints it, after a barrier of the backend's ranks)."""
    if rank == 0:
        print(json.dumps(READY), flush=True)


class Turns:
    """The worker's side: this rank's pipe, opened once (the parent holds it open, so the open does
    not block; when the parent closes it, a rank still waiting reads the end and stops)."""

    def __init__(self, gate: str, rank: int):
        self.fifo = open(os.path.join(gate, str(rank)), "rb", buffering=0)

    def next(self) -> bool:
        """Block until ncl-perf gives this rank its next turn (False: there are no more)."""
        return self.fifo.read(len(GO)) == GO

    def close(self) -> None:
        self.fifo.close()


def order(backends: List[str], turn: int) -> List[str]:
    """The backends of one turn, the first rotating with the turn number."""
    k = turn % len(backends)
    return backends[k:] + backends[:k]


class _Gates:
    """One FIFO per rank and backend, held open for writing and reading by this process, so that a
    turn given before a rank opens its pipe waits in it, and no open ever blocks."""

    def __init__(self, root: str, backends: List[str], n: int):
        self.dirs = {b: os.path.join(root, f"gate-{b}") for b in backends}
        self.fds: Dict[str, List[int]] = {}
        for b, d in self.dirs.items():
            os.mkdir(d)
            for r in range(n):
                os.mkfifo(os.path.join(d, str(r)))
            self.fds[b] = [os.open(os.path.join(d, str(r)), os.O_RDWR) for r in range(n)]

    def give(self, backend: str) -> None:
        for fd in self.fds[backend]:
            os.write(fd, GO)

    def close(self) -> None:
        for fds in self.fds.values():
            for fd in fds:
                os.close(fd)


def _await_ready(proc, write: Callable[[str], None]) -> bool:
    """Read a launcher's output up to its READY line (the rest passed to write); False if it ended first."""
    for text in proc.stdout:
        try:
            if json.loads(text) == READY:
                return True
        except json.JSONDecodeError:
            pass
        write(text.rstrip("\n"))
    return False


def run(backends: List[str], n: int, turns: List[tuple], command: Callable[[str, str, str], tuple],
        on_row: Callable[[str, tuple, dict], None], write: Callable[[str], None]) -> Dict[str, int]:
    """Run every backend's ranks at once and give them turns: `turns` lists what each turn runs (its
    size and round, passed back to on_row), command(backend, gate dir, scratch dir) gives (argv, env)
    of a backend's launcher, on_row(backend, turn, row) gets each JSON row rank 0 prints (two per
    turn), write the rest of their output.  The launchers' exit codes by backend."""
    codes: Dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="ncl-perf-") as tmp, supervisor.Group() as group:
        gates = _Gates(tmp, backends, n)
        with contextlib.ExitStack() as stack:
            stack.callback(gates.close)
            procs = {}
            for b in backends:
                scratch = os.path.join(tmp, f"scratch-{b}")
                os.mkdir(scratch)
                argv, env = command(b, gates.dirs[b], scratch)
                proc = group.start(argv, stdout=subprocess.PIPE, text=True, env=env)
                if proc is None:  # a signal is stopping the group
                    return {b: 1 for b in backends}
                procs[b] = proc
            for b in backends:  # every backend set up before anyone's first turn
                if not _await_ready(procs[b], write):
                    codes[b] = procs[b].wait() or 1
            for i, turn in enumerate(turns):
                alive = [b for b in backends if b not in codes]
                if not alive:  # every launcher ended early
                    break
                for b in order(alive, i):
                    gates.give(b)
                    got = 0
                    while got < 2:
                        text = procs[b].stdout.readline()
                        if not text:  # its launcher ended early: no more turns for it
                            codes[b] = procs[b].wait() or 1
                            break
                        try:
                            row = json.loads(text)
                        except json.JSONDecodeError:
                            write(text.rstrip("\n"))
                            continue
                        on_row(b, turn, row)
                        got += 1
        for b, proc in procs.items():
            for text in proc.stdout:  # anything after the last turn (a launcher's farewell)
                write(text.rstrip("\n"))
            codes.setdefault(b, proc.wait())
    return codes
