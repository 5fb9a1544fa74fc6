/* all_to_all.c: all_to_all, all_to_allv and scatter.
 *
 * Per step each sender's slot holds n pieces of k = slot/n elements, piece j bound for
 * rank j; after the step, rank r copies piece r out of every sender's slot (scatter: out
 * of the root's only).  all_to_allv first spends one step publishing each rank's send and
 * receive counts, so that every rank checks the whole count matrix (and raises the same
 * error if a send count differs from the matching receive count) and knows how many
 * steps the largest block needs.
 * all_to_all with a registered send buffer (window.c) that recv does not overlap copies
 * each rank's block straight out of its sender's buffer: 1 step, one copy, 1 step; an
 * unregistered one does the same through process_vm_readv (cma.c) from cma_min_bytes per
 * block up.  scatter likewise reads its block of the root's buffer. */
#include <string.h>

#include "internal.h"

static int all_to_all_call(ncl_comm* c, const void* send_, void* recv_, size_t count, int dtype) {
    NCL_CHECK(ncl_check_args(c, send_, recv_, count, dtype, -1, -1));
    if (count == 0) return NCL_OK; /* nothing to move: a no-op, as in MPI and NCCL */
    const uint8_t* send = send_;
    uint8_t* recv = recv_;
    size_t es = (size_t)ncl_dtype_size(dtype), n = (size_t)c->nranks, k = c->slot_bytes / es / n;
    ncl_fingerprint fp = {.coll = NCL_COLL_ALL_TO_ALL, .dtype = (uint8_t)dtype, .root = -1, .count = count};
    size_t bytes = n * count * es;
    ncl_reg rs = ncl_direct_source(c, send, bytes);
    if (rs.win && (recv + bytes <= send || send + bytes <= recv)) { /* in place, peers would read what we write */
        ncl_fp_registered(&fp, &rs, NULL);
        ncl_call_path(c, "direct");
        NCL_CHECK(ncl_step_sync(c, &fp));
        for (size_t i = 0; i < n; i++) {
            size_t j = ((size_t)c->rank + i) % n;
            memcpy(recv + j * count * es, ncl_reg_peer(&rs, (int)j) + (size_t)c->rank * count * es, count * es);
        }
        return ncl_step_sync(c, &fp);
    }
    bool overlap = !(recv + bytes <= send || send + bytes <= recv);
    if (ncl_use_cma(c, count * es) && !overlap) {
        NCL_CHECK(ncl_cma_exchange(c, send, &fp));
        for (size_t i = 0; i < n; i++) {
            size_t j = ((size_t)c->rank + i) % n, at = (size_t)c->rank * count * es;
            if (j == (size_t)c->rank)
                memcpy(recv + j * count * es, send + at, count * es);
            else
                NCL_CHECK(ncl_cma_read(c, (int)j, recv + j * count * es, ncl_cma_peer_addr(c, (int)j) + at,
                                       count * es));
        }
        return ncl_step_sync(c, &fp);
    }
    size_t nsteps = count ? ncl_div_up(count, k) : 1;
    for (size_t i = 0; i < nsteps; i++) {
        size_t off = i * k, m = ncl_min(k, count - off);
        ncl_pack_blocks(ncl_step_begin(c), send, n, count, off, m, es);
        NCL_CHECK(ncl_step_sync(c, &fp));
        for (size_t j = 0; j < n; j++)
            memcpy(recv + (j * count + off) * es, ncl_step_peer_slot(c, (int)j) + (size_t)c->rank * m * es, m * es);
    }
    return NCL_OK;
}

static int scatter_call(ncl_comm* c, const void* send_, void* recv_, size_t count, int dtype, int root) {
    NCL_CHECK(ncl_check_args(c, c->rank == root ? send_ : recv_, recv_, count, dtype, -1, root));
    if (root < 0) return ncl_error(NCL_ERR_ARGUMENT, "root %d is negative", root);
    if (count == 0) return NCL_OK; /* nothing to move: a no-op, as in MPI and NCCL */
    const uint8_t* send = send_;
    uint8_t* recv = recv_;
    size_t es = (size_t)ncl_dtype_size(dtype), n = (size_t)c->nranks, k = c->slot_bytes / es / n;
    ncl_fingerprint fp = {.coll = NCL_COLL_SCATTER, .dtype = (uint8_t)dtype, .root = root, .count = count};
    if (ncl_use_cma(c, count * es)) {
        NCL_CHECK(ncl_cma_exchange(c, send, &fp));
        size_t at = (size_t)c->rank * count * es;
        if (c->rank == root) {
            if (recv != send + at) memcpy(recv, send + at, count * es);
        } else {
            NCL_CHECK(ncl_cma_read(c, root, recv, ncl_cma_peer_addr(c, root) + at, count * es));
        }
        return ncl_step_sync(c, &fp);
    }
    size_t nsteps = count ? ncl_div_up(count, k) : 1;
    for (size_t i = 0; i < nsteps; i++) {
        size_t off = i * k, m = ncl_min(k, count - off);
        if (c->rank == root) ncl_pack_blocks(ncl_step_begin(c), send, n, count, off, m, es);
        NCL_CHECK(ncl_step_sync(c, &fp));
        memcpy(recv + off * es, ncl_step_peer_slot(c, root) + (size_t)c->rank * m * es, m * es);
    }
    return NCL_OK;
}

/* Check every rank's sends against the receivers' expectations; return the largest block. */
static int check_count_matrix(ncl_comm* c, uint64_t* max_count) {
    int n = c->nranks;
    *max_count = 0;
    for (int src = 0; src < n; src++) {
        const uint64_t* sends = (const uint64_t*)ncl_step_peer_slot(c, src);
        for (int dst = 0; dst < n; dst++) {
            uint64_t expected = ((const uint64_t*)ncl_step_peer_slot(c, dst))[n + src];
            if (sends[dst] != expected)
                return ncl_error(NCL_ERR_MISMATCH,
                                 "all_to_allv counts disagree: rank %d sends %llu elements to rank %d, "
                                 "which expects %llu from it",
                                 src, (unsigned long long)sends[dst], dst, (unsigned long long)expected);
            if (sends[dst] > *max_count) *max_count = sends[dst];
        }
    }
    return NCL_OK;
}

static int all_to_allv_impl(ncl_comm* c, const uint8_t* send, const uint64_t* send_counts, uint8_t* recv,
                            const uint64_t* recv_counts, int dtype) {
    size_t es = (size_t)ncl_dtype_size(dtype), n = (size_t)c->nranks, k = c->slot_bytes / es / n;
    ncl_fingerprint fp = {.coll = NCL_COLL_ALL_TO_ALLV, .dtype = (uint8_t)dtype, .root = -1};
    uint64_t* counts = (uint64_t*)ncl_step_begin(c); /* [send counts | recv counts] */
    memcpy(counts, send_counts, n * sizeof *counts);
    memcpy(counts + n, recv_counts, n * sizeof *counts);
    NCL_CHECK(ncl_step_sync(c, &fp));
    uint64_t max_count;
    NCL_CHECK(check_count_matrix(c, &max_count));
    for (size_t lo = 0; lo < max_count; lo += k) {
        uint8_t* slot = ncl_step_begin(c);
        size_t displ = 0;
        for (size_t j = 0; j < n; j++) {
            size_t m = send_counts[j] > lo ? ncl_min(k, send_counts[j] - lo) : 0;
            ncl_copy_shared(slot + j * k * es, send + (displ + lo) * es, m * es);
            displ += send_counts[j];
        }
        NCL_CHECK(ncl_step_sync(c, &fp));
        displ = 0;
        for (size_t j = 0; j < n; j++) {
            size_t m = recv_counts[j] > lo ? ncl_min(k, recv_counts[j] - lo) : 0;
            memcpy(recv + (displ + lo) * es, ncl_step_peer_slot(c, (int)j) + (size_t)c->rank * k * es, m * es);
            displ += recv_counts[j];
        }
    }
    return NCL_OK;
}

/* The public entry points: each call recorded in the flight recorder (flight.c). */
int ncl_all_to_all(ncl_comm* c, const void* send, void* recv, size_t count, int dtype) {
    NCL_CHECK(ncl_comm_usable(c));
    ncl_call_begin(c, NCL_COLL_ALL_TO_ALL, dtype, count, -1, -1);
    return ncl_call_end(c, all_to_all_call(c, send, recv, count, dtype));
}

int ncl_scatter(ncl_comm* c, const void* send, void* recv, size_t count, int dtype, int root) {
    NCL_CHECK(ncl_comm_usable(c));
    ncl_call_begin(c, NCL_COLL_SCATTER, dtype, count, -1, root);
    return ncl_call_end(c, scatter_call(c, send, recv, count, dtype, root));
}

int ncl_all_to_allv(ncl_comm* c, const void* send, const uint64_t* send_counts, void* recv,
                    const uint64_t* recv_counts, int dtype) {
    NCL_CHECK(ncl_check_args(c, send, recv, 0, dtype, -1, -1));
    if (!send_counts || !recv_counts) return ncl_error(NCL_ERR_ARGUMENT, "all_to_allv needs both count arrays");
    uint64_t sent = 0, received = 0;
    for (int j = 0; j < c->nranks; j++) sent += send_counts[j], received += recv_counts[j];
    if ((sent && !send) || (received && !recv)) return ncl_error(NCL_ERR_ARGUMENT, "NULL buffer with nonzero counts");
    ncl_call_begin(c, NCL_COLL_ALL_TO_ALLV, dtype, sent, -1, -1);
    return ncl_call_end(c, all_to_allv_impl(c, send, send_counts, recv, recv_counts, dtype));
}
