"""Call: one collective as a Communicator method validated it, the only thing a backend gets.

A public method checks its arguments once (every ValueError/TypeError before any rank
communicates), then builds one Call and hands it to its backend (ncl/backend.py).  The wrappers
around the backend (async Work, NCL_DEBUG tracing, emulation, the flight record's failure dump)
read the same Call: nothing below the Communicator re-validates or asks C what Python knew.
(One call skips it while no wrapper is on: an all_reduce of a plain numpy array or torch tensor goes
to the backend's all_reduce with the same fields, see ncl/comm.py.)

Fields (-1 or None where the collective has no such thing):
    collective   "all_reduce", "reduce", ..., "send", "recv", "barrier": the C core's names
    send, recv   cffi pointers to the first element (ffi.NULL where this rank has no such buffer)
    count        elements as the C core counts them, so its flight record agrees: the whole buffer
                 for all_reduce, reduce and broadcast; one rank's block for all_gather, gather,
                 reduce_scatter and scatter; one peer's block for all_to_all; everything this rank
                 sends for all_to_allv; the message for send and recv; 0 for barrier
    dtype        NCL_* dtype code (ncl/dtypes.py), -1 for barrier
    op           NCL_* reduction code, -1 for collectives that do not reduce
    root         the root, or the peer of send and recv
    algo         NCL_ALGO_* for all_reduce (NCL_ALGO_AUTO: the backend picks)
    send_counts, recv_counts   all_to_allv: elements per peer, in peer order (tuples of ints)
    matrix, row  all_to_allv(all_counts=): rows [sender, receiver] as an int64 (N, N) array, known
                 on every rank, and elements per row
Slotted and built positionally by Call.of: it is on every call's path (~0.15 µs).
"""
from .dtypes import nbytes


_new = object.__new__


class Call:
    __slots__ = ("collective", "send", "recv", "count", "dtype", "op", "root", "algo", "send_counts", "recv_counts",
                 "matrix", "row")

    @staticmethod
    def of(collective: str, send, recv, count: int, dtype: int, op: int = -1, root: int = -1, algo: int = 0,
           send_counts=None, recv_counts=None, matrix=None, row: int = 1) -> "Call":
        """A new Call (a factory rather than __init__: calling a class costs 40 ns more)."""
        c = _new(Call)
        c.collective = collective
        c.send = send
        c.recv = recv
        c.count = count
        c.dtype = dtype
        c.op = op
        c.root = root
        c.algo = algo
        c.send_counts = send_counts
        c.recv_counts = recv_counts
        c.matrix = matrix
        c.row = row
        return c

    @property
    def nbytes(self) -> int:
        """count in bytes (what the flight record reports as the call's bytes)."""
        return nbytes(self.count, self.dtype)

    def __repr__(self) -> str:
        unset = {"op": -1, "root": -1, "algo": 0, "row": 1}
        fields = [f"{name}={value!r}" for name in self.__slots__[3:] for value in [getattr(self, name)]
                  if value is not None and (name not in unset or unset[name] != value)]
        return f"Call({self.collective!r}, {', '.join(fields)})"

