"""Builds ncl._ncl_ffi, the compiled C core, with cffi's out-of-line API mode.

The declarations come from native/ncl.h (between its CDEF markers), so the header is the
one place the C interface is written down.  Flags: no -march (the wheel must run on any
x86-64; the kernels pick AVX2/AVX-512 at run time), no FP contraction (reductions must
give the same bits whatever the compiler fuses).
"""
import glob
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def _cdef() -> str:
    with open(os.path.join(HERE, "ncl.h")) as f:
        text = f.read()
    return text.split("/* BEGIN CDEF */", 1)[1].split("/* END CDEF */", 1)[0]


# Python functions the core calls back (ncl/_native.py defines them with ffi.def_extern).
CALLBACKS = 'extern "Python" int ncl_py_interrupt_hook(char* reason, size_t cap);'

ffibuilder = FFI()
ffibuilder.cdef(_cdef() + CALLBACKS)
ffibuilder.set_source(
    "ncl._ncl_ffi",
    '#include "ncl.h"',
    # setuptools wants paths relative to the project root
    sources=sorted(os.path.relpath(p, os.path.dirname(HERE)) for p in glob.glob(os.path.join(HERE, "*.c"))),
    include_dirs=[os.path.relpath(HERE, os.path.dirname(HERE))],
    # -fno-loop-unroll-and-jam: GCC would fuse two sources of a reduction into one scalar loop with branches
    # (the NaN-propagating MIN/MAX: 13x slower) instead of vectorising the loop over elements
    extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-strict-aliasing", "-fno-loop-unroll-and-jam",
                        "-Wall", "-Wextra",
                        "-Wno-unused-parameter"],
    libraries=["rt"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
