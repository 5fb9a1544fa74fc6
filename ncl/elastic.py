"""Elastic groups: revoke a communicator, and shrink it to the ranks that are left.

revoke is abort with a reason peers recognise (REVOKED) plus a flag in the segment that every
call checks first: every rank waiting on the group fails at once with NclPeerError quoting it,
and every later call on it raises, even one whose peers' steps were posted before the revoke.

shrink builds a shared-memory group of the survivors without a word from the ranks that are
gone.  Each survivor reads from the old segment (still mapped) which ranks died or closed
(ncl_comm_gone_ranks) and derives the new group's name from the parent's name, its shrink
counter and the sorted survivors: survivors with the same view meet in the same segment, set up
as split() sets up a sub-group.  A view that changes meanwhile (a second failure during the
shrink) makes the attempt fail within its short deadline; every survivor then looks again and
retries, with a longer deadline each time, until the communicator's timeout: the end is a
smaller working group or a clear error, never a hang.
"""
import operator
import os
import time
from typing import Iterable, List, Optional

from ._native import error, ffi, lib
from .errors import NclError
from .job import segment_name
from .shm import SharedMemoryBackend

REVOKED = "it revoked the communicator (comm.revoke())"
FIRST_ATTEMPT_S = 0.5  # a setup of live ranks takes milliseconds; a view that differs fails this fast


def revoke(backend) -> None:
    """Revoke the group (a backend other than shared memory: abort it, with the same words)."""
    if isinstance(backend, SharedMemoryBackend):
        if not backend.closed:
            lib.ncl_comm_revoke(backend.handle, REVOKED.encode())
    else:
        backend.abort(REVOKED)


def failed_ranks(backend: SharedMemoryBackend) -> List[int]:
    """Ranks of the group whose process died, or that closed their communicator."""
    out = ffi.new("uint8_t[]", backend.size)
    rc = lib.ncl_comm_gone_ranks(backend.handle, out)
    if rc:
        raise error(rc)
    return [r for r in range(backend.size) if out[r]]


def check_exclude(exclude: Optional[Iterable[int]], size: int) -> frozenset:
    """exclude as a set of ranks of the group, checked."""
    if exclude is None:
        return frozenset()
    if isinstance(exclude, (str, bytes)) or not hasattr(exclude, "__iter__"):
        raise TypeError(f"exclude must be a list of ranks or None, not {type(exclude).__name__}")
    ranks = set()
    for r in exclude:
        if isinstance(r, bool):
            raise TypeError("exclude must hold ranks (ints), not bool")
        try:
            r = operator.index(r)
        except TypeError:
            raise TypeError(f"exclude must hold ranks (ints), not {type(r).__name__}") from None
        if not 0 <= r < size:
            raise ValueError(f"exclude holds rank {r}, outside the group's 0..{size - 1}")
        ranks.add(r)
    return frozenset(ranks)


def _unlink_if_left(name: str) -> None:
    """Remove a segment a new group's rank 0 created and died before the others opened it
    (nobody else would: the core unlinks it once every rank has attached)."""
    try:
        os.unlink("/dev/shm" + name)
    except OSError:
        pass


def shrink(backend: SharedMemoryBackend, index: int, exclude: frozenset) -> Optional[SharedMemoryBackend]:
    """The backend of this rank in the parent's `index`-th shrink (collective over the survivors:
    the parent's ranks not in exclude and not gone); None when this rank is excluded."""
    if backend.rank in exclude:
        return None
    timeout = backend.options.timeout_s
    deadline, attempt_s = time.monotonic() + timeout, FIRST_ATTEMPT_S
    while True:
        members = sorted(set(range(backend.size)) - exclude - set(failed_ranks(backend)))
        name = f"{backend.name}/shrink{index}/" + ".".join(map(str, members))
        options = backend.sub_options(len(members))
        options.timeout_s = min(attempt_s, max(deadline - time.monotonic(), 0.05))
        try:
            new = SharedMemoryBackend.create(name, f"{backend.label}.shrink{index}", members.index(backend.rank),
                                             len(members), backend.unique_id, options)
        except NclError as exc:
            if members[0] in failed_ranks(backend):
                _unlink_if_left(segment_name(backend.unique_id, name))
            if time.monotonic() >= deadline:
                raise type(exc)(f"shrink of rank {backend.rank}'s group to ranks {members} failed within "
                                f"{timeout:g} s: {exc}") from None
            attempt_s *= 2
            continue
        new.options.timeout_s = timeout
        rc = lib.ncl_comm_set_timeout(new.handle, timeout)
        if rc:
            raise error(rc)
        return new
