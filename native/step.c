/* step.c: the engine every collective is written in.
 *
 * Each rank owns two staging slots and a step counter.  Step s uses every rank's slot
 * s % 2: a rank writes its slot, posts s (with a fingerprint of the call), waits until all
 * ranks have posted s and checks their fingerprints, then reads any rank's slot s % 2.
 * A rank may write slot s % 2 again only at step s + 2, and it gets there only after every
 * rank posted s + 1, i.e. finished reading step s: double buffering with no extra flags.
 * The fingerprints turn a mismatched call (other collective, dtype, count, op, root or
 * algorithm) into an error on every rank instead of a hang or silent corruption. */
#include <stdio.h>
#include <string.h>

#include "internal.h"

uint8_t* ncl_step_begin(ncl_comm* c) { return ncl_slot(c, c->rank, c->step + 1); }

uint8_t* ncl_step_peer_slot(ncl_comm* c, int rank) { return ncl_slot(c, rank, c->step); }

void ncl_pack_blocks(uint8_t* slot, const uint8_t* send, size_t n, size_t count, size_t off, size_t m, size_t es) {
    for (size_t b = 0; b < n; b++) memcpy(slot + b * m * es, send + (b * count + off) * es, m * es);
}

static int describe(char* out, size_t cap, const ncl_fingerprint* fp) {
    return snprintf(out, cap, "%s(%s, count=%llu, op=%s, root=%d, extra=%llu)", ncl_coll_name(fp->coll),
                    ncl_dtype_name(fp->dtype), (unsigned long long)fp->count, ncl_op_name(fp->op), (int)fp->root,
                    (unsigned long long)fp->extra);
}

static bool same_fp(const ncl_fingerprint* a, const ncl_fingerprint* b) {
    return a->coll == b->coll && a->dtype == b->dtype && a->op == b->op && a->root == b->root &&
           a->count == b->count && a->extra == b->extra;
}

/* Every rank builds the same message: the ranks that differ from rank 0, and what each called. */
static int mismatch_error(ncl_comm* c, uint32_t parity) {
    char msg[900];
    size_t len = (size_t)snprintf(msg, sizeof msg, "ranks called mismatched collectives: rank 0 called ");
    const ncl_fingerprint* ref = &c->ranks[0].fp[parity];
    len += (size_t)describe(msg + len, sizeof msg - len, ref);
    for (int r = 1; r < c->nranks && len < sizeof msg - 80; r++) {
        const ncl_fingerprint* fp = &c->ranks[r].fp[parity];
        if (same_fp(fp, ref)) continue;
        len += (size_t)snprintf(msg + len, sizeof msg - len, "; rank %d called ", r);
        len += (size_t)describe(msg + len, sizeof msg - len, fp);
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

int ncl_step_sync(ncl_comm* c, const ncl_fingerprint* fp_in) {
    uint32_t s = c->step + 1, parity = s & 1;
    ncl_rank_ctrl* me = &c->ranks[c->rank];
    me->fp[parity] = *fp_in;
    me->fp[parity].step = s;
    ncl_post_word(&me->step, &me->waiters, s);
    double deadline = ncl_now() + c->timeout_s;
    const char* what = ncl_coll_name(fp_in->coll);
    for (int r = 0; r < c->nranks; r++) {
        if (r == c->rank) continue;
        int rc = ncl_wait_word(c, -1, &c->ranks[r].step, &c->ranks[r].waiters, s, deadline, what);
        if (rc == NCL_ERR_TIMEOUT) return timeout_error(c, s, what);
        if (rc != NCL_OK) return rc;
    }
    for (int r = 0; r < c->nranks; r++)
        if (!same_fp(&c->ranks[r].fp[parity], fp_in)) return mismatch_error(c, parity);
    c->step = s;
    return NCL_OK;
}

int ncl_comm_usable(ncl_comm* c) {
    if (!c) return ncl_error(NCL_ERR_STATE, "the communicator is closed");
    if (c->broken)
        return ncl_error(NCL_ERR_STATE,
                         "the communicator is unusable after an earlier error on this rank (see that error); "
                         "create a new one");
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
    return status;
}

int ncl_comm_abort(ncl_comm* c) {
    if (!c) return NCL_OK;
    c->broken = NCL_ERR_STATE;
    leave(c, NCL_ERR_PEER, "it called abort()");
    /* Wake anyone asleep on our words so they notice now rather than at their next slice. */
    ncl_post_word(&c->ranks[c->rank].step, &c->ranks[c->rank].waiters, atomic_load(&c->ranks[c->rank].step));
    return NCL_OK;
}

int ncl_barrier(ncl_comm* c) {
    NCL_CHECK(ncl_comm_usable(c));
    ncl_fingerprint fp = {.coll = NCL_COLL_BARRIER, .root = -1};
    return ncl_fail(c, ncl_step_sync(c, &fp));
}
