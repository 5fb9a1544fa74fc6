/* broadcast.c: broadcast, all_gather and gather.
 *
 * broadcast, per slot-sized chunk: the root copies in, 1 step, every other rank copies
 *   the root's slot out, each from its own n-th of it round (ncl_reader_turn says why).
 * all_gather / gather, per chunk of each rank's piece: every rank copies its piece in,
 *   1 step, every rank (gather: the root) copies all n pieces out to their places.
 * With a registered source (window.c) and at least direct_min_bytes, both read the source
 * where it is: 1 step, one copy, 1 step so that nobody reuses a buffer a peer still reads.
 * Unregistered ones of at least cma_min_bytes do the same through process_vm_readv (cma.c),
 * but only where each buffer has one reader (gather, and broadcast / all_gather of 2 ranks):
 * every reader pins the pages it reads, so n-1 readers of one buffer pin it n-1 times and
 * contend on its owner's memory map, while staging writes it once for all readers to share
 * from the cache.  Measured, 64 MiB: broadcast on 8 ranks 10-13 ms staged against 19-20 ms
 * through CMA; all_gather on 4 ranks 14.7 against 23.4 ms (and 2 ranks: 9.0 against 10.0). */
#include <string.h>

#include "internal.h"

static void copy(void* dst, const void* src, size_t bytes) {
    if (dst != src && bytes) memcpy(dst, src, bytes);
}

static int broadcast_call(ncl_comm* c, const void* send_, void* recv_, size_t count, int dtype, int root) {
    NCL_CHECK(ncl_check_args(c, send_, recv_, count, dtype, -1, root));
    if (root < 0) return ncl_error(NCL_ERR_ARGUMENT, "root %d is negative", root);
    if (count == 0) return NCL_OK; /* nothing to move: a no-op, as in MPI and NCCL */
    const uint8_t* send = send_;
    uint8_t* recv = recv_;
    size_t bytes = count * (size_t)ncl_dtype_size(dtype), chunk = c->slot_bytes;
    ncl_fingerprint fp = {.coll = NCL_COLL_BROADCAST, .dtype = (uint8_t)dtype, .root = root, .count = count};
    ncl_reg rs = ncl_direct_source(c, send, bytes);
    if (rs.win) {
        ncl_fp_registered(&fp, &rs, NULL);
        ncl_call_path(c, "direct");
        NCL_CHECK(ncl_step_sync(c, &fp));
        copy(recv, ncl_reg_peer(&rs, root), bytes);
        return ncl_step_sync(c, &fp);
    }
    if (ncl_use_cma(c, bytes) && c->nranks == 2) { /* one reader only: see the top of the file */
        NCL_CHECK(ncl_cma_exchange(c, send, &fp));
        if (c->rank == root)
            copy(recv, send, bytes);
        else
            NCL_CHECK(ncl_cma_read(c, root, recv, ncl_cma_peer_addr(c, root), bytes));
        return ncl_step_sync(c, &fp);
    }
    size_t nsteps = bytes ? ncl_div_up(bytes, chunk) : 1;
    for (size_t i = 0; i < nsteps; i++) {
        size_t off = i * chunk, m = ncl_min(chunk, bytes - off);
        if (c->rank == root) ncl_copy_shared(ncl_step_begin(c, m), send + off, m);
        NCL_CHECK(ncl_step_sync(c, &fp));
        if (c->rank == root)
            copy(recv + off, send + off, m);
        else
            ncl_copy_from_own_share(c, recv + off, ncl_step_peer_slot(c, root), m, true); /* streaming: 64 MiB */
    }
    return NCL_OK;
}

/* root < 0: every rank receives (all_gather); else only the root does (gather). */
static int gather_impl(ncl_comm* c, const uint8_t* send, uint8_t* recv, size_t count, int dtype, int root,
                       ncl_fingerprint* fp) {
    size_t es = (size_t)ncl_dtype_size(dtype), bytes = count * es, chunk = c->slot_bytes;
    bool receives = root < 0 || root == c->rank;
    /* Direct: each rank's piece is read where it is; in place (send is this rank's block of
     * a registered recv) that is block r of rank r's recv, else every rank's send. */
    bool in_place = root < 0 && send == recv + (size_t)c->rank * bytes;
    ncl_reg reg = in_place ? ncl_direct_source(c, recv, bytes * (size_t)c->nranks) : ncl_direct_source(c, send, bytes);
    if (reg.win) {
        in_place ? ncl_fp_registered(fp, NULL, &reg) : ncl_fp_registered(fp, &reg, NULL);
        ncl_call_path(c, "direct");
        NCL_CHECK(ncl_step_sync(c, fp));
        for (int i = 0; i < c->nranks && (root < 0 || root == c->rank); i++) {
            int r = ncl_reader_turn(c, i);
            copy(recv + (size_t)r * bytes, ncl_reg_peer(&reg, r) + (in_place ? (size_t)r * bytes : 0), bytes);
        }
        return ncl_step_sync(c, fp);
    }
    if (ncl_use_cma(c, bytes) && (root >= 0 || c->nranks == 2)) { /* one reader per buffer */
        NCL_CHECK(ncl_cma_exchange(c, send, fp));
        for (int i = 0; i < c->nranks && receives; i++) {
            int r = ncl_reader_turn(c, i);
            if (r == c->rank)
                copy(recv + (size_t)r * bytes, send, bytes);
            else
                NCL_CHECK(ncl_cma_read(c, r, recv + (size_t)r * bytes, ncl_cma_peer_addr(c, r), bytes));
        }
        return ncl_step_sync(c, fp);
    }
    size_t nsteps = bytes ? ncl_div_up(bytes, chunk) : 1;
    for (size_t i = 0; i < nsteps; i++) {
        size_t off = i * chunk, m = ncl_min(chunk, bytes - off);
        ncl_copy_shared(ncl_step_begin(c, m), send + off, m);
        NCL_CHECK(ncl_step_sync(c, fp));
        if (!receives) continue;
        for (int i = 0; i < c->nranks; i++) {
            int r = ncl_reader_turn(c, i);
            memcpy(recv + (size_t)r * bytes + off, ncl_step_peer_slot(c, r), m);
        }
    }
    return NCL_OK;
}

static int all_gather_call(ncl_comm* c, const void* send, void* recv, size_t count, int dtype) {
    NCL_CHECK(ncl_check_args(c, send, recv, count, dtype, -1, -1));
    if (count == 0) return NCL_OK; /* nothing to move: a no-op, as in MPI and NCCL */
    ncl_fingerprint fp = {.coll = NCL_COLL_ALL_GATHER, .dtype = (uint8_t)dtype, .root = -1, .count = count};
    return gather_impl(c, send, recv, count, dtype, -1, &fp);
}

static int gather_call(ncl_comm* c, const void* send, void* recv, size_t count, int dtype, int root) {
    NCL_CHECK(ncl_check_args(c, send, c->rank == root ? recv : send, count, dtype, -1, root));
    if (root < 0) return ncl_error(NCL_ERR_ARGUMENT, "root %d is negative", root);
    if (count == 0) return NCL_OK; /* nothing to move: a no-op, as in MPI and NCCL */
    ncl_fingerprint fp = {.coll = NCL_COLL_GATHER, .dtype = (uint8_t)dtype, .root = root, .count = count};
    return gather_impl(c, send, recv, count, dtype, root, &fp);
}

/* The public entry points: each call recorded in the flight recorder (flight.c). */
int ncl_broadcast(ncl_comm* c, const void* send, void* recv, size_t count, int dtype, int root) {
    NCL_CHECK(ncl_comm_usable(c));
    ncl_call_begin(c, NCL_COLL_BROADCAST, dtype, count, -1, root);
    return ncl_call_end(c, broadcast_call(c, send, recv, count, dtype, root));
}

int ncl_all_gather(ncl_comm* c, const void* send, void* recv, size_t count, int dtype) {
    NCL_CHECK(ncl_comm_usable(c));
    ncl_call_begin(c, NCL_COLL_ALL_GATHER, dtype, count, -1, -1);
    return ncl_call_end(c, all_gather_call(c, send, recv, count, dtype));
}

int ncl_gather(ncl_comm* c, const void* send, void* recv, size_t count, int dtype, int root) {
    NCL_CHECK(ncl_comm_usable(c));
    ncl_call_begin(c, NCL_COLL_GATHER, dtype, count, -1, root);
    return ncl_call_end(c, gather_call(c, send, recv, count, dtype, root));
}
