"""Memory that exchanges keep between calls instead of allocating it anew, as DeepEP keeps its
buffers: a registered send buffer that peers read in place, and a pool of large outputs.

Why: a fresh tensor of tens of MB costs a page fault (and the kernel's zeroing) per 4 KiB,
since glibc maps every allocation above 32 MiB anew; at 4096 MoE tokens that was 40 of the
50 ms an all_to_allv took here, more than the copy itself.
"""
import math
import weakref
from typing import List

import numpy as np
import torch

# Smaller ones come from malloc's free lists: ~1 µs a tensor against the pool's ~5 (a weakref finalizer and
# three views), and they seldom fault (a 737 KB MoE output at 8 ranks: ~1 fault a call).  Larger ones it
# may map anew, faulted in page by page as they are filled (5.9 MB: 135 faults a call; pooled none; 2026-12-06).
POOL_MIN_BYTES = 1 << 20
POOL_KEEP = 4             # idle buffers kept; older ones go back to the system


def size_class(nbytes: int) -> int:
    """nbytes rounded up to a multiple of an eighth of its power of two (at most 1/8 more)."""
    step = 1 << max(nbytes.bit_length() - 4, 0)
    return -(-nbytes // step) * step


class OutputPool:
    """Large tensors handed to callers, taken back when the caller lets go of the last view:
    each buffer belongs to one live tensor at a time, so results never alias."""

    def __init__(self, keep: int = POOL_KEEP):
        self._idle: List[np.ndarray] = []
        self._keep = keep

    def empty(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0 or nbytes < POOL_MIN_BYTES:
            # (sizes as arguments: torch parses them faster than a tuple; a 0-d shape has none to pass)
            return torch.empty(*shape, dtype=dtype) if shape else torch.empty((), dtype=dtype)
        buf = self._take(nbytes)
        view = buf[:nbytes]  # torch holds this array; when it goes, the buffer comes back
        weakref.finalize(view, self._give_back, buf)
        return torch.from_numpy(view).view(dtype).view(shape)

    def idle(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        """Free the idle buffers; those still lent out are freed when their tensors go."""
        self._keep = 0
        self._idle.clear()

    def _take(self, nbytes: int) -> np.ndarray:
        size = size_class(nbytes)  # the same class for a call's slightly different row counts
        for i, b in enumerate(self._idle):
            if len(b) == size:
                return self._idle.pop(i)
        return np.empty(size, np.uint8)

    def _give_back(self, buf: np.ndarray) -> None:
        self._idle.append(buf)
        if len(self._idle) > self._keep:
            self._idle.pop(0)


class SendBuffer:
    """A registered buffer the rows to send are gathered into, so that receivers copy them
    straight out of it (ncl's all_to_allv reads registered senders in place: one copy, no
    system call).  Growing it is collective: every rank calls rows() with the same
    largest_rows (what the largest sender needs, known to all from the exchanged counts), so
    all grow it in the same call to the same size."""

    def __init__(self, comm):
        self._comm = comm
        self._buf = None

    def rows(self, count: int, width: int, dtype: torch.dtype, largest_rows: int) -> torch.Tensor:
        """[count, width] of dtype at the start of the buffer, which holds largest_rows such rows."""
        need = largest_rows * width * dtype.itemsize
        if self._buf is None or self._buf.numel() < need:
            self._buf = None  # release the old window first
            self._buf = self._comm.empty(1 << max(need - 1, 1).bit_length(), np.uint8, like="torch")
        return self._buf[:count * width * dtype.itemsize].view(dtype).view(count, width)

    def close(self) -> None:
        """Drop the registered memory (unmapped once no tensor views it any more)."""
        self._buf = None
