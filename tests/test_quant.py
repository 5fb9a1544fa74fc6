"""The C block-scaled codes (native/quant.c, ncl.compress.quantize/dequantize) byte for byte against a
numpy reference of OCP MX v1.0 (below: numpy and ml_dtypes only): random data with outliers, zeros,
subnormals, blocks spanning 1e-38 .. 1e38, NaN and inf blocks, every format, many sizes."""
import ml_dtypes
import numpy as np
import pytest

from harness import case_seed
from ncl import compress

BLOCK = 32
# element type (ml_dtypes' name; "int8": fixed point with 6 fraction bits) and emax (OCP MX v1.0, table 1)
ELEMENTS = {"fp8": ("float8_e4m3fn", 8), "int8": ("int8", 0), "mxfp4": ("float4_e2m1fn", 2)}


def reference_quantize(values: np.ndarray, name: str) -> np.ndarray:
    element, emax = ELEMENTS[name]
    v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, BLOCK)
    finite = np.isfinite(v).all(axis=1)
    amax = np.where(finite, np.abs(np.where(np.isfinite(v), v, 0)).max(axis=1), 0)
    exp = np.where(amax > 0, np.frexp(amax)[1] - 1, -127) - emax  # floor(log2(amax)), exactly
    exp = np.clip(exp, -127, 127).astype(np.int32)
    scaled = np.ldexp(np.where(finite[:, None], v, 0), -exp[:, None])
    if element == "int8":
        codes = np.clip(np.rint(scaled * 64), -127, 127).astype(np.int8).view(np.uint8)
    else:
        t = getattr(ml_dtypes, element)
        top = float(ml_dtypes.finfo(t).max)
        codes = np.clip(scaled, -top, top).astype(t).view(np.uint8)
        if element == "float4_e2m1fn":  # two codes a byte, the first in the low nibble
            codes = codes.reshape(-1, 2)
            codes = (codes[:, 0] & 0x0F) | (codes[:, 1] << 4)
    scales = np.where(finite, exp + 127, 255).astype(np.uint8)
    return np.concatenate([codes.reshape(-1), scales])


def reference_dequantize(packed: np.ndarray, count: int, name: str) -> np.ndarray:
    element, _ = ELEMENTS[name]
    blocks = count // BLOCK
    code_bytes = blocks * BLOCK * (4 if element == "float4_e2m1fn" else 8) // 8
    codes, scales = packed[:code_bytes], packed[code_bytes:code_bytes + blocks]
    if element == "int8":
        values = codes.view(np.int8).astype(np.float32) / 64
    else:
        if element == "float4_e2m1fn":
            codes = np.stack([codes & 0x0F, codes >> 4], axis=1).reshape(-1)
        values = codes.view(getattr(ml_dtypes, element)).astype(np.float32)
    with np.errstate(over="ignore"):  # (scale 255: NaN below)
        out = np.ldexp(values.reshape(blocks, BLOCK), scales.astype(np.int32)[:, None] - 127)
    out[scales == 255] = np.nan
    return out.reshape(-1)


def _awkward(count: int, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = count // BLOCK
    v = rng.standard_normal(count).astype(np.float32)
    v[rng.random(count) < 0.01] *= 1000                                           # outliers
    with np.errstate(over="ignore"):  # (an outlier times 1e38 is an inf: one more non-finite block)
        v *= np.repeat(10.0 ** rng.uniform(-38, 38, blocks), BLOCK).astype(np.float32)  # 1e-38 .. 1e38, subnormals
    v[rng.random(count) < 0.05] = 0.0
    v[rng.random(count) < 0.01] = -0.0
    kind = rng.integers(0, 8, blocks)
    for b in np.flatnonzero(kind == 0):
        v[b * BLOCK:(b + 1) * BLOCK] = 0.0                                         # zero blocks
    for b in np.flatnonzero(kind == 1):
        v[b * BLOCK + rng.integers(BLOCK)] = rng.choice([np.nan, np.inf, -np.inf])  # non-finite blocks
    for b in np.flatnonzero(kind == 2):                                             # just below a power of two,
        v[b * BLOCK] = np.float32(2.0 ** rng.integers(-126, 127)) * np.float32(1 - 2 ** -24)  # halfway codes
        v[b * BLOCK + 1:(b + 1) * BLOCK] = rng.integers(-64, 64, BLOCK - 1) * np.float32(2.0 ** rng.integers(-130, 100))
    return v


@pytest.mark.parametrize("name", sorted(compress.FORMATS))
def test_c_codes_are_the_references_bytes(name):
    fmt = compress.FORMATS[name]
    for count in (0, 32, 64, 96, 32 * 7, 32 * 1001, 32 * 4096):
        v = _awkward(count, case_seed("quant", name, count))
        want = reference_quantize(v, name)
        got = compress.quantize(v, fmt)
        bad = np.flatnonzero(got != want)
        assert got.dtype == np.uint8 and not bad.size, f"count={count}: {bad.size} bytes differ, first at {bad[:4]}"
        back, want_back = compress.dequantize(got, count, fmt), reference_dequantize(want, count, name)
        assert back.dtype == np.float32
        assert back.tobytes() == want_back.tobytes(), f"count={count}: decoded values differ"


@pytest.mark.parametrize("name", sorted(compress.FORMATS))
def test_every_code_decodes_as_the_reference(name):
    """Every code byte under scales 0, 1, 126, 127, 128, 254 and 255 (NaN)."""
    per_block = BLOCK * (4 if name == "mxfp4" else 8) // 8
    codes = np.resize(np.arange(256, dtype=np.uint8), 8 * per_block)
    scales = np.array([0, 1, 126, 127, 128, 254, 255, 127], np.uint8)
    packed = np.concatenate([codes, scales])
    got = compress.dequantize(packed, 8 * BLOCK, compress.FORMATS[name])
    assert got.tobytes() == reference_dequantize(packed, 8 * BLOCK, name).tobytes()


def test_bad_counts_are_errors():
    fmt = compress.FORMATS["fp8"]
    with pytest.raises(ValueError, match="not whole blocks"):
        compress.quantize(np.zeros(33, np.float32), fmt)
    with pytest.raises(ValueError, match="not whole blocks"):
        compress.dequantize(np.zeros(66, np.uint8), 33, fmt)
    with pytest.raises(ValueError, match="fewer than 64 values"):
        compress.dequantize(np.zeros(65, np.uint8), 64, fmt)


# ---- fp8 rows (DeepEP's convention: e4m3 codes, one float32 scale per 128 values of a row), ncl.moe's fp8 dispatch
def reference_fp8_rows(rows: np.ndarray) -> np.ndarray:
    """Per row, blocks of 128 (the last one shorter): amax = max |v| (NaNs skipped), at least 1e-4; codes
    e4m3(v * (448 / amax)), scale amax / 448.  Bytes of a row: the codes, zero-padded to 4, then the scales."""
    r, w = rows.shape
    blocks = -(-w // 128)
    codes, scales = np.zeros((r, -(-w // 4) * 4), np.uint8), np.empty((r, blocks), np.float32)
    for b in range(blocks):
        v = rows[:, b * 128:(b + 1) * 128]
        amax = np.fmax(np.fmax.reduce(np.abs(v), axis=1), np.float32(1e-4))
        with np.errstate(invalid="ignore", over="ignore"):
            scaled = v * (np.float32(448) / amax)[:, None]
        codes[:, b * 128:b * 128 + v.shape[1]] = scaled.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
        scales[:, b] = amax / np.float32(448)
    return np.concatenate([codes, scales.view(np.uint8).reshape(r, 4 * blocks)], axis=1)


def reference_fp8_rows_values(packed: np.ndarray, width: int) -> np.ndarray:
    codes = packed[:, :width].view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    scales = np.ascontiguousarray(packed[:, -(-width // 4) * 4:]).view(np.float32)
    with np.errstate(invalid="ignore"):
        return codes * np.repeat(scales, 128, axis=1)[:, :width]


def test_fp8_rows_are_the_references_bytes():
    for rows, width in ((0, 64), (1, 1), (3, 127), (2, 128), (5, 200), (4, 2880), (64, 256)):
        count = rows * width
        for kind in ("awkward", "outliers"):
            seed = case_seed("fp8 rows", kind, rows, width)
            if kind == "awkward":  # zeros, NaN and inf blocks, 1e-38 .. 1e38, subnormals
                v = _awkward(-(-count // BLOCK) * BLOCK, seed)[:count].reshape(rows, width)
            else:
                rng = np.random.default_rng(seed)
                v = rng.standard_normal((rows, width)).astype(np.float32)
                v[rng.random((rows, width)) < 0.01] *= 1000
            want = reference_fp8_rows(v)
            got = compress.quantize_fp8_rows(v)
            assert got.shape == (rows, compress.fp8_row_bytes(width))
            bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
            assert not bad.size, f"{kind} {rows}x{width}: {bad.size} bytes differ, first at {bad[:4]}"
            back = compress.dequantize_fp8_rows(got, width)
            assert back.tobytes() == reference_fp8_rows_values(want, width).tobytes(), f"{kind} {rows}x{width}"
            codes, scales = compress.fp8_row_parts(got, width)
            assert codes.tobytes() == want[:, :width].tobytes() and scales.shape == (rows, -(-width // 128))
