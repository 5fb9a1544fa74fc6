"""The only module that touches the compiled C core: loads it and turns status codes into
exceptions (one `check` for every call, as mpi4py does), and lets signal handlers run while
the core waits (the interrupt hook)."""
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


# The exception a signal handler raised inside a wait of the core, until the call that waited
# returns NCL_ERR_INTERRUPTED and error() hands it on.  The hook runs on the main thread only.
_interrupt: list = []


def _stop_wait(exc_type, exc, tb) -> int:
    """ncl_py_interrupt_hook's onerror: a signal handler raised (KeyboardInterrupt, SystemExit,
    anything): keep the exception, tell the core why (peers quote it) and end the wait."""
    _interrupt[:] = [exc]
    hook = tb.tb_frame.f_locals if tb is not None else {}  # the callback's arguments (cffi documents this way in)
    if "reason" in hook:  # (else the core says "a signal handler")
        reason = f"{exc_type.__name__} on this rank".encode("ascii", "backslashreplace")[:hook["cap"] - 1]
        ffi.memmove(hook["reason"], reason, len(reason))
    return 1


@ffi.def_extern(onerror=_stop_wait)
def ncl_py_interrupt_hook(reason, cap):
    """Called by the core's waits on the main thread every 50 ms: entering Python runs any
    pending signal handler first; one that raises ends up in _stop_wait."""
    return 0


lib.ncl_set_interrupt_hook(lib.ncl_py_interrupt_hook)


def last_error() -> str:
    return ffi.string(lib.ncl_last_error()).decode(errors="replace")


def error(rc: int) -> Exception:
    """The exception matching a failed C status code, with the core's message; for an
    interrupted wait, the exception the signal handler raised."""
    if rc == lib.NCL_ERR_INTERRUPTED and _interrupt:
        exc = _interrupt.pop()
        exc.add_note(f"ncl: {last_error()}; the group was aborted")
        return exc
    return _EXCEPTIONS.get(rc, errors.NclError)(last_error())


def check(rc: int) -> None:
    """Raise the exception matching a C status code, with the core's message."""
    if rc != lib.NCL_OK:
        raise error(rc)


def kernel_isa() -> str:
    """Which reduction kernels this CPU runs: "avx512", "avx2" or "generic"."""
    return ffi.string(lib.ncl_kernel_isa()).decode()
