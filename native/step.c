/* step.c: the engine every collective is written in.
 *
 * Each rank owns a staging area (two slots' worth) and a step counter.  At step s a rank
 * writes its slot for s, posts s (with a fingerprint of the call and where its slot is),
 * waits until all ranks have posted s and checks their fingerprints, then reads any rank's
 * slot of step s.  Every rank has posted s, so finished reading step s - 1, before any rank
 * gets past step s: a rank's slot for s + 1 need only avoid its slot for s, with no extra flags.
 * Where the slots lie is the writer's choice, and it fills its staging as a ring (small slots
 * one after another, through one half, then the other; a slot that does not fit where the
 * last one ended starts the other half): a line is written again only after ~2 slots' worth
 * of later ones, by when the readers' caches have let it go.  Writing a line that a reader
 * still holds waits for the reader's copy to be invalidated: with the two halves used in turn,
 * a 256 KiB two-shot all_reduce at np=2 spent more time on that than on the copies (37.6 us,
 * 18.1 in the ring; 64 KiB 11.7 against 7.3; 1-2 MiB alike; the same processes alternating,
 * 2026-12).  Slots below RING_MIN_BYTES take the start of the other half every step, as
 * before: there the ring gained nothing (16 KiB) or lost up to 12% (4-8 KiB).
 * The fingerprints turn a mismatched call (other collective, dtype, count, op, root or
 * algorithm) into an error on every rank instead of a hang or silent corruption. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include "internal.h"

#define RING_MIN_BYTES ((size_t)16 << 10)

/* The ring's first use: its pages fault in at once (~2 us each), not one at a time in the calls
 * that reach them (setup leaves them alone: a communicator used for small calls never needs them).
 * Where the kernel cannot (before Linux 5.14, or /dev/shm full) they fault in as they are reached. */
static void fault_in(ncl_comm* c) {
    c->ring_faulted = true;
#ifdef MADV_POPULATE_WRITE
    (void)madvise(ncl_staging(c, c->rank), 2 * c->slot_bytes, MADV_POPULATE_WRITE);
#endif
}

uint8_t* ncl_step_begin(ncl_comm* c, size_t bytes) {
    uint32_t s = c->step + 1;
    if (c->placed_step != s) { /* once per step (every collective asks once) */
        size_t want = ncl_div_up(ncl_max(bytes, 1), NCL_CACHE_LINE) * NCL_CACHE_LINE;
        if (bytes < RING_MIN_BYTES || c->ring_pos + want > c->slot_bytes)
            c->ring_half ^= 1, c->ring_pos = 0;
        else if (!c->ring_faulted)
            fault_in(c);
        c->placed_step = s;
        c->placed_off = (size_t)c->ring_half * c->slot_bytes + c->ring_pos;
        c->ring_pos += want;
    }
    return ncl_staging(c, c->rank) + c->placed_off;
}

uint8_t* ncl_step_slot(ncl_comm* c, int rank, uint32_t step) {
    return ncl_staging(c, rank) + c->ranks[rank].slot_off[step & 1];
}

uint8_t* ncl_step_peer_slot(ncl_comm* c, int rank) { return ncl_step_slot(c, rank, c->step); }

void ncl_pack_blocks(uint8_t* slot, const uint8_t* send, size_t n, size_t count, size_t off, size_t m, size_t es) {
    for (size_t b = 0; b < n; b++) ncl_copy_shared(slot + b * m * es, send + (b * count + off) * es, m * es);
}

/* Appends to a bounded message (what snprintf would have written is never past cap). */
static size_t append(char* out, size_t cap, size_t len, const char* fmt, ...) __attribute__((format(printf, 4, 5)));
static size_t append(char* out, size_t cap, size_t len, const char* fmt, ...) {
    if (len >= cap) return len;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out + len, cap - len, fmt, ap);
    va_end(ap);
    return n < 0 ? len : ncl_min(len + (size_t)n, cap);
}

/* A call as the user wrote it: only the fields that matter for its collective. */
static size_t describe(char* out, size_t cap, const ncl_fingerprint* fp) {
    bool reduces =
        fp->coll == NCL_COLL_ALL_REDUCE || fp->coll == NCL_COLL_REDUCE || fp->coll == NCL_COLL_REDUCE_SCATTER;
    size_t len = append(out, cap, 0, "%s(", ncl_coll_name(fp->coll));
    if (fp->coll != NCL_COLL_BARRIER)
        len = append(out, cap, len, "%s, count=%llu", ncl_dtype_name(fp->dtype), (unsigned long long)fp->count);
    if (reduces) len = append(out, cap, len, ", op=%s", ncl_op_name(fp->op));
    if (fp->root >= 0) len = append(out, cap, len, ", root=%d", (int)fp->root);
    uint64_t extra = fp->extra & 0xffffffffu;
    if (fp->coll == NCL_COLL_ALL_REDUCE && extra < NCL_NUM_ALGOS)
        len = append(out, cap, len, ", algorithm=%s", ncl_algo_name((int)extra));
    else if (extra)
        len = append(out, cap, len, ", extra=%llu", (unsigned long long)extra);
    if (fp->extra & NCL_EXTRA_CMA) len = append(out, cap, len, ", single-copy reads");
    for (int i = 0; i < 2; i++)
        if (fp->win[i])
            len = append(out, cap, len, ", %s in registered window %u at byte %llu", i ? "recv" : "send",
                         (unsigned)fp->win[i], (unsigned long long)fp->win_off[i]);
    return append(out, cap, len, ")");
}

static bool same_fp(const ncl_fingerprint* a, const ncl_fingerprint* b) {
    return a->coll == b->coll && a->dtype == b->dtype && a->op == b->op && a->root == b->root &&
           a->count == b->count && a->extra == b->extra && a->win[0] == b->win[0] && a->win[1] == b->win[1] &&
           a->win_off[0] == b->win_off[0] && a->win_off[1] == b->win_off[1];
}

/* Every rank builds the same message: the ranks that differ from rank 0, and what each called. */
static int mismatch_error(ncl_comm* c, uint32_t parity) {
    char msg[1200];
    size_t len = append(msg, sizeof msg, 0, "ranks called mismatched collectives: rank 0 called ");
    const ncl_fingerprint* ref = &c->ranks[0].fp[parity];
    len = describe(msg + len, sizeof msg - len, ref) + len;
    for (int r = 1; r < c->nranks && len < sizeof msg - 80; r++) {
        const ncl_fingerprint* fp = &c->ranks[r].fp[parity];
        if (same_fp(fp, ref)) continue;
        len = append(msg, sizeof msg, len, "; rank %d called ", r);
        len = describe(msg + len, sizeof msg - len, fp) + len;
    }
    return ncl_error(NCL_ERR_MISMATCH, "%s", msg);
}

static int timeout_error(ncl_comm* c, uint32_t s, const char* what) {
    char missing[512] = "";
    size_t len = 0;
    for (int r = 0; r < c->nranks && len < sizeof missing - 16; r++)
        if ((int32_t)(atomic_load(&c->ranks[r].step) - s) < 0)
            len += (size_t)snprintf(missing + len, sizeof missing - len, "%s%d", len ? ", " : "", r);
    return ncl_error(NCL_ERR_TIMEOUT, "%s (call %u) timed out after %.1f s on rank %d waiting for ranks [%s]",
                     what, (unsigned)s, c->timeout_s, c->rank, missing);
}

/* A 64-bit hash of what a fingerprint compares, kept on the cache line that waiters poll
 * anyway, so that checking every peer's call costs no extra cache misses; the full
 * fingerprints are read only to word the error.  Each step of the fold, h = (h ^ part) * odd,
 * is a bijection of h, so fingerprints that differ in any one field never share a digest. */
static uint64_t digest_of(const ncl_fingerprint* fp) {
    uint64_t parts[] = {fp->coll, fp->dtype, fp->op, (uint64_t)(uint32_t)fp->root, fp->count, fp->extra,
                        fp->win[0], fp->win[1], fp->win_off[0], fp->win_off[1]};
    uint64_t h = 0x9e3779b97f4a7c15u;
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) h = (h ^ parts[i]) * 0xbf58476d1ce4e5b9u;
    return h ^ (h >> 31);
}

static bool digests_agree(ncl_comm* c, uint32_t parity, uint64_t mine) {
    for (int r = 0; r < c->nranks; r++)
        if (c->ranks[r].digest[parity] != mine) return false;
    return true;
}

/* Oversubscribed hosts (more ranks than CPUs): every rank counts itself in at one shared
 * word and waits on one generation word that the last arrival advances (after checking
 * everyone's digest, so that the others need not read n cache lines each): one poll per
 * scheduling instead of one per peer. */
static int wait_central(ncl_comm* c, uint32_t s, uint64_t mine, double deadline, const char* what,
                        const ncl_on_last* last) {
    ncl_header* h = c->hdr;
    if (atomic_fetch_add(&h->arrived, 1) + 1 == (uint32_t)c->nranks) {
        if (c->verify_calls && !digests_agree(c, s & 1, mine))
            atomic_store(&h->bad_step, s);
        else if (last) /* every slot of step s is written: do the work once, for everyone */
            last->run(c, s, last->arg);
        atomic_store(&h->last_rank, (uint32_t)c->rank);
        atomic_store(&h->arrived, 0); /* before the generation: the next step's arrivals count afresh */
        ncl_post_word(&h->generation, &h->gen_waiters, s);
    } else {
        NCL_CHECK(ncl_wait_word(c, -1, &h->generation, &h->gen_waiters, s, deadline, what));
    }
    return atomic_load(&h->bad_step) == s ? mismatch_error(c, s & 1) : NCL_OK;
}

static int wait_each(ncl_comm* c, uint32_t s, uint64_t mine, double deadline, const char* what) {
    for (int r = 0; r < c->nranks; r++) {
        if (r == c->rank) continue;
        NCL_CHECK(ncl_wait_step(c, r, s, deadline, what));
    }
    return !c->verify_calls || digests_agree(c, s & 1, mine) ? NCL_OK : mismatch_error(c, s & 1);
}

int ncl_step_sync(ncl_comm* c, const ncl_fingerprint* fp_in) { return ncl_step_sync_last(c, fp_in, NULL); }

int ncl_step_sync_last(ncl_comm* c, const ncl_fingerprint* fp_in, const ncl_on_last* last) {
    uint32_t s = c->step + 1, parity = s & 1;
    ncl_rank_ctrl* me = &c->ranks[c->rank];
    uint64_t mine = 0;
    if (c->verify_calls) { /* off only to measure what the check costs */
        mine = digest_of(fp_in);
        me->fp[parity] = *fp_in; /* read by peers only to word a mismatch error */
        me->fp[parity].step = s;
        /* The digest shares the line peers poll: a store there while they poll costs a line
         * transfer on the critical path, so store only a changed digest (loops repeat calls). */
        if (me->digest[parity] != mine) me->digest[parity] = mine;
    }
    if (c->placed_step == s) me->slot_off[parity] = c->placed_off; /* the line the post stores to anyway */
    ncl_post_step(c, s); /* publishes the above; timeouts and liveness read it */
    double deadline = ncl_now() + c->timeout_s;
    const char* what = ncl_coll_name(fp_in->coll);
    int rc = c->central_sync ? wait_central(c, s, mine, deadline, what, last) : wait_each(c, s, mine, deadline, what);
    if (rc == NCL_ERR_TIMEOUT) return timeout_error(c, s, what);
    if (rc != NCL_OK) return rc;
    c->step = s;
    return NCL_OK;
}

/* Wake anyone asleep on this rank's words (or the shared one) so that they notice at once,
 * not at their next liveness check, that this rank left. */
void ncl_wake_waiters(ncl_comm* c) {
    ncl_post_word(&c->ranks[c->rank].step, &c->ranks[c->rank].waiters, atomic_load(&c->ranks[c->rank].step));
    ncl_post_word(&c->hdr->generation, &c->hdr->gen_waiters, atomic_load(&c->hdr->generation));
}

int ncl_comm_usable(ncl_comm* c) {
    if (!c) return ncl_error(NCL_ERR_STATE, "the communicator is closed");
    uint32_t revoker = atomic_load_explicit(&c->hdr->revoked, memory_order_relaxed);
    if (revoker && !c->broken) /* even a call whose peers' steps are already posted fails */
        return ncl_fail(c, ncl_error(NCL_ERR_PEER, "rank %u revoked the communicator", revoker - 1));
    if (c->broken) { /* quote why this rank left (its own words in the segment): a revoke is named */
        char reason[sizeof c->ranks[c->rank].abort_reason];
        ncl_own_reason(c, reason, sizeof reason);
        return ncl_error(NCL_ERR_STATE, "the communicator is unusable after an earlier error on this rank (%s); "
                         "create a new one, or shrink() it", reason[0] ? reason : "see that error");
    }
    return NCL_OK;
}

/* Leave the group, telling peers why (they quote it in their own error). */
static void leave(ncl_comm* c, int status, const char* reason) {
    ncl_rank_ctrl* me = &c->ranks[c->rank];
    if (atomic_load(&me->aborted)) return;
    me->abort_status = status;
    snprintf(me->abort_reason, sizeof me->abort_reason, "%s", reason);
    atomic_store(&me->aborted, NCL_ABORTED); /* publishes status and reason */
}

int ncl_fail(ncl_comm* c, int status) {
    if (status == NCL_OK || status == NCL_ERR_ARGUMENT) return status;
    c->broken = status;
    leave(c, status, ncl_last_error());
    ncl_wake_waiters(c); /* peers asleep on this rank learn now, not at their next check */
    return status;
}

int ncl_comm_abort(ncl_comm* c, const char* reason) {
    if (!c) return NCL_OK;
    c->broken = NCL_ERR_STATE;
    leave(c, NCL_ERR_PEER, reason ? reason : "it called abort()");
    ncl_wake_waiters(c);
    return NCL_OK;
}

int ncl_comm_revoke(ncl_comm* c, const char* reason) {
    if (!c) return NCL_OK;
    uint32_t none = 0;
    atomic_compare_exchange_strong(&c->hdr->revoked, &none, (uint32_t)c->rank + 1);
    return ncl_comm_abort(c, reason);
}

int ncl_barrier(ncl_comm* c) {
    NCL_CHECK(ncl_comm_usable(c));
    ncl_call_begin(c, NCL_COLL_BARRIER, -1, 0, -1, -1);
    ncl_fingerprint fp = {.coll = NCL_COLL_BARRIER, .root = -1};
    return ncl_call_end(c, ncl_step_sync(c, &fp));
}
