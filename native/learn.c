/* learn.c: what all_reduce learns while it runs: which algorithm, and which kind of stores.
 *
 * Neither has one answer on this kind of host.  Streaming (non-temporal) stores send lines to
 * memory, ordinary ones leave them dirty in the writer's cache for the reader: with the 2-vCPU
 * VM's vCPUs far apart streaming made a 1 MiB staged exchange 3-5x faster (2026-11), with them
 * close ordinary stores won by 1.2-1.5x while the direct path still wanted streaming 2-4x
 * (2026-12).  Two-shot beat one-shot by 1.3x at 1-4 MiB on a quiet host and lost by 1.3-1.5x
 * when other jobs held the cores (it waits twice as often).  So each communicator measures.
 *
 * Per size class (a power of two from 32 KiB), rank 0 keeps a moving average of the time per
 * byte of each algorithm that could run (staged: one-shot, two-shot, cma where it works;
 * registered buffers: direct too) and, per algorithm and class, of each kind of store, and
 * publishes the fastest in the header.  To keep the averages current every rank tries another
 * on the same calls (one of each kind in 32), found from its own count
 * of the class's calls: collectives run in the same order everywhere, so the counts agree.
 *
 * A store kind read stale is harmless (it never changes a result), but ranks must agree on the
 * algorithm (it is in the fingerprint).  So rank 0 publishes a new one as one 64-bit word
 * {effective step, old, new}: a call starting at step s takes `new` if s >= effective, else
 * `old`.  Rank 0 writes it at the end of a call whose last step is e, with effective = e + 1
 * and old = what a call starting at e took until then; every other rank has posted step e, so
 * it is past the start of this call and starts its next at e or later: before or after the
 * write it reads the same choice.  Rank 0 changes a word again only from step e + 1 on.
 * Below 32 KiB, or with NCL_ALGO / NCL_STREAMING set, the choice is fixed. */
#include "internal.h"

#define LEARN_MIN_BYTES (32u << 10)  /* copy.c's floor for streaming stores */
#define SWITCH_MARGIN 0.8f           /* another choice must be 20% faster: single calls vary that much under load */
#define DEFAULT_STREAMING(algo) ((algo) == NCL_ALGO_DIRECT) /* before anything is measured */

static int size_class(size_t bytes) {
    int k = 0;
    for (size_t b = bytes / LEARN_MIN_BYTES; b > 1 && k < NCL_LEARN_CLASSES - 1; b >>= 1) k++;
    return k;
}

/* Trial calls: the algorithm on the 16th of every 32 calls of a class and the store kind on the 32nd
 * (a benchmark's few dozen calls per size pay for at most two, each possibly 2x slower). */
static bool trial(uint32_t calls, uint32_t at) { return calls % 32 == at; }

/* A moving average of ns per byte: a quarter of each sample, one preempted call counting at most
 * twice the average. */
static void average(float* est, float x) { *est = *est == 0 ? x : *est + ((x < 2 * *est ? x : 2 * *est) - *est) * 0.25f; }

/* The index of the smallest estimate of two samples or more if it beats est[current] by the margin,
 * else current (one lucky call never decides). */
static int fastest(const float* est, const uint8_t* seen, int n, int current) {
    int best = current;
    for (int i = 0; i < n; i++)
        if (seen[i] >= 2 && (seen[best] < 2 || est[i] < SWITCH_MARGIN * est[best])) best = i;
    return best;
}

static int choice_at(uint64_t word, uint32_t step) {
    uint32_t effective = (uint32_t)(word >> 32);
    return (int)(((int32_t)(step - effective) >= 0 ? word : word >> 8) & 0xff);
}

ncl_learned ncl_learn_pick(ncl_comm* c, int algo, bool forced, bool registered, size_t bytes) {
    ncl_learned l = {.algo = algo, .model = algo, .forced = forced, .cls = -1, .bytes = bytes};
    if (bytes < LEARN_MIN_BYTES) return l;
    l.cls = size_class(bytes);
    if (!forced) { /* the model's choice until rank 0 publishes a faster one */
        l.table = registered;
        uint32_t n = c->algo_calls[l.table][l.cls]++;
        int published = choice_at(atomic_load(&c->hdr->algo_word[l.table][l.cls]), c->step);
        int best = published ? published : algo;
        l.algo = best;
        if (trial(n, 15)) { /* another candidate, each in turn; direct (no copies at all) first */
            static const int order[] = {NCL_ALGO_DIRECT, NCL_ALGO_ONE_SHOT, NCL_ALGO_TWO_SHOT, NCL_ALGO_CMA};
            int cands[NCL_NUM_ALGOS], k = 0;
            for (size_t i = 0; i < sizeof order / sizeof order[0]; i++) {
                int a = order[i];
                if (a != best && (a != NCL_ALGO_DIRECT || registered) && (a != NCL_ALGO_CMA || c->cma)) cands[k++] = a;
            }
            l.algo = cands[(n / 32) % (uint32_t)k];
        }
    }
    uint8_t kind = atomic_load_explicit(&c->hdr->streaming[l.algo][l.cls], memory_order_relaxed);
    bool best = c->streaming ? c->streaming == 1 : kind ? kind == NCL_STORES_STREAMING : DEFAULT_STREAMING(l.algo);
    l.store_trial = !c->streaming && trial(c->store_calls[l.algo][l.cls]++, 31);
    l.stream = best != l.store_trial;
    if (c->rank == 0) l.t0 = ncl_now();
    return l;
}

void ncl_learn_from(ncl_comm* c, const ncl_learned* l, int status) {
    if (c->rank != 0 || l->cls < 0 || status != NCL_OK) return;
    float x = (float)((ncl_now() - l->t0) * 1e9 / (double)l->bytes);
    if (!c->streaming) {
        float* est = c->store_ns[l->algo][l->cls];
        uint8_t* seen = c->store_seen[l->algo][l->cls];
        average(&est[l->stream], x);
        seen[l->stream] += seen[l->stream] < 255;
        _Atomic uint8_t* word = &c->hdr->streaming[l->algo][l->cls];
        uint8_t now = atomic_load_explicit(word, memory_order_relaxed);
        int was = now ? now == NCL_STORES_STREAMING : DEFAULT_STREAMING(l->algo);
        int want = fastest(est, seen, 2, was);
        if (want != was) atomic_store_explicit(word, want ? NCL_STORES_STREAMING : NCL_STORES_CACHED, memory_order_relaxed);
    }
    if (l->forced || l->store_trial) return; /* an algorithm is timed with its best stores only */
    float* est = c->algo_ns[l->table][l->cls];
    uint8_t* seen = c->algo_seen[l->table][l->cls];
    average(&est[l->algo], x);
    seen[l->algo] += seen[l->algo] < 255;
    _Atomic uint64_t* word = &c->hdr->algo_word[l->table][l->cls];
    uint64_t w = atomic_load(word);
    if ((int32_t)(c->step - (uint32_t)(w >> 32)) < 0) return; /* the last change is not in force yet */
    int now = choice_at(w, c->step), base = now ? now : l->model; /* 0: the model's choice */
    int want = fastest(est, seen, NCL_NUM_ALGOS, base);
    if (want != base) atomic_store(word, (uint64_t)(c->step + 1) << 32 | (uint64_t)now << 8 | (uint64_t)want);
}
