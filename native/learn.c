/* learn.c: what all_reduce learns while it runs: which algorithm, and which kind of stores.
 *
 * Neither has one answer on this kind of host.  Streaming (non-temporal) stores send lines to
 * memory, ordinary ones leave them dirty in the writer's cache for the reader: with the 2-vCPU
 * VM's vCPUs far apart streaming made a 1 MiB staged exchange 3-5x faster (2026-11), with them
 * close ordinary stores won by 1.2-1.5x while the direct path still wanted streaming 2-4x
 * (2026-12; in a later fast minute direct too ran faster with ordinary ones, see streams).
 * Two-shot beat one-shot by 1.3x at 1-4 MiB on a quiet host and lost by 1.3-1.5x when other
 * jobs held the cores (it waits twice as often).  So each communicator measures.
 *
 * It measures by duels, never by times taken apart: the host changes its speed 2-3x within
 * seconds, so averages of samples minutes apart compare the host's modes, not the choices (an
 * early verdict taken so stuck at 2x the right time, 2026-12), while two consecutive calls see
 * the same mode.  Per size class (a power of two from 32 KiB) and kind of buffer (staged,
 * registered), the choice in force (the incumbent) meets one challenger at a time in a duel of
 * eight consecutive calls in blocks of two, C C I I C C I I (see challenger_at); rank 0 times the
 * second call of each block, and the challenger wins when the median of the NCL_DUEL_PAIRS ratios
 * challenger / incumbent of neighbouring blocks is below SWITCH_MARGIN (ordered C/I, I/C, C/I: a
 * drift cancels), and the last of them too (challenger_won: one slow call must not decide).  A
 * challenger is another algorithm that could run (one-shot, two-shot, cma where it works, direct on
 * registered buffers; with its own best stores) or the incumbent with the other kind of stores.
 * Two duels come on the class's first calls (a benchmark's first dozen calls of a size find the
 * faster algorithm and stores), then one in every DUEL_EVERY calls,
 * challengers in turn: a verdict is retried in whatever mode the host is in later, and overturned
 * there if it was wrong.  Between duels rank 0 watches the stores (react): ordinary ones that stay
 * much slower than streaming ones give way, and come back when streaming ones slow down.
 * Every rank knows from its own count of the class's calls which calls duel and what runs in
 * them: collectives run in the same order everywhere, so the counts agree.
 *
 * A store kind read stale is harmless (it never changes a result), but ranks must agree on the
 * algorithm (it is in the fingerprint).  So rank 0 publishes a new one as one 64-bit word
 * {effective step, old, new}: a call starting at step s takes `new` if s >= effective, else
 * `old`.  Rank 0 writes it at the end of a call whose last step is e, with effective = e + 1
 * and old = what a call starting at e took until then; every other rank has posted step e, so
 * it is past the start of this call and starts its next at e or later: before or after the
 * write it reads the same choice.  Rank 0 writes only at a duel's last call, and a call with no
 * duel follows every duel, so the next duel starts at e + 1 or later: every rank sees the same
 * incumbent, hence the same challengers, in all of its calls.
 * Below 32 KiB, or with NCL_ALGO and NCL_STREAMING set, the choice is fixed. */
#include <string.h>

#include "internal.h"

#define LEARN_MIN_BYTES (32u << 10)  /* copy.c's floor for streaming stores */
/* A challenger must be 7% faster, so that equal choices do not flap.  Not 10%: the timed calls still
 * carry part of the switch, which pulls every ratio towards 1 (two-shot right after one-shot ran at
 * 136-152 us against 122-128 steady, 2 MiB bfloat16 at np=2): two-shot, 0.8x one-shot there, duelled
 * at 0.90-0.93 five times in a row, and one-shot kept a 0.9 margin for ~1,100 calls (2026-12). */
#define SWITCH_MARGIN 0.93f
#define DUEL_CALLS 8                 /* blocks of two: C C I I C C I I */
/* After the early duels, one duel in DUEL_EVERY calls: 4 challenger calls, often 2x slower, and the
 * incumbent's next calls pay for the switch back.  In 64 calls that cost 10-14% of the steady time
 * (2 MiB bfloat16 at np=2, ncl-perf's loop, 2026-12); react follows the host's modes in between. */
#define DUEL_EVERY 128
#define DEFAULT_STREAMING(algo) ((algo) == NCL_ALGO_DIRECT) /* before anything is measured */

/* The early duels' first calls (call 0 pays for the buffers' first touch, and a call with no duel
 * follows each duel, see above): the other stores, then the likeliest rival (see rival_of).  No
 * more: at np=8 a row of ncl-perf has ~30 calls of a size, and every challenger's call may be 2x
 * slower. */
static const uint32_t EARLY[] = {1, 1 + (DUEL_CALLS + 1)};
#define EARLY_DUELS (int)(sizeof EARLY / sizeof EARLY[0])

static int size_class(size_t bytes) {
    int k = 0;
    for (size_t b = bytes / LEARN_MIN_BYTES; b > 1 && k < NCL_LEARN_CLASSES - 1; b >>= 1) k++;
    return k;
}

/* The number of the duel that call n of a class belongs to, with its place in it in *at; -1 if none. */
static int duel_of(uint32_t n, int* at) {
    for (int d = 0; d < EARLY_DUELS; d++)
        if (n - EARLY[d] < DUEL_CALLS) return *at = (int)(n - EARLY[d]), d;
    if (n < DUEL_EVERY / 2 || (n - DUEL_EVERY / 2) % DUEL_EVERY >= DUEL_CALLS) return -1;
    *at = (int)((n - DUEL_EVERY / 2) % DUEL_EVERY);
    return EARLY_DUELS + (int)((n - DUEL_EVERY / 2) / DUEL_EVERY);
}

/* Which of k rivals duel d takes (the other stores at index `stores`, -1 if they are not learned):
 * the other stores first, in the first early duel and in every other later one (a slow minute made
 * ordinary stores 4-5x slower than streaming ones, a fast one 2-2.5x faster, 2026-12: the choice
 * that matters most, and the algorithms' duels compare them fairly only with the right stores);
 * the likeliest in the second early duel; later ones the likeliest and the rest in turn. */
static int rival_of(int d, int k, int stores) {
    if (k == 1) return 0;
    int e = d - EARLY_DUELS;
    if (stores >= 0 && (d == 0 || (e >= 0 && e % 2 == 0))) return stores;
    if (d < EARLY_DUELS || (e / 2) % 2 == 0) return 0; /* (no stores to learn: both early duels this) */
    int rest = stores >= 0 ? 2 : 1;                     /* the other stores come second (rivals_of) */
    return k > rest ? rest + (e / 4) % (k - rest) : 0;
}

/* Blocks of two calls, C C I I C C I I.  The first call of a block pays for the switch (the
 * caches and the ranks' skew it starts from are the other choice's: one-shot after two-shot ran
 * 2x its steady time, 2026-12) and is not timed; the second is, and the ratios of neighbouring
 * blocks' timed calls (places 1/3, 5/3, 5/7) decide. */
static bool challenger_at(int at) { return at % 4 < 2; }
static bool timed_at(int at) { return at % 2 == 1; }

/* The challengers of the incumbent, in the order duels take them: the likeliest winner (on
 * registered buffers direct, which reads them in place: 1 MiB out of place at np=2, 47 us against
 * two-shot's 56, 16 MiB 1.8 against 2.2 ms, 2026-12; else two-shot, at np=2 the likeliest from a few
 * hundred KiB), the incumbent with the other stores, then the rest. */
static int rivals_of(const ncl_comm* c, int incumbent, bool forced, bool registered, int* out) {
    static const int for_staged[] = {NCL_ALGO_TWO_SHOT, NCL_ALGO_ONE_SHOT, NCL_ALGO_DIRECT, NCL_ALGO_CMA};
    static const int for_registered[] = {NCL_ALGO_DIRECT, NCL_ALGO_TWO_SHOT, NCL_ALGO_ONE_SHOT, NCL_ALGO_CMA};
    const int* order = registered ? for_registered : for_staged;
    int k = 0;
    for (size_t i = 0; i < sizeof for_staged / sizeof for_staged[0] && !forced; i++) {
        int a = order[i];
        if (a != incumbent && (a != NCL_ALGO_DIRECT || registered) && (a != NCL_ALGO_CMA || c->cma)) out[k++] = a;
    }
    if (!c->streaming) { /* the other stores second */
        int at = k < 1 ? k : 1;
        memmove(out + at + 1, out + at, (size_t)(k - at) * sizeof *out);
        out[at] = NCL_OTHER_STORES, k++;
    }
    return k;
}

/* Streaming stores for `algo` in class cls?  Which stores suit one-shot, two-shot and direct is
 * mostly the host's mode, so one that has not learned its own takes what the staged ones have
 * (one- and two-shot each other's, direct two-shot's, else one-shot's).  Direct challenging with
 * its default (streaming) in the fast mode lost every duel on registered buffers though it was the
 * faster with ordinary stores (np=2, 1 MiB out of place: direct 46 us ordinary, 59 streaming,
 * against two-shot's 55 ordinary; 16 MiB 2.4-2.6 against 3.0 ms; 2026-12-06): it never ran.  Stores
 * that held a duel count as learned too, not only those that won one: two-shot's ordinary stores,
 * its default, kept in a fast minute, left direct to challenge with streaming ones, lose or tie, and
 * the row to stay on two-shot (1 MiB out of place: 56 us against direct's 46 with ordinary stores
 * once it ran; 2026-12-06). */
static const int LENDERS[] = {NCL_ALGO_TWO_SHOT, NCL_ALGO_ONE_SHOT};
#define NUM_LENDERS (sizeof LENDERS / sizeof LENDERS[0])

static bool streams(const ncl_comm* c, int algo, int cls) {
    uint8_t kind = atomic_load_explicit(&c->hdr->streaming[algo][cls], memory_order_relaxed);
    for (size_t i = 0; !kind && algo != NCL_ALGO_CMA && i < NUM_LENDERS; i++)
        if (LENDERS[i] != algo) kind = atomic_load_explicit(&c->hdr->streaming[LENDERS[i]][cls], memory_order_relaxed);
    return c->streaming ? c->streaming == 1 : kind ? kind == NCL_STORES_STREAMING : DEFAULT_STREAMING(algo);
}

static int choice_at(uint64_t word, uint32_t step) {
    uint32_t effective = (uint32_t)(word >> 32);
    return (int)(((int32_t)(step - effective) >= 0 ? word : word >> 8) & 0xff);
}

ncl_learned ncl_learn_pick(ncl_comm* c, int algo, bool forced, bool registered, size_t bytes) {
    ncl_learned l = {.algo = algo, .model = algo, .forced = forced, .cls = -1, .at = -1, .bytes = bytes};
    if (bytes < LEARN_MIN_BYTES) return l;
    l.cls = size_class(bytes);
    l.table = registered;
    uint32_t n = c->algo_calls[l.table][l.cls]++;
    if (!forced) { /* the model's choice until rank 0 publishes a faster one */
        int published = choice_at(atomic_load(&c->hdr->algo_word[l.table][l.cls]), c->step);
        l.algo = published ? published : algo;
    }
    l.incumbent = l.algo;
    int rivals[NCL_NUM_ALGOS + 1], at, d = duel_of(n, &at), k = d < 0 ? 0 : rivals_of(c, l.algo, forced, registered, rivals);
    if (k > 0) {
        int stores = -1;
        for (int i = 0; i < k; i++) stores = rivals[i] == NCL_OTHER_STORES ? i : stores;
        l.at = at, l.rival = rivals[rival_of(d, k, stores)], l.challenger = challenger_at(at);
        if (l.challenger && l.rival != NCL_OTHER_STORES) l.algo = l.rival;
    }
    l.stream = streams(c, l.algo, l.cls) != (l.challenger && l.rival == NCL_OTHER_STORES);
    if (c->rank == 0) l.t0 = ncl_now();
    return l;
}

static float median(float* x, int n) { /* n <= NCL_RECENT: insertion sort */
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && x[j] < x[j - 1]; j--) {
            float t = x[j];
            x[j] = x[j - 1], x[j - 1] = t;
        }
    return n % 2 ? x[n / 2] : (x[n / 2 - 1] + x[n / 2]) / 2;
}

/* The ratios are C1/I3, C5/I3, C5/I7 (timed calls at places 1, 3, 5, 7): the median cancels a
 * drift, but the first two share I3, so one slow call there alone (a preemption, a peer late) made
 * both low and crowned a challenger that was no faster (two-shot's I3 at 5.0 ms among 1.5 ms calls,
 * 16 MiB at np=2: one-shot crowned, then 1.3x slower for the rest of the row, 2026-12-06).  So the
 * last ratio, which does not use I3, must be below the margin too. */
static bool challenger_won(float* ratio) {
    bool last = ratio[NCL_DUEL_PAIRS - 1] < SWITCH_MARGIN; /* before median() sorts them */
    return last && median(ratio, NCL_DUEL_PAIRS) < SWITCH_MARGIN;
}

/* The challenger won: it is the incumbent from the call after next on (see above). */
static void crown(ncl_comm* c, const ncl_learned* l) {
    if (l->rival == NCL_OTHER_STORES) { /* the incumbent's stores: read by every rank, stale is harmless */
        bool now = streams(c, l->incumbent, l->cls);
        atomic_store_explicit(&c->hdr->streaming[l->incumbent][l->cls],
                              now ? NCL_STORES_CACHED : NCL_STORES_STREAMING, memory_order_relaxed);
        return;
    }
    _Atomic uint64_t* word = &c->hdr->algo_word[l->table][l->cls];
    uint64_t w = atomic_load(word);
    if ((int32_t)(c->step - (uint32_t)(w >> 32)) < 0) return; /* the last change is not in force yet */
    int now = choice_at(w, c->step); /* 0: the model's choice */
    atomic_store(word, (uint64_t)(c->step + 1) << 32 | (uint64_t)now << 8 | (uint64_t)l->rival);
}

/* Between duels, rank 0 follows the host's mode with the stores (which need no agreement: stale is
 * harmless).  Ordinary stores cost 4-5x more in the slow mode than in the fast one, streaming ones
 * about the same, a little less in the slow mode (2 MiB 175 against 242 us, 16 MiB 1.5 against
 * 2.4 ms; 2026-12).  So ordinary stores that have run REACT_MARGIN slower than this algorithm's
 * typical streaming call (the median of its last NCL_RECENT) for REACT_CALLS calls in a row give
 * way, and streaming ones that have run REACT_BACK above their typical call for REACT_BACK_CALLS
 * calls in a row try ordinary ones again (if those are slow, the first rule brings streaming back
 * after three calls).  The median, not the recent low: the fastest call of a wide spread (16 MiB
 * at np=2, slow minutes: the low 0.6-0.7 of the typical call) let any three typical calls in a
 * row send the stores to ordinary ones every ten calls, five of them at 3-4x (out of place 5.3 ms
 * against MPICH's 4.1, where streaming alone ran 2.2; 2026-12-06).  Not at the first
 * slow call: calls slowed by anything else gave ordinary stores up for the ~100 calls until the
 * next stores duel, at 2x their time in the fast mode (2 MiB 260 against 125 us, 2026-12): a
 * preemption slows one call, and after the ranks slept (ncl-perf running another library) the
 * first call waits for the peers to wake and the next runs with cold caches (2 MiB: 9 ms, 0.5 ms,
 * then 125 us).  The first two calls after a change pay for it (the lines sit where the other
 * stores left them: 2-6x a steady call) and judge nothing. */
#define REACT_MARGIN 1.5f
#define REACT_CALLS 3
#define REACT_BACK 1.3f
#define REACT_BACK_CALLS 3
static void set_stores(ncl_comm* c, const ncl_learned* l, ncl_duel* d, uint8_t kind) {
    atomic_store_explicit(&c->hdr->streaming[l->algo][l->cls], kind, memory_order_relaxed);
    d->slower[l->algo] = 0, d->settling[l->algo] = 2;
}

/* The median of an algorithm's last streaming calls (ns per byte), 0 before the first. */
static float typical_streamed(const ncl_duel* d, int algo) {
    float x[NCL_RECENT];
    memcpy(x, d->streamed[algo], sizeof x);
    return d->streamed_n[algo] ? median(x, d->streamed_n[algo]) : 0.0f;
}

static void remember_streamed(ncl_duel* d, int algo, float x) {
    d->streamed[algo][d->streamed_at[algo]] = x;
    d->streamed_at[algo] = (uint8_t)((d->streamed_at[algo] + 1) % NCL_RECENT);
    if (d->streamed_n[algo] < NCL_RECENT) d->streamed_n[algo]++;
}

/* The streaming call ordinary stores are held to: this algorithm's typical one, or, when it never
 * streamed (its stores were lent, see streams), its lender's (streaming stores cost about the same in
 * both modes, so a slow minute still shows: direct crowned with lent ordinary stores in the fast mode
 * had nothing to be held to when the slow one came, 2026-12-06).  Not the last streaming call: the
 * last before a change to ordinary stores is, by the rule that made it, a slow one. */
static float streamed_ref(const ncl_duel* d, int algo) {
    for (size_t i = 0; !d->streamed_n[algo] && algo != NCL_ALGO_CMA && i < NUM_LENDERS; i++)
        if (LENDERS[i] != algo && d->streamed_n[LENDERS[i]]) return typical_streamed(d, LENDERS[i]);
    return typical_streamed(d, algo);
}

static void react(ncl_comm* c, const ncl_learned* l, ncl_duel* d, float x) {
    int a = l->algo;
    if (c->streaming) return; /* NCL_STREAMING fixes the stores */
    if (d->settling[a] > 0) {
        d->settling[a]--;
        return;
    }
    if (!l->stream) {
        float ref = streamed_ref(d, a);
        d->slower[a] = ref > 0 && x > REACT_MARGIN * ref ? d->slower[a] + 1 : 0;
        if (d->slower[a] >= REACT_CALLS) {
            set_stores(c, l, d, NCL_STORES_STREAMING);
            /* streaming stores come back at the host's level now: a step of the host sent them away,
             * and held to their calls before it they would flap again (tests/test_collectives.py) */
            d->streamed_n[a] = d->streamed_at[a] = 0;
        }
        return;
    }
    float typical = typical_streamed(d, a); /* before this call joins it */
    remember_streamed(d, a, x);
    d->slower[a] = typical > 0 && x > REACT_BACK * typical ? d->slower[a] + 1 : 0;
    if (d->slower[a] >= REACT_BACK_CALLS) set_stores(c, l, d, NCL_STORES_CACHED);
}

void ncl_learn_from(ncl_comm* c, const ncl_learned* l, int status) {
    if (c->rank != 0 || l->cls < 0 || status != NCL_OK) return;
    ncl_duel* d = &c->duels[l->table][l->cls];
    float x = (float)((ncl_now() - l->t0) * 1e9 / (double)l->bytes);
    if (l->at < 0) {
        react(c, l, d, x);
        return;
    }
    if (l->at == 0) d->pairs = 0;
    if (!timed_at(l->at)) return;
    if (l->stream) remember_streamed(d, l->algo, x);
    if (d->pairs >= NCL_DUEL_PAIRS) return;
    if (l->at > 1) d->ratio[d->pairs++] = l->challenger ? x / d->first : d->first / x;
    d->first = x; /* the next ratio's other term */
    if (l->at != DUEL_CALLS - 1 || d->pairs != NCL_DUEL_PAIRS) return;
    if (challenger_won(d->ratio)) {
        crown(c, l);
        memset(d->slower, 0, sizeof d->slower); /* react counts afresh under the new choice */
    } else if (l->rival == NCL_OTHER_STORES) { /* the incumbent's stores held: learned, so lent (streams) */
        atomic_store_explicit(&c->hdr->streaming[l->incumbent][l->cls],
                              l->stream ? NCL_STORES_STREAMING : NCL_STORES_CACHED, memory_order_relaxed);
    }
}
