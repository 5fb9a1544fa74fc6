/* reduce_kernels.c: element-wise reduction of n buffers, strictly left to right, with the
 * best instruction set this CPU has, chosen once at run time (never -march=native: the
 * build must run on any x86-64).  Every variant computes the same bits: same operations
 * in the same order per element, no FP contraction, vectorised across elements only.
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
#endif

static const kernel_fn (*chosen)[NCL_NUM_OPS];
static const char* chosen_name;

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
