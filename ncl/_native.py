"""The only module that touches the compiled C core: loads it and turns status codes into
exceptions (one `check` for every call, as mpi4py does)."""
from . import errors

try:
    from ._ncl_ffi import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "ncl's C core (ncl._ncl_ffi) is not built: install the package with `pip install .` "
        "(or `pip install -e .`) so that setuptools compiles native/"
    ) from exc

_EXCEPTIONS = {
    lib.NCL_ERR_ARGUMENT: ValueError,
    lib.NCL_ERR_SYSTEM: errors.NclSystemError,
    lib.NCL_ERR_TIMEOUT: errors.NclTimeoutError,
    lib.NCL_ERR_PEER: errors.NclPeerError,
    lib.NCL_ERR_MISMATCH: errors.NclMismatchError,
    lib.NCL_ERR_STATE: errors.NclStateError,
}


def last_error() -> str:
    return ffi.string(lib.ncl_last_error()).decode(errors="replace")


def error(rc: int) -> Exception:
    """The exception matching a failed C status code, with the core's message."""
    return _EXCEPTIONS.get(rc, errors.NclError)(last_error())


def check(rc: int) -> None:
    """Raise the exception matching a C status code, with the core's message."""
    if rc != lib.NCL_OK:
        raise error(rc)


def kernel_isa() -> str:
    """Which reduction kernels this CPU runs: "avx512", "avx2" or "generic"."""
    return ffi.string(lib.ncl_kernel_isa()).decode()
