"""The reduction kernels alone (no communication): every dtype x op x number of sources
against a numpy reduction done left to right, and every instruction-set variant
(NCL_KERNEL_ISA) bitwise identical to the portable one."""
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from ncl._native import ffi, lib

DTYPES = {
    lib.NCL_INT8: np.int8, lib.NCL_UINT8: np.uint8, lib.NCL_INT32: np.int32, lib.NCL_INT64: np.int64,
    lib.NCL_FLOAT16: np.float16, lib.NCL_BFLOAT16: ml_dtypes.bfloat16, lib.NCL_FLOAT32: np.float32,
    lib.NCL_FLOAT64: np.float64, lib.NCL_FLOAT8_E4M3FN: ml_dtypes.float8_e4m3fn, lib.NCL_FLOAT8_E5M2: ml_dtypes.float8_e5m2,
}
NARROW_FLOATS = (np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)  # reduce in float32
OPS = {lib.NCL_SUM: "sum", lib.NCL_PROD: "prod", lib.NCL_MIN: "min", lib.NCL_MAX: "max", lib.NCL_AVG: "avg"}
COUNTS = (0, 1, 7, 31, 1000, 100003)


def make_sources(dtype, op, nsrc, count, seed):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = (-3, 4) if op == lib.NCL_PROD else (info.min, info.max)
        return [rng.integers(max(lo, info.min), min(hi, info.max), count, endpoint=True).astype(dtype)
                for _ in range(nsrc)]
    scale = 2.0 if op == lib.NCL_PROD else 100.0
    srcs = [(rng.standard_normal(count) * scale).astype(dtype) for _ in range(nsrc)]
    if op in (lib.NCL_MIN, lib.NCL_MAX):
        for k, s in enumerate(srcs):  # NaNs in every source, each with its own payload (quiet NaN | k + 1)
            bits = s.view(np.dtype(f"u{s.itemsize}"))
            bits[rng.random(count) < 0.05] = QUIET_NAN[s.dtype] | (k + 1)
    return srcs


# a quiet NaN's bits by dtype; the low bits are free for a payload (but for fp8's: e4m3fn has one NaN, S.1111.111;
# e5m2's payload bits are its mantissa's two)
QUIET_NAN = {np.dtype(t): bits for t, bits in ((np.float16, 0x7E00), (ml_dtypes.bfloat16, 0x7FC0),
                                                (np.float32, 0x7FC00000), (np.float64, 0x7FF8000000000000),
                                                (ml_dtypes.float8_e4m3fn, 0x7F), (ml_dtypes.float8_e5m2, 0x7D))}


def reference(srcs, op):
    """Left-to-right reduction in numpy; 16- and 8-bit floats in float32, rounded once (ml_dtypes' rounding of
    fp8, overflow and NaN included, is the rule native/fp8.h states)."""
    dtype = srcs[0].dtype
    if OPS[op] == "avg" and np.issubdtype(dtype, np.integer):  # exact sum, truncated toward zero
        total = sum(s.astype(object) for s in srcs) if dtype == np.int64 else sum(s.astype(np.int64) for s in srcs)
        n = len(srcs)
        return np.array([t // n if t >= 0 else -((-t) // n) for t in np.ravel(total)], dtype=dtype)
    wide = np.float32 if dtype in NARROW_FLOATS else dtype
    acc = srcs[0].astype(wide)
    with np.errstate(over="ignore", invalid="ignore"):
        for s in srcs[1:]:
            s = s.astype(wide)
            acc = {"sum": np.add, "avg": np.add, "prod": np.multiply, "min": np.minimum,
                   "max": np.maximum}[OPS[op]](acc, s).astype(wide)
    if OPS[op] == "avg":
        acc = (acc / np.array(len(srcs), dtype=wide)).astype(wide)
    out = acc.astype(dtype)
    if dtype == ml_dtypes.bfloat16:  # a NaN keeps the top of its payload, quieted (ml_dtypes makes it canonical)
        nan = np.isnan(acc)
        out.view(np.uint16)[nan] = (acc.view(np.uint32)[nan] >> 16).astype(np.uint16) | 0x40
    return out


def reduce_local(srcs, op):
    dst = np.empty_like(srcs[0])
    code = next(c for c, t in DTYPES.items() if np.dtype(t) == srcs[0].dtype)
    ptrs = ffi.new("const void *[]", [ffi.cast("void *", s.ctypes.data) for s in srcs])
    rc = lib.ncl_reduce_local(ffi.cast("void *", dst.ctypes.data), ptrs, len(srcs), dst.size, code, op)
    assert rc == lib.NCL_OK
    return dst


@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda c: np.dtype(DTYPES[c]).name)
@pytest.mark.parametrize("op", list(OPS), ids=lambda o: OPS[o])
def test_matches_numpy_left_to_right(dtype, op):
    for nsrc in (1, 2, 3, 5, 8):
        for count in COUNTS:
            srcs = make_sources(DTYPES[dtype], op, nsrc, count, seed=nsrc * 1000 + count)
            got, want = reduce_local(srcs, op), reference(srcs, op)
            assert got.tobytes() == want.tobytes(), f"nsrc={nsrc} count={count}: {got[:8]} != {want[:8]}"


@pytest.mark.parametrize("dtype", (lib.NCL_FLOAT8_E4M3FN, lib.NCL_FLOAT8_E5M2), ids=("e4m3fn", "e5m2"))
@pytest.mark.parametrize("op", list(OPS), ids=lambda o: OPS[o])
def test_fp8_every_pair_of_values(dtype, op):
    """All 65536 pairs of fp8 codes (NaN, inf, subnormals, zeros of both signs; sums that overflow, round to a
    subnormal or tie), and the pairs once more after a third source: the rounding of native/fp8.h is ml_dtypes'.
    Two cases numpy decides otherwise, by the kernels' rule instead: MIN/MAX of equal numbers (+0, -0) keep the
    earlier source; a NaN that arithmetic makes of two NaNs may have either sign (IEEE 754 leaves it open)."""
    codes = np.arange(256, dtype=np.uint8).view(DTYPES[dtype])
    a, b = np.repeat(codes, 256), np.tile(codes, 256)
    for srcs in ([a, b], [a, b, np.roll(a, 12345)]):
        got, want = reduce_local(srcs, op), reference(srcs, op)
        if OPS[op] in ("min", "max"):
            acc = srcs[0].astype(np.float32)
            for s in srcs[1:]:
                s = s.astype(np.float32)
                wins = s < acc if OPS[op] == "min" else s > acc
                acc = np.where(np.isnan(acc), acc, np.where(np.isnan(s) | wins, s, acc))
            want = acc.astype(DTYPES[dtype])
        bad = np.flatnonzero((got.view(np.uint8) != want.view(np.uint8)) & ~(np.isnan(got) & np.isnan(want)
                                                                            & (OPS[op] not in ("min", "max"))))
        assert not bad.size, [(hex(srcs[0].view(np.uint8)[i]), hex(srcs[1].view(np.uint8)[i]), hex(got.view(np.uint8)[i]),
                               hex(want.view(np.uint8)[i])) for i in bad[:8]]


@pytest.mark.parametrize("dtype", [d for d in DTYPES if not np.issubdtype(DTYPES[d], np.integer)],
                         ids=lambda c: np.dtype(DTYPES[c]).name)
@pytest.mark.parametrize("op", (lib.NCL_MIN, lib.NCL_MAX), ids=("min", "max"))
def test_min_max_keep_the_first_sources_nan(dtype, op):
    """By hand: a NaN wins over any number, whichever source holds it, and of two NaNs the first."""
    t = np.dtype(DTYPES[dtype])
    nan = [np.array([QUIET_NAN[t] | k], f"u{t.itemsize}").view(t)[0] for k in (1, 2)]
    one, two = t.type(1.0), t.type(2.0)
    srcs = [np.array([one, nan[0], one, nan[0]], t), np.array([nan[1], two, two, nan[1]], t)]
    got = reduce_local(srcs, op).view(f"u{t.itemsize}")
    # (an fp8 NaN is stored canonical, as ml_dtypes stores it: through float32 and back)
    stored = [np.array([x], t).astype(np.float32).astype(t) if t.itemsize == 1 else np.array([x], t)
              for x in (nan[1], nan[0], two if op == lib.NCL_MAX else one, nan[0])]
    bits = [s.view(f"u{t.itemsize}")[0] for s in stored]
    assert list(got) == bits


def test_in_place_destination_may_alias_a_source():
    a, b = make_sources(np.float32, lib.NCL_SUM, 2, 5000, seed=1)
    want = reference([a, b], lib.NCL_SUM)
    ptrs = ffi.new("const void *[]", [ffi.cast("void *", a.ctypes.data), ffi.cast("void *", b.ctypes.data)])
    assert lib.ncl_reduce_local(ffi.cast("void *", a.ctypes.data), ptrs, 2, a.size, lib.NCL_FLOAT32, lib.NCL_SUM) == 0
    assert a.tobytes() == want.tobytes()


def test_bad_codes_are_errors_not_crashes():
    x = np.zeros(4, np.float32)
    p = ffi.cast("void *", x.ctypes.data)
    srcs = ffi.new("const void *[]", [p])
    assert lib.ncl_reduce_local(p, srcs, 1, 4, 99, lib.NCL_SUM) == lib.NCL_ERR_ARGUMENT
    assert lib.ncl_reduce_local(p, srcs, 1, 4, lib.NCL_FLOAT32, 99) == lib.NCL_ERR_ARGUMENT
    assert lib.ncl_reduce_local(p, srcs, 0, 4, lib.NCL_FLOAT32, lib.NCL_SUM) == lib.NCL_ERR_ARGUMENT


DIGEST = """
import hashlib, sys
sys.path.insert(0, {tests!r})
import test_kernels as t, ncl
h = hashlib.sha256()
for dtype in t.DTYPES:
    for op in t.OPS:
        for nsrc in (1, 2, 3, 8):  # 2: the one-pass path
            h.update(t.reduce_local(t.make_sources(t.DTYPES[dtype], op, nsrc, 4099, seed=nsrc), op).tobytes())
print(ncl.kernel_isa(), h.hexdigest())
"""


@pytest.mark.timeout(120)
def test_every_instruction_set_gives_the_same_bits():
    tests = os.path.dirname(os.path.abspath(__file__))
    results = {}
    for isa in ("generic", "avx2", "avx512"):
        out = subprocess.run([sys.executable, "-c", DIGEST.format(tests=tests)], capture_output=True, text=True,
                             env=dict(os.environ, NCL_KERNEL_ISA=isa), check=True).stdout.split()
        results[out[0]] = out[1]  # the CPU may lack an ISA: then it falls back, and the key says so
    assert "generic" in results
    assert len(set(results.values())) == 1, results


def test_the_core_reads_the_isa_knob_in_any_case():
    out = subprocess.run([sys.executable, "-c", "import ncl; print(ncl.kernel_isa())"], capture_output=True, text=True,
                         env=dict(os.environ, NCL_KERNEL_ISA="GENERIC"), check=True).stdout.strip()
    assert out == "generic"


@pytest.mark.parametrize("op", (lib.NCL_SUM, lib.NCL_AVG), ids=("sum", "avg"))
def test_bfloat16_every_code_and_sums_that_round_to_subnormals(op):
    """Every bfloat16 code against random ones and against its own near-negation (sums landing on float32
    subnormals, which the CPU's bf16 rounding instruction would flush to zero: native/reduce_kernels.c rounds
    those lanes the integer way; NaN and infinity codes in the first source only), with a third source once more,
    lengths not a multiple of the 32-wide step."""
    rng = np.random.default_rng(5)
    codes = np.arange(1 << 16, dtype=np.uint16)
    near = codes ^ np.uint16(0x8000) ^ rng.integers(0, 4, codes.size, dtype=np.uint16)
    for b in (rng.integers(0, 1 << 16, codes.size, dtype=np.uint16), near):
        b[(b & 0x7F80) == 0x7F80] = 0x3F80  # one NaN at most per element (which of two NaNs a sum keeps is open)
        srcs = [codes.view(ml_dtypes.bfloat16), b.view(ml_dtypes.bfloat16)]
        with np.errstate(invalid="ignore"):  # infinity + -infinity
            sums = srcs[0].astype(np.float32) + srcs[1].astype(np.float32)
        if b is near:
            assert np.count_nonzero(np.abs(sums[np.isfinite(sums)]) < np.finfo(np.float32).tiny) > 1000
        for group in (srcs, srcs + [np.roll(srcs[1], 777)]):
            group = [s[:65531] for s in group]
            got, want = reduce_local(group, op), reference(group, op)
            assert got.tobytes() == want.tobytes()
