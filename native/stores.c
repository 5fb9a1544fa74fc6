/* stores.c: which stores an all_reduce uses for the data its peers read, learned while it runs.
 *
 * Streaming (non-temporal) stores send lines to memory; ordinary ones leave them dirty in the
 * writer's cache for the reader to fetch.  Which is faster depends on the host's mood, not on
 * the code: on the 2-vCPU VM, with the vCPUs far apart, streaming made a 1 MiB staged exchange
 * 3-5x faster (2026-11); with them close, ordinary stores made it 1.2-1.5x faster while the
 * direct path still wanted streaming 2-4x (2026-12).  No fixed rule holds in both, so each
 * communicator measures: per path and size class (a power of two from 32 KiB), rank 0 keeps the
 * time per byte of each kind (a moving average) and publishes the faster in the header; every
 * rank reads it at the start of a call.  To keep both averages current, every rank uses the
 * other kind on the same calls (the 8th of every 8 first, then the 64th of every 64), which it
 * finds from its own count of the class's calls: collectives run in the same order everywhere,
 * so the counts agree and a trial is one call on every rank at once.  Below 32 KiB stores stay
 * ordinary (the reader finds the lines in cache).  A rank reading a stale choice is harmless:
 * the kind of store never changes a result, only its speed.  NCL_STREAMING=on|off forces one. */
#include "internal.h"

#define STREAM_MIN_BYTES (32u << 10)   /* copy.c's floor for streaming stores */
#define DEFAULT_STREAMING(algo) ((algo) == NCL_ALGO_DIRECT) /* before anything is measured */
#define SWITCH_MARGIN 0.9 /* the other kind must be 10% faster: no flapping on noise */

static int size_class(size_t bytes) {
    int k = 0;
    for (size_t b = bytes / STREAM_MIN_BYTES; b > 1 && k < NCL_STORE_CLASSES - 1; b >>= 1) k++;
    return k;
}

static bool trial(uint32_t calls) { return calls < 64 ? calls % 8 == 7 : calls % 64 == 63; }

ncl_stores ncl_stores_pick(ncl_comm* c, int algo, size_t bytes) {
    ncl_stores s = {.algo = algo, .cls = -1, .stream = false, .bytes = bytes};
    if (c->streaming) { /* NCL_STREAMING forces one kind: nothing to learn */
        s.stream = c->streaming == 1;
        return s;
    }
    if (bytes < STREAM_MIN_BYTES || algo <= 0 || algo >= NCL_NUM_ALGOS) return s;
    s.cls = size_class(bytes);
    uint8_t published = atomic_load_explicit(&c->hdr->streaming[algo][s.cls], memory_order_relaxed);
    bool best = published ? published == NCL_STORES_STREAMING : DEFAULT_STREAMING(algo);
    s.stream = best != trial(c->store_calls[algo][s.cls]++);
    if (c->rank == 0) s.t0 = ncl_now();
    return s;
}

void ncl_stores_learn(ncl_comm* c, const ncl_stores* s, int status) {
    if (c->rank != 0 || s->cls < 0 || status != NCL_OK) return;
    float x = (float)((ncl_now() - s->t0) * 1e9 / (double)s->bytes), *est = c->store_ns[s->algo][s->cls];
    float* mine = &est[s->stream];
    /* a quarter of each new sample; one preempted call counts at most twice the average */
    *mine = *mine == 0 ? x : *mine + ((x < 2 * *mine ? x : 2 * *mine) - *mine) * 0.25f;
    if (est[0] == 0 || est[1] == 0) return;
    _Atomic uint8_t* word = &c->hdr->streaming[s->algo][s->cls];
    uint8_t now = atomic_load_explicit(word, memory_order_relaxed), want = now;
    if (est[1] < SWITCH_MARGIN * est[0]) want = NCL_STORES_STREAMING;
    if (est[0] < SWITCH_MARGIN * est[1]) want = NCL_STORES_CACHED;
    if (want != now) atomic_store_explicit(word, want, memory_order_relaxed);
}
