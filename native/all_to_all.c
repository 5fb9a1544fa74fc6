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
            size_t j = (size_t)ncl_reader_turn(c, (int)i);
            memcpy(recv + j * count * es, ncl_reg_peer(&rs, (int)j) + (size_t)c->rank * count * es, count * es);
        }
        return ncl_step_sync(c, &fp);
    }
    bool overlap = !(recv + bytes <= send || send + bytes <= recv);
    if (ncl_use_cma(c, count * es) && !overlap) {
        NCL_CHECK(ncl_cma_exchange(c, send, &fp));
        for (size_t i = 0; i < n; i++) {
            size_t j = (size_t)ncl_reader_turn(c, (int)i), at = (size_t)c->rank * count * es;
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
        ncl_pack_blocks(ncl_step_begin(c, n * m * es), send, n, count, off, m, es);
        NCL_CHECK(ncl_step_sync(c, &fp));
        for (int i = 0; i < c->nranks; i++) {
            size_t j = (size_t)ncl_reader_turn(c, i);
            memcpy(recv + (j * count + off) * es, ncl_step_peer_slot(c, (int)j) + (size_t)c->rank * m * es, m * es);
        }
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
        if (c->rank == root) ncl_pack_blocks(ncl_step_begin(c, n * m * es), send, n, count, off, m, es);
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

/* What each rank publishes in the count step besides its counts (after the 2n counts). */
enum { PUB_ADDR, PUB_WIN, PUB_WIN_OFF, PUB_OVERLAP, PUB_WORDS };

/* One copy per byte: each rank reads its blocks where the senders keep them, from a peer's
 * registered window when the sender's buffer is registered (a memcpy), else through CMA; a
 * last step keeps every sender's buffer unchanged until its readers are done. */
static int all_to_allv_single_copy(ncl_comm* c, const uint8_t* send, uint8_t* recv, const uint64_t* recv_counts,
                                   size_t es, const ncl_fingerprint* fp) {
    int n = c->nranks;
    for (int i = 0; i < n; i++) {
        int j = ncl_reader_turn(c, i);
        size_t before = 0, at = 0;
        const uint64_t* theirs = (const uint64_t*)ncl_step_peer_slot(c, j);
        for (int r = 0; r < c->rank; r++) at += theirs[r];
        for (int r = 0; r < j; r++) before += recv_counts[r];
        size_t bytes = recv_counts[j] * es;
        if (!bytes) continue;
        const uint64_t* pub = theirs + 2 * n;
        uint8_t* win = pub[PUB_WIN] ? ncl_window_peer(c, (uint32_t)pub[PUB_WIN], j) : NULL;
        uint8_t* dst = recv + before * es;
        if (j == c->rank)
            memcpy(dst, send + at * es, bytes);
        else if (win)
            memcpy(dst, win + pub[PUB_WIN_OFF] + at * es, bytes);
        else if (c->cma)
            NCL_CHECK(ncl_cma_read(c, j, dst, pub[PUB_ADDR] + at * es, bytes));
        else
            return ncl_error(NCL_ERR_ARGUMENT, "all_to_allv: rank %d's registered buffer (window %llu) is no longer "
                             "mapped on rank %d", j, (unsigned long long)pub[PUB_WIN], c->rank);
    }
    return ncl_step_sync(c, fp);
}

/* Blocks of up to k elements per peer and step, through the staging slots. */
static int all_to_allv_staged(ncl_comm* c, const uint8_t* send, const uint64_t* send_counts, uint8_t* recv,
                              const uint64_t* recv_counts, uint64_t max_count, size_t es,
                              const ncl_fingerprint* fp) {
    size_t n = (size_t)c->nranks, k = c->slot_bytes / es / n;
    for (size_t lo = 0; lo < max_count; lo += k) {
        uint8_t* slot = ncl_step_begin(c, n * k * es);
        size_t displ = 0;
        for (size_t j = 0; j < n; j++) {
            size_t m = send_counts[j] > lo ? ncl_min(k, send_counts[j] - lo) : 0;
            ncl_copy_shared(slot + j * k * es, send + (displ + lo) * es, m * es);
            displ += send_counts[j];
        }
        NCL_CHECK(ncl_step_sync(c, fp));
        displ = 0;
        for (size_t j = 0; j < n; j++) {
            size_t m = recv_counts[j] > lo ? ncl_min(k, recv_counts[j] - lo) : 0;
            memcpy(recv + (displ + lo) * es, ncl_step_peer_slot(c, (int)j) + (size_t)c->rank * k * es, m * es);
            displ += recv_counts[j];
        }
    }
    return NCL_OK;
}

static int all_to_allv_impl(ncl_comm* c, const uint8_t* send, const uint64_t* send_counts, uint8_t* recv,
                            const uint64_t* recv_counts, int dtype) {
    size_t es = (size_t)ncl_dtype_size(dtype), n = (size_t)c->nranks;
    ncl_fingerprint fp = {.coll = NCL_COLL_ALL_TO_ALLV, .dtype = (uint8_t)dtype, .root = -1};
    uint64_t sent = 0, received = 0;
    for (size_t j = 0; j < n; j++) sent += send_counts[j], received += recv_counts[j];
    /* [send counts | recv counts | PUB_WORDS] */
    uint64_t* counts = (uint64_t*)ncl_step_begin(c, c->slot_bytes);
    memcpy(counts, send_counts, n * sizeof *counts);
    memcpy(counts + n, recv_counts, n * sizeof *counts);
    /* A registered sender is read in place at any size: one copy, and no more steps than staging
     * (direct_min_bytes is all_reduce's threshold, where the direct path costs extra steps). */
    ncl_reg reg = n > 1 && sent ? ncl_registered(c, send, sent * es) : (ncl_reg){NULL, 0};
    uint64_t* pub = counts + 2 * n;
    pub[PUB_ADDR] = (uint64_t)(uintptr_t)send;
    pub[PUB_WIN] = ncl_reg_id(&reg);
    pub[PUB_WIN_OFF] = reg.off;
    pub[PUB_OVERLAP] = sent && received && !(recv + received * es <= send || send + sent * es <= recv);
    NCL_CHECK(ncl_step_sync(c, &fp));
    uint64_t max_count;
    NCL_CHECK(check_count_matrix(c, &max_count));
    /* Every rank decides the path from the same published words, so all take the same one. */
    bool every_registered = true, overlap = false;
    for (size_t j = 0; j < n; j++) {
        const uint64_t* theirs = (const uint64_t*)ncl_step_peer_slot(c, (int)j);
        uint64_t total = 0;
        for (size_t r = 0; r < n; r++) total += theirs[r];
        every_registered = every_registered && (total == 0 || theirs[2 * n + PUB_WIN] != 0);
        overlap = overlap || theirs[2 * n + PUB_OVERLAP];
    }
    if (max_count && !overlap && n > 1 && (every_registered || ncl_use_cma(c, max_count * es))) {
        ncl_call_path(c, every_registered ? "direct" : "cma");
        return all_to_allv_single_copy(c, send, recv, recv_counts, es, &fp);
    }
    return all_to_allv_staged(c, send, send_counts, recv, recv_counts, max_count, es, &fp);
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

static int check_all_to_allv_args(ncl_comm* c, const void* send, const uint64_t* send_counts, void* recv,
                                  const uint64_t* recv_counts, int dtype, uint64_t* sent) {
    NCL_CHECK(ncl_check_args(c, send, recv, 0, dtype, -1, -1));
    if (!send_counts || !recv_counts) return ncl_error(NCL_ERR_ARGUMENT, "all_to_allv needs both count arrays");
    uint64_t received = 0;
    *sent = 0;
    for (int j = 0; j < c->nranks; j++) *sent += send_counts[j], received += recv_counts[j];
    if ((*sent && !send) || (received && !recv)) return ncl_error(NCL_ERR_ARGUMENT, "NULL buffer with nonzero counts");
    return NCL_OK;
}

int ncl_all_to_allv(ncl_comm* c, const void* send, const uint64_t* send_counts, void* recv,
                    const uint64_t* recv_counts, int dtype) {
    uint64_t sent = 0;
    NCL_CHECK(check_all_to_allv_args(c, send, send_counts, recv, recv_counts, dtype, &sent));
    ncl_call_begin(c, NCL_COLL_ALL_TO_ALLV, dtype, sent, -1, -1);
    return ncl_call_end(c, all_to_allv_impl(c, send, send_counts, recv, recv_counts, dtype));
}

int ncl_all_to_allv_known(ncl_comm* c, const void* send, const uint64_t* send_counts, void* recv,
                          const uint64_t* recv_counts, const int64_t* matrix, uint64_t row, int dtype) {
    uint64_t sent = 0;
    NCL_CHECK(check_all_to_allv_args(c, send, send_counts, recv, recv_counts, dtype, &sent));
    if (!matrix) return ncl_error(NCL_ERR_ARGUMENT, "all_to_allv: NULL count matrix");
    int n = c->nranks;
    uint64_t max_count = 0, digest = 0xcbf29ce484222325ull; /* FNV-1a over the matrix */
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            int64_t m = matrix[(size_t)i * (size_t)n + (size_t)j];
            if (m < 0) return ncl_error(NCL_ERR_ARGUMENT, "all_counts[%d][%d] = %lld is negative", i, j, (long long)m);
            if (m * row > max_count) max_count = (uint64_t)m * row;
            for (int b = 0; b < 64; b += 8) digest = (digest ^ (((uint64_t)m >> b) & 0xff)) * 0x100000001b3ull;
        }
    for (int j = 0; j < n; j++) {
        uint64_t mine = (uint64_t)matrix[(size_t)c->rank * (size_t)n + (size_t)j] * row;
        uint64_t theirs = (uint64_t)matrix[(size_t)j * (size_t)n + (size_t)c->rank] * row;
        if (mine != send_counts[j] || theirs != recv_counts[j])
            return ncl_error(NCL_ERR_ARGUMENT, "all_counts disagree with this rank's counts for rank %d: it sends %llu "
                             "and receives %llu elements, the matrix says %llu and %llu", j,
                             (unsigned long long)send_counts[j], (unsigned long long)recv_counts[j],
                             (unsigned long long)mine, (unsigned long long)theirs);
    }
    ncl_call_begin(c, NCL_COLL_ALL_TO_ALLV, dtype, sent, -1, -1);
    size_t es = (size_t)ncl_dtype_size(dtype);
    /* Large: the single-copy paths, which need the published step and a last one.  With more
     * ranks than CPUs every step is a scheduling round of all of them, so what fits one staged
     * step goes staged: one step and two copies beat two steps and one copy there. */
    bool one_step = max_count <= c->slot_bytes / es / (size_t)n;
    if (n > 1 && ncl_use_cma(c, max_count * es) && !(c->oversubscribed && one_step))
        return ncl_call_end(c, all_to_allv_impl(c, send, send_counts, recv, recv_counts, dtype));
    /* the digest and the largest count in the fingerprint: ranks holding different matrices
     * get a mismatch error at the first step, not garbage */
    ncl_fingerprint fp = {.coll = NCL_COLL_ALL_TO_ALLV, .dtype = (uint8_t)dtype, .root = -1, .count = max_count,
                          .extra = digest};
    return ncl_call_end(c, all_to_allv_staged(c, send, send_counts, recv, recv_counts, max_count, es, &fp));
}
