/* copy.c: writing data that another rank will read (and, at the end, into a rank's own output).
 *
 * On this kind of host the costly part of a shared-memory exchange is not the copy but the
 * hand-over of freshly written cache lines from the writer's core to the reader's: measured
 * on the 2-vCPU VM, a 1 MiB exchange through ordinary stores ran at 2.2-4 GB/s whenever the
 * two vCPUs sat far apart (most runs), against 11-12 GB/s with non-temporal stores, which
 * send the lines to memory instead of leaving them dirty in the writer's cache.  Below about
 * 32 KiB ordinary stores win (the reader finds the lines in cache; 4 KiB: 0.4 us against
 * 0.9 us).  So every copy into a slot a peer reads goes through ncl_copy_shared, and every
 * reduction whose result a peer reads through ncl_reduce_shared.  With the vCPUs close the
 * other way round holds for staged exchanges (2026-12): all_reduce, the one collective where
 * it matters most, asks learn.c, which measures both while it runs, and passes its choice to
 * the _stores forms. */
#include <string.h>

#include "internal.h"

#if defined(__x86_64__)
#include <emmintrin.h>
#define HAVE_STREAMING 1 /* SSE2 is part of x86-64: no run-time check needed */
#endif

#define NT_MIN_BYTES (32u << 10)
#define REDUCE_PIECE (16u << 10) /* reduce into an L1-resident buffer, then stream it out */

void ncl_copy_shared(void* dst, const void* src, size_t n) { ncl_copy_stores(dst, src, n, true); }

int ncl_reduce_shared(void* dst, const void** srcs, int nsrc, size_t count, int dtype, int op) {
    return ncl_reduce_stores(dst, srcs, nsrc, count, dtype, op, true);
}

void ncl_copy_stores(void* dst_, const void* src_, size_t n, bool stream) {
#ifdef HAVE_STREAMING
    if (stream && n >= NT_MIN_BYTES) {
        uint8_t* dst = dst_;
        const uint8_t* src = src_;
        size_t head = (16 - ((uintptr_t)dst & 15)) & 15; /* movntdq needs 16-byte aligned targets */
        memcpy(dst, src, head);
        dst += head, src += head, n -= head;
        size_t body = n & ~(size_t)63;
        for (size_t i = 0; i < body; i += 64) {
            const __m128i* s = (const __m128i*)(src + i);
            __m128i a = _mm_loadu_si128(s), b = _mm_loadu_si128(s + 1), c = _mm_loadu_si128(s + 2),
                    d = _mm_loadu_si128(s + 3);
            __m128i* t = (__m128i*)(dst + i);
            _mm_stream_si128(t, a);
            _mm_stream_si128(t + 1, b);
            _mm_stream_si128(t + 2, c);
            _mm_stream_si128(t + 3, d);
        }
        memcpy(dst + body, src + body, n - body);
        _mm_sfence(); /* the stores are visible before the step that publishes them */
        return;
    }
#endif
    if (n) memcpy(dst_, src_, n);
}

/* memset; with stream, streaming stores from NT_MIN_BYTES (for memory nobody reads again soon). */
void ncl_zero_stores(void* dst_, size_t n, bool stream) {
#ifdef HAVE_STREAMING
    if (stream && n >= NT_MIN_BYTES) {
        uint8_t* dst = dst_;
        size_t head = (16 - ((uintptr_t)dst & 15)) & 15; /* movntdq needs 16-byte aligned targets */
        memset(dst, 0, head);
        dst += head, n -= head;
        size_t body = n & ~(size_t)63;
        __m128i z = _mm_setzero_si128();
        for (size_t i = 0; i < body; i += 64) {
            __m128i* t = (__m128i*)(dst + i);
            _mm_stream_si128(t, z);
            _mm_stream_si128(t + 1, z);
            _mm_stream_si128(t + 2, z);
            _mm_stream_si128(t + 3, z);
        }
        memset(dst + body, 0, n - body);
        _mm_sfence(); /* ordered before the call returns the tensor */
        return;
    }
#endif
    if (n) memset(dst_, 0, n);
}

/* Copies into this rank's own output (which no peer reads) stream when the ranks oversubscribe the
 * CPUs and their outputs together reach a quarter of the largest cache (each rank also touches its
 * send and two staging slots): a rank's output lines are then out of cache by the time it copies
 * into them (its CPU-mates ran while it waited), and an ordinary store reads each line from memory
 * before writing it.  Two-shot's gather, float32, out of place, the same processes alternating, the
 * ratio streaming / ordinary (2026-12-06, 32 MiB L3; fast minutes of the host, then slow ones): 8
 * ranks on 2 CPUs 1 MiB 0.64-1.16 (median of 8 runs 0.80) / 0.85, 2 MiB 0.77-0.95 / 0.64, 16 MiB
 * 0.68-0.85 / 0.98, 64 MiB 0.77-0.86 / 0.67; 4 ranks 2 MiB 0.78-0.86 / 0.83-1.69 (median of 3
 * 1.24: the line is about here), 4 MiB 0.74-0.91 / 0.36-0.38, 16 MiB 0.74-0.93 / 0.40-0.61;
 * 3 ranks 4 MiB 0.78-0.84, 16 MiB 0.50-0.81; below the line 8 ranks 256 KiB 0.96-1.23, 4 ranks
 * 1 MiB 0.82-1.09, 3 ranks 1 MiB 0.92-1.18; 2 ranks (not oversubscribed: each keeps its cache)
 * 1-2 MiB 1.36-1.47, 16-64 MiB 0.98-1.07. */
size_t ncl_output_stream_min_bytes(const ncl_comm* c) {
    return c->oversubscribed ? ncl_div_up(c->cache_bytes / 4, (size_t)c->nranks) : SIZE_MAX;
}

void ncl_copy_from_own_share(const ncl_comm* c, void* dst_, const void* src_, size_t n, bool stream) {
    uint8_t* dst = dst_;
    const uint8_t* src = src_;
    size_t start = n / (size_t)c->nranks * (size_t)c->rank / NCL_CACHE_LINE * NCL_CACHE_LINE;
    ncl_copy_stores(dst + start, src + start, n - start, stream);
    ncl_copy_stores(dst, src, start, stream);
}

int ncl_reduce_stores(void* dst_, const void** srcs, int nsrc, size_t count, int dtype, int op, bool stream) {
    size_t es = (size_t)ncl_dtype_size(dtype);
    if (!stream || count * es < NT_MIN_BYTES) return ncl_reduce_local(dst_, srcs, nsrc, count, dtype, op);
    _Alignas(64) static __thread uint8_t piece[REDUCE_PIECE];
    const void* at[NCL_MAX_RANKS];
    uint8_t* dst = dst_;
    size_t per = REDUCE_PIECE / es;
    for (size_t off = 0; off < count; off += per) {
        size_t m = ncl_min(per, count - off);
        for (int i = 0; i < nsrc; i++) at[i] = (const uint8_t*)srcs[i] + off * es;
        NCL_CHECK(ncl_reduce_local(piece, at, nsrc, m, dtype, op));
        ncl_copy_stores(dst + off * es, piece, m * es, true);
    }
    return NCL_OK;
}
