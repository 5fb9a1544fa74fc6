"""Block-scaled compressed collectives: values travel as 8- or 4-bit codes with one shared scale per
block of 32, and are reduced in fp32.

Formats (OCP Microscaling Formats (MX) v1.0, https://www.opencompute.org/documents/ocp-microscaling-formats-mx-v1-0-spec-final-pdf):
every block of BLOCK values shares one E8M0 scale, 2^e with e = floor(log2(max |v|)) - emax of the element
format (section 6.3), stored as e + 127 in one byte; each value is v / 2^e rounded to nearest-even into the
element format and clamped to its largest magnitude.  A block holding a NaN or an infinity gets the NaN
scale (255) and comes back as all NaN.  The bytes of a block: BLOCK codes (packed two to a byte for
4-bit ones), then, per chunk, the scales.  The C core encodes and decodes (native/quant.c, which states
the rounding exactly; tests/test_quant.py holds a numpy reference it matches byte for byte).

Where rounding happens (and nowhere else), for a call on x of any float dtype:
  all_reduce      x is cut into `size` chunks of whole blocks (the last padded with zeros).  (1) Each rank
                  quantizes every chunk and sends chunk j to rank j (an all_to_all of codes); rank j
                  dequantizes the `size` versions of its chunk and sums them in fp32 in rank order (AVG
                  then divides by size).  (2) Rank j quantizes that sum once more and every rank gathers
                  every chunk's codes (an all_gather) and dequantizes them.  (3) The fp32 values are
                  rounded once into x's dtype.  Every rank ends with the same bits, whatever algorithm
                  moves the codes, since the codes are copied exactly and every rank decodes the same ones.
  reduce_scatter  (1) and (3): rank j's block is its fp32 sum, rounded once into the dtype.
  all_gather      each rank quantizes its block once; every rank decodes every block, its own included.
  all_to_all      each block is quantized once by its sender and decoded by its receiver.
The codes move through the communicator's own all_to_all and all_gather (uint8), so tracing, the
flight record and emulation see the compressed bytes.
"""
from typing import Any, Dict, List, NamedTuple, Tuple

import numpy as np

from ._native import check, ffi, lib
from .buffers import ReduceOp, as_buffer, bump_version, check_op, output, rows

BLOCK = lib.NCL_MX_BLOCK   # values per shared scale (OCP MX v1.0: k = 32 for every MX format)
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


class Format(NamedTuple):
    name: str
    code: int             # the C core's ncl_mx_format (native/quant.c has each one's emax)
    bits: int             # bits per element code
    about: str


FORMATS: Dict[str, Format] = {f.name: f for f in (
    Format("fp8", lib.NCL_MX_FP8, 8, "MXFP8 (E4M3 elements, max 448)"),
    Format("int8", lib.NCL_MX_INT8, 8, "MXINT8 (8-bit two's complement, implicit scale 2^-6; -128 unused)"),
    Format("mxfp4", lib.NCL_MX_FP4, 4, "MXFP4 (E2M1 elements: 0, 0.5, 1, 1.5, 2, 3, 4, 6)"),
)}


def check_format(compress: Any) -> Format:
    fmt = FORMATS.get(compress) if isinstance(compress, str) else None
    if fmt is None:
        raise ValueError(f"compress must be one of {', '.join(FORMATS)}, not {compress!r}")
    return fmt


def packed_bytes(count: int, fmt: Format) -> int:
    """Bytes of `count` values (a whole number of blocks) in the format: codes, then one scale a block."""
    blocks = -(-count // BLOCK)
    return blocks * (BLOCK * fmt.bits // 8 + 1)


def bytes_per_value(fmt: Format) -> float:
    return (BLOCK * fmt.bits / 8 + 1) / BLOCK


def wire_calls(count: int, size: int, compress: str) -> List[Tuple[str, int]]:
    """The (collective, bytes as the flight record counts them) a compressed all_reduce of `count`
    values over `size` ranks issues: an all_to_all of one chunk's codes to each peer, then an
    all_gather of one chunk's codes (what the cost model prices, and a trace records)."""
    chunk = packed_bytes(_chunks(count, size)[0], check_format(compress))
    return [("all_to_all", chunk), ("all_gather", chunk)]


def quantize(values: np.ndarray, fmt: Format) -> np.ndarray:
    """fp32 values (a multiple of BLOCK of them) -> their packed bytes (uint8)."""
    v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    packed = np.empty(packed_bytes(v.size, fmt), dtype=np.uint8)
    check(lib.ncl_mx_quantize(ffi.from_buffer(packed), ffi.from_buffer("float[]", v), v.size, fmt.code))
    return packed


def dequantize(packed: np.ndarray, count: int, fmt: Format) -> np.ndarray:
    """The fp32 values of `count` packed values (a multiple of BLOCK)."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if packed.size < packed_bytes(count, fmt):
        raise ValueError(f"dequantize: {packed.size} bytes hold fewer than {count} values in {fmt.name}")
    out = np.empty(count, dtype=np.float32)
    check(lib.ncl_mx_dequantize(ffi.from_buffer("float[]", out), ffi.from_buffer(packed), count, fmt.code))
    return out


# ---- fp8 rows (DeepEP's convention), what ncl.moe's fp8 dispatch sends -------------------------------------------
FP8_ROW_BLOCK = lib.NCL_FP8_ROW_BLOCK  # values of a row per float32 scale (the last block of a row may be shorter)


def fp8_row_bytes(width: int) -> int:
    """Bytes of a row of `width` values as an fp8 row: e4m3 codes (padded to 4 bytes), then one float32
    scale per FP8_ROW_BLOCK values (native/quant.c states the rounding)."""
    return lib.ncl_fp8_row_bytes(width)


def quantize_fp8_rows(rows: np.ndarray) -> np.ndarray:
    """float32 rows (R, W) -> their fp8 rows, (R, fp8_row_bytes(W)) uint8."""
    v = np.ascontiguousarray(rows, dtype=np.float32)
    packed = np.empty((v.shape[0], fp8_row_bytes(v.shape[1])), dtype=np.uint8)
    check(lib.ncl_fp8_rows_quantize(ffi.from_buffer(packed), ffi.from_buffer("float[]", v), v.shape[0], v.shape[1]))
    return packed


def fp8_row_parts(packed: np.ndarray, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """Views of fp8 rows (R, fp8_row_bytes(width)): the codes (R, width) uint8, the scales (R, blocks) float32."""
    return packed[:, :width], packed[:, fp8_row_bytes(width) - 4 * -(-width // FP8_ROW_BLOCK):].view(np.float32)


def dequantize_fp8_rows(packed: np.ndarray, width: int) -> np.ndarray:
    """fp8 rows (R, fp8_row_bytes(width)) uint8 -> their float32 values (R, width): code times scale."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or packed.shape[1] != fp8_row_bytes(width):
        raise ValueError(f"fp8 rows of {width} values are {fp8_row_bytes(width)} bytes, not {packed.shape}")
    out = np.empty((packed.shape[0], width), dtype=np.float32)
    check(lib.ncl_fp8_rows_dequantize(ffi.from_buffer("float[]", out), ffi.from_buffer(packed), packed.shape[0], width))
    return out


# ---- the collectives -------------------------------------------------------------------------------------------

def _values(buf) -> np.ndarray:
    """A flat numpy view of a checked buffer's elements (torch tensors through their storage)."""
    obj = buf.obj
    if isinstance(obj, np.ndarray):
        return obj.reshape(-1)
    import torch
    flat = obj.detach().reshape(-1)
    if flat.dtype == torch.bfloat16:
        import ml_dtypes
        return flat.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return flat.numpy()


def _check_float(buf, name: str) -> None:
    from .dtypes import NAMES
    if NAMES[buf.dtype] not in FLOAT_DTYPES:
        raise TypeError(f"compress needs a float {name} ({', '.join(FLOAT_DTYPES)}), not {NAMES[buf.dtype]}")


def _store(dst, values: np.ndarray) -> None:
    """Write fp32 values into a checked buffer, rounding once into its dtype."""
    target = _values(dst)
    target[...] = values.astype(target.dtype)
    bump_version(dst.obj)


def _chunks(count: int, size: int) -> Tuple[int, int]:
    """(values per chunk, a whole number of blocks; padded total) for `count` values over `size` ranks."""
    per = -(-count // size)
    per = -(-per // BLOCK) * BLOCK
    return per, per * size


def _reduce_chunks(comm, flat: np.ndarray, fmt: Format, op: ReduceOp) -> Tuple[np.ndarray, int]:
    """Steps (1) of all_reduce and reduce_scatter: this rank's chunk summed in fp32 in rank order."""
    size = comm.size
    per, padded = _chunks(flat.size, size)
    values = np.zeros(padded, dtype=np.float32)
    values[:flat.size] = flat
    sent = np.stack([quantize(values[j * per:(j + 1) * per], fmt) for j in range(size)])
    got = comm.all_to_all(sent)
    total = np.zeros(per, dtype=np.float32)
    for r in range(size):  # rank order: the same sum on any algorithm
        total += dequantize(got[r], per, fmt)
    if op == ReduceOp.AVG:
        total /= np.float32(size)
    return total, per


def _check_reduction(op, compress) -> Tuple[ReduceOp, Format]:
    op = check_op(op)
    fmt = check_format(compress)
    if op not in (ReduceOp.SUM, ReduceOp.AVG):
        raise ValueError(f"compress works with SUM and AVG, not {op.name}: a block-scaled code keeps neither "
                         "order nor products")
    return op, fmt


def all_reduce(comm, x, compress: str, op: ReduceOp = ReduceOp.SUM, *, out=None):
    op, fmt = _check_reduction(op, compress)
    src = as_buffer(x, "x", writable=out is None)
    _check_float(src, "x")
    dst = src if out is None else output(out, src, src.shape)
    flat = _values(src).astype(np.float32)
    mine, per = _reduce_chunks(comm, flat, fmt, op)
    every = comm.all_gather(quantize(mine, fmt)).reshape(comm.size, -1)
    result = np.concatenate([dequantize(every[j], per, fmt) for j in range(comm.size)])
    _store(dst, result[:flat.size])
    return dst.obj


def _per_rank_blocks(src, size: int) -> Tuple[np.ndarray, int]:
    """x's `size` blocks along dim 0 in fp32, each padded with zeros to whole BLOCKs: ([size, per], values
    a block)."""
    block = src.count // size
    padded = np.zeros((size, -(-block // BLOCK) * BLOCK), dtype=np.float32)
    padded[:, :block] = _values(src).astype(np.float32).reshape(size, block)
    return padded, block


def _divisible(src, size: int) -> None:
    n = rows(src, "x")
    if n % size:
        raise ValueError(f"x.shape[0] = {n} is not divisible by the communicator size {size}")


def reduce_scatter(comm, x, compress: str, op: ReduceOp = ReduceOp.SUM, out=None):
    op, fmt = _check_reduction(op, compress)
    src = as_buffer(x, "x", writable=False)
    _check_float(src, "x")
    _divisible(src, comm.size)
    dst = output(out, src, (src.shape[0] // comm.size,) + src.shape[1:])
    padded, block = _per_rank_blocks(src, comm.size)  # chunk j is exactly rank j's block
    mine, _ = _reduce_chunks(comm, padded.reshape(-1), fmt, op)
    _store(dst, mine[:block])
    return dst.obj


def all_gather(comm, x, compress: str, out=None):
    fmt = check_format(compress)
    src = as_buffer(x, "x", writable=False)
    _check_float(src, "x")
    shape = (comm.size * src.shape[0],) + src.shape[1:] if src.shape else (comm.size,)
    dst = output(out, src, shape)
    per = -(-src.count // BLOCK) * BLOCK
    values = np.zeros(per, dtype=np.float32)
    values[:src.count] = _values(src)
    every = comm.all_gather(quantize(values, fmt)).reshape(comm.size, -1)
    _store(dst, np.concatenate([dequantize(every[r], per, fmt)[:src.count] for r in range(comm.size)]))
    return dst.obj


def all_to_all(comm, x, compress: str, out=None):
    fmt = check_format(compress)
    src = as_buffer(x, "x", writable=False)
    _check_float(src, "x")
    _divisible(src, comm.size)
    dst = output(out, src, src.shape)
    padded, block = _per_rank_blocks(src, comm.size)
    got = comm.all_to_all(np.stack([quantize(padded[j], fmt) for j in range(comm.size)]))
    per = padded.shape[1]
    _store(dst, np.concatenate([dequantize(got[r], per, fmt)[:block] for r in range(comm.size)]))
    return dst.obj
