/* p2p.c: send and recv over a channel per ordered pair of ranks.
 *
 * A channel has two slots and two counters: `sent` (chunks the sender posted) and `acked`
 * (chunks the receiver consumed).  Chunk k travels in slot k % 2; the sender may fill it
 * once the receiver has consumed chunk k - 2 (acked >= k - 1).  So a message of up to two
 * slots is buffered (send returns before the matching recv, as MPI's eager protocol), and
 * longer ones stream with the two ranks working on alternate slots.  Each chunk carries
 * the message's fingerprint, so a receive of the wrong size or dtype fails loudly. */
#include <stdio.h>
#include <string.h>

#include "internal.h"

static int check_peer(ncl_comm* c, const void* buf, size_t count, int dtype, int peer) {
    NCL_CHECK(ncl_check_args(c, buf, buf, count, dtype, -1, -1));
    if (peer < 0 || peer >= c->nranks || peer == c->rank)
        return ncl_error(NCL_ERR_ARGUMENT, "peer %d must be another rank of this %d-rank group", peer, c->nranks);
    return NCL_OK;
}

static int send_impl(ncl_comm* c, const uint8_t* buf, size_t count, int dtype, int peer) {
    ncl_pair_ctrl* ch = &c->pairs[(size_t)c->rank * (size_t)c->nranks + (size_t)peer];
    size_t bytes = count * (size_t)ncl_dtype_size(dtype), chunk = c->p2p_slot_bytes;
    size_t nchunks = bytes ? ncl_div_up(bytes, chunk) : 1;
    ncl_fingerprint fp = {.coll = NCL_COLL_SEND, .dtype = (uint8_t)dtype, .root = c->rank, .count = count};
    double deadline = ncl_now() + c->timeout_s;
    char what[64];
    snprintf(what, sizeof what, "send to rank %d", peer);
    for (size_t i = 0; i < nchunks; i++) {
        uint32_t k = c->p2p_sent[peer];
        int rc = ncl_wait_word(c, peer, &ch->acked, &ch->acked_waiters, k - 1, deadline, what);
        if (rc != NCL_OK) return rc;
        size_t off = i * chunk, m = ncl_min(chunk, bytes - off);
        ncl_copy_shared(ncl_p2p_slot(c, c->rank, peer, k), buf + off, m);
        ch->fp[k & 1] = fp;
        ncl_post_word(&ch->sent, &ch->sent_waiters, k + 1);
        c->p2p_sent[peer] = k + 1;
    }
    return NCL_OK;
}

static int recv_impl(ncl_comm* c, uint8_t* buf, size_t count, int dtype, int peer) {
    ncl_pair_ctrl* ch = &c->pairs[(size_t)peer * (size_t)c->nranks + (size_t)c->rank];
    size_t bytes = count * (size_t)ncl_dtype_size(dtype), chunk = c->p2p_slot_bytes;
    size_t nchunks = bytes ? ncl_div_up(bytes, chunk) : 1;
    double deadline = ncl_now() + c->timeout_s;
    char what[64];
    snprintf(what, sizeof what, "recv from rank %d", peer);
    for (size_t i = 0; i < nchunks; i++) {
        uint32_t k = c->p2p_recvd[peer];
        int rc = ncl_wait_word(c, peer, &ch->sent, &ch->sent_waiters, k + 1, deadline, what);
        if (rc != NCL_OK) return rc;
        const ncl_fingerprint* fp = &ch->fp[k & 1];
        if (fp->dtype != dtype || fp->count != count)
            return ncl_error(NCL_ERR_MISMATCH, "recv from rank %d expected %zu %s elements, but rank %d sent %llu %s",
                             peer, count, ncl_dtype_name(dtype), peer, (unsigned long long)fp->count,
                             ncl_dtype_name(fp->dtype));
        size_t off = i * chunk, m = ncl_min(chunk, bytes - off);
        memcpy(buf + off, ncl_p2p_slot(c, peer, c->rank, k), m);
        ncl_post_word(&ch->acked, &ch->acked_waiters, k + 1);
        c->p2p_recvd[peer] = k + 1;
    }
    return NCL_OK;
}

/* The public entry points: each call recorded in the flight recorder (flight.c). */
int ncl_send(ncl_comm* c, const void* buf, size_t count, int dtype, int peer) {
    NCL_CHECK(check_peer(c, buf, count, dtype, peer));
    ncl_call_begin(c, NCL_COLL_SEND, dtype, count, -1, peer);
    return ncl_call_end(c, send_impl(c, buf, count, dtype, peer));
}

int ncl_recv(ncl_comm* c, void* buf, size_t count, int dtype, int peer) {
    NCL_CHECK(check_peer(c, buf, count, dtype, peer));
    ncl_call_begin(c, NCL_COLL_RECV, dtype, count, -1, peer);
    return ncl_call_end(c, recv_impl(c, buf, count, dtype, peer));
}
