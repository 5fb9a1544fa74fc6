/* fp8.h: the two OCP 8-bit floats, float8_e4m3fn (bias 7, no inf, NaN = S.1111.111, largest 448)
 * and float8_e5m2 (bias 15, IEEE-like: inf and NaNs), to and from float32.
 *
 * Invariant: every conversion gives the bits ml_dtypes gives (numpy's astype): float32 -> fp8
 * rounds to nearest even once; a result beyond the largest finite value is the type's
 * overflow value (e4m3fn: NaN, as it has no inf; e5m2: inf); a NaN becomes the canonical
 * quiet NaN of its sign (e4m3fn S.1111.111, e5m2 S.11111.10).  (torch's .to() differs only
 * there: it saturates e4m3fn to +-448.)  fp8 -> float32 is exact.  Each function is a few
 * selects on integers and one float add, no branches or tables, so the reduction loops that
 * call them vectorise; none depends on denormals being kept (DAZ/FTZ safe on the way in). */
#ifndef NCL_FP8_H
#define NCL_FP8_H
#include <stdint.h>
#include <string.h>

static inline float fp8_bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t fp8_float_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* MANT mantissa bits, BIAS exponent bias: normals shift into float32's fields with the
 * exponent rebased; subnormals (exponent field 0) are the integer mantissa times 2^(1-BIAS-MANT). */
#define FP8_DECODE(b, MANT, BIAS)                                                                       \
    ((((b) & 0x7fu) >> (MANT)) == 0                                                                     \
         ? fp8_bits_to_float(((uint32_t)((b) & 0x80u) << 24)) +                                         \
               (((b) & 0x80u) ? -1.0f : 1.0f) * (float)((b) & ((1u << (MANT)) - 1)) *                   \
                   fp8_bits_to_float((uint32_t)(127 + 1 - (BIAS) - (MANT)) << 23)                       \
         : fp8_bits_to_float(((uint32_t)((b) & 0x80u) << 24) |                                          \
                             ((((uint32_t)(b) & 0x7fu) << (23 - (MANT))) + ((uint32_t)(127 - (BIAS)) << 23))))

static inline float e4m3_to_float(uint8_t b) {
    float f = FP8_DECODE(b, 3, 7);
    return (b & 0x7f) == 0x7f ? fp8_bits_to_float(0x7fc00000u | ((uint32_t)(b & 0x80) << 24)) : f;
}

static inline float e5m2_to_float(uint8_t b) {
    float f = FP8_DECODE(b, 2, 15);
    uint32_t special = ((uint32_t)(b & 0x80) << 24) | 0x7f800000u | ((uint32_t)(b & 3) << 21); /* inf, NaN */
    return (b & 0x7c) == 0x7c ? fp8_bits_to_float(special) : f;
}

/* |f| below the smallest normal: round |f| * 2^(BIAS-1+MANT) to an integer by adding a float
 * whose ulp is the subnormal step (the FPU rounds to nearest even); the integer is the code
 * (the step up to the smallest normal gives its code too).  At or above: round the float32
 * mantissa to MANT bits, to nearest even, in the integer bits (a carry bumps the exponent). */
#define FP8_ENCODE_MAGNITUDE(a, MANT, BIAS)                                                             \
    ((a) < ((uint32_t)(127 + 1 - (BIAS)) << 23)                                                         \
         ? fp8_float_to_bits(fp8_bits_to_float(a) +                                                    \
                             fp8_bits_to_float((uint32_t)(127 + 24 - (BIAS) - (MANT)) << 23)) -              \
               ((uint32_t)(127 + 24 - (BIAS) - (MANT)) << 23)                               \
         : (((a) + ((1u << (22 - (MANT))) - 1) + (((a) >> (23 - (MANT))) & 1)) >> (23 - (MANT))) -     \
               ((uint32_t)(127 - (BIAS)) << (MANT)))

static inline uint8_t float_to_e4m3(float f) {
    uint32_t u = fp8_float_to_bits(f), a = u & 0x7fffffffu, sign = (u >> 24) & 0x80;
    uint32_t m = FP8_ENCODE_MAGNITUDE(a, 3, 7);
    /* above 464 (halfway from 448 to the NaN code's 480; the tie rounds to even, 448) and NaN */
    return (uint8_t)(sign | (a > 0x43e80000u ? 0x7fu : m));
}

static inline uint8_t float_to_e5m2(float f) {
    uint32_t u = fp8_float_to_bits(f), a = u & 0x7fffffffu, sign = (u >> 24) & 0x80;
    uint32_t m = FP8_ENCODE_MAGNITUDE(a, 2, 15);
    /* NaN; from 61440 (halfway from 57344 to 65536, a tie that rounds to even: inf) on, inf */
    return (uint8_t)(sign | (a > 0x7f800000u ? 0x7eu : a >= 0x47700000u ? 0x7cu : m));
}
#undef FP8_DECODE
#undef FP8_ENCODE_MAGNITUDE
#endif
