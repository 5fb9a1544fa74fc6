"""Communicators that span hosts: shared memory inside each host (the C core), MPI between
hosts (ncl.transport.mpi), composed per collective.

Hosts are found by hostname plus boot id (never from environment guesses); NCL_HOSTS=K splits
each real host's ranks into K emulated hosts whose traffic between them must go through MPI,
so the multi-host paths run and are tested on one machine.

Layout words used below: H hosts, L ranks per host when every host has as many ("uniform"),
`local` the host's shared-memory communicator, `rail` the MPI communicator of the ranks with
the same local rank on every host, `leaders` that of local rank 0 of every host.

Algorithms (uniform hosts, ranks numbered host after host):
    all_reduce      local reduce-scatter -> rail all-reduce of each rank's block -> local all-gather
    reduce_scatter  local reduce-scatter of the blocks this local rank's rail owns -> rail reduce-scatter
    all_gather      local all-gather -> rail all-gather of the host blocks
    all_to_all(v)   local all-to-all grouping rows by destination local rank -> rail all-to-all
                    (one message per host pair and rail, as Tutel's two-level all-to-all)
    broadcast       local broadcast on the root's host -> leaders' broadcast -> local broadcasts
Messages up to SMALL_BYTES go through each host's leader in three rounds instead (reduce,
all-gather between leaders, broadcast).  Every inter-host reduction is an all-to-all of pieces, each piece reduced once by ncl's own
kernel in host order, then an all-gather: every rank gets the same bits.  AVG sums in a wider
type and divides once.  Hosts of different sizes (a split, an uneven placement) use the
leaders for all_reduce, all_gather and broadcast and one flat MPI exchange for all_to_all(v);
reduce, gather and scatter go through all_reduce, all_gather and broadcast.
"""
import hashlib
import socket
import sys
import threading
import time
import weakref
from typing import List, Optional, Sequence

import numpy as np

from . import dtypes, elastic, env, log
from ._native import check, ffi, lib
from .call import Call
from .comm import Communicator
from .errors import NclError, NclMismatchError, NclStateError
from .job import get_unique_id
from .shm import SharedMemoryBackend
from .transport.mpi import MpiTransport, abort_at_exit, import_mpi, keep_finalize, ulfm_missing
from .tuning import options

_TAG = 77
# Up to this many bytes a message crosses hosts in the fewest rounds: reduced onto each
# host's leader, exchanged whole between leaders (one all-gather, each reduces every host's
# copy in host order), broadcast back.  Each round costs a scheduling of every rank involved,
# tens of µs when ranks outnumber CPUs, so latency, not bytes, decides small messages.
SMALL_BYTES = 32 << 10


def host_key() -> str:
    """This machine's identity: hostname plus boot id (a container or a reboot is another host)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{socket.gethostname()}/{boot}"


def assign_hosts(keys: Sequence[str], emulated: int) -> List[int]:
    """Host number of each rank: real hosts in order of first appearance, each split into
    `emulated` hosts of consecutive ranks (NCL_HOSTS)."""
    real = {k: [r for r, key in enumerate(keys) if key == k] for k in dict.fromkeys(keys)}
    host_of = [0] * len(keys)
    for i, ranks in enumerate(real.values()):
        if len(ranks) % emulated:
            raise ValueError(f"NCL_HOSTS={emulated} must divide the {len(ranks)} ranks of host {i} "
                             f"({list(real)[i].split('/')[0]})")
        per = len(ranks) // emulated
        for j, r in enumerate(ranks):
            host_of[r] = i * emulated + j // per
    return host_of


def _view(ptr, nbytes: int) -> np.ndarray:
    """The bytes at a C pointer as a uint8 array (no copy)."""
    if not nbytes:
        return np.empty(0, np.uint8)
    return np.frombuffer(ffi.buffer(ffi.cast("char *", ptr), nbytes), np.uint8)


_WIDE = {np.dtype(np.float16): np.float32, np.dtype(np.float32): np.float64, np.dtype(np.float64): np.float64}


def from_mpi(mpi_comm, *, timeout: Optional[float] = None, host_of: Optional[Sequence[int]] = None,
             label: str = "world") -> Communicator:
    """A communicator over the ranks of an mpi4py communicator (see Communicator.from_mpi)."""
    MPI = import_mpi()
    mpi = mpi_comm.Dup()
    rank, size = mpi.Get_rank(), mpi.Get_size()
    opts = options(size, timeout)
    world = MpiTransport(mpi, opts.timeout_s, label)
    keys = world.allgather_obj(host_key())
    machine_ranks = keys.count(keys[rank])  # emulated hosts share this machine's CPUs
    if host_of is None:
        host_of = assign_hosts(keys, env.get("NCL_HOSTS"))
    job = env.get("NCL_UNIQUE_ID") or get_unique_id()
    job = world.allgather_obj(job)[0]
    members = [[r for r in range(size) if host_of[r] == h] for h in sorted(set(host_of))]
    host = sorted(set(host_of)).index(host_of[rank])
    local_rank = members[host].index(rank)
    uid = job[:12] + hashlib.sha256(f"{job}/{label}/host{host}".encode()).hexdigest()[:20]
    local_args = ("world", f"{label}.host{host}", local_rank, len(members[host]), uid,
                  options(len(members[host]), timeout, machine_ranks))
    if len(members) == 1 and local_rank == rank:
        mpi.Free()
        return Communicator._create(*local_args)  # one host: plain shared memory
    local = SharedMemoryBackend.create(*local_args)
    leaders = mpi.Split(0 if local_rank == 0 else MPI.UNDEFINED, host)
    uniform = len({len(m) for m in members}) == 1
    rail = mpi.Split(local_rank, host) if uniform else MPI.COMM_NULL
    return HierarchicalCommunicator(HierarchicalBackend(world, local, leaders, rail, members, host, rank, size,
                                                        label, opts))


class HierarchicalCommunicator(Communicator):
    """A Communicator whose backend spans hosts (HierarchicalBackend): the same methods and
    argument checks; split goes through MPI, and phase_times says where the time went."""

    def phase_times(self, reset: bool = False) -> dict:
        """Seconds this rank spent in shared-memory steps and in MPI exchanges (waiting
        included) since the last reset: where a collective's time goes."""
        return self._backend.phase_times(reset)

    def split(self, color: Optional[int], key: Optional[int] = None) -> Optional[Communicator]:
        color, key = self._split_args(color, key)
        MPI = import_mpi()
        self._splits += 1
        backend = self._backend
        host_of = {r: h for h, m in enumerate(backend.members) for r in m}
        table = backend.world.allgather_obj((color, key))
        sub = backend.world.comm.Split(MPI.UNDEFINED if color is None else color, key)
        if color is None:
            return None
        ranks = sorted((k, r) for r, (c, k) in enumerate(table) if c == color)
        label = f"{self._label}.split{self._splits}.color{color}"
        comm = from_mpi(sub, timeout=self._options.timeout_s, host_of=[host_of[r] for _, r in ranks], label=label)
        sub.Free()
        return comm

    def shrink(self, exclude: Optional[Sequence[int]] = None) -> Optional[Communicator]:
        """As Communicator.shrink, across hosts through MPI's fault tolerance (ULFM; Open MPI 5 under
        `mpiexec --with-ft ulfm`, see transport.mpi.ulfm_missing): the survivors revoke the MPI
        communicator (so ranks still waiting in an exchange leave it), shrink it to the live
        ranks (MPI_Comm_shrink) and build the hierarchy again over those, each keeping its host.
        MPI's shrink keeps every live rank, so exclude must be None."""
        if elastic.check_exclude(exclude, self._size):
            raise ValueError("across hosts shrink() leaves out the failed ranks only (MPI_Comm_shrink keeps every "
                             "live rank): exclude must be None")
        reason = ulfm_missing()
        if reason is not None:
            raise NotImplementedError(f"shrink() of a multi-host communicator: {reason}")
        self._after_pending()
        MPI, backend = import_mpi(), self._backend
        world = backend.world.comm
        world.Revoke()
        # blocking: ULFM's shrink completes despite failed ranks (an agreement among the live ones),
        # but waits for a live rank that never calls it; Open MPI 5.0.11's Ishrink fails (MPI_ERR_INTERN).
        # So a watchdog ends the job at the communicator's deadline rather than let it hang.
        watchdog = threading.Timer(self._options.timeout_s, _shrink_overdue, (MPI, self._rank, self._options.timeout_s))
        watchdog.daemon = True
        watchdog.start()
        try:
            survivors = world.Shrink()
        finally:
            watchdog.cancel()
        old = MPI.Group.Translate_ranks(survivors.Get_group(), list(range(survivors.Get_size())), world.Get_group())
        host_of = {r: h for h, m in enumerate(backend.members) for r in m}
        self._shrinks += 1
        comm = from_mpi(survivors, timeout=self._options.timeout_s, host_of=[host_of[r] for r in old],
                        label=f"{self._label}.shrink{self._shrinks}")
        survivors.Free()
        self.close()
        keep_finalize()  # the failure is survived: exit through MPI_Finalize, not MPI_Abort
        return comm


def _shrink_overdue(MPI, rank: int, timeout_s: float) -> None:
    """A live rank never joined the shrink: no exception can reach the blocked MPI call, so the job ends."""
    sys.stderr.write(f"ncl: rank {rank}: shrink() across hosts did not complete in {timeout_s:g} s (a live rank "
                     "never called it); aborting the MPI job\n")
    sys.stderr.flush()
    MPI.COMM_WORLD.Abort(1)


# the algorithm of each collective, on the Call's fields
_ALGORITHMS = {
    "all_reduce": lambda b, c: b._all_reduce(c.send, c.recv, c.count, c.dtype, c.op),
    "reduce": lambda b, c: b._reduce(c.send, c.recv, c.count, c.dtype, c.op, c.root),
    "reduce_scatter": lambda b, c: b._reduce_scatter(c.send, c.recv, c.count, c.dtype, c.op),
    "broadcast": lambda b, c: b._broadcast(c.send, c.recv, c.count, c.dtype, c.root),
    "all_gather": lambda b, c: b._all_gather(c.send, c.recv, c.count, c.dtype),
    "gather": lambda b, c: b._gather(c.send, c.recv, c.count, c.dtype, c.root),
    "scatter": lambda b, c: b._scatter(c.send, c.recv, c.count, c.dtype, c.root),
    "all_to_all": lambda b, c: b._all_to_allv(c.send, (c.count,) * b.size, c.recv, (c.count,) * b.size, c.dtype),
    "all_to_allv": lambda b, c: b._all_to_allv(c.send, c.send_counts, c.recv, c.recv_counts, c.dtype),
    "send": lambda b, c: b._send(c.send, c.count, c.dtype, c.root),
    "recv": lambda b, c: b._recv(c.recv, c.count, c.dtype, c.root),
    "barrier": lambda b, c: b._barrier(),
}


class HierarchicalBackend:
    """Runs each Call with the algorithm of the same name below (see the module docstring):
    steps of this host's shared-memory backend composed with MPI exchanges between hosts."""
    single_host = False  # registered memory reaches this host's ranks only

    def __init__(self, world: MpiTransport, local: SharedMemoryBackend, leaders, rail, members: List[List[int]],
                 host: int, rank: int, size: int, label: str, opts):
        self.rank, self.size, self.label, self.options = rank, size, label, opts
        self.recorder = local  # its flight record holds the intra-host steps
        self.world, self.local, self.members, self._host = world, local, members, host
        self._hosts = len(members)
        self._leaders = MpiTransport(leaders, opts.timeout_s, f"{label} leaders") if local.rank == 0 else None
        self._rail = MpiTransport(rail, opts.timeout_s, f"{label} rail") if rail != import_mpi().COMM_NULL else None
        self._host_major = [r for m in members for r in m]  # world ranks, host after host
        self._contiguous = self._host_major == list(range(size))
        self._broken = ""      # the first group error: the backend refuses use after it
        self._buffers = {}     # scratch memory by purpose (_scratch)
        self._intra_s = 0.0  # seconds in shared-memory steps since the last phase_times(reset=True)
        self._destroy = weakref.finalize(self, _release, local, [world.comm, leaders, rail])
        logger = log.for_rank(rank, size, label)
        if logger.isEnabledFor(log.logging.INFO):
            logger.info("ready: %d hosts of %s ranks (this is host %d, local rank %d); %s", self._hosts,
                        sorted({len(m) for m in members}), host, local.rank,
                        "rails between hosts" if self._rail else "host leaders between hosts")
            log.for_rank(local.rank, local.size, local.label).info("%s", local.describe())

    # ---- the Backend protocol (ncl/backend.py) ------------------------------------------------------
    def run(self, call: Call) -> None:
        if self._broken:
            raise NclStateError(f"this communicator (rank {self.rank} of {self.size}) is unusable after an "
                                f"earlier error: {self._broken}; create a new one")
        try:
            _ALGORITHMS[call.collective](self, call)
        except NclError as exc:  # the group is in an unknown state (a cancelled MPI exchange, say)
            self._broken = f"{type(exc).__name__}: {exc}"
            self.local.abort(f"it failed with {self._broken}")  # this host's ranks learn why (an MPI timeout, say)
            self._revoke_mpi()
            abort_at_exit()
            raise

    def last_call(self) -> None:
        return None  # the recorder holds the intra-host steps, not the collectives

    def window(self, nbytes: int):
        """Registered memory of this host's ranks (the intra-host steps read it in place)."""
        return self.local.window(nbytes)

    def abort(self, reason: Optional[str] = None) -> None:
        self.local.abort(reason)
        self._broken = self._broken or f"aborted: {reason or 'abort()'}"
        self._revoke_mpi()
        abort_at_exit()  # the other hosts' ranks may be waiting for this one

    def _revoke_mpi(self) -> None:
        """The other hosts' ranks leave their exchanges at once where MPI can tell them (ULFM)."""
        for transport in (self.world, self._leaders, self._rail):
            if transport is not None:
                transport.revoke()

    def close(self) -> None:
        self._destroy()

    def _intra(self, call: Call) -> None:
        """One step of this host's shared-memory backend, timed as intra-host."""
        start = time.perf_counter()
        try:
            self.local.run(call)
        finally:
            self._intra_s += time.perf_counter() - start

    def phase_times(self, reset: bool = False) -> dict:
        transports = [t for t in (self.world, self._leaders, self._rail) if t]
        times = {"intra-host": self._intra_s, "inter-host": sum(t.seconds for t in transports)}
        if reset:
            self._intra_s = 0.0
            for t in transports:
                t.seconds = 0.0
        return times

    # ---- helpers -----------------------------------------------------------------------------------
    def _all_reduce_between(self, transport: MpiTransport, buf: np.ndarray, count: int, dtype: int, op: int) -> None:
        """All-reduce of buf among the transport's ranks: pieces exchanged, each reduced once in
        rank order by ncl's kernel, then gathered, so every rank gets the same bits."""
        n = transport.size
        if n == 1 or count == 0:
            return
        es = dtypes.ITEMSIZE[dtype]
        if n * count * es <= SMALL_BYTES:  # one round: every rank reduces every copy, in rank order
            copies = np.empty(n * count * es, np.uint8)
            transport.allgather(buf[:count * es], copies)
            srcs = ffi.new("const void *[]", [ffi.from_buffer(copies[r * count * es:(r + 1) * count * es])
                                              for r in range(n)])
            check(lib.ncl_reduce_local(ffi.from_buffer(buf), srcs, n, count, dtype, op))
            return
        q = -(-count // n)
        whole = buf if q * n == count else self._scratch("padded", n * q * es)  # pieces of q elements
        if whole is not buf:
            whole[:count * es] = buf[:count * es]
            whole[count * es:] = 0
        pieces = self._scratch("pieces", n * q * es)
        transport.alltoallv(whole, [q * es] * n, pieces, [q * es] * n)
        mine = whole[transport.rank * q * es:(transport.rank + 1) * q * es]  # reduced in place, then shared
        srcs = ffi.new("const void *[]", [ffi.from_buffer(pieces[h * q * es:(h + 1) * q * es]) for h in range(n)])
        check(lib.ncl_reduce_local(ffi.from_buffer(mine), srcs, n, q, dtype, op))
        transport.allgather_in_place(whole, q * es)
        if whole is not buf:
            buf[:count * es] = whole[:count * es]

    def _scratch(self, name: str, nbytes: int) -> np.ndarray:
        """A reusable buffer (fresh large arrays would page-fault on every call)."""
        have = self._buffers.get(name)
        if have is None or have.nbytes < nbytes:
            have = self._buffers[name] = np.empty(nbytes, np.uint8)
        return have[:nbytes]

    def _avg(self, src, dst, count: int, dtype: int, keep=None) -> None:
        """AVG: the SUM of a wider copy (exact for integers), divided once, rounded once."""
        np_dtype = dtypes.numpy_dtype(dtype)
        x = np.frombuffer(_view(src, count * np_dtype.itemsize).copy(), np_dtype)
        wide = x.astype(np.int64 if np_dtype.kind in "iu" else _WIDE.get(np_dtype, np.float32))
        self._all_reduce(ffi.from_buffer(wide), ffi.from_buffer(wide), count, dtypes.code(wide.dtype), lib.NCL_SUM)
        if np_dtype.kind in "iu":
            q = np.abs(wide) // self.size
            result = np.where(wide < 0, -q, q)
        else:
            result = wide / self.size
        out = result.astype(np_dtype)
        if keep is not None:
            out = out[keep]
        _view(dst, out.nbytes)[:] = out.view(np.uint8)

    # ---- collectives (the pointers and counts Communicator validated) ----------------------------------
    def _all_reduce(self, src, dst, count, dtype, op):
        if count == 0:
            return
        if op == lib.NCL_AVG:
            return self._avg(src, dst, count, dtype)
        es = dtypes.ITEMSIZE[dtype]
        if self._rail is None or count * es <= SMALL_BYTES:  # through each host's leader
            buf = _view(dst, count * es)
            if src != dst:
                buf[:] = _view(src, count * es)
            ptr = ffi.from_buffer(buf)
            self._intra(Call.of("reduce", ptr, ptr, count, dtype, op, 0))
            if self._leaders:
                self._all_reduce_between(self._leaders, buf, count, dtype, op)
            self._intra(Call.of("broadcast", ptr, ptr, count, dtype, -1, 0))
            return
        n_local = self.local.size
        per = -(-count // n_local)
        mine = self._scratch("block", per * es)
        if per * n_local == count:  # reduce-scatter from and all-gather into the caller's buffers
            self._intra(Call.of("reduce_scatter", src, ffi.from_buffer(mine), per, dtype, op))
            self._all_reduce_between(self._rail, mine, per, dtype, op)
            self._intra(Call.of("all_gather", ffi.from_buffer(mine), dst, per, dtype))
            return
        buf = _view(dst, count * es)
        work = self._scratch("work", n_local * per * es)
        work[:count * es] = _view(src, count * es)
        work[count * es:] = 0
        self._intra(Call.of("reduce_scatter", ffi.from_buffer(work), ffi.from_buffer(mine), per, dtype, op))
        self._all_reduce_between(self._rail, mine, per, dtype, op)
        self._intra(Call.of("all_gather", ffi.from_buffer(mine), ffi.from_buffer(work), per, dtype))
        buf[:] = work[:count * es]

    def _reduce(self, src, dst, count, dtype, op, root):
        tmp = _view(src, count * dtypes.ITEMSIZE[dtype]).copy()
        self._all_reduce(ffi.from_buffer(tmp), ffi.from_buffer(tmp), count, dtype, op)
        if self.rank == root:
            _view(dst, tmp.nbytes)[:] = tmp

    def _reduce_scatter(self, src, dst, count, dtype, op):
        es, n = dtypes.ITEMSIZE[dtype], self.size
        if count == 0:
            return
        if op == lib.NCL_AVG or self._rail is None or not self._contiguous:
            whole = count * n
            if op == lib.NCL_AVG:
                return self._avg(src, dst, whole, dtype, keep=slice(self.rank * count, (self.rank + 1) * count))
            tmp = _view(src, whole * es).copy()
            self._all_reduce(ffi.from_buffer(tmp), ffi.from_buffer(tmp), whole, dtype, op)
            _view(dst, count * es)[:] = tmp[self.rank * count * es:(self.rank + 1) * count * es]
            return
        hosts, n_local = self._hosts, self.local.size
        blocks = _view(src, n * count * es).reshape(hosts, n_local, count * es)
        work = np.ascontiguousarray(blocks.transpose(1, 0, 2))  # by owning local rank, then host
        mine = np.empty(hosts * count * es, np.uint8)             # my rail's blocks, summed over this host
        self._intra(Call.of("reduce_scatter", ffi.from_buffer(work), ffi.from_buffer(mine), hosts * count, dtype, op))
        got = np.empty_like(mine)
        self._rail.alltoallv(mine, [count * es] * hosts, got, [count * es] * hosts)
        srcs = ffi.new("const void *[]", [ffi.from_buffer(got[h * count * es:(h + 1) * count * es])
                                          for h in range(hosts)])
        check(lib.ncl_reduce_local(dst, srcs, hosts, count, dtype, op))

    def _to_world_order(self, host_major: np.ndarray, dst: np.ndarray, block: int) -> None:
        """Blocks in host-major rank order -> world rank order."""
        if self._contiguous:
            if host_major is not dst:
                dst[:] = host_major
            return
        for i, r in enumerate(self._host_major):
            dst[r * block:(r + 1) * block] = host_major[i * block:(i + 1) * block]

    def _all_gather(self, src, dst, count, dtype):
        es, n = dtypes.ITEMSIZE[dtype], self.size
        block = count * es
        out = _view(dst, n * block)
        if count == 0:
            return
        host_block = np.empty(self.local.size * block, np.uint8)
        self._intra(Call.of("all_gather", src, ffi.from_buffer(host_block), count, dtype))
        every = out if self._contiguous else np.empty_like(out)
        if self._rail is not None:
            self._rail.allgather(host_block, every)
        else:
            if self._leaders:
                self._leaders.allgatherv(host_block, every, [len(m) * block for m in self.members])
            self._intra(Call.of("broadcast", ffi.from_buffer(every), ffi.from_buffer(every), n * count, dtype, -1, 0))
        self._to_world_order(every, out, block)

    def _gather(self, src, dst, count, dtype, root):
        tmp = np.empty(self.size * count * dtypes.ITEMSIZE[dtype], np.uint8)
        self._all_gather(src, ffi.from_buffer(tmp), count, dtype)
        if self.rank == root:
            _view(dst, tmp.nbytes)[:] = tmp

    def _broadcast(self, src, dst, count, dtype, root):
        nbytes = count * dtypes.ITEMSIZE[dtype]
        if count == 0:
            return
        buf = _view(dst, nbytes)
        if self.rank == root and src != dst:
            buf[:] = _view(src, nbytes)
        root_host = next(h for h, m in enumerate(self.members) if root in m)
        ptr = ffi.from_buffer(buf)
        if self._host == root_host:
            self._intra(Call.of("broadcast", ptr, ptr, count, dtype, -1, self.members[root_host].index(root)))
        if self._leaders:
            self._leaders.bcast(buf, root_host)
        if self._host != root_host:
            self._intra(Call.of("broadcast", ptr, ptr, count, dtype, -1, 0))

    def _scatter(self, send, dst, count, dtype, root):
        es = dtypes.ITEMSIZE[dtype]
        whole = np.empty(self.size * count * es, np.uint8)
        if self.rank == root:
            whole[:] = _view(send, whole.nbytes)
        self._broadcast(ffi.from_buffer(whole), ffi.from_buffer(whole), self.size * count, dtype, root)
        _view(dst, count * es)[:] = whole[self.rank * count * es:(self.rank + 1) * count * es]

    def _all_to_allv(self, src, send, dst, recv, dtype):
        """send, recv: elements per peer (all_to_allv(all_counts=)'s matrix is not needed: the
        counts are exchanged and checked here anyway)."""
        es, n = dtypes.ITEMSIZE[dtype], self.size
        matrix = np.empty((2 * n, n), np.int64)  # every rank's send counts, then its recv counts
        self.world.allgather(np.array([send, recv], np.int64).T.copy(), matrix.reshape(n, n, 2))
        sent, expected = matrix.reshape(n, n, 2)[:, :, 0], matrix.reshape(n, n, 2)[:, :, 1]
        bad = np.argwhere(sent != expected.T)
        if len(bad):  # the same message on every rank
            i, j = (int(v) for v in bad[0])
            raise NclMismatchError(f"all_to_allv counts disagree: rank {i} sends {sent[i, j]} elements to rank {j}, "
                                   f"which expects {expected[j, i]} from it")
        x, out = _view(src, sum(send) * es), _view(dst, sum(recv) * es)
        if self._rail is None or not self._contiguous:  # one flat exchange between all ranks
            self.world.alltoallv(x, [c * es for c in send], out, [c * es for c in recv])
            return
        hosts, n_local, l_me = self._hosts, self.local.size, self.local.rank
        starts = np.concatenate([[0], np.cumsum(send)]) * es
        # step 1 (shared memory): rows grouped by destination local rank, then destination host
        order = [h * n_local + l for l in range(n_local) for h in range(hosts)]
        step1 = np.concatenate([x[starts[j]:starts[j + 1]] for j in order]) if order else x
        mine = self.members[self._host]
        to_local = [sum(send[h * n_local + l] for h in range(hosts)) for l in range(n_local)]
        from_local = [sum(int(sent[src_r, h * n_local + l_me]) for h in range(hosts)) for src_r in mine]
        got = np.empty(sum(from_local) * es, np.uint8)
        self._intra(Call.of("all_to_allv", ffi.from_buffer(step1), ffi.from_buffer(got), sum(to_local), dtype,
                            send_counts=tuple(to_local), recv_counts=tuple(from_local)))
        # got: [source local rank][destination host] -> [destination host][source local rank]
        pieces, at = {}, 0
        for src_l, src_r in enumerate(mine):
            for h in range(hosts):
                rows = int(sent[src_r, h * n_local + l_me])
                pieces[h, src_l] = got[at:at + rows * es]
                at += rows * es
        step2 = np.concatenate([pieces[h, s] for h in range(hosts) for s in range(n_local)]) if pieces else got
        to_host = [sum(pieces[h, s].nbytes for s in range(n_local)) for h in range(hosts)]
        from_host = [sum(recv[h * n_local + s] for s in range(n_local)) * es for h in range(hosts)]
        # step 2 (MPI, one message per host pair on this rail): arrives in source rank order
        self._rail.alltoallv(step2, to_host, out, from_host)

    def _send(self, ptr, count, dtype, dst):
        if dst in self.members[self._host]:
            return self._intra(Call.of("send", ptr, ffi.NULL, count, dtype, -1, self.members[self._host].index(dst)))
        self.world.send(_view(ptr, count * dtypes.ITEMSIZE[dtype]), dst, _TAG)

    def _recv(self, ptr, count, dtype, src):
        if src in self.members[self._host]:
            return self._intra(Call.of("recv", ffi.NULL, ptr, count, dtype, -1, self.members[self._host].index(src)))
        self.world.recv(_view(ptr, count * dtypes.ITEMSIZE[dtype]), src, _TAG)

    def _barrier(self):
        self._intra(Call.of("barrier", ffi.NULL, ffi.NULL, 0, -1))
        if self._leaders:
            self._leaders.barrier()
        self._intra(Call.of("barrier", ffi.NULL, ffi.NULL, 0, -1))


def _release(local: SharedMemoryBackend, mpi_comms) -> None:
    local.close()
    MPI = import_mpi()
    for c in mpi_comms:
        if c != MPI.COMM_NULL and not MPI.Is_finalized():
            c.Free()
