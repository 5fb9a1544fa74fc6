/* all_reduce.c: all_reduce (one-shot, two-shot), reduce and reduce_scatter.
 *
 * All three reduce in rank order (rank 0 op rank 1 op ...), so every rank gets the same
 * bits whatever the algorithm or chunking.  Messages larger than a staging slot go in
 * slot-sized chunks, one or two steps each.
 *
 * one-shot, per chunk of m elements: copy in (m), 1 step, every rank reduces all n copies
 *   (reads n*m), from its own block round: lowest latency, best for small messages.
 * Wherever every rank reads the same slots, each starts at its own block (ncl_reader_turn).
 * two-shot, per chunk: copy in all blocks but its own (m - m/n), 1 step, rank r reduces block r
 *   of all copies (its own straight from send) into its other slot and its recv (reads m), 1 step,
 *   everyone copies the other n-1 reduced blocks out (m - m/n): the reduce-scatter + all-gather
 *   that keeps per-rank traffic flat as n grows (the copies out stream when the ranks oversubscribe
 *   the CPUs and the outputs outgrow the cache: copy.c, ncl_output_stream_min_bytes).
 * cma (unregistered buffers, process_vm_readv works, see cma.c): two-shot with one copy:
 *   rank r reads block r of every peer's send piece by piece into scratch memory and
 *   reduces it with its own into its recv (streaming stores), 1 step, reads every other
 *   block from its owner's recv, 1 step so that nobody reuses a buffer a peer still reads.
 * direct (send and recv registered, see window.c): two-shot with no staging, per chunk of half
 *   a slot: rank r reduces block r of every rank's send straight into its own recv,
 *   1 step, copies the other blocks from their owners' recv; 1 step at the end so that nobody
 *   reuses a buffer a peer still reads. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Block b of an m-element chunk split n ways; blocks are multiples of 64 bytes. */
static void block_range(size_t m, int n, int b, size_t es, size_t* lo, size_t* hi) {
    size_t per_line = NCL_CACHE_LINE / es;
    size_t blk = ncl_div_up(ncl_div_up(m, (size_t)n), per_line) * per_line;
    *lo = ncl_min((size_t)b * blk, m);
    *hi = ncl_min(*lo + blk, m);
}

/* Reduce every rank's slot (from offset_bytes) into dst, this rank's own part read from `own`
 * instead when given; `stream` when a peer reads dst next and streaming stores pay (learn.c). */
static int reduce_peers(ncl_comm* c, void* dst, const void* own, size_t offset_bytes, size_t m, int dtype, int op,
                        bool stream) {
    const void* srcs[NCL_MAX_RANKS];
    for (int r = 0; r < c->nranks; r++) srcs[r] = ncl_step_peer_slot(c, r) + offset_bytes;
    if (own) srcs[c->rank] = own;
    return ncl_reduce_stores(dst, srcs, c->nranks, m, dtype, op, stream);
}

/* Two-shot's reduction of this rank's block: into its slot, for the peers, and unless only a
 * root collects, into recv too, for itself, piece by piece while a piece is still in cache: the
 * gather then copies only the other blocks (np=2, the same processes alternating: 512 KiB
 * 47 -> 41 us, 1 MiB 68 -> 60, 2 and 4 MiB within 4% either way, 2026-12). */
#define DUAL_PIECE_BYTES ((size_t)32 << 10) /* copy.c's floor for streaming stores */
static int reduce_my_block(ncl_comm* c, uint8_t* slot, uint8_t* recv, const uint8_t* own, size_t offset_bytes,
                           size_t m, int dtype, int op, bool stream) {
    if (!recv) return reduce_peers(c, slot, own, offset_bytes, m, dtype, op, stream);
    size_t es = (size_t)ncl_dtype_size(dtype), per = DUAL_PIECE_BYTES / es;
    for (size_t at = 0; at < m; at += per) {
        size_t k = ncl_min(per, m - at);
        NCL_CHECK(reduce_peers(c, recv + at * es, own + at * es, offset_bytes + at * es, k, dtype, op, false));
        ncl_copy_stores(slot + at * es, recv + at * es, k * es, stream);
    }
    return NCL_OK;
}

/* Reduce all n slots of an m-element chunk into dst, from this rank's own block round to it:
 * every rank reads every slot, and ranks that read the same lines at once contend for them
 * (one-shot 1 MiB at np=2: 131 -> 76 us, 2026-12).  Each element is still reduced in rank
 * order, so the bits are the same. */
static int reduce_all_from_own_block(ncl_comm* c, uint8_t* dst, size_t m, int dtype, int op) {
    size_t es = (size_t)ncl_dtype_size(dtype), lo, hi;
    block_range(m, c->nranks, c->rank, es, &lo, &hi);
    NCL_CHECK(reduce_peers(c, dst + lo * es, NULL, lo * es, m - lo, dtype, op, false));
    return lo ? reduce_peers(c, dst, NULL, 0, lo, dtype, op, false) : NCL_OK;
}

typedef struct {
    size_t m;
    int dtype, op;
    bool stream;
} last_reduce;

/* Central sync: the last rank to arrive reduces every slot into its own, once for all. */
static void reduce_into_own_slot(ncl_comm* c, uint32_t step, void* arg) {
    const last_reduce* a = arg;
    const void* srcs[NCL_MAX_RANKS];
    for (int r = 0; r < c->nranks; r++) srcs[r] = ncl_step_slot(c, r, step);
    ncl_reduce_stores(ncl_step_slot(c, c->rank, step), srcs, c->nranks, a->m, a->dtype, a->op, a->stream);
}

static int one_shot(ncl_comm* c, const uint8_t* send, uint8_t* recv, size_t count, int dtype, int op, bool stream,
                    const ncl_fingerprint* fp) {
    size_t es = (size_t)ncl_dtype_size(dtype), chunk = c->slot_bytes / es;
    size_t nsteps = count ? ncl_div_up(count, chunk) : 1;
    for (size_t i = 0; i < nsteps; i++) {
        size_t off = i * chunk, m = ncl_min(chunk, count - off);
        ncl_copy_stores(ncl_step_begin(c, m * es), send + off * es, m * es, stream);
        if (c->central_sync) { /* oversubscribed: one rank reduces, the rest copy its result */
            last_reduce a = {m, dtype, op, stream};
            ncl_on_last last = {reduce_into_own_slot, &a};
            NCL_CHECK(ncl_step_sync_last(c, fp, &last));
            ncl_copy_from_own_share(c, recv + off * es, ncl_step_peer_slot(c, ncl_step_last_rank(c)), m * es, false);
            continue;
        }
        NCL_CHECK(ncl_step_sync(c, fp));
        NCL_CHECK(reduce_all_from_own_block(c, recv + off * es, m, dtype, op));
    }
    return NCL_OK;
}

/* Two-shot; with root >= 0 only the root collects the reduced blocks (that is reduce). */
static int two_shot(ncl_comm* c, const uint8_t* send, uint8_t* recv, size_t count, int dtype, int op, int root,
                    bool stream, const ncl_fingerprint* fp) {
    size_t es = (size_t)ncl_dtype_size(dtype), chunk = c->slot_bytes / es;
    size_t nsteps = count ? ncl_div_up(count, chunk) : 1;
    bool out_streams = count * es >= c->out_stream_min_bytes;
    for (size_t i = 0; i < nsteps; i++) {
        size_t off = i * chunk, m = ncl_min(chunk, count - off), lo, hi;
        const uint8_t* piece = send + off * es;
        /* stage every block but mine (peers reduce those): mine is reduced straight from send */
        block_range(m, c->nranks, c->rank, es, &lo, &hi);
        uint8_t* slot = ncl_step_begin(c, m * es);
        ncl_copy_stores(slot, piece, lo * es, stream);
        ncl_copy_stores(slot + hi * es, piece + hi * es, (m - hi) * es, stream);
        NCL_CHECK(ncl_step_sync(c, fp));
        /* reduce my block into my next slot (and recv) */
        bool receives = root < 0 || root == c->rank;
        uint8_t* mine = ncl_step_begin(c, m * es); /* my block at its place in the chunk */
        NCL_CHECK(reduce_my_block(c, mine + lo * es, receives ? recv + (off + lo) * es : NULL, piece + lo * es,
                                  lo * es, hi - lo, dtype, op, stream));
        NCL_CHECK(ncl_step_sync(c, fp));
        if (!receives) continue;
        for (int i = 1; i < c->nranks; i++) { /* gather the other ranks' reduced blocks */
            int r = ncl_reader_turn(c, i);
            block_range(m, c->nranks, r, es, &lo, &hi);
            ncl_copy_stores(recv + (off + lo) * es, ncl_step_peer_slot(c, r) + lo * es, (hi - lo) * es, out_streams);
        }
    }
    return NCL_OK;
}

/* Direct goes through the message half a staging slot at a time (1 MiB by default), one step
 * each: a peer copies each rank's reduced block of a chunk right after the step, while it is still
 * in that rank's cache, instead of the whole block after the whole reduction, from memory once it
 * outgrows the cache (float32, same processes alternating, slow minutes: np=2 16 MiB 3.0-3.5 ->
 * 2.3-2.8 ms, 32 MiB 5.5-7.2 -> 4.3-5.9, 64 MiB 11.3-13.4 -> 8.9-12.7; np=8 16 MiB 12.7 -> 11.6,
 * 64 MiB 63.6 -> 57.9; 1 and 2 MiB alike; chunks of 512 KiB and 2 MiB no better, 2026-12-06).
 * Tied to the slot so that NCL_BUFFSIZE sets the granularity of every path (and small slots
 * test many chunks). */
static size_t direct_chunk_bytes(const ncl_comm* c) { return ncl_max(c->slot_bytes / 2, (size_t)NCL_CACHE_LINE); }

static int direct(ncl_comm* c, const ncl_reg* send, const ncl_reg* recv, size_t count, int dtype, int op,
                  bool stream, const ncl_fingerprint* fp) {
    size_t es = (size_t)ncl_dtype_size(dtype), chunk = direct_chunk_bytes(c) / es, lo, hi;
    const void* srcs[NCL_MAX_RANKS];
    uint8_t* mine = ncl_reg_peer(recv, c->rank);
    NCL_CHECK(ncl_step_sync(c, fp));
    for (size_t off = 0; off < count; off += chunk) {
        size_t m = ncl_min(chunk, count - off);
        block_range(m, c->nranks, c->rank, es, &lo, &hi);
        for (int r = 0; r < c->nranks; r++) srcs[r] = ncl_reg_peer(send, r) + (off + lo) * es;
        NCL_CHECK(ncl_reduce_stores(mine + (off + lo) * es, srcs, c->nranks, hi - lo, dtype, op, stream));
        NCL_CHECK(ncl_step_sync(c, fp));
        for (int i = 1; i < c->nranks; i++) { /* the other blocks of this chunk, from their owners' recv */
            int r = ncl_reader_turn(c, i);
            block_range(m, c->nranks, r, es, &lo, &hi);
            memcpy(mine + (off + lo) * es, ncl_reg_peer(recv, r) + (off + lo) * es, (hi - lo) * es);
        }
    }
    return ncl_step_sync(c, fp); /* nobody reuses a buffer a peer still reads */
}

#define CMA_SCRATCH_BYTES ((size_t)256 << 10) /* all peers' pieces together: stays in L2 */

static int cma_two_shot(ncl_comm* c, const uint8_t* send, uint8_t* recv, size_t count, int dtype, int op,
                        bool stream, ncl_fingerprint* fp) {
    size_t es = (size_t)ncl_dtype_size(dtype), n = (size_t)c->nranks, lo, hi;
    if (!c->cma_scratch && !(c->cma_scratch = aligned_alloc(NCL_PAGE, CMA_SCRATCH_BYTES)))
        return ncl_error(NCL_ERR_SYSTEM, "out of memory for the all_reduce scratch buffer");
    fp->extra |= NCL_EXTRA_CMA;
    uint64_t* mine = (uint64_t*)ncl_step_begin(c, 2 * sizeof(uint64_t));
    mine[0] = (uint64_t)(uintptr_t)send, mine[1] = (uint64_t)(uintptr_t)recv;
    NCL_CHECK(ncl_step_sync(c, fp));
    /* reduce-scatter: my block of everyone's send, in pieces that fit the scratch */
    block_range(count, c->nranks, c->rank, es, &lo, &hi);
    size_t piece = ncl_max(CMA_SCRATCH_BYTES / (n - 1) / NCL_CACHE_LINE * NCL_CACHE_LINE, NCL_CACHE_LINE) / es;
    const void* srcs[NCL_MAX_RANKS];
    for (size_t off = lo; off < hi; off += piece) {
        size_t m = ncl_min(piece, hi - off);
        uint8_t* slot = c->cma_scratch;
        for (int r = 0; r < c->nranks; r++) {
            if (r == c->rank) {
                srcs[r] = send + off * es;
                continue;
            }
            uint64_t theirs = ((const uint64_t*)ncl_step_peer_slot(c, r))[0];
            NCL_CHECK(ncl_cma_read(c, r, slot, theirs + off * es, m * es));
            srcs[r] = slot;
            slot += piece * es;
        }
        NCL_CHECK(ncl_reduce_stores(recv + off * es, srcs, c->nranks, m, dtype, op, stream));
    }
    uint64_t recvs[NCL_MAX_RANKS]; /* the next step reuses the slots: keep the addresses */
    for (int r = 0; r < c->nranks; r++) recvs[r] = ((const uint64_t*)ncl_step_peer_slot(c, r))[1];
    NCL_CHECK(ncl_step_sync(c, fp));
    /* all-gather: every other block from its owner's recv */
    for (int i = 1; i < c->nranks; i++) {
        int r = ncl_reader_turn(c, i);
        block_range(count, c->nranks, r, es, &lo, &hi);
        NCL_CHECK(ncl_cma_read(c, r, recv + lo * es, recvs[r] + lo * es, (hi - lo) * es));
    }
    return ncl_step_sync(c, fp);
}

static int all_reduce_call(ncl_comm* c, const void* send, void* recv, size_t count, int dtype, int op, int algo) {
    NCL_CHECK(ncl_check_args(c, send, recv, count, dtype, op, -1));
    if (count == 0) return NCL_OK; /* nothing to move: a no-op, as in MPI and NCCL */
    size_t bytes = count * (size_t)ncl_dtype_size(dtype);
    if (c->nranks == 1) { /* every op of one source is that source (AVG: x / 1): a copy, as NCCL does */
        ncl_call_path(c, "local");
        if (recv != send) memmove(recv, send, bytes);
        return NCL_OK;
    }
    ncl_reg rs = {NULL, 0}, rr = {NULL, 0};
    if (algo == NCL_ALGO_AUTO || algo == NCL_ALGO_DIRECT) {
        rs = ncl_registered(c, send, bytes);
        rr = ncl_registered(c, recv, bytes);
    }
    bool registered = rs.win && rr.win && c->nranks > 1;
    if (algo == NCL_ALGO_DIRECT && !registered)
        return ncl_error(NCL_ERR_ARGUMENT, "the direct all_reduce needs send and recv buffers from comm.empty() "
                                           "(registered memory) on more than one rank");
    if (algo == NCL_ALGO_CMA && !(c->cma && c->nranks > 1))
        return ncl_error(NCL_ERR_ARGUMENT, "the cma all_reduce needs more than one rank and process_vm_readv "
                                           "between them (the setup probe failed, or NCL_CMA=0)");
    bool forced = algo != NCL_ALGO_AUTO;
    if (!forced) /* the cost model's choice; learn.c may know a faster one on this host now */
        algo = registered && bytes >= c->direct_min_bytes                        ? NCL_ALGO_DIRECT
               : c->cma && c->nranks > 1 && bytes >= c->cma_all_reduce_min_bytes ? NCL_ALGO_CMA
               : bytes <= c->one_shot_max_bytes                                  ? NCL_ALGO_ONE_SHOT
                                                                                 : NCL_ALGO_TWO_SHOT;
    if (algo < NCL_ALGO_ONE_SHOT || algo > NCL_ALGO_CMA)
        return ncl_error(NCL_ERR_ARGUMENT, "unknown all_reduce algorithm %d", algo);
    ncl_learned how = ncl_learn_pick(c, algo, forced, registered, bytes);
    algo = how.algo;
    ncl_call_path(c, ncl_algo_name(algo));
    ncl_call_stores(c, how.stream);
    ncl_fingerprint fp = {.coll = NCL_COLL_ALL_REDUCE, .dtype = (uint8_t)dtype, .op = (uint8_t)op, .root = -1,
                          .count = count, .extra = (uint64_t)algo};
    if (algo == NCL_ALGO_DIRECT) ncl_fp_registered(&fp, &rs, &rr);
    int rc = algo == NCL_ALGO_DIRECT     ? direct(c, &rs, &rr, count, dtype, op, how.stream, &fp)
             : algo == NCL_ALGO_ONE_SHOT ? one_shot(c, send, recv, count, dtype, op, how.stream, &fp)
             : algo == NCL_ALGO_CMA      ? cma_two_shot(c, send, recv, count, dtype, op, how.stream, &fp)
                                         : two_shot(c, send, recv, count, dtype, op, -1, how.stream, &fp);
    ncl_learn_from(c, &how, rc);
    return rc;
}

static int reduce_call(ncl_comm* c, const void* send, void* recv, size_t count, int dtype, int op, int root) {
    NCL_CHECK(ncl_check_args(c, send, c->rank == root ? recv : send, count, dtype, op, root));
    if (count == 0) return NCL_OK; /* nothing to move: a no-op, as in MPI and NCCL */
    ncl_fingerprint fp = {.coll = NCL_COLL_REDUCE, .dtype = (uint8_t)dtype, .op = (uint8_t)op, .root = root,
                          .count = count};
    ncl_call_path(c, "two_shot");
    return two_shot(c, send, recv, count, dtype, op, root, true, &fp);
}

/* Per step, rank r publishes a piece of k elements of each of its n blocks; every rank
 * then reduces its own block's piece from all n slots in rank order. */
static int reduce_scatter_call(ncl_comm* c, const void* send_, void* recv_, size_t count, int dtype, int op) {
    NCL_CHECK(ncl_check_args(c, send_, recv_, count, dtype, op, -1));
    if (count == 0) return NCL_OK; /* nothing to move: a no-op, as in MPI and NCCL */
    const uint8_t* send = send_;
    uint8_t* recv = recv_;
    size_t es = (size_t)ncl_dtype_size(dtype), n = (size_t)c->nranks, k = c->slot_bytes / es / n;
    ncl_fingerprint fp = {.coll = NCL_COLL_REDUCE_SCATTER, .dtype = (uint8_t)dtype, .op = (uint8_t)op,
                          .root = -1, .count = count};
    ncl_reg rs = ncl_direct_source(c, send, n * count * es);
    if (rs.win) { /* registered: reduce my block of every rank's send in place, no staging */
        ncl_call_path(c, "direct");
        const void* srcs[NCL_MAX_RANKS];
        for (int r = 0; r < c->nranks; r++) srcs[r] = ncl_reg_peer(&rs, r) + (size_t)c->rank * count * es;
        ncl_fp_registered(&fp, &rs, NULL);
        NCL_CHECK(ncl_step_sync(c, &fp));
        NCL_CHECK(ncl_reduce_local(recv, srcs, c->nranks, count, dtype, op));
        return ncl_step_sync(c, &fp);
    }
    size_t nsteps = count ? ncl_div_up(count, k) : 1;
    for (size_t i = 0; i < nsteps; i++) {
        size_t off = i * k, m = ncl_min(k, count - off);
        ncl_pack_blocks(ncl_step_begin(c, n * m * es), send, n, count, off, m, es);
        NCL_CHECK(ncl_step_sync(c, &fp));
        NCL_CHECK(reduce_peers(c, recv + off * es, NULL, (size_t)c->rank * m * es, m, dtype, op, false));
    }
    return NCL_OK;
}

/* The public entry points: each call recorded in the flight recorder (flight.c). */
int ncl_all_reduce(ncl_comm* c, const void* send, void* recv, size_t count, int dtype, int op, int algo) {
    NCL_CHECK(ncl_comm_usable(c));
    ncl_call_begin(c, NCL_COLL_ALL_REDUCE, dtype, count, op, -1);
    return ncl_call_end(c, all_reduce_call(c, send, recv, count, dtype, op, algo));
}

int ncl_reduce(ncl_comm* c, const void* send, void* recv, size_t count, int dtype, int op, int root) {
    NCL_CHECK(ncl_comm_usable(c));
    ncl_call_begin(c, NCL_COLL_REDUCE, dtype, count, op, root);
    return ncl_call_end(c, reduce_call(c, send, recv, count, dtype, op, root));
}

int ncl_reduce_scatter(ncl_comm* c, const void* send, void* recv, size_t count, int dtype, int op) {
    NCL_CHECK(ncl_comm_usable(c));
    ncl_call_begin(c, NCL_COLL_REDUCE_SCATTER, dtype, count, op, -1);
    return ncl_call_end(c, reduce_scatter_call(c, send, recv, count, dtype, op));
}
