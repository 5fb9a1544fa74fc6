/* all_reduce.c: all_reduce (one-shot, two-shot), reduce and reduce_scatter.
 *
 * All three reduce in rank order (rank 0 op rank 1 op ...), so every rank gets the same
 * bits whatever the algorithm or chunking.  Messages larger than a staging slot go in
 * slot-sized chunks, one or two steps each.
 *
 * one-shot, per chunk of m elements: copy in (m), 1 step, every rank reduces all n copies
 *   (reads n*m): lowest latency, best for small messages.
 * two-shot, per chunk: copy in (m), 1 step, rank r reduces block r of all copies into its
 *   other slot (reads m), 1 step, everyone copies the n reduced blocks out (m): the
 *   reduce-scatter + all-gather that keeps per-rank traffic flat as n grows. */
#include <string.h>

#include "internal.h"

/* Block b of an m-element chunk split n ways; blocks are multiples of 64 bytes. */
static void block_range(size_t m, int n, int b, size_t es, size_t* lo, size_t* hi) {
    size_t per_line = NCL_CACHE_LINE / es;
    size_t blk = ncl_div_up(ncl_div_up(m, (size_t)n), per_line) * per_line;
    *lo = ncl_min((size_t)b * blk, m);
    *hi = ncl_min(*lo + blk, m);
}

static int reduce_peers(ncl_comm* c, void* dst, size_t offset_bytes, size_t m, int dtype, int op) {
    const void* srcs[NCL_MAX_RANKS];
    for (int r = 0; r < c->nranks; r++) srcs[r] = ncl_step_peer_slot(c, r) + offset_bytes;
    return ncl_reduce_local(dst, srcs, c->nranks, m, dtype, op);
}

static int one_shot(ncl_comm* c, const uint8_t* send, uint8_t* recv, size_t count, int dtype, int op,
                    const ncl_fingerprint* fp) {
    size_t es = (size_t)ncl_dtype_size(dtype), chunk = c->slot_bytes / es;
    size_t nsteps = count ? ncl_div_up(count, chunk) : 1;
    for (size_t i = 0; i < nsteps; i++) {
        size_t off = i * chunk, m = ncl_min(chunk, count - off);
        memcpy(ncl_step_begin(c), send + off * es, m * es);
        NCL_CHECK(ncl_step_sync(c, fp));
        NCL_CHECK(reduce_peers(c, recv + off * es, 0, m, dtype, op));
    }
    return NCL_OK;
}

/* Two-shot; with root >= 0 only the root collects the reduced blocks (that is reduce). */
static int two_shot(ncl_comm* c, const uint8_t* send, uint8_t* recv, size_t count, int dtype, int op, int root,
                    const ncl_fingerprint* fp) {
    size_t es = (size_t)ncl_dtype_size(dtype), chunk = c->slot_bytes / es;
    size_t nsteps = count ? ncl_div_up(count, chunk) : 1;
    for (size_t i = 0; i < nsteps; i++) {
        size_t off = i * chunk, m = ncl_min(chunk, count - off), lo, hi;
        memcpy(ncl_step_begin(c), send + off * es, m * es);
        NCL_CHECK(ncl_step_sync(c, fp));
        /* reduce my block into my next slot */
        block_range(m, c->nranks, c->rank, es, &lo, &hi);
        uint8_t* mine = ncl_step_begin(c);
        NCL_CHECK(reduce_peers(c, mine + lo * es, lo * es, hi - lo, dtype, op));
        NCL_CHECK(ncl_step_sync(c, fp));
        if (root >= 0 && root != c->rank) continue;
        for (int r = 0; r < c->nranks; r++) { /* gather every rank's reduced block */
            block_range(m, c->nranks, r, es, &lo, &hi);
            memcpy(recv + (off + lo) * es, ncl_step_peer_slot(c, r) + lo * es, (hi - lo) * es);
        }
    }
    return NCL_OK;
}

int ncl_all_reduce(ncl_comm* c, const void* send, void* recv, size_t count, int dtype, int op, int algo) {
    NCL_CHECK(ncl_check_args(c, send, recv, count, dtype, op, -1));
    if (algo == NCL_ALGO_AUTO) algo = count * (size_t)ncl_dtype_size(dtype) <= 65536 ? NCL_ALGO_ONE_SHOT : NCL_ALGO_TWO_SHOT;
    if (algo != NCL_ALGO_ONE_SHOT && algo != NCL_ALGO_TWO_SHOT)
        return ncl_error(NCL_ERR_ARGUMENT, "unknown all_reduce algorithm %d", algo);
    ncl_fingerprint fp = {.coll = NCL_COLL_ALL_REDUCE, .dtype = (uint8_t)dtype, .op = (uint8_t)op, .root = -1,
                          .count = count, .extra = (uint64_t)algo};
    int rc = algo == NCL_ALGO_ONE_SHOT ? one_shot(c, send, recv, count, dtype, op, &fp)
                                       : two_shot(c, send, recv, count, dtype, op, -1, &fp);
    return ncl_fail(c, rc);
}

int ncl_reduce(ncl_comm* c, const void* send, void* recv, size_t count, int dtype, int op, int root) {
    NCL_CHECK(ncl_check_args(c, send, c->rank == root ? recv : send, count, dtype, op, root));
    ncl_fingerprint fp = {.coll = NCL_COLL_REDUCE, .dtype = (uint8_t)dtype, .op = (uint8_t)op, .root = root,
                          .count = count};
    return ncl_fail(c, two_shot(c, send, recv, count, dtype, op, root, &fp));
}

/* Per step, rank r publishes a piece of k elements of each of its n blocks; every rank
 * then reduces its own block's piece from all n slots in rank order. */
int ncl_reduce_scatter(ncl_comm* c, const void* send_, void* recv_, size_t count, int dtype, int op) {
    NCL_CHECK(ncl_check_args(c, send_, recv_, count, dtype, op, -1));
    const uint8_t* send = send_;
    uint8_t* recv = recv_;
    size_t es = (size_t)ncl_dtype_size(dtype), n = (size_t)c->nranks, k = c->slot_bytes / es / n;
    ncl_fingerprint fp = {.coll = NCL_COLL_REDUCE_SCATTER, .dtype = (uint8_t)dtype, .op = (uint8_t)op,
                          .root = -1, .count = count};
    size_t nsteps = count ? ncl_div_up(count, k) : 1;
    for (size_t i = 0; i < nsteps; i++) {
        size_t off = i * k, m = ncl_min(k, count - off);
        ncl_pack_blocks(ncl_step_begin(c), send, n, count, off, m, es);
        NCL_CHECK(ncl_fail(c, ncl_step_sync(c, &fp)));
        NCL_CHECK(ncl_fail(c, reduce_peers(c, recv + off * es, (size_t)c->rank * m * es, m, dtype, op)));
    }
    return NCL_OK;
}
