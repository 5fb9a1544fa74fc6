/* p2p.c: send and recv over a channel per ordered pair of ranks, that progress together.
 *
 * A channel has two slots and two counters: `sent` (chunks the sender posted) and `acked`
 * (chunks the receiver consumed).  Chunk k travels in slot k % 2; the sender may fill it
 * once the receiver has consumed chunk k - 2 (acked >= k - 1).  A message of up to two slots
 * is eager (posted at once, complete when posted, as MPI's eager protocol).  A longer one,
 * when every rank can read every other's memory (cma.c), is a rendezvous: one chunk carries
 * the sender's address, the receiver reads the whole message with one copy and acks it, and
 * the send completes at the ack.  Without CMA a long message streams through the slots.
 *
 * Every transfer is an ncl_p2p_op advanced by `advance`, which never blocks: a blocking
 * ncl_send/ncl_recv is one op advanced and waited on; ncl_p2p_progress advances a batch of
 * them together (NCCL's group semantics), so sends and recvs between the same ranks complete
 * in any order and size.  Per peer and direction ops move in list order.  A recv from any
 * source (peer -1, as MPI_ANY_SOURCE) takes the first channel with a message waiting that no
 * earlier recv of the batch is owed, lowest rank first, and then is a recv from that peer.
 * Each chunk carries the message's fingerprint, so a receive of the wrong size or dtype fails
 * loudly. */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "internal.h"

enum { POSTING = 0, AWAIT_ACK = 1, DONE = 2 }; /* ncl_p2p_op.state */

static int check_peer(ncl_comm* c, const void* buf, size_t count, int dtype, int peer, bool any) {
    NCL_CHECK(ncl_check_args(c, buf, buf, count, dtype, -1, -1));
    if (any && peer == -1 && c->nranks > 1) return NCL_OK;
    if (peer < 0 || peer >= c->nranks || peer == c->rank)
        return ncl_error(NCL_ERR_ARGUMENT, "peer %d must be another rank of this %d-rank group", peer, c->nranks);
    return NCL_OK;
}

static ncl_pair_ctrl* channel(ncl_comm* c, const ncl_p2p_op* op) {
    int src = op->is_send ? c->rank : op->peer, dst = op->is_send ? op->peer : c->rank;
    return &c->pairs[(size_t)src * (size_t)c->nranks + (size_t)dst];
}

static size_t op_bytes(const ncl_p2p_op* op) { return op->count * (size_t)ncl_dtype_size(op->dtype); }

static bool rendezvous(ncl_comm* c, size_t bytes) { return bytes > 2 * c->p2p_slot_bytes && ncl_use_cma(c, bytes); }

static size_t chunks_of(ncl_comm* c, size_t bytes) {
    return rendezvous(c, bytes) || bytes == 0 ? 1 : ncl_div_up(bytes, c->p2p_slot_bytes);
}

static bool reached(_Atomic uint32_t* word, uint32_t target) {
    return (int32_t)(atomic_load_explicit(word, memory_order_acquire) - target) >= 0;
}

/* Post as many chunks of a send as the channel takes; true if anything moved. */
static bool advance_send(ncl_comm* c, ncl_p2p_op* op) {
    ncl_pair_ctrl* ch = channel(c, op);
    size_t bytes = op_bytes(op), chunk = c->p2p_slot_bytes, nchunks = chunks_of(c, bytes);
    bool moved = false;
    if (op->state == AWAIT_ACK) {
        if (!reached(&ch->acked, op->last_chunk + 1)) return false;
        op->state = DONE;
        return true;
    }
    ncl_fingerprint fp = {.coll = NCL_COLL_SEND, .dtype = (uint8_t)op->dtype, .root = c->rank, .count = op->count};
    while (op->done < nchunks) {
        uint32_t k = c->p2p_sent[op->peer];
        if (!reached(&ch->acked, k - 1)) return moved;
        uint8_t* slot = ncl_p2p_slot(c, c->rank, op->peer, k);
        if (nchunks == 1 && rendezvous(c, bytes)) {
            *(uint64_t*)slot = (uint64_t)(uintptr_t)op->buf;
            fp.extra = NCL_EXTRA_CMA;
        } else {
            size_t off = op->done * chunk;
            ncl_copy_shared(slot, (const uint8_t*)op->buf + off, ncl_min(chunk, bytes - off));
        }
        ch->fp[k & 1] = fp;
        ncl_post_word(&ch->sent, &ch->sent_waiters, k + 1);
        c->p2p_sent[op->peer] = k + 1;
        op->last_chunk = k;
        op->done++;
        moved = true;
    }
    op->state = fp.extra ? AWAIT_ACK : DONE; /* a rendezvous buffer is read until the ack */
    return moved;
}

/* Consume as many chunks of a recv as have arrived; true if anything moved. */
static int advance_recv(ncl_comm* c, ncl_p2p_op* op, bool* moved) {
    ncl_pair_ctrl* ch = channel(c, op);
    size_t bytes = op_bytes(op), chunk = c->p2p_slot_bytes;
    size_t nchunks = bytes ? ncl_div_up(bytes, chunk) : 1;
    while (op->state != DONE) {
        uint32_t k = c->p2p_recvd[op->peer];
        if (!reached(&ch->sent, k + 1)) return NCL_OK;
        const ncl_fingerprint* fp = &ch->fp[k & 1];
        if (fp->dtype != op->dtype || fp->count != op->count)
            return ncl_error(NCL_ERR_MISMATCH, "recv from rank %d expected %zu %s elements, but rank %d sent %llu %s",
                             op->peer, op->count, ncl_dtype_name(op->dtype), op->peer,
                             (unsigned long long)fp->count, ncl_dtype_name(fp->dtype));
        const uint8_t* slot = ncl_p2p_slot(c, op->peer, c->rank, k);
        if (fp->extra & NCL_EXTRA_CMA) {
            NCL_CHECK(ncl_cma_read(c, op->peer, op->buf, *(const uint64_t*)slot, bytes));
            nchunks = 1;
        } else {
            size_t off = op->done * chunk;
            memcpy((uint8_t*)op->buf + off, slot, ncl_min(chunk, bytes - off));
        }
        ncl_post_word(&ch->acked, &ch->acked_waiters, k + 1);
        c->p2p_recvd[op->peer] = k + 1;
        *moved = true;
        if (++op->done == nchunks) op->state = DONE;
    }
    return NCL_OK;
}

/* An earlier op of the batch that still posts to or reads from `peer` in op's direction (an
 * unbound recv from any source counts for every peer). */
static bool owed(const ncl_p2p_op* ops, int i, int peer) {
    for (int j = 0; j < i; j++)
        if (ops[j].is_send == ops[i].is_send && ops[j].state == POSTING && (ops[j].peer == peer || ops[j].peer < 0))
            return true;
    return false;
}

/* A recv from any source: bound to the lowest peer with a message waiting, if any. */
static void bind_any(ncl_comm* c, ncl_p2p_op* ops, int i) {
    for (int p = 0; p < c->nranks; p++) {
        if (p == c->rank || owed(ops, i, p)) continue;
        ncl_pair_ctrl* ch = &c->pairs[(size_t)p * (size_t)c->nranks + (size_t)c->rank];
        if (reached(&ch->sent, c->p2p_recvd[p] + 1)) {
            ops[i].peer = p;
            return;
        }
    }
}

/* Advance op unless an earlier op of the batch on the same channel still posts or reads. */
static int advance(ncl_comm* c, ncl_p2p_op* ops, int i, bool* moved) {
    ncl_p2p_op* op = &ops[i];
    if (op->state == DONE) return NCL_OK;
    if (op->peer < 0) {
        if (owed(ops, i, -1)) return NCL_OK;
        bind_any(c, ops, i);
        if (op->deadline == 0) op->deadline = ncl_now() + c->timeout_s;
        if (op->peer < 0) return NCL_OK;
    }
    if (owed(ops, i, op->peer)) return NCL_OK;
    if (op->deadline == 0) op->deadline = ncl_now() + c->timeout_s;
    if (op->is_send) {
        *moved |= advance_send(c, op);
        return NCL_OK;
    }
    return advance_recv(c, op, moved);
}

static int overdue(ncl_comm* c, const ncl_p2p_op* op, double now) {
    int rc = ncl_peer_alive(c, op->peer); /* (peer -1: every rank) */
    const char* dir = op->is_send ? "send to" : "recv from";
    if (op->peer < 0) {
        if (rc != NCL_OK) return rc;
        if (op->deadline && now > op->deadline)
            return ncl_error(NCL_ERR_TIMEOUT, "recv from any rank: nothing came within %.1f s", c->timeout_s);
        return NCL_OK;
    }
    if (rc != NCL_OK) {
        char msg[768];
        snprintf(msg, sizeof msg, "%s", ncl_last_error());
        return ncl_error(rc, "%s rank %d: %s", dir, op->peer, msg);
    }
    if (op->deadline && now > op->deadline)
        return ncl_error(NCL_ERR_TIMEOUT, "%s rank %d: timed out after %.1f s", dir, op->peer, c->timeout_s);
    return NCL_OK;
}

int ncl_p2p_progress(ncl_comm* c, ncl_p2p_op* ops, int n, double wait_s) {
    NCL_CHECK(ncl_comm_usable(c));
    for (int i = 0; i < n; i++)
        NCL_CHECK(check_peer(c, ops[i].buf, ops[i].count, ops[i].dtype, ops[i].peer, !ops[i].is_send));
    double start = ncl_now(), next_check = start + 0.05;
    for (unsigned idle = 0;;) {
        bool moved = false, pending = false;
        for (int i = 0; i < n; i++) {
            int rc = advance(c, ops, i, &moved);
            if (rc != NCL_OK) return ncl_fail(c, rc);
            pending |= ops[i].state != DONE;
        }
        if (!pending) return NCL_OK;
        idle = moved ? 0 : idle + 1;
        if (idle < 64) continue;
        double now = ncl_now();
        if (now > next_check) { /* liveness and deadlines, about every 50 ms */
            next_check = now + 0.05;
            for (int i = 0; i < n; i++)
                if (ops[i].state != DONE) {
                    int rc = overdue(c, &ops[i], now);
                    if (rc != NCL_OK) return ncl_fail(c, rc);
                }
        }
        if (now - start > wait_s) return NCL_OK; /* the caller may add ops and come back */
        if (now - start < c->yield_us * 1e-6) {
            sched_yield();
        } else { /* a peer still computing: leave the core to this process's other threads */
            struct timespec nap = {0, 50000};
            nanosleep(&nap, NULL);
        }
    }
}

/* One op, advanced and waited on (futex) until done: the blocking send and recv. */
static int run_one(ncl_comm* c, ncl_p2p_op* op) {
    ncl_pair_ctrl* ch = channel(c, op);
    char what[64];
    snprintf(what, sizeof what, "%s rank %d", op->is_send ? "send to" : "recv from", op->peer);
    for (;;) {
        bool moved = false;
        NCL_CHECK(advance(c, op, 0, &moved));
        if (op->state == DONE) return NCL_OK;
        int rc = op->is_send ? ncl_wait_word(c, op->peer, &ch->acked, &ch->acked_waiters,
                                             op->state == AWAIT_ACK ? op->last_chunk + 1 : c->p2p_sent[op->peer] - 1,
                                             op->deadline, what)
                             : ncl_wait_word(c, op->peer, &ch->sent, &ch->sent_waiters, c->p2p_recvd[op->peer] + 1,
                                             op->deadline, what);
        NCL_CHECK(rc);
    }
}

/* The public entry points: each call recorded in the flight recorder (flight.c). */
int ncl_send(ncl_comm* c, const void* buf, size_t count, int dtype, int peer) {
    NCL_CHECK(check_peer(c, buf, count, dtype, peer, false));
    ncl_call_begin(c, NCL_COLL_SEND, dtype, count, -1, peer);
    ncl_p2p_op op = {.is_send = 1, .peer = peer, .dtype = dtype, .buf = (void*)buf, .count = count};
    return ncl_call_end(c, run_one(c, &op));
}

int ncl_recv(ncl_comm* c, void* buf, size_t count, int dtype, int peer) {
    NCL_CHECK(check_peer(c, buf, count, dtype, peer, false));
    ncl_call_begin(c, NCL_COLL_RECV, dtype, count, -1, peer);
    ncl_p2p_op op = {.is_send = 0, .peer = peer, .dtype = dtype, .buf = buf, .count = count};
    return ncl_call_end(c, run_one(c, &op));
}

int ncl_recv_any(ncl_comm* c, void* buf, size_t count, int dtype, int* src) {
    NCL_CHECK(check_peer(c, buf, count, dtype, -1, true));
    ncl_call_begin(c, NCL_COLL_RECV, dtype, count, -1, -1);
    ncl_p2p_op op = {.is_send = 0, .peer = -1, .dtype = dtype, .buf = buf, .count = count};
    int rc;
    while ((rc = ncl_p2p_progress(c, &op, 1, 1.0)) == NCL_OK && op.state != DONE) {}
    *src = op.peer;
    return ncl_call_end(c, rc);
}
