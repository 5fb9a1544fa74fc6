/* reduce_kernels.c: element-wise reduction of n buffers, strictly left to right, with the
 * best instruction set this CPU has, chosen once at run time (never -march=native: the
 * build must run on any x86-64).  Every variant computes the same bits: same operations
 * in the same order per element, no FP contraction, vectorised across elements only.  Where the
 * CPU rounds float32 to bfloat16 itself (AVX512_BF16), bf16 SUM and AVG use that instruction, its
 * one difference (subnormals flushed) rounded the integer way: the same bits again.
 * NCL_KERNEL_ISA=generic|avx2|avx512 (any case) forces a variant (capped at what the CPU has);
 * ncl/env.py refuses any other value before a communicator exists. */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fp8.h"
#include "internal.h"

typedef void (*kernel_fn)(void* dst, const void** srcs, int nsrc, size_t count);

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* round to nearest even; NaN stays a (quiet) NaN */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#define KERNEL_ISA generic
#include "reduce_body.h"
#undef KERNEL_ISA

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,f16c,fma")
#define KERNEL_ISA avx2
#include "reduce_body.h"
#undef KERNEL_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,fma")
#define KERNEL_ISA avx512
#include "reduce_body.h"
#undef KERNEL_ISA
#pragma GCC pop_options

#if defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10
#define HAVE_AVX512_BF16 1
/* bf16 SUM and AVG where the CPU rounds float32 to bfloat16 itself (AVX512_BF16), with one shuffle
 * per 32 elements: a 64-byte load holds 32 bfloat16, and as 16 32-bit lanes the even elements are
 * the lanes shifted up by 16 and the odd ones the lanes' upper halves, float32 as they stand.  Each
 * is summed in rank order, both are rounded at once (VCVTNE2PS2BF16) and put back in order by one
 * permutation.  The instruction flushes float32 subnormals, so a step holding one (rare) rounds
 * the integer way: float_to_bf16's bits, NaN included.  1 MiB from 2 sources, in cache: 39-42 us,
 * against 48-49 with widening loads (float32's bytes: 37); 256 KiB 10.3-10.9 against 12.1-12.5 (2026-12). */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#include <immintrin.h>
/* float_to_bf16 of 16 float32 lanes, the result in each lane's upper 16 bits (the lower are junk) */
static inline __m512i bf16_round_high(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_or_epi32(rounded, nan, u, _mm512_set1_epi32(0x00400000)); /* NaN: made quiet */
}

static inline __mmask16 f32x16_subnormal(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    return _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7f800000)) &
           _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x007fffff));
}

/* The 32 bfloat16 of even (elements 0, 2, ...) and odd (1, 3, ...), in element order. */
static inline __m512i bf16_pack(__m512 even, __m512 odd) {
    if (__builtin_expect((f32x16_subnormal(even) | f32x16_subnormal(odd)) != 0, 0))
        return _mm512_or_si512(_mm512_srli_epi32(bf16_round_high(even), 16),
                               _mm512_and_si512(bf16_round_high(odd), _mm512_set1_epi32((int)0xffff0000u)));
    /* VCVTNE2PS2BF16 gives even 0-15 then odd 0-15: element 2i is word i, element 2i + 1 word 16 + i */
    static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    return _mm512_permutexvar_epi16(_mm512_loadu_si512((const void*)order), (__m512i)_mm512_cvtne2ps_pbh(odd, even));
}

static void bf16_sum_or_avg(uint16_t* dst, const void** srcs, int nsrc, size_t count, bool avg) {
    const __m512i upper = _mm512_set1_epi32((int)0xffff0000u);
    const __m512 divisor = _mm512_set1_ps((float)nsrc);
    size_t i = 0;
    for (; i + 32 <= count; i += 32) {
        __m512i v = _mm512_loadu_si512((const void*)((const uint16_t*)srcs[0] + i));
        __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, upper));
        for (int s = 1; s < nsrc; s++) {
            v = _mm512_loadu_si512((const void*)((const uint16_t*)srcs[s] + i));
            even = _mm512_add_ps(even, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
            odd = _mm512_add_ps(odd, _mm512_castsi512_ps(_mm512_and_si512(v, upper)));
        }
        if (avg) even = _mm512_div_ps(even, divisor), odd = _mm512_div_ps(odd, divisor);
        _mm512_storeu_si512((void*)(dst + i), bf16_pack(even, odd));
    }
    for (; i < count; i++) { /* the last < 32 elements, one by one: the same operations */
        float a = bf16_to_float(((const uint16_t*)srcs[0])[i]);
        for (int s = 1; s < nsrc; s++) a = a + bf16_to_float(((const uint16_t*)srcs[s])[i]);
        dst[i] = float_to_bf16(avg ? a / nsrc : a);
    }
}

static void bf16_sum_avx512bf16(void* dst, const void** srcs, int nsrc, size_t count) {
    bf16_sum_or_avg(dst, srcs, nsrc, count, false);
}

static void bf16_avg_avx512bf16(void* dst, const void** srcs, int nsrc, size_t count) {
    bf16_sum_or_avg(dst, srcs, nsrc, count, true);
}
#pragma GCC pop_options
#endif
#endif

static const kernel_fn (*chosen)[NCL_NUM_OPS];
static const char* chosen_name;
static kernel_fn with_bf16_rounding[NCL_NUM_DTYPES][NCL_NUM_OPS]; /* avx512's, bf16 SUM and AVG replaced */

static void choose(void) {
    const char* want = getenv("NCL_KERNEL_ISA");
    int cap = 2; /* 0 generic, 1 avx2, 2 avx512 */
    if (want && strcasecmp(want, "generic") == 0) cap = 0;
    if (want && strcasecmp(want, "avx2") == 0) cap = 1;
    chosen = kernels_generic;
    chosen_name = "generic";
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (cap >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
        chosen = kernels_avx512;
        chosen_name = "avx512";
#ifdef HAVE_AVX512_BF16
        if (__builtin_cpu_supports("avx512bf16")) { /* the same bits, rounded by the CPU */
            memcpy(with_bf16_rounding, kernels_avx512, sizeof with_bf16_rounding);
            with_bf16_rounding[NCL_BFLOAT16][NCL_SUM] = bf16_sum_avx512bf16;
            with_bf16_rounding[NCL_BFLOAT16][NCL_AVG] = bf16_avg_avx512bf16;
            chosen = (const kernel_fn(*)[NCL_NUM_OPS])with_bf16_rounding;
        }
#endif
    } else if (cap >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
               __builtin_cpu_supports("fma")) {
        chosen = kernels_avx2;
        chosen_name = "avx2";
    }
#endif
}

const char* ncl_kernel_isa(void) {
    if (!chosen) choose();
    return chosen_name;
}

int ncl_dtype_size(int dtype) {
    static const int sizes[NCL_NUM_DTYPES] = {1, 1, 4, 8, 2, 2, 4, 8, 1, 1};
    return dtype >= 0 && dtype < NCL_NUM_DTYPES ? sizes[dtype] : 0;
}

int ncl_reduce_local(void* dst, const void** srcs, int nsrc, size_t count, int dtype, int op) {
    if (dtype < 0 || dtype >= NCL_NUM_DTYPES) return ncl_error(NCL_ERR_ARGUMENT, "unknown dtype code %d", dtype);
    if (op < 0 || op >= NCL_NUM_OPS) return ncl_error(NCL_ERR_ARGUMENT, "unknown reduction op code %d", op);
    if (nsrc < 1) return ncl_error(NCL_ERR_ARGUMENT, "reduction needs at least one source, got %d", nsrc);
    if (!chosen) choose(); /* idempotent: a race only writes the same values twice */
    chosen[dtype][op](dst, srcs, nsrc, count);
    return NCL_OK;
}

int ncl_sum_rows(void* y_, const void* rows_, size_t nrows, const int64_t* index, size_t tokens, int n, size_t width,
                 int dtype) {
    size_t es = (size_t)ncl_dtype_size(dtype), row = width * es;
    if (!es) return ncl_error(NCL_ERR_ARGUMENT, "unknown dtype code %d", dtype);
    if (n < 1 || n > 65536) return ncl_error(NCL_ERR_ARGUMENT, "sum_rows: %d sources per row", n);
    if (!chosen) choose();
    const void** srcs = malloc((size_t)n * sizeof *srcs);
    if (!srcs) return ncl_error(NCL_ERR_SYSTEM, "sum_rows: out of memory");
    uint8_t* y = y_;
    const uint8_t* rows = rows_;
    for (size_t t = 0; t < tokens; t++) {
        int k = 0;
        for (int j = 0; j < n; j++) {
            int64_t i = index[t * (size_t)n + (size_t)j];
            if (i < 0) continue;
            if ((uint64_t)i >= nrows) {
                free(srcs);
                return ncl_error(NCL_ERR_ARGUMENT, "sum_rows: row %lld of %zu", (long long)i, nrows);
            }
            srcs[k++] = rows + (size_t)i * row;
        }
        uint8_t* dst = y + t * row;
        if (k == 0)
            memset(dst, 0, row);
        else if (k == 1)
            memcpy(dst, srcs[0], row);
        else
            chosen[dtype][NCL_SUM](dst, srcs, k, width);
    }
    free(srcs);
    return NCL_OK;
}
