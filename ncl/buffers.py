"""Buffers: what ncl accepts (numpy arrays, torch CPU tensors), how they map to the C core's
dtypes, and the checks that turn a malformed argument into a precise ValueError/TypeError
before any rank communicates.  torch is never imported here: a tensor is recognised only
if the caller already imported torch."""
import enum
import numbers
import sys
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from ._native import check, ffi, lib
from .dtypes import CODES, ITEMSIZE, ML_DTYPES, SUPPORTED


class ReduceOp(enum.IntEnum):
    SUM = lib.NCL_SUM
    PROD = lib.NCL_PROD
    MIN = lib.NCL_MIN
    MAX = lib.NCL_MAX
    AVG = lib.NCL_AVG


# the core's codes (ncl/dtypes.py) by numpy dtype, and torch name.  ml_dtypes' dtypes are recognised by name
# (no import) and then added here, keyed by the dtype object itself, so a bfloat16 array's next call is a lookup
# (numpy builds dtype.name anew each time: 0.6-2 µs)
_NUMPY_DTYPES = {np.dtype(name): code for name, code in CODES.items() if name not in ML_DTYPES}
_TORCH_DTYPE_NAMES = {f"torch.{name}": code for name, code in CODES.items()}
_torch_codes: dict = {}  # torch.dtype -> code, filled on first use (keyed by the dtype object: no str())


def _numpy_dtype_code(dtype: np.dtype) -> Optional[int]:
    code = _NUMPY_DTYPES.get(dtype)
    if code is None and dtype.name in ML_DTYPES and dtype.isnative and dtype.itemsize == ITEMSIZE[CODES[dtype.name]]:
        code = _NUMPY_DTYPES[dtype] = CODES[dtype.name]
    return code


def torch_dtype_code(dtype) -> Optional[int]:
    """The NCL_* code of a torch dtype; None for one the core does not handle."""
    code = _torch_codes.get(dtype)
    if code is None:
        code = _TORCH_DTYPE_NAMES.get(str(dtype))
        if code is not None:
            _torch_codes[dtype] = code
    return code


class Buffer:
    """A validated buffer: the object plus what the C core needs.  Slotted and filled in place by
    `_buffer`: on every call's path, where a NamedTuple's field reads cost twice a slot's."""
    __slots__ = ("obj", "ptr", "count", "nbytes", "dtype", "shape", "is_torch")
    obj: Any
    ptr: Any            # cffi pointer (or buffer) to the first element
    count: int          # elements
    nbytes: int
    dtype: int          # NCL_* dtype code
    shape: Tuple[int, ...]
    is_torch: bool

    def __repr__(self) -> str:
        return (f"Buffer({type(self.obj).__name__}, count={self.count}, nbytes={self.nbytes}, dtype={self.dtype}, "
                f"shape={self.shape})")


_new = object.__new__
_from_buffer = ffi.from_buffer
_BYTES = ffi.typeof("char[]")  # what from_buffer gives by default; named once, not parsed on every call


def _buffer(obj, ptr, count: int, nbytes: int, dtype: int, shape, is_torch: bool) -> Buffer:
    b = _new(Buffer)
    b.obj = obj
    b.ptr = ptr
    b.count = count
    b.nbytes = nbytes
    b.dtype = dtype
    b.shape = shape
    b.is_torch = is_torch
    return b


def _torch_tensor_type():
    torch = sys.modules.get("torch")
    return torch.Tensor if torch is not None else None


def as_buffer(x: Any, name: str, *, writable: bool) -> Buffer:
    """Validate `x` as a communication buffer; `writable` when ncl will write into it.
    This is on every call's path: numpy arrays take ~0.3 µs (cffi's buffer protocol gives the
    pointer; __array_interface__ would cost 1 µs)."""
    if isinstance(x, np.ndarray):
        code = _NUMPY_DTYPES.get(x.dtype)
        if code is None:
            code = _numpy_dtype_code(x.dtype)
            if code is None:
                raise TypeError(f"{name} has unsupported dtype {x.dtype}; supported: {SUPPORTED}")
        try:
            ptr = ffi.from_buffer(x)  # refuses arrays that are not C-contiguous
        except (ValueError, BufferError):
            raise ValueError(f"{name} must be C-contiguous (got strides {x.strides}); "
                             f"pass np.ascontiguousarray({name})") from None
        if writable and not x.flags.writeable:
            raise ValueError(f"{name} is read-only, but this call writes into it")
        return _buffer(x, ptr, x.size, len(ptr), code, x.shape, False)
    tensor_type = _torch_tensor_type()
    if tensor_type is not None and isinstance(x, tensor_type):
        code = torch_dtype_code(x.dtype)
        if code is None:
            raise TypeError(f"{name} has unsupported dtype {x.dtype}; supported: {SUPPORTED}")
        if not x.is_cpu:
            raise ValueError(f"{name} is on device {x.device}; ncl works on CPU tensors")
        if x.is_sparse or not x.is_contiguous():
            raise ValueError(f"{name} must be a contiguous dense tensor; pass {name}.contiguous()")
        count = x.numel()
        return _buffer(x, ffi.cast("void *", x.data_ptr()), count, count * x.element_size(), code, tuple(x.shape),
                       True)
    raise TypeError(f"{name} must be a numpy array or a torch CPU tensor, not {type(x).__name__}")


def plain(x: Any, writable: bool) -> Optional[Tuple[Any, int, int]]:
    """(pointer, dtype code, count) of x when it is exactly a numpy array or a torch tensor (no
    subclass) that as_buffer(x, writable=writable) accepts: a core dtype, C-contiguous (a strided,
    dense CPU tensor), writable if asked.  None for anything else (a subclass, a bad array, an odd
    tensor): as_buffer then takes it and says what is wrong.  all_reduce's fast path (ncl/comm.py)
    uses it instead of a Buffer: ~0.25 µs instead of ~0.65 for an array."""
    if type(x) is np.ndarray:
        code = _NUMPY_DTYPES.get(x.dtype)
        if code is None:
            code = _numpy_dtype_code(x.dtype)
            if code is None:
                return None
        try:  # cffi refuses an array that is not C-contiguous, or read-only when writable (cheaper than x.flags)
            return _from_buffer(_BYTES, x, writable), code, x.size
        except (ValueError, BufferError):
            return None
    torch = sys.modules.get("torch")
    if torch is None or type(x) is not torch.Tensor:
        return None
    code = _torch_codes.get(x.dtype)
    if code is None:
        code = torch_dtype_code(x.dtype)
        if code is None:
            return None
    if x.layout is not torch.strided or not x.is_cpu or not x.is_contiguous():
        return None
    return ffi.cast("void *", x.data_ptr()), code, x.numel()


def plain_pair(x: Any, out: Any) -> Optional[Tuple[Any, Any, int, int]]:
    """(send pointer, recv pointer, dtype code, count) of all_reduce(x, out=out) when plain() takes x
    and out (out writable) and out has x's dtype and shape, as as_buffer and output require; None for
    anything else (they then say what is wrong).  Whether out overlaps x other than as x itself is
    left to the backend's all_reduce (the core's ncl_all_reduce_checked: two compares in C where the
    pointer arithmetic cost 0.2 µs here), which refuses it before anything moves.  Two exact numpy
    arrays, the commonest pair, are checked inline: ~0.6 µs, where plain() twice took 0.7."""
    if type(x) is np.ndarray and type(out) is np.ndarray:
        dtype = x.dtype
        code = _NUMPY_DTYPES.get(dtype)
        if code is None:
            code = _numpy_dtype_code(dtype)
        if code is None or out.shape != x.shape:
            return None
        out_dtype = out.dtype
        if out_dtype is not dtype and _numpy_dtype_code(out_dtype) != code:
            return None
        try:  # (as in plain: x and out C-contiguous, out writable)
            return _from_buffer(x), _from_buffer(_BYTES, out, True), code, x.size
        except (ValueError, BufferError):
            return None
    send = plain(x, False)
    recv = plain(out, True) if send is not None else None
    if recv is None or recv[1] != send[1] or out.shape != x.shape:
        return None
    return send[0], recv[0], send[1], send[2]


def bump_version(obj) -> None:
    """A torch tensor a call writes: autograd sees it modified, as after torch's in-place ops."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        torch.autograd.graph.increment_version(obj)


def empty_like(like: Buffer, shape: Tuple[int, ...]) -> Any:
    """A new output of `like`'s kind and dtype."""
    if like.is_torch:
        return sys.modules["torch"].empty(shape, dtype=like.obj.dtype)
    return np.empty(shape, dtype=like.obj.dtype)


def output(out: Any, like: Buffer, shape: Tuple[int, ...], name: str = "out", *, rows_known: bool = True) -> Buffer:
    """Validate a caller's `out` (or allocate one) of exactly `shape` and `like`'s dtype;
    with rows_known=False only the dims after the first are checked."""
    if out is None:
        return as_buffer(empty_like(like, shape), name, writable=True)
    buf = as_buffer(out, name, writable=True)
    if buf.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {out.dtype} but must match the input's {like.obj.dtype}")
    if buf.shape != shape if rows_known else buf.shape[1:] != tuple(shape[1:]):
        raise ValueError(f"{name} has shape {buf.shape} but must have shape {tuple(shape)}")
    return buf


def check_aliasing(x: Buffer, out: Buffer, call: str, in_place_at: Optional[int], layout: str) -> None:
    """Refuse an out that overlaps x other than in the call's one in-place layout: x starting
    in_place_at bytes into out (None: no overlap allowed).  Peers may read x while this rank
    writes out, so any other overlap would hand them half-written data."""
    xa, oa = x.ptr, out.ptr  # cffi pointers compare and add by address (void * in bytes): no int() round trip
    if (not x.nbytes or not out.nbytes or xa + x.nbytes <= oa or oa + out.nbytes <= xa
            or (in_place_at is not None and oa + in_place_at == xa)):
        return
    raise ValueError(f"out overlaps x, which {call} does not allow: {layout}; give out its own memory")


def check_rank(value: Any, name: str, size: int, *, other_than: Optional[int] = None) -> int:
    if type(value) is int and 0 <= value < size and value != other_than:  # the common case, fast
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int rank, not {type(value).__name__}")
    value = int(value)
    if not 0 <= value < size:
        raise ValueError(f"{name}={value} is out of range: this communicator has ranks 0..{size - 1}")
    if other_than is not None and value == other_than:
        raise ValueError(f"{name}={value} is this rank itself; send/recv need another rank")
    return value


def check_op(op: Any) -> ReduceOp:
    if isinstance(op, ReduceOp):
        return op
    raise TypeError(f"op must be an ncl.ReduceOp (ncl.SUM, PROD, MIN, MAX, AVG), not {op!r}")


def rows(buf: Buffer, name: str) -> int:
    """Length of dim 0, for the collectives that split or stack along it."""
    if not buf.shape:
        raise ValueError(f"{name} must have at least one dimension (the one split among ranks)")
    return buf.shape[0]


def check_counts(counts: Any, name: str, size: int) -> Tuple[int, ...]:
    """Per-peer row counts for all_to_allv: `size` non-negative ints."""
    if type(counts) in (list, tuple) and len(counts) == size and all(type(c) is int and c >= 0 for c in counts):
        return tuple(counts)  # the common case, fast
    if isinstance(counts, np.ndarray):
        counts = counts.tolist()
    elif _torch_tensor_type() is not None and isinstance(counts, _torch_tensor_type()):
        counts = counts.tolist()
    if not isinstance(counts, Sequence) or isinstance(counts, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of {size} ints, not {type(counts).__name__}")
    if len(counts) != size:
        raise ValueError(f"{name} has {len(counts)} entries but the communicator has {size} ranks")
    for i, c in enumerate(counts):
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise TypeError(f"{name}[{i}] must be an int, not {type(c).__name__}")
        if c < 0:
            raise ValueError(f"{name}[{i}] = {c} is negative")
    return tuple(int(c) for c in counts)


def sum_rows(out, rows, index: np.ndarray) -> bool:
    """In the C core, out[t] = the sum over ranks r, in rank order, of rows[index[t, r]] (-1: no
    row): each row read once, each token written once, 16-bit floats added in float32 and rounded
    once.  out [tokens, hidden] and rows [R, hidden]: contiguous torch tensors of one dtype;
    index: int64 [tokens, ranks].  False (out untouched) for a dtype the core has no kernel for."""
    code = torch_dtype_code(rows.dtype)
    if code is None:
        return False
    check(lib.ncl_sum_rows(ffi.cast("void *", out.data_ptr()), ffi.cast("const void *", rows.data_ptr()),
                           rows.shape[0], ffi.from_buffer("int64_t[]", index), index.shape[0], index.shape[1],
                           out.shape[1], code))
    return True
