/* fp8.h: the two OCP 8-bit floats, float8_e4m3fn (bias 7, no inf, NaN = S.1111.111, largest 448)
 * and float8_e5m2 (bias 15, IEEE-like: inf and NaNs), to and from float32.
 *
 * Invariant: every conversion gives the bits ml_dtypes gives (numpy's astype): float32 -> fp8
 * rounds to nearest even once; a result beyond the largest finite value is the type's
 * overflow value (e4m3fn: NaN, as it has no inf; e5m2: inf); a NaN becomes the canonical
 * quiet NaN of its sign (e4m3fn S.1111.111, e5m2 S.11111.10).  (torch's .to() differs only
 * there: it saturates e4m3fn to +-448.)  fp8 -> float32 is exact.  Each function is a few
 * selects on integers and one float add, no branches or tables, always inlined (GCC would not,
 * and calls keep a loop scalar), so the reduction loops that call them vectorise.  Decoding is
 * integer only, so it holds under DAZ/FTZ too. */
#ifndef NCL_FP8_H
#define NCL_FP8_H
#include <stdint.h>
#include <string.h>

static inline __attribute__((always_inline)) float fp8_bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline __attribute__((always_inline)) uint32_t fp8_float_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* if c then x else y, as bit masks: a ?: on a value computed by float arithmetic lets GCC move
 * that arithmetic into a branch (it may trap), and the loop no longer vectorises */
static inline __attribute__((always_inline)) uint32_t fp8_select(int c, uint32_t x, uint32_t y) {
    uint32_t mask = 0u - (uint32_t)(c != 0);
    return (x & mask) | (y & ~mask);
}

/* mant mantissa bits, bias exponent bias (constants once inlined).  Both arms of every choice
 * are computed and the choice is fp8_select: no branch, so loops over it vectorise.
 * Normals shift into float32's fields with the exponent rebased; subnormals (exponent field 0)
 * are the integer mantissa m times 2^(1 - bias - mant): its leading one, at bit p, becomes the
 * implicit bit.  Integers only (float arithmetic here would keep MIN/MAX loops scalar). */
static inline __attribute__((always_inline)) float fp8_decode(uint8_t b, int mant, int bias) {
    uint32_t mag = b & 0x7fu, sign = (uint32_t)(b & 0x80u) << 24, m = mag & ((1u << mant) - 1), sub = 0;
    for (int p = 0; p < mant; p++)
        sub = fp8_select(m >> p == 1, ((uint32_t)(127 + 1 - bias - mant + p) << 23) | ((m - (1u << p)) << (23 - p)), sub);
    uint32_t normal = (mag << (23 - mant)) + ((uint32_t)(127 - bias) << 23);
    return fp8_bits_to_float(sign | fp8_select((mag >> mant) == 0, sub, normal));
}

/* The code of |f| (float32 bits a) when it is finite and in range.  Below the smallest normal:
 * |f| plus a float whose ulp is the subnormal step, so that the FPU rounds to nearest even; the
 * sum's low bits are the code (the step up to the smallest normal gives its code too).  At or
 * above: the float32 mantissa rounded to mant bits, to nearest even, in the integer bits (a
 * carry bumps the exponent). */
static inline __attribute__((always_inline)) uint32_t fp8_encode_magnitude(uint32_t a, int mant, int bias) {
    uint32_t magic = (uint32_t)(127 + 24 - bias - mant) << 23;
    uint32_t sub = fp8_float_to_bits(fp8_bits_to_float(a) + fp8_bits_to_float(magic)) - magic;
    uint32_t normal = ((a + ((1u << (22 - mant)) - 1) + ((a >> (23 - mant)) & 1)) >> (23 - mant)) -
                      ((uint32_t)(127 - bias) << mant);
    return fp8_select(a < ((uint32_t)(127 + 1 - bias) << 23), sub, normal);
}

static inline __attribute__((always_inline)) float e4m3_to_float(uint8_t b) {
    uint32_t nan = 0x7fc00000u | ((uint32_t)(b & 0x80) << 24);
    return fp8_bits_to_float(fp8_select((b & 0x7f) == 0x7f, nan, fp8_float_to_bits(fp8_decode(b, 3, 7))));
}

static inline __attribute__((always_inline)) float e5m2_to_float(uint8_t b) {
    uint32_t special = ((uint32_t)(b & 0x80) << 24) | 0x7f800000u | ((uint32_t)(b & 3) << 21); /* inf, NaN */
    return fp8_bits_to_float(fp8_select((b & 0x7c) == 0x7c, special, fp8_float_to_bits(fp8_decode(b, 2, 15))));
}

static inline __attribute__((always_inline)) uint8_t float_to_e4m3(float f) {
    uint32_t u = fp8_float_to_bits(f), a = u & 0x7fffffffu, sign = (u >> 24) & 0x80;
    uint32_t m = fp8_encode_magnitude(a, 3, 7);
    /* above 464 (halfway from 448 to the NaN code's 480; the tie rounds to even, 448) and NaN */
    return (uint8_t)(sign | fp8_select(a > 0x43e80000u, 0x7f, m));
}

static inline __attribute__((always_inline)) uint8_t float_to_e5m2(float f) {
    uint32_t u = fp8_float_to_bits(f), a = u & 0x7fffffffu, sign = (u >> 24) & 0x80;
    uint32_t m = fp8_encode_magnitude(a, 2, 15);
    /* NaN; from 61440 (halfway from 57344 to 65536, a tie that rounds to even: inf) on, inf */
    return (uint8_t)(sign | fp8_select(a > 0x7f800000u, 0x7e, fp8_select(a >= 0x47700000u, 0x7c, m)));
}
#endif
