"""The shared-memory backend: the C core (native/) over one segment that every rank of the
group maps.  `_runner` is the only place that turns a Call into lib.ncl_* arguments (and
`_direct_all_reduce` and `_direct_moe` the Communicator's fast paths, the calls it makes without a
Call); a status other than NCL_OK becomes the matching exception (ncl/_native.py), with the core's
message.

It owns the C communicator handle and its lifetime (destroyed on close or when garbage), the
registered-memory windows and the names of its sub-groups' segments.  The core's flight
recorder (native/flight.c) keeps this rank's last calls; `last_call` reads the newest for the
wrappers that report what the core decided (its algorithm, steps and time).
"""
import weakref
from typing import Optional, Tuple

from . import env, log, tuning
from ._native import check, error, ffi, lib
from .call import Call
from .job import segment_key, segment_name

def _runner(handle):
    """run(call) on this handle: the one mapping of a Call to the core's arguments.  A closure
    with one match, hottest collectives first: it is on every call's path (no self, no table
    of lambdas: each would cost a Python frame more)."""
    all_reduce = lib.ncl_all_reduce  # (a local: the hottest call skips an attribute lookup)

    def run(c: Call) -> None:
        match c.collective:
            case "all_reduce":
                rc = all_reduce(handle, c.send, c.recv, c.count, c.dtype, c.op, c.algo)
            case "all_gather":
                rc = lib.ncl_all_gather(handle, c.send, c.recv, c.count, c.dtype)
            case "reduce_scatter":
                rc = lib.ncl_reduce_scatter(handle, c.send, c.recv, c.count, c.dtype, c.op)
            case "all_to_allv":
                rc = _all_to_allv(handle, c)
            case "broadcast":
                rc = lib.ncl_broadcast(handle, c.send, c.recv, c.count, c.dtype, c.root)
            case "send":
                rc = lib.ncl_send(handle, c.send, c.count, c.dtype, c.root)
            case "recv" if c.root >= 0:
                rc = lib.ncl_recv(handle, c.recv, c.count, c.dtype, c.root)
            case "recv":  # from any source: c.send is where the sender's rank goes
                rc = lib.ncl_recv_any(handle, c.recv, c.count, c.dtype, c.send)
            case "all_to_all":
                rc = lib.ncl_all_to_all(handle, c.send, c.recv, c.count, c.dtype)
            case "reduce":
                rc = lib.ncl_reduce(handle, c.send, c.recv, c.count, c.dtype, c.op, c.root)
            case "gather":
                rc = lib.ncl_gather(handle, c.send, c.recv, c.count, c.dtype, c.root)
            case "scatter":
                rc = lib.ncl_scatter(handle, c.send, c.recv, c.count, c.dtype, c.root)
            case "barrier":
                rc = lib.ncl_barrier(handle)
            case "moe_dispatch":  # c.send: the ncl_moe_dispatch_args ncl/moe.py filled
                rc = lib.ncl_moe_dispatch(handle, c.send)
            case "moe_combine":
                rc = lib.ncl_moe_combine(handle, c.send)
            case _:
                raise ValueError(f"the shared-memory backend has no collective {c.collective!r}")
        if rc:
            raise error(rc)
    return run


def _direct_all_reduce(handle):
    """all_reduce(send, recv, count, dtype, op, algo) on this handle: the Communicator's fast path
    for the commonest call, with what its Call would carry.  It raises ValueError, nothing moved, for
    a recv that overlaps send other than as send itself (in place): the one check the fast path
    leaves to the core (ncl_all_reduce_checked)."""
    ncl_all_reduce_checked = lib.ncl_all_reduce_checked

    def all_reduce(send, recv, count: int, dtype: int, op: int, algo: int) -> None:
        rc = ncl_all_reduce_checked(handle, send, recv, count, dtype, op, algo)
        if rc:
            raise error(rc)
    return all_reduce


def _direct_moe(handle):
    """moe(collective, args) on this handle: the Communicator's fast path for ncl/moe_step.py's
    "moe_dispatch" and "moe_combine", with what their Call would carry (the argument struct)."""
    calls = {"moe_dispatch": lib.ncl_moe_dispatch, "moe_combine": lib.ncl_moe_combine}

    def moe(collective: str, args) -> None:
        rc = calls[collective](handle, args)
        if rc:
            raise error(rc)
    return moe


def _all_to_allv(handle, c: Call) -> int:
    send, recv = ffi.new("uint64_t[]", c.send_counts), ffi.new("uint64_t[]", c.recv_counts)
    if c.matrix is None:
        return lib.ncl_all_to_allv(handle, c.send, send, c.recv, recv, c.dtype)
    return lib.ncl_all_to_allv_known(handle, c.send, send, c.recv, recv, ffi.from_buffer("int64_t[]", c.matrix),
                                     c.row, c.dtype)


class P2PBatch:
    """Sends and recvs progressing together in the core (ncl_p2p_progress): add(call) returns a
    token, progress(wait_s) the tokens of the calls now done.  Ops not yet done are carried
    from round to round (their state lives in the op)."""

    def __init__(self, handle):
        self._handle = handle
        self._ops: list = []  # (token, ncl_p2p_op[1]) not yet done
        self._any: dict = {}  # token -> where a recv from any source puts its sender's rank
        self._next = 0

    def add(self, c: Call) -> int:
        op = ffi.new("ncl_p2p_op[1]")
        send = c.collective == "send"
        op[0].is_send, op[0].peer, op[0].dtype = send, c.root, c.dtype
        op[0].buf, op[0].count = c.send if send else c.recv, c.count
        self._next += 1
        self._ops.append((self._next, op))
        if not send and c.root < 0:
            self._any[self._next] = c.send
        return self._next

    def progress(self, wait_s: float) -> list:
        n = len(self._ops)
        ops = ffi.new("ncl_p2p_op[]", n)
        size = ffi.sizeof("ncl_p2p_op")
        for i, (_, op) in enumerate(self._ops):
            ffi.memmove(ops + i, op, size)
        rc = lib.ncl_p2p_progress(self._handle, ops, n, wait_s)
        for i, (_, op) in enumerate(self._ops):
            ffi.memmove(op, ops + i, size)
        if rc:
            raise error(rc)
        for token, op in self._ops:
            if self._any.get(token) is not None and op[0].state == 2:
                self._any.pop(token)[0] = op[0].peer  # a recv from any source: who sent
        done = [token for token, op in self._ops if op[0].state == 2]
        self._ops = [(token, op) for token, op in self._ops if op[0].state != 2]
        return done


class SharedMemoryBackend:
    """One rank's side of a group on one host (see the module docstring)."""
    single_host = True  # every rank maps every rank's registered memory

    def __init__(self, handle, rank: int, size: int, *, name: str, unique_id: str, label: str, options):
        self.handle = handle
        self.rank, self.size = rank, size
        self.name = name            # this group's name within the job (segment names derive from it)
        self.unique_id = unique_id  # the job's
        self.label = label
        self.options = options
        self.recorder = self
        self._windows = 0
        self._newest = ffi.new("ncl_flight_entry[1]")
        self._destroy = weakref.finalize(self, lib.ncl_comm_destroy, handle)
        self.run = _runner(handle)
        self.all_reduce = _direct_all_reduce(handle)
        self.moe = _direct_moe(handle)

    @classmethod
    def create(cls, name: str, label: str, rank: int, size: int, unique_id: str, options) -> "SharedMemoryBackend":
        """Create (rank 0) or attach to the group's segment; returns once every rank has."""
        out = ffi.new("ncl_comm **")
        check(lib.ncl_comm_create(segment_name(unique_id, name).encode(), segment_key(unique_id, name).encode(), rank,
                                  size, options, out))
        return cls(out[0], rank, size, name=name, unique_id=unique_id, label=label, options=options)

    def last_call(self) -> Optional[Tuple[int, Optional[str], int, float]]:
        e = self._newest[0]
        if lib.ncl_flight_entries(self.handle, self._newest, 1) != 1:
            return None
        return (e.seq, ffi.string(e.algorithm).decode() if e.algorithm else None, e.steps,
                max(e.t_end - e.t_begin, 0.0))

    def moe_take(self, args) -> None:
        """Copy this rank's rows of the moe_dispatch that just ran out of the step (native/moe.c)."""
        check(lib.ncl_moe_take(self.handle, args))

    def moe_combine_steps(self, args) -> int:
        """The steps a moe_combine with these args would take (native/moe.c): 1, more (it needs args.back), 0."""
        return lib.ncl_moe_combine_steps(self.handle, args)

    def p2p_batch(self) -> P2PBatch:
        return P2PBatch(self.handle)

    def window(self, nbytes: int):
        self._windows += 1
        name = segment_name(self.unique_id, f"{self.name}/window{self._windows}").encode()
        out = ffi.new("ncl_window **")
        check(lib.ncl_window_create(self.handle, name, nbytes, out))
        win = out[0]
        memory = ffi.gc(ffi.cast("char *", lib.ncl_window_ptr(win)), lambda _p: lib.ncl_window_free(win), nbytes)
        return ffi.buffer(memory, nbytes)

    def sub_options(self, size: int):
        """A sub-group's options (a split, a shrink): this group's, with the algorithm thresholds of its size."""
        options = ffi.new("ncl_options *", self.options[0])
        options.one_shot_max_bytes, options.direct_min_bytes, options.cma_all_reduce_min_bytes = \
            tuning.thresholds(size)
        return options

    def split(self, index: int, color: int, rank: int, size: int) -> "SharedMemoryBackend":
        """The group of this rank's color in its `index`-th split (collective over its members)."""
        options = self.sub_options(size)
        return SharedMemoryBackend.create(f"{self.name}/split{index}/color{color}",
                                          f"{self.label}.split{index}.color{color}", rank, size, self.unique_id,
                                          options)

    @property
    def closed(self) -> bool:
        return not self._destroy.alive

    def abort(self, reason: Optional[str] = None) -> None:
        if not self.closed:
            lib.ncl_comm_abort(self.handle, reason.encode(errors="backslashreplace") if reason else ffi.NULL)

    def close(self) -> None:
        self._destroy()

    def describe(self) -> str:
        """What this group decided at setup, for NCL_DEBUG=INFO."""
        info, o = ffi.new("ncl_comm_info *"), self.options
        check(lib.ncl_comm_get_info(self.handle, info))

        def at(nbytes: int, never: str = "never") -> str:
            return never if nbytes >= tuning.NEVER else log.size_text(nbytes)
        waiting = ("oversubscribed: no spinning, steps meet at one shared word" if info.central_sync else
                   "spin, then yield, then sleep")
        cma = (f"on from {log.size_text(o.cma_min_bytes)} per peer block" if info.cma else
               "off (NCL_CMA=0)" if not o.cma_min_bytes else "not needed (one rank)" if self.size == 1 else
               "unavailable: the kernel refused process_vm_readv between the ranks (ptrace scope?)")
        forced = f", forced {env.get('NCL_ALGO')}" if tuning.forced_all_reduce_algorithm() else ""
        cma_from = at(o.cma_all_reduce_min_bytes) if info.cma else "never"
        out_streams = at(info.out_stream_min_bytes)  # copy.c: oversubscribed, past a quarter of the cache
        return (f"ready: segment {log.size_text(info.segment_bytes)} (staging 2 x {log.size_text(info.slot_bytes)}"
                f" per rank, send/recv 2 x {log.size_text(info.p2p_slot_bytes)} per pair); {self.size} ranks on "
                f"{info.cpus} CPUs: {waiting}; outputs stream from {out_streams} ({log.size_text(info.cache_bytes)} "
                f"cache); single-copy reads: {cma}; all_reduce: one_shot up to "
                f"{at(o.one_shot_max_bytes, 'any size')}, cma from {cma_from}, "
                f"registered direct from {at(o.direct_min_bytes)}{forced}; "
                f"timeout {o.timeout_s:g} s; flight recorder {o.flight_entries} calls; "
                f"fingerprint checks {'on' if o.verify_calls else 'OFF'}")
