/* moe.c: MoE dispatch and combine of small batches, one step each (ncl/moe.py's fast path).
 *
 * Experts sit in contiguous blocks of `per` over the ranks; a token goes once to each rank
 * holding one of its top-k experts, rows grouped by destination, token order within each.
 * A staging slot starts with the sender's nranks counts (one cache line at 8 ranks: a reader
 * gets the whole matrix [sender][receiver] from nranks lines), then nranks pieces; piece j
 * carries records bound for rank j: [row | k ids (int64, -1 where rank j does not hold that
 * expert) | k weights].
 * Dispatch: one step publishes counts and records together, and every rank reads the matrix
 * (alike on every rank).  Normal mode (outputs sized from the matrix): when every block fit
 * its piece the records moved, and ncl_moe_take copies this rank's out of the senders' slots;
 * that is safe until this rank posts another step: a sender rewrites the slot of step s only
 * at s + 2 (step.c), so take checks that no step came between.  When a block did not fit,
 * only the counts moved, and every rank knows it alike: the caller moves the rows the
 * ordinary way with the matrix known.  Low-latency mode (slots > 0: the outputs' size is
 * known before, so the caller passes them): the same first step, then as many more as the
 * largest block needs (every rank counts them alike from the matrix), each taken into the
 * outputs as it lands: one call, only real rows moved, whatever the batch.
 * Combine: with the dispatch's matrix known, the rows go back in one step when each block
 * fits a piece (every rank decides alike, before the step), and each token's rows are summed
 * in rank order straight from the slots, with ncl_sum_rows's kernels (the same bits). */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* A slot: the sender's nranks counts, then nranks pieces of piece_bytes, cache-line aligned. */
static size_t counts_bytes(const ncl_comm* c) { return ((size_t)c->nranks * 8 + 63) & ~(size_t)63; }

static size_t piece_bytes(const ncl_comm* c) {
    return (c->slot_bytes - counts_bytes(c)) / (size_t)c->nranks & ~(size_t)63;
}

static uint8_t* piece_of(const ncl_comm* c, uint8_t* slot, size_t j) { return slot + counts_bytes(c) + j * piece_bytes(c); }

static size_t rows_per_piece(const ncl_comm* c, size_t record) { return piece_bytes(c) / record; }

/* The largest block of a [sender][receiver] matrix (a negative count reads as huge: the callers check). */
static uint64_t largest_block(const ncl_comm* c, const int64_t* matrix) {
    uint64_t largest = 0;
    for (size_t i = 0; i < (size_t)c->nranks * (size_t)c->nranks; i++) largest = ncl_max(largest, (uint64_t)matrix[i]);
    return largest;
}

static size_t ids_at(const ncl_moe_dispatch_args* a) { return ((size_t)a->row_bytes + 7) & ~(size_t)7; }
static size_t record_bytes(const ncl_moe_dispatch_args* a) {
    return (ids_at(a) + 8 * (size_t)a->k + (size_t)a->weight_bytes * (size_t)a->k + 7) & ~(size_t)7;
}

static int64_t expert(const ncl_moe_dispatch_args* a, size_t t, int j) {
    const uint8_t* p = (const uint8_t*)a->topk_idx + (t * (size_t)a->k + (size_t)j) * (size_t)a->idx_bytes;
    if (a->idx_bytes == 4) {
        int32_t v;
        memcpy(&v, p, 4);
        return v;
    }
    int64_t v;
    memcpy(&v, p, 8);
    return v;
}

static int check_dispatch(ncl_comm* c, const ncl_moe_dispatch_args* a) {
    NCL_CHECK(ncl_comm_usable(c));
    if (!a || !a->send_counts || !a->send_token || !a->matrix || (a->tokens && (!a->x || !a->topk_idx || !a->weights)))
        return ncl_error(NCL_ERR_ARGUMENT, "moe_dispatch: NULL argument");
    if (a->slots && (!a->recv_x || !a->recv_idx || !a->recv_w))
        return ncl_error(NCL_ERR_ARGUMENT, "moe_dispatch: the low-latency mode takes its outputs with the call");
    if (a->k < 1 || (a->idx_bytes != 4 && a->idx_bytes != 8) || a->weight_bytes < 1 || a->weight_bytes > 8 ||
        a->num_experts < 1 || a->num_experts % c->nranks)
        return ncl_error(NCL_ERR_ARGUMENT, "moe_dispatch: k %d, id bytes %d, weight bytes %d, %d experts on %d ranks",
                         a->k, a->idx_bytes, a->weight_bytes, a->num_experts, c->nranks);
    for (size_t t = 0; t < a->tokens; t++)
        for (int j = 0; j < a->k; j++) {
            int64_t e = expert(a, t, j);
            if (e < -1 || e >= a->num_experts)
                return ncl_error(NCL_ERR_ARGUMENT, "topk_idx holds expert ids outside 0..%d (or -1 for none)",
                                 a->num_experts - 1);
        }
    return NCL_OK;
}

/* send_counts and send_token: the rows this rank sends, grouped by rank, token order within. */
static void route(const ncl_comm* c, const ncl_moe_dispatch_args* a, int per) {
    size_t n = (size_t)c->nranks;
    uint64_t* counts = a->send_counts;
    memset(counts, 0, n * sizeof *counts);
    for (int pass = 0; pass < 2; pass++) {
        uint64_t at[NCL_MAX_RANKS];
        for (size_t r = 0, sum = 0; pass && r < n; r++) at[r] = sum, sum += counts[r];
        for (size_t t = 0; t < a->tokens; t++)
            for (int j = 0; j < a->k; j++) {
                int64_t e = expert(a, t, j), dest = e / per;
                bool seen = e < 0;
                for (int i = 0; i < j && !seen; i++) seen = expert(a, t, i) >= 0 && expert(a, t, i) / per == dest;
                if (seen) continue; /* -1, or a rank this token already goes to */
                if (pass)
                    a->send_token[at[dest]++] = (int64_t)t;
                else
                    counts[dest]++;
            }
    }
}

static void pack_record(uint8_t* rec, const ncl_moe_dispatch_args* a, size_t t, int dest, int per) {
    size_t k = (size_t)a->k, wb = (size_t)a->weight_bytes;
    memcpy(rec, (const uint8_t*)a->x + t * a->row_bytes, a->row_bytes);
    int64_t* ids = (int64_t*)(rec + ids_at(a));
    for (size_t j = 0; j < k; j++) {
        int64_t e = expert(a, t, (int)j);
        ids[j] = e >= 0 && e / per == dest ? e : -1;
    }
    memcpy(ids + k, (const uint8_t*)a->weights + t * k * wb, k * wb);
}

/* Records [from, from + fit) of each destination's block into the slot of the next step. */
static void pack_chunk(ncl_comm* c, uint8_t* slot, const ncl_moe_dispatch_args* a, int per, uint64_t from,
                       size_t fit, size_t record) {
    const int64_t* token = a->send_token;
    for (int j = 0; j < c->nranks; j++) {
        uint64_t count = a->send_counts[j];
        uint8_t* piece = piece_of(c, slot, (size_t)j);
        for (uint64_t i = from; i < count && i < from + fit; i++)
            pack_record(piece + (i - from) * record, a, (size_t)token[i], j, per);
        token += count;
    }
}

/* Sender s's records [from, from + fit) of this step for this rank, into the outputs from row
 * `row` on (the matrix says how many s sent in all). */
static size_t take_chunk(ncl_comm* c, const ncl_moe_dispatch_args* a, int s, uint64_t from, size_t fit, size_t row) {
    size_t record = record_bytes(a), k = (size_t)a->k, wb = (size_t)a->weight_bytes;
    uint64_t count = (uint64_t)a->matrix[(size_t)s * (size_t)c->nranks + (size_t)c->rank];
    const uint8_t* rec = piece_of(c, ncl_step_peer_slot(c, s), (size_t)c->rank);
    for (uint64_t i = from; i < count && i < from + fit; i++, row++, rec += record) {
        memcpy((uint8_t*)a->recv_x + row * a->row_bytes, rec, a->row_bytes);
        memcpy(a->recv_idx + row * k, rec + ids_at(a), 8 * k);
        memcpy((uint8_t*)a->recv_w + row * k * wb, rec + ids_at(a) + 8 * k, k * wb);
    }
    return row;
}

/* Low-latency outputs: block s holds rank s's rows at s * slots, the rest zero rows, no
 * expert (-1), zero weights. */
static int check_slots(ncl_comm* c, const ncl_moe_dispatch_args* a) {
    for (int s = 0; s < c->nranks; s++) {
        uint64_t count = (uint64_t)a->matrix[(size_t)s * (size_t)c->nranks + (size_t)c->rank];
        if (count > a->slots)
            return ncl_error(NCL_ERR_ARGUMENT, "moe_dispatch: rank %d sent %llu rows, more than %llu slots", s,
                             (unsigned long long)count, (unsigned long long)a->slots);
    }
    return NCL_OK;
}

/* The padding rows of recv_x are zeroed with streaming stores by copy.c's rule for a rank's own
 * output (oversubscribed, and the ranks' padding together a quarter of the largest cache): nobody
 * reads them back soon, and an ordinary store first reads each line from memory.  8 ranks on 2 CPUs,
 * 128 tokens (~58% of recv_x padding, 3.4 MB a rank), dispatch + combine wall, rounds alternating in
 * the same processes (2026-12-06): 6.6-7.0 ms against 7.0-7.6 with memset, 6.8-8.5 against 7.2-9.1
 * in a slower hour; 16 tokens (426 KB a rank, under the line) alike within the host's noise; 4 ranks,
 * 128 tokens (0.9 MB a rank, under it) 2.1-2.2 against 2.2-2.5 ms, a gain the rule leaves. */
static void pad_slots(ncl_comm* c, const ncl_moe_dispatch_args* a) {
    size_t k = (size_t)a->k, wb = (size_t)a->weight_bytes, padding = 0;
    for (int s = 0; s < c->nranks; s++)
        padding += a->slots - (size_t)a->matrix[(size_t)s * (size_t)c->nranks + (size_t)c->rank];
    bool stream = padding * a->row_bytes >= c->out_stream_min_bytes;
    for (int s = 0; s < c->nranks; s++) {
        size_t count = (size_t)a->matrix[(size_t)s * (size_t)c->nranks + (size_t)c->rank];
        size_t row = (size_t)s * a->slots + count, pad = a->slots - count;
        ncl_zero_stores((uint8_t*)a->recv_x + row * a->row_bytes, pad * a->row_bytes, stream);
        for (size_t i = 0; i < pad * k; i++) a->recv_idx[row * k + i] = -1;
        memset((uint8_t*)a->recv_w + row * k * wb, 0, pad * k * wb);
    }
}

/* The low-latency mode after the first step: take it, then the steps the largest block still needs. */
static int dispatch_steps(ncl_comm* c, ncl_moe_dispatch_args* a, int per, size_t fit, const ncl_fingerprint* fp) {
    NCL_CHECK(check_slots(c, a));
    int n = c->nranks;
    uint64_t largest = largest_block(c, a->matrix);
    for (uint64_t from = 0;;) {
        for (int s = 0; s < n; s++) take_chunk(c, a, s, from, fit, (size_t)s * a->slots + from);
        from += fit;
        if (from >= largest) break;
        pack_chunk(c, ncl_step_begin(c, c->slot_bytes), a, per, from, fit, record_bytes(a));
        NCL_CHECK(ncl_step_sync(c, fp));
    }
    pad_slots(c, a);
    return NCL_OK;
}

int ncl_moe_dispatch(ncl_comm* c, ncl_moe_dispatch_args* a) {
    NCL_CHECK(check_dispatch(c, a));
    int n = c->nranks, per = a->num_experts / n;
    size_t record = record_bytes(a), fit = rows_per_piece(c, record);
    bool steps = a->slots && fit; /* low-latency: as many steps as it takes (a record no piece holds: counts only) */
    route(c, a, per);
    uint64_t sent = 0;
    bool fits = true; /* normal mode: else no record moves this step, anyone's: pack none */
    for (int j = 0; j < n; j++) sent += a->send_counts[j], fits = fits && a->send_counts[j] <= fit;
    ncl_call_begin(c, NCL_COLL_MOE_DISPATCH, NCL_UINT8, sent * record, -1, -1);
    uint8_t* slot = ncl_step_begin(c, c->slot_bytes);
    memcpy(slot, a->send_counts, (size_t)n * sizeof *a->send_counts);
    if (fits || steps) pack_chunk(c, slot, a, per, 0, fit, record);
    /* the record's size, the experts and the slots: ranks that disagree get a mismatch error */
    ncl_fingerprint fp = {.coll = NCL_COLL_MOE_DISPATCH, .dtype = NCL_UINT8, .root = -1, .count = record,
                          .extra = (uint64_t)a->num_experts | a->slots << 40}; /* (bit 32 is NCL_EXTRA_CMA) */
    int rc = ncl_step_sync(c, &fp);
    if (rc) return ncl_call_end(c, rc);
    a->moved = 1;
    for (int i = 0; i < n; i++) {
        const uint64_t* counts = (const uint64_t*)ncl_step_peer_slot(c, i);
        for (int j = 0; j < n; j++) {
            a->matrix[(size_t)i * (size_t)n + (size_t)j] = (int64_t)counts[j];
            if (counts[j] > fit) a->moved = 0;
        }
    }
    if (steps) {
        ncl_call_path(c, a->moved ? "one_step" : "steps");
        a->moved = 1;
        return ncl_call_end(c, dispatch_steps(c, a, per, fit, &fp));
    }
    if (a->slots) a->moved = 0; /* a record no piece holds: the caller moves the rows (even none: it pads) */
    ncl_call_path(c, a->moved ? "one_step" : "counts");
    a->step = c->step;
    return ncl_call_end(c, NCL_OK);
}

int ncl_moe_take(ncl_comm* c, const ncl_moe_dispatch_args* a) {
    NCL_CHECK(ncl_comm_usable(c));
    if (!a->moved || a->step != c->step || a->slots)
        return ncl_error(NCL_ERR_STATE, "moe_take must follow the moe_dispatch whose rows moved, with no call between "
                                        "(and the low-latency mode's takes its rows itself)");
    size_t row = 0;
    for (int s = 0; s < c->nranks; s++) row = take_chunk(c, a, s, 0, SIZE_MAX, row);
    return NCL_OK;
}

/* My received block from rank s goes back to s: rows [from, from + fit) of it into the next step's slot.  The
 * block starts at s * slots, or after the blocks before it. */
static void pack_back(ncl_comm* c, uint8_t* slot, const ncl_moe_combine_args* a, size_t row, size_t from, size_t fit) {
    int n = c->nranks, me = c->rank;
    size_t at = 0;
    for (int s = 0; s < n; s++) {
        size_t count = (size_t)a->matrix[(size_t)s * (size_t)n + (size_t)me];
        if (a->slots) at = (size_t)s * a->slots;
        if (from < count)
            ncl_copy_shared(piece_of(c, slot, (size_t)s), (const uint8_t*)a->rows + (at + from) * row,
                            ncl_min(count - from, fit) * row);
        at += count;
    }
}

/* Each token's rows, in rank order, summed into y: rank r returned my block for it in send_token's order,
 * starting at blocks[r]. */
static int sum_tokens(ncl_comm* c, const ncl_moe_combine_args* a, size_t row, const uint8_t* const* blocks) {
    int n = c->nranks, me = c->rank;
    const void** srcs = calloc(a->tokens * (size_t)n + 1, sizeof *srcs);
    int* have = calloc(a->tokens + 1, sizeof *have);
    if (!srcs || !have) {
        free(srcs);
        free(have);
        return ncl_error(NCL_ERR_SYSTEM, "moe_combine: out of memory");
    }
    const int64_t* token = a->send_token;
    int rc = NCL_OK;
    for (int r = 0; r < n && rc == NCL_OK; r++) {
        size_t count = (size_t)a->matrix[(size_t)me * (size_t)n + (size_t)r];
        for (size_t i = 0; i < count; i++) {
            int64_t t = token[i];
            if (t < 0 || (uint64_t)t >= a->tokens) {
                rc = ncl_error(NCL_ERR_ARGUMENT, "moe_combine: token %lld of %llu", (long long)t,
                               (unsigned long long)a->tokens);
                break;
            }
            srcs[(size_t)t * (size_t)n + (size_t)have[t]++] = blocks[r] + i * row;
        }
        token += count;
    }
    for (size_t t = 0; t < a->tokens && rc == NCL_OK; t++) {
        uint8_t* y = (uint8_t*)a->y + t * row;
        if (have[t] == 0)
            memset(y, 0, row);
        else if (have[t] == 1)
            memcpy(y, srcs[t * (size_t)n], row);
        else
            rc = ncl_reduce_local(y, srcs + t * (size_t)n, have[t], a->width, a->dtype, NCL_SUM);
    }
    free(srcs);
    free(have);
    return rc;
}

/* One step (every block fits a piece): summed straight from the peers' slots.  More steps: each
 * rank's rows gathered into back (rank order), summed from there. */
static int combine_rows(ncl_comm* c, const ncl_moe_combine_args* a, size_t row, size_t fit, size_t steps) {
    int n = c->nranks, me = c->rank;
    ncl_fingerprint fp = {.coll = NCL_COLL_MOE_COMBINE, .dtype = (uint8_t)a->dtype, .root = -1, .count = a->width,
                          .extra = a->slots};
    const uint8_t* blocks[NCL_MAX_RANKS];
    for (size_t step = 0, from = 0; step < steps; step++, from += fit) {
        pack_back(c, ncl_step_begin(c, c->slot_bytes), a, row, from, fit);
        NCL_CHECK(ncl_step_sync(c, &fp));
        size_t at = 0;
        for (int r = 0; r < n; r++) {
            size_t count = (size_t)a->matrix[(size_t)me * (size_t)n + (size_t)r];
            const uint8_t* piece = piece_of(c, ncl_step_peer_slot(c, r), (size_t)me);
            if (steps == 1)
                blocks[r] = piece;
            else if (from < count)
                memcpy((uint8_t*)a->back + (at + from) * row, piece, ncl_min(count - from, fit) * row);
            at += count;
        }
    }
    if (steps > 1)
        for (size_t r = 0, at = 0; r < (size_t)n; at += (size_t)a->matrix[(size_t)me * (size_t)n + r], r++)
            blocks[r] = (const uint8_t*)a->back + at * row;
    return sum_tokens(c, a, row, blocks);
}

/* How the rows go back, decided alike on every rank from the matrix before any step: 1 in one
 * step, k > 1 in k steps (through back), 0 not at all (a row larger than a piece, or a bad count). */
static size_t combine_steps(const ncl_comm* c, const ncl_moe_combine_args* a, size_t row, size_t* fit) {
    for (size_t i = 0; i < (size_t)c->nranks * (size_t)c->nranks; i++)
        if (a->matrix[i] < 0) return 0;
    size_t largest = largest_block(c, a->matrix);
    *fit = piece_bytes(c) / ncl_max(row, 1);
    if (largest <= *fit) return 1;
    return *fit ? (largest + *fit - 1) / *fit : 0;
}

int ncl_moe_combine_steps(ncl_comm* c, const ncl_moe_combine_args* a) {
    size_t es = (size_t)ncl_dtype_size(a ? a->dtype : -1), fit;
    if (!c || !a || !es || !a->matrix) return 0;
    size_t steps = combine_steps(c, a, (size_t)a->width * es, &fit);
    return steps > (size_t)INT32_MAX ? INT32_MAX : (int)steps;
}

int ncl_moe_combine(ncl_comm* c, ncl_moe_combine_args* a) {
    NCL_CHECK(ncl_comm_usable(c));
    size_t es = (size_t)ncl_dtype_size(a ? a->dtype : -1);
    if (!a || !es || !a->matrix || (a->tokens && !a->y))
        return ncl_error(NCL_ERR_ARGUMENT, "moe_combine: NULL argument or unknown dtype");
    size_t n = (size_t)c->nranks, row = (size_t)a->width * es, fit, sent = 0, dispatched = 0;
    for (size_t i = 0; i < n * n; i++) {
        if (i % n == (size_t)c->rank) sent += (size_t)a->matrix[i];
        if (i / n == (size_t)c->rank) dispatched += (size_t)a->matrix[i];
    }
    if (dispatched && !a->send_token) return ncl_error(NCL_ERR_ARGUMENT, "moe_combine: NULL send_token");
    /* every rank decides alike: one step, more steps into back (when given), or nothing */
    size_t steps = combine_steps(c, a, row, &fit);
    a->moved = steps == 1 || (steps > 1 && a->back);
    if (!a->moved) return NCL_OK;
    ncl_call_begin(c, NCL_COLL_MOE_COMBINE, a->dtype, sent * a->width, -1, -1);
    ncl_call_path(c, steps == 1 ? "one_step" : "steps");
    return ncl_call_end(c, combine_rows(c, a, row, fit, steps));
}
