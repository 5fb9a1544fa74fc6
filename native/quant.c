/* quant.c: block-scaled codes (OCP Microscaling Formats v1.0) of float32 values, the wire format of
 * ncl/compress.py's compressed collectives; one pass over the data each way.
 *
 * Invariant: the bytes are those of the numpy reference (tests/test_quant.py), on every CPU.  Per
 * block of NCL_MX_BLOCK values, one E8M0 scale 2^e: e = floor(log2(max |v|)) - emax, exact (read
 * from the exponent bits), -127 for an all-zero block, clamped to [-127, 127], stored as e + 127.
 * A block holding a NaN or an inf gets scale 255 and zero codes, and decodes to all NaN.  A value
 * becomes v * 2^-e (a power-of-two product: rounded, once, only below float32's normals), clamped to
 * the element's largest magnitude, rounded to nearest even into the element (native/fp8.h's rule).
 * Layout: every block's codes (4-bit ones two a byte, the first in the low nibble), then every
 * block's scale.  Decoding multiplies each code's value by 2^e, which is exact. */
#include <string.h>

#include "fp8.h"
#include "internal.h"

enum { SCALE_NAN = 255 };

static const struct {
    int emax;  /* exponent of the element's largest power of two (OCP MX v1.0, table 1) */
    int bits;  /* per code */
} FORMATS[NCL_NUM_MX_FORMATS] = {
    [NCL_MX_FP8] = {8, 8},   /* E4M3, max 448 */
    [NCL_MX_INT8] = {0, 8},  /* two's complement with 6 fraction bits, max 127/64 (-128 unused) */
    [NCL_MX_FP4] = {2, 4},   /* E2M1, max 6 */
};

/* 2^e as a float, for e in [-127, 127] (2^-127 is a subnormal, still exact) */
static inline float pow2(int e) {
    return fp8_bits_to_float(e >= -126 ? (uint32_t)(e + 127) << 23 : 0x00400000u);
}

/* E2M1 (bias 1, one mantissa bit, no inf or NaN; sign at bit 3) through fp8.h's helpers */
static inline uint8_t float_to_e2m1(float f) {
    uint32_t u = fp8_float_to_bits(f);
    return (uint8_t)(((u >> 28) & 8) | fp8_encode_magnitude(u & 0x7fffffffu, 1, 1));
}

static inline float e2m1_to_float(uint8_t n) {
    return fp8_decode((uint8_t)(((n & 8) << 4) | (n & 7)), 1, 1);
}

/* x clamped to [-top, top] (x finite, top > 0), on the bits: a float compare-and-select here would
 * be compiled as a branch, and the loop would not vectorise */
static inline float clamp(float x, float top) {
    uint32_t u = fp8_float_to_bits(x), a = u & 0x7fffffffu, t = fp8_float_to_bits(top);
    return fp8_bits_to_float((u & 0x80000000u) | fp8_select(a > t, t, a));
}

/* this block's e (see the top); *finite = 0 for a block with a NaN or an inf */
static int block_exponent(const float* v, int emax, int* finite) {
    uint32_t amax = 0, bad = 0;
    for (int i = 0; i < NCL_MX_BLOCK; i++) {
        uint32_t a = fp8_float_to_bits(v[i]) & 0x7fffffffu;
        bad |= a >= 0x7f800000u;
        amax = a > amax ? a : amax;
    }
    *finite = !bad;
    if (bad || amax == 0) return -127;
    int floor_log2 = amax >= 0x00800000u ? (int)(amax >> 23) - 127 : (31 - __builtin_clz(amax)) - 149;
    int e = floor_log2 - emax;
    return e < -127 ? -127 : e > 127 ? 127 : e;
}

int ncl_mx_quantize(void* packed_, const float* values, size_t count, int format) {
    if (format < 0 || format >= NCL_NUM_MX_FORMATS) return ncl_error(NCL_ERR_ARGUMENT, "unknown MX format %d", format);
    if (count % NCL_MX_BLOCK) return ncl_error(NCL_ERR_ARGUMENT, "mx_quantize: %zu values, not whole blocks", count);
    uint8_t* packed = packed_;
    size_t blocks = count / NCL_MX_BLOCK, block_bytes = NCL_MX_BLOCK * (size_t)FORMATS[format].bits / 8;
    uint8_t* scales = packed + blocks * block_bytes;
    for (size_t b = 0; b < blocks; b++) {
        const float* v = values + b * NCL_MX_BLOCK;
        uint8_t* out = packed + b * block_bytes;
        int finite, e = block_exponent(v, FORMATS[format].emax, &finite);
        scales[b] = finite ? (uint8_t)(e + 127) : SCALE_NAN;
        if (!finite) { /* zero codes */
            memset(out, 0, block_bytes);
            continue;
        }
        float s = pow2(-e);
        if (format == NCL_MX_FP8) {
            for (int i = 0; i < NCL_MX_BLOCK; i++) out[i] = float_to_e4m3(clamp(v[i] * s, 448.0f));
        } else if (format == NCL_MX_INT8) {
            for (int i = 0; i < NCL_MX_BLOCK; i++) { /* adding 1.5 * 2^23 rounds to an integer, to nearest even */
                float x = clamp(v[i] * s * 64.0f, 127.0f);
                out[i] = (uint8_t)(int8_t)(int32_t)((x + 12582912.0f) - 12582912.0f);
            }
        } else {
            for (int i = 0; i < NCL_MX_BLOCK / 2; i++)
                out[i] = (uint8_t)(float_to_e2m1(clamp(v[2 * i] * s, 6.0f)) |
                                   float_to_e2m1(clamp(v[2 * i + 1] * s, 6.0f)) << 4);
        }
    }
    return NCL_OK;
}

int ncl_mx_dequantize(float* values, const void* packed_, size_t count, int format) {
    if (format < 0 || format >= NCL_NUM_MX_FORMATS) return ncl_error(NCL_ERR_ARGUMENT, "unknown MX format %d", format);
    if (count % NCL_MX_BLOCK) return ncl_error(NCL_ERR_ARGUMENT, "mx_dequantize: %zu values, not whole blocks", count);
    const uint8_t* packed = packed_;
    size_t blocks = count / NCL_MX_BLOCK, block_bytes = NCL_MX_BLOCK * (size_t)FORMATS[format].bits / 8;
    const uint8_t* scales = packed + blocks * block_bytes;
    for (size_t b = 0; b < blocks; b++) {
        const uint8_t* in = packed + b * block_bytes;
        float* out = values + b * NCL_MX_BLOCK;
        if (scales[b] == SCALE_NAN) {
            for (int i = 0; i < NCL_MX_BLOCK; i++) out[i] = fp8_bits_to_float(0x7fc00000u);
            continue;
        }
        float s = pow2(scales[b] - 127);
        if (format == NCL_MX_FP8) {
            for (int i = 0; i < NCL_MX_BLOCK; i++) out[i] = e4m3_to_float(in[i]) * s;
        } else if (format == NCL_MX_INT8) {
            for (int i = 0; i < NCL_MX_BLOCK; i++) out[i] = (float)(int8_t)in[i] / 64.0f * s;
        } else {
            for (int i = 0; i < NCL_MX_BLOCK / 2; i++) {
                out[2 * i] = e2m1_to_float(in[i] & 0x0f) * s;
                out[2 * i + 1] = e2m1_to_float(in[i] >> 4) * s;
            }
        }
    }
    return NCL_OK;
}

/* fp8 rows (DeepEP's convention, ncl.moe's fp8 dispatch): each row's values in blocks of
 * NCL_FP8_ROW_BLOCK (the last one may be shorter), one float32 scale per block.  amax = max |v| of
 * the block, at least 1e-4; a code is float_to_e4m3(v * (448 / amax)) (|v * 448/amax| <= 448 up to
 * one rounding, which e4m3 rounds back to 448), the scale amax / 448; a value decodes as code *
 * scale.  NaNs are skipped by the max and stay NaN; an inf makes its block NaN.  Layout of a row:
 * width codes, zero-padded to 4 bytes, then the scales (ncl_fp8_row_bytes in all). */
size_t ncl_fp8_row_bytes(size_t width) {
    return ((width + 3) & ~(size_t)3) + 4 * ncl_div_up(width, NCL_FP8_ROW_BLOCK);
}

int ncl_fp8_rows_quantize(void* packed_, const float* rows, size_t nrows, size_t width) {
    size_t row_bytes = ncl_fp8_row_bytes(width), codes_bytes = (width + 3) & ~(size_t)3;
    for (size_t r = 0; r < nrows; r++) {
        const float* v = rows + r * width;
        uint8_t* codes = (uint8_t*)packed_ + r * row_bytes;
        memset(codes + width, 0, codes_bytes - width);
        for (size_t b = 0, at = 0; at < width; b++, at += NCL_FP8_ROW_BLOCK) {
            size_t m = ncl_min(NCL_FP8_ROW_BLOCK, width - at);
            float amax = 1e-4f;
            for (size_t i = 0; i < m; i++) {
                float a = fp8_bits_to_float(fp8_float_to_bits(v[at + i]) & 0x7fffffffu);
                amax = a > amax ? a : amax;
            }
            float factor = 448.0f / amax, scale = amax / 448.0f;
            for (size_t i = 0; i < m; i++) codes[at + i] = float_to_e4m3(v[at + i] * factor);
            memcpy(codes + codes_bytes + 4 * b, &scale, 4);
        }
    }
    return NCL_OK;
}

int ncl_fp8_rows_dequantize(float* rows, const void* packed_, size_t nrows, size_t width) {
    size_t row_bytes = ncl_fp8_row_bytes(width), codes_bytes = (width + 3) & ~(size_t)3;
    for (size_t r = 0; r < nrows; r++) {
        const uint8_t* codes = (const uint8_t*)packed_ + r * row_bytes;
        float* v = rows + r * width;
        for (size_t b = 0, at = 0; at < width; b++, at += NCL_FP8_ROW_BLOCK) {
            size_t m = ncl_min(NCL_FP8_ROW_BLOCK, width - at);
            float scale;
            memcpy(&scale, codes + codes_bytes + 4 * b, 4);
            for (size_t i = 0; i < m; i++) v[at + i] = e4m3_to_float(codes[at + i]) * scale;
        }
    }
    return NCL_OK;
}
