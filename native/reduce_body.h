/* reduce_body.h: the reduction kernels, included once per instruction set by
 * reduce_kernels.c with KERNEL_ISA set to a suffix (and a `#pragma GCC target` around it),
 * so the compiler vectorises the same loops for AVX-512, AVX2 and plain x86-64.
 *
 * Each kernel walks the message in blocks that stay in L1: the block's accumulator is
 * sources 0 and 1 combined, then combined with sources 2..n-1 in order, the last of them fused
 * with the finish (AVG divides) and the store; two sources take one pass with no accumulator.
 * 16- and 8-bit floats accumulate in float32 and round once at the store (fp8: native/fp8.h).
 * Integer SUM/PROD run in the unsigned type so that overflow wraps (two's complement) without UB;
 * integer AVG sums exactly in a wider type W, so an average never overflows, then divides
 * (truncating toward zero).  Float MIN/MAX propagate NaN: the result is the NaN of the first
 * source (in rank order) that holds one, so every rank gets the same bits whichever rank had it. */
#define KCAT_(a, b) a##_##b
#define KCAT(a, b) KCAT_(a, b)
#define BLOCK 512

#define DEFINE_KERNEL(NAME, T, A, LOAD, STORE, COMBINE, FINISH)                           \
    static void KCAT(NAME, KERNEL_ISA)(void* dst_, const void** srcs, int nsrc, size_t count) {     \
        T* dst = dst_;                                                                    \
        A acc[BLOCK];                                                                     \
        for (size_t base = 0; base < count; base += BLOCK) {                              \
            size_t m = count - base < BLOCK ? count - base : BLOCK;                       \
            const T* s0 = (const T*)srcs[0] + base;                                       \
            if (nsrc == 1) {                                                              \
                for (size_t i = 0; i < m; i++) dst[base + i] = STORE(FINISH(LOAD(s0[i]))); \
                continue;                                                                 \
            }                                                                             \
            const T* s1 = (const T*)srcs[1] + base;                                       \
            if (nsrc == 2) { /* the common case in one pass: no accumulator round trip */ \
                for (size_t i = 0; i < m; i++) {                                          \
                    A a = LOAD(s0[i]), b = LOAD(s1[i]);                                   \
                    dst[base + i] = STORE(FINISH(COMBINE(a, b)));                         \
                }                                                                         \
                continue;                                                                 \
            }                                                                             \
            for (size_t i = 0; i < m; i++) {                                              \
                A a = LOAD(s0[i]), b = LOAD(s1[i]);                                       \
                acc[i] = COMBINE(a, b);                                                   \
            }                                                                             \
            for (int s = 2; s < nsrc - 1; s++) {                                          \
                const T* p = (const T*)srcs[s] + base;                                    \
                for (size_t i = 0; i < m; i++) {                                          \
                    A b = LOAD(p[i]);                                                     \
                    acc[i] = COMBINE(acc[i], b);                                          \
                }                                                                         \
            }                                                                             \
            const T* last = (const T*)srcs[nsrc - 1] + base;                              \
            for (size_t i = 0; i < m; i++) {                                              \
                A b = LOAD(last[i]);                                                      \
                dst[base + i] = STORE(FINISH(COMBINE(acc[i], b)));                        \
            }                                                                             \
        }                                                                                 \
    }

#define K_ID(x) (x)
#define K_MIN(a, b) ((b) < (a) ? (b) : (a))
#define K_MAX(a, b) ((b) > (a) ? (b) : (a))
/* a NaN accumulator stays; a NaN source replaces a number (x != x only for NaN; no -ffast-math).
 * Three plain selects, each of a comparison always evaluated, so the loop vectorises. */
#define K_FMIN(a, b) ((a) != (a) ? (a) : (b) != (b) ? (b) : K_MIN(a, b))
#define K_FMAX(a, b) ((a) != (a) ? (a) : (b) != (b) ? (b) : K_MAX(a, b))
#define K_ADD(a, b) ((a) + (b))
#define K_MUL(a, b) ((a) * (b))
#define K_AVG(x) ((x) / nsrc)

/* One dtype: all five ops.  U is the unsigned twin for wrapping arithmetic, W the exact sum's. */
#define DEFINE_INT_KERNELS(TAG, T, U, W)                                                           \
    DEFINE_KERNEL(TAG##_sum, T, T, K_ID, K_ID, (T)(U) K_WADD_##TAG, K_ID)                         \
    DEFINE_KERNEL(TAG##_prod, T, T, K_ID, K_ID, (T)(U) K_WMUL_##TAG, K_ID)                        \
    DEFINE_KERNEL(TAG##_min, T, T, K_ID, K_ID, K_MIN, K_ID)                                        \
    DEFINE_KERNEL(TAG##_max, T, T, K_ID, K_ID, K_MAX, K_ID)                                        \
    DEFINE_KERNEL(TAG##_avg, T, W, (W), (T), K_ADD, K_AVG)

#define DEFINE_FLOAT_KERNELS(TAG, T, A, LOAD, STORE)                                          \
    DEFINE_KERNEL(TAG##_sum, T, A, LOAD, STORE, K_ADD, K_ID)                                  \
    DEFINE_KERNEL(TAG##_prod, T, A, LOAD, STORE, K_MUL, K_ID)                                 \
    DEFINE_KERNEL(TAG##_min, T, A, LOAD, STORE, K_FMIN, K_ID)                                 \
    DEFINE_KERNEL(TAG##_max, T, A, LOAD, STORE, K_FMAX, K_ID)                                 \
    DEFINE_KERNEL(TAG##_avg, T, A, LOAD, STORE, K_ADD, (A)K_AVG)

/* wrapping add/multiply through the unsigned type */
#define K_WADD_i8(a, b) ((uint8_t)((uint8_t)(a) + (uint8_t)(b)))
#define K_WMUL_i8(a, b) ((uint8_t)((uint32_t)(uint8_t)(a) * (uint8_t)(b)))
#define K_WADD_u8(a, b) ((uint8_t)((a) + (b)))
#define K_WMUL_u8(a, b) ((uint8_t)((uint32_t)(a) * (b)))
#define K_WADD_i32(a, b) ((uint32_t)(a) + (uint32_t)(b))
#define K_WMUL_i32(a, b) ((uint32_t)(a) * (uint32_t)(b))
#define K_WADD_i64(a, b) ((uint64_t)(a) + (uint64_t)(b))
#define K_WMUL_i64(a, b) ((uint64_t)(a) * (uint64_t)(b))

DEFINE_INT_KERNELS(i8, int8_t, uint8_t, int64_t)
DEFINE_INT_KERNELS(u8, uint8_t, uint8_t, int64_t)
DEFINE_INT_KERNELS(i32, int32_t, uint32_t, int64_t)
DEFINE_INT_KERNELS(i64, int64_t, uint64_t, __int128) /* 1024 int64 sources cannot overflow it */
DEFINE_FLOAT_KERNELS(f16, _Float16, float, (float), (_Float16))
DEFINE_FLOAT_KERNELS(bf16, uint16_t, float, bf16_to_float, float_to_bf16)
DEFINE_FLOAT_KERNELS(f32, float, float, K_ID, K_ID)
DEFINE_FLOAT_KERNELS(f64, double, double, K_ID, K_ID)
DEFINE_FLOAT_KERNELS(e4m3, uint8_t, float, e4m3_to_float, float_to_e4m3)
DEFINE_FLOAT_KERNELS(e5m2, uint8_t, float, e5m2_to_float, float_to_e5m2)

/* [dtype][op], in the order of ncl_dtype and ncl_op */
#define KROW(TAG) {KCAT(TAG##_sum, KERNEL_ISA), KCAT(TAG##_prod, KERNEL_ISA), KCAT(TAG##_min, KERNEL_ISA), \
                   KCAT(TAG##_max, KERNEL_ISA), KCAT(TAG##_avg, KERNEL_ISA)}
static const kernel_fn KCAT(kernels, KERNEL_ISA)[NCL_NUM_DTYPES][NCL_NUM_OPS] = {
    KROW(i8), KROW(u8), KROW(i32), KROW(i64), KROW(f16), KROW(bf16), KROW(f32), KROW(f64), KROW(e4m3), KROW(e5m2)};

#undef DEFINE_KERNEL
#undef DEFINE_INT_KERNELS
#undef DEFINE_FLOAT_KERNELS
#undef KROW
#undef BLOCK
