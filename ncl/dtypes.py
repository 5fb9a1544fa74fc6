"""The element types ncl moves and reduces, one table: the C core's code (native/ncl.h, ncl_dtype)
and, read from the core, each code's name (numpy's name; torch's after "torch.") and size.
Buffers' checks, the multi-host AVG, the flight record and ncl-perf take them from here; numpy
and torch dtypes are derived from the names (those numpy lacks, bfloat16 and the fp8 types, through
ml_dtypes, imported on first use).
"""
from typing import Any, Optional

import numpy as np

from ._native import ffi, lib

NAMES = tuple(ffi.string(lib.ncl_dtype_name(code)).decode() for code in range(lib.NCL_NUM_DTYPES))  # by code
CODES = {name: code for code, name in enumerate(NAMES)}
ITEMSIZE = tuple(lib.ncl_dtype_size(code) for code in range(lib.NCL_NUM_DTYPES))  # bytes, by code
# the order messages list them in and ncl-perf sweeps them: floats first
LISTED = ("float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
          "int8", "uint8", "int32", "int64")
SUPPORTED = ", ".join(LISTED)
assert sorted(LISTED) == sorted(NAMES), "LISTED must name every dtype of the core once"
# nccl-tests' short names, where they differ
NCCL_TESTS_NAMES = {"float32": "float", "float64": "double", "float16": "half", "float8_e4m3fn": "f8e4m3",
                    "float8_e5m2": "f8e5m2"}
# the names numpy has no dtype for: ml_dtypes' types (torch's and jax's too) provide them
ML_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def numpy_dtype(dtype: Any) -> np.dtype:
    """numpy's dtype for a core code, a name ("bfloat16", "float32", ...), a numpy or torch dtype;
    TypeError for one the core does not handle."""
    name = NAMES[dtype] if isinstance(dtype, int) and 0 <= dtype < len(NAMES) else _name(dtype)
    if name not in CODES:
        raise TypeError(f"dtype {dtype!r} is not supported; supported: {SUPPORTED}")
    if name in ML_DTYPES:
        import ml_dtypes
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def _name(dtype: Any) -> Optional[str]:
    text = str(dtype).removeprefix("torch.")
    if getattr(dtype, "__name__", "") in ML_DTYPES:  # ml_dtypes' scalar types (ml_dtypes.bfloat16, ...)
        return dtype.__name__
    if text in CODES:
        return text
    try:
        return np.dtype(dtype).name
    except TypeError:
        return None


def code(dtype: Any) -> int:
    """The core's code of a numpy dtype (or anything numpy_dtype takes)."""
    return CODES[numpy_dtype(dtype).name]


def nbytes(count: int, dtype_code: int) -> int:
    """Bytes of count elements (0 where the call has no dtype, -1)."""
    return count * ITEMSIZE[dtype_code] if dtype_code >= 0 else 0
