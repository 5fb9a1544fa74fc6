"""MXFP4 (ncl.models.mxfp4) against a numpy reference written from the format's definition:
each nibble's sign, exponent and mantissa bits give its E2M1 value (checked against the lookup
table too), times 2^(scale - 127); the low nibble of a byte is the even element.  Then the
encoder's round trip within the format's rounding error, and the tiled matmul against the dense
matmul of the decoded weight."""
import numpy as np
import pytest
import torch

from ncl.models import mxfp4


def e2m1(code: int) -> float:
    """An FP4 E2M1 code from its bits: sign | 2 exponent bits (bias 1) | 1 mantissa bit."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 1
    if exponent == 0:  # subnormal: 0 or 0.5
        return sign * 0.5 * mantissa
    return sign * 2.0 ** (exponent - 1) * (1.0 + 0.5 * mantissa)


def reference_decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[..., G, 16] bytes, [..., G] scales -> [..., G*32] float64, one element at a time."""
    *lead, groups, nbytes = blocks.shape
    out = np.empty((*lead, groups * nbytes * 2))
    for index in np.ndindex(*lead, groups):
        scale = 2.0 ** (int(scales[index]) - 127)
        for j in range(nbytes):
            byte = int(blocks[index][j])
            at = index[:-1] + (index[-1] * 32 + 2 * j,)
            out[at] = e2m1(byte & 0xF) * scale
            out[at[:-1] + (at[-1] + 1,)] = e2m1(byte >> 4) * scale
    return out


def test_the_lookup_table_is_e2m1():
    assert [e2m1(c) for c in range(16)] == list(mxfp4.FP4_VALUES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_equals_the_reference(dtype):
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (3, 5, 4, 16), dtype=np.uint8)
    blocks[0, 0, 0] = np.arange(16, dtype=np.uint8) * 17  # every code, both nibbles
    blocks[0, 0, 1] = np.arange(240, 256, dtype=np.uint8)
    scales = rng.integers(100, 150, (3, 5, 4), dtype=np.uint8)
    scales[0, 0, :2] = (0, 252)  # the extremes whose products stay within float32 (6 * 2^127 would not)
    want = reference_decode(blocks, scales)
    got = mxfp4.decode(torch.from_numpy(blocks), torch.from_numpy(scales), dtype)
    assert got.dtype == dtype and got.shape == (3, 5, 128)
    np.testing.assert_array_equal(got.double().numpy(), want)  # exact: every value is representable


def test_low_nibble_is_the_even_element():
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = 0x2F  # low nibble 0xF (-6), high nibble 0x2 (1.0)
    got = mxfp4.decode(blocks, torch.tensor([128], dtype=torch.uint8), torch.float32)
    assert got[:2].tolist() == [-12.0, 2.0] and not got[2:].any()


def test_scale_255_is_nan():
    got = mxfp4.decode(torch.full((1, 16), 0x22, dtype=torch.uint8), torch.tensor([255], dtype=torch.uint8))
    assert torch.isnan(got.float()).all()


def _weights():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 8, 32 * 4, generator=g)
    spread = torch.exp2(torch.randint(-12, 12, (6, 8, 4, 1), generator=g).float())  # per-block magnitudes
    w = (w.view(6, 8, 4, 32) * spread).view(6, 8, 128)
    w[0, 0, :32] = 0.0  # an all-zero block
    w[0, 1, :32] = 6.0  # a block exactly at the top of the grid
    return w


def test_encode_picks_the_smallest_power_of_two_scale():
    w = _weights()
    blocks, scales = mxfp4.encode(w)
    assert blocks.shape == (6, 8, 4, 16) and scales.shape == (6, 8, 4)
    amax = w.view(6, 8, 4, 32).abs().amax(-1)
    scale = 2.0 ** (scales.double() - 127)
    nonzero = amax > 0
    assert (amax <= 6 * scale).all()
    assert (amax[nonzero] > 3 * scale[nonzero]).all()  # a smaller power of two would not fit
    assert scales[0, 1, 0] == 127


def test_round_trip_within_the_format_error():
    w = _weights()
    blocks, scales = mxfp4.encode(w)
    got = mxfp4.decode(blocks, scales, torch.float32)
    scale = (2.0 ** (scales.float() - 127)).repeat_interleave(32, -1)
    scaled = (w / scale).abs()
    # half the gap between neighbouring E2M1 magnitudes: 0.5 up to 2, 1 up to 4, 2 up to 6
    half_gap = torch.where(scaled <= 2, 0.25, torch.where(scaled <= 4, 0.5, 1.0)) * scale
    assert ((got - w).abs() <= half_gap * (1 + 1e-6)).all()
    assert torch.equal(mxfp4.decode(*mxfp4.encode(got), torch.float32), got)  # decoded values are fixed points
    assert torch.equal(got.view(6, 8, 4, 32)[0, 1, 0], torch.full((32,), 6.0))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matmul_equals_the_dense_matmul_of_the_decoded_weight(dtype, tol):
    g = torch.Generator().manual_seed(3)
    w, bias = torch.randn(70, 96, generator=g), torch.randn(70, generator=g)
    blocks, scales = mxfp4.encode(w)
    x = torch.randn(2, 5, 96, generator=g).to(dtype)
    dense = x.double() @ mxfp4.decode(blocks, scales, torch.float64).t() + bias.double()
    for tile_rows in (16, 32, 1024):  # tiles that do not divide, divide, and exceed the 70 rows
        got = mxfp4.matmul(x, blocks, scales, bias.to(dtype), tile_rows=tile_rows)
        assert got.dtype == dtype and got.shape == (2, 5, 70)
        torch.testing.assert_close(got.double(), dense, rtol=tol, atol=tol * dense.abs().max().item())


@pytest.mark.parametrize("call, says", [
    (lambda: mxfp4.encode(torch.zeros(4, 33)), "multiple of 32"),
    (lambda: mxfp4.decode(torch.zeros(2, 16), torch.zeros(2, dtype=torch.uint8)), "uint8"),
    (lambda: mxfp4.decode(torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8)),
     r"\[\.\.\., G, 16\]"),
    (lambda: mxfp4.matmul(torch.zeros(3, 64), *mxfp4.encode(torch.zeros(5, 96))), "features"),
])
def test_bad_arguments_are_clear_errors(call, says):
    with pytest.raises(ValueError, match=says):
        call()


def test_the_configs_block_is_the_formats():
    from ncl.models import configs, mxfp4
    assert configs.MXFP4_BLOCK == mxfp4.BLOCK
