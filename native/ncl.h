/* ncl.h: the C core's public interface, the only header the cffi binding reads.
 *
 * Contract (as in NCCL's nccl.h): every function returns an ncl_status; on failure
 * ncl_last_error() holds a message for the calling thread.  Nothing aborts or prints.
 * Buffers are plain pointers with element counts; send == recv means in place.
 * The text between the CDEF markers must stay plain C that cffi's cdef can parse. */
#ifndef NCL_H
#define NCL_H
#include <stddef.h>
#include <stdint.h>

/* BEGIN CDEF */
enum { NCL_MAX_RANKS = 1024 }; /* ranks in one group (ncl/job.py's MAX_RANKS, for the launcher, must agree) */

typedef enum {
    NCL_OK = 0,
    NCL_ERR_ARGUMENT = 1,  /* a bad argument that Python should have caught */
    NCL_ERR_SYSTEM = 2,    /* an OS call failed (shm_open, mmap, ...) */
    NCL_ERR_TIMEOUT = 3,   /* a peer did not arrive before the deadline */
    NCL_ERR_PEER = 4,      /* a peer died or aborted */
    NCL_ERR_MISMATCH = 5,  /* ranks called different collectives or arguments */
    NCL_ERR_STATE = 6,     /* the communicator is broken or closed */
    NCL_ERR_INTERRUPTED = 7 /* the interrupt hook stopped a wait (a signal handler raised) */
} ncl_status;

typedef enum {
    NCL_INT8 = 0, NCL_UINT8 = 1, NCL_INT32 = 2, NCL_INT64 = 3,
    NCL_FLOAT16 = 4, NCL_BFLOAT16 = 5, NCL_FLOAT32 = 6, NCL_FLOAT64 = 7,
    NCL_FLOAT8_E4M3FN = 8, NCL_FLOAT8_E5M2 = 9, /* OCP fp8: native/fp8.h states their rounding */
    NCL_NUM_DTYPES = 10
} ncl_dtype;

typedef enum {
    NCL_SUM = 0, NCL_PROD = 1, NCL_MIN = 2, NCL_MAX = 3, NCL_AVG = 4,
    NCL_NUM_OPS = 5
} ncl_op;

typedef enum {
    NCL_ALGO_AUTO = 0,      /* the core picks, by the thresholds in ncl_options */
    NCL_ALGO_ONE_SHOT = 1,  /* every rank reduces the whole message */
    NCL_ALGO_TWO_SHOT = 2,  /* reduce-scatter in rank order, then all-gather, through staging */
    NCL_ALGO_DIRECT = 3,    /* two-shot reading peers' registered buffers in place (no staging) */
    NCL_ALGO_CMA = 4,       /* two-shot reading peers' buffers with process_vm_readv (single copy) */
    NCL_NUM_ALGOS = 5
} ncl_algo;

typedef struct ncl_comm ncl_comm;
typedef struct ncl_window ncl_window;

/* Options fixed when a communicator is created; every rank must pass the same ones. */
typedef struct {
    size_t staging_bytes;   /* per rank, split into two slots (double buffering) */
    size_t p2p_bytes;       /* per ordered pair of ranks, split into two slots */
    double timeout_s;       /* deadline of every wait */
    int32_t spin_us;        /* busy-wait this long before yielding */
    int32_t yield_us;       /* then sched_yield this long before sleeping on a futex */
    size_t one_shot_max_bytes;  /* all_reduce AUTO: one-shot up to here, two-shot above */
    size_t direct_min_bytes;    /* registered buffers: read peers in place from here up */
    size_t cma_min_bytes;       /* unregistered buffers: single-copy reads (process_vm_readv) from here up; 0: never */
    size_t cma_all_reduce_min_bytes; /* all_reduce AUTO: the CMA two-shot from here up (if CMA works) */
    uint32_t flight_entries;    /* calls the flight recorder keeps (0: none) */
    int32_t verify_calls;       /* compare every call's fingerprint across ranks (0 only to measure its cost) */
    uint32_t host_ranks;        /* processes sharing this machine's CPUs, this group's or more (0: nranks) */
    int32_t streaming;          /* all_reduce's stores for data peers read: 0 learned (learn.c), 1 streaming, 2 ordinary */
} ncl_options;

/* What a communicator decided at setup (for logs and reports). */
typedef struct {
    uint64_t segment_bytes, slot_bytes, p2p_slot_bytes;
    int32_t cpus;            /* CPUs this rank may run on (sched_getaffinity) */
    int32_t oversubscribed;  /* more ranks than cpus: no spinning */
    int32_t central_sync;    /* steps meet at one shared word (rank 0's choice) */
    int32_t cma;             /* every rank can read every other's memory with process_vm_readv */
    uint64_t cache_bytes;    /* the largest CPU cache (sysfs) */
    uint64_t out_stream_min_bytes; /* outputs copied from staging stream from here up (SIZE_MAX: never) */
} ncl_comm_info;

/* One call in a communicator's flight recorder (the last N calls of this rank). */
typedef struct {
    uint64_t seq;            /* call number on this communicator and rank, from 1 */
    int32_t coll;            /* ncl_coll_name(coll) names it */
    int32_t dtype, op, root; /* -1 where unused; root is the peer of send/recv */
    uint64_t count;          /* elements, as the call counts them (all_to_allv: all it sends) */
    uint32_t first_step;     /* the communicator's step counter when the call began */
    uint32_t steps;          /* steps it completed: where a stuck call stopped */
    int32_t status;          /* -1 while running, else its ncl_status */
    int32_t stores;          /* all_reduce: 1 streaming stores, 2 ordinary ones (learn.c); 0 other calls */
    double t_begin, t_end;   /* CLOCK_MONOTONIC seconds (one clock for every process of a host); t_end 0: running */
    const char* algorithm;   /* the path taken: "one_shot", "two_shot", "direct", "cma", "staged", "p2p" */
} ncl_flight_entry;

const char* ncl_last_error(void);
/* Called by every wait of the process's main thread at least every 50 ms (signal handlers run
 * there); a non-zero return ends the wait with NCL_ERR_INTERRUPTED, its message quoting the
 * `reason` the hook wrote (cap bytes).  NULL: no hook. */
typedef int (*ncl_interrupt_hook)(char* reason, size_t cap);
void ncl_set_interrupt_hook(ncl_interrupt_hook hook);
int ncl_dtype_size(int dtype);
const char* ncl_kernel_isa(void);   /* which reduction kernels the CPU got: "avx512", "avx2", "generic" */

/* Reduce nsrc buffers element by element, strictly left to right (srcs[0] op srcs[1] op ...);
 * 16- and 8-bit floats accumulate in float32 and round once; AVG divides the sum by nsrc
 * (integers: the exact sum, truncated toward zero).  dst may alias any source. */
int ncl_reduce_local(void* dst, const void** srcs, int nsrc, size_t count, int dtype, int op);
/* y[t] = the SUM (as ncl_reduce_local) of rows[index[t*n + j]] over j = 0..n-1 in order,
 * skipping negative entries; zero when all are: a rank-ordered sum of the rows several
 * ranks returned for each token (MoE combine), each row read once, each output row written
 * once.  rows holds nrows rows of width elements. */
int ncl_sum_rows(void* y, const void* rows, size_t nrows, const int64_t* index, size_t tokens, int n, size_t width,
                 int dtype);

/* Block-scaled codes (OCP MX v1.0) of float32 values, count a whole number of NCL_MX_BLOCK blocks:
 * packed holds every block's codes (bits per value: 8, or 4 for MXFP4), then one E8M0 scale byte per
 * block.  native/quant.c states the rounding; ncl/compress.py sends these bytes. */
enum { NCL_MX_BLOCK = 32 };
typedef enum { NCL_MX_FP8 = 0, NCL_MX_INT8 = 1, NCL_MX_FP4 = 2, NCL_NUM_MX_FORMATS = 3 } ncl_mx_format;
int ncl_mx_quantize(void* packed, const float* values, size_t count, int format);
int ncl_mx_dequantize(float* values, const void* packed, size_t count, int format);
/* fp8 rows (DeepEP's convention: e4m3 codes, one float32 scale per NCL_FP8_ROW_BLOCK values of a
 * row); native/quant.c states the rounding and the layout of a row's ncl_fp8_row_bytes bytes. */
enum { NCL_FP8_ROW_BLOCK = 128 };
size_t ncl_fp8_row_bytes(size_t width);
int ncl_fp8_rows_quantize(void* packed, const float* rows, size_t nrows, size_t width);
int ncl_fp8_rows_dequantize(float* rows, const void* packed, size_t nrows, size_t width);

/* name: the group's rendezvous note in /dev/shm ("/ncl-..."), key: 64 hex characters, secret to
 * the job; both identical on every rank.  Rank 0 creates the segment (anonymous) and hands it to
 * the others (native/segment.c).  Returns once all nranks have attached; the note is gone then. */
int ncl_comm_create(const char* name, const char* key, int rank, int nranks, const ncl_options* opts,
                    ncl_comm** out);
int ncl_comm_destroy(ncl_comm* comm);
/* Mark this rank failed so that peers stop waiting; they quote `reason` (NULL: "it called abort()"). */
int ncl_comm_abort(ncl_comm* comm, const char* reason);
/* Abort, and make every later call of every rank on the group fail at once (NCL_ERR_PEER naming
 * this rank), even one whose peers' steps are already posted: ncclCommRevoke. */
int ncl_comm_revoke(ncl_comm* comm, const char* reason);
int ncl_comm_set_timeout(ncl_comm* comm, double timeout_s);
uint64_t ncl_comm_segment_bytes(const ncl_comm* comm);
int ncl_comm_get_info(const ncl_comm* comm, ncl_comm_info* out);
/* The newest min(cap, recorded) flight-recorder entries, oldest first; returns how many. */
int ncl_flight_entries(const ncl_comm* comm, ncl_flight_entry* out, int cap);
/* Ranks gone for good, nranks bytes: 1 its process died, 2 it closed its communicator, else 0. */
int ncl_comm_gone_ranks(ncl_comm* comm, uint8_t* out);
/* Each rank's last posted step (nranks values), read from the shared segment: who lags. */
int ncl_comm_peer_steps(const ncl_comm* comm, uint32_t* out);
const char* ncl_coll_name(int coll);
const char* ncl_dtype_name(int dtype);
const char* ncl_op_name(int op);
const char* ncl_algo_name(int algo);      /* "auto", "one_shot", "two_shot", "direct", "cma" (NCL_NUM_ALGOS) */
const char* ncl_status_name(int status);  /* "ok", "bad argument", ..., "unusable"; "?" for others */

/* Registered (symmetric) memory.  Collective: every rank asks for the same bytes and gets
 * its own slice of one segment all ranks map.  Collectives on buffers inside a window (at
 * the same offset on every rank) read peers' slices in place instead of staging copies.
 * ncl_window_free is local and may come after the communicator is destroyed. */
int ncl_window_create(ncl_comm* comm, const char* name, size_t bytes, ncl_window** out); /* name: for errors */
void* ncl_window_ptr(const ncl_window* win);
int ncl_window_free(ncl_window* win);

int ncl_barrier(ncl_comm* comm);
int ncl_all_reduce(ncl_comm* comm, const void* send, void* recv, size_t count, int dtype, int op, int algo);
/* ncl_all_reduce, first refusing (NCL_ERR_ARGUMENT, nothing moved) a recv that overlaps send
 * other than as send itself; the entry of Python's fast path (args.c) */
int ncl_all_reduce_checked(ncl_comm* comm, const void* send, void* recv, size_t count, int dtype, int op, int algo);
int ncl_reduce(ncl_comm* comm, const void* send, void* recv, size_t count, int dtype, int op, int root);
int ncl_broadcast(ncl_comm* comm, const void* send, void* recv, size_t count, int dtype, int root);
/* count is per rank: send holds count elements, recv holds nranks * count */
int ncl_all_gather(ncl_comm* comm, const void* send, void* recv, size_t count, int dtype);
int ncl_gather(ncl_comm* comm, const void* send, void* recv, size_t count, int dtype, int root);
/* count is per rank: send holds nranks * count elements, recv holds count */
int ncl_reduce_scatter(ncl_comm* comm, const void* send, void* recv, size_t count, int dtype, int op);
int ncl_scatter(ncl_comm* comm, const void* send, void* recv, size_t count, int dtype, int root);
int ncl_all_to_all(ncl_comm* comm, const void* send, void* recv, size_t count, int dtype);
/* counts in elements, one per peer; blocks are packed in peer order in both buffers */
int ncl_all_to_allv(ncl_comm* comm, const void* send, const uint64_t* send_counts,
                    void* recv, const uint64_t* recv_counts, int dtype);
/* all_to_allv when every rank already holds the whole matrix of rows [sender][receiver]
 * (nranks x nranks, row elements per row, the same everywhere; checked against this rank's
 * counts, and through a digest in the fingerprint against the peers'): small ones skip the
 * exchange of counts, one step fewer; from cma_min_bytes per block up, as ncl_all_to_allv. */
int ncl_all_to_allv_known(ncl_comm* comm, const void* send, const uint64_t* send_counts, void* recv,
                          const uint64_t* recv_counts, const int64_t* matrix, uint64_t row, int dtype);
int ncl_send(ncl_comm* comm, const void* buf, size_t count, int dtype, int peer);
int ncl_recv(ncl_comm* comm, void* buf, size_t count, int dtype, int peer);
/* A send or recv that progresses with others (p2p.c; a recv's peer may be -1: any source, the
 * sender's rank once it is bound): the caller fills is_send, peer, dtype, buf
 * and count and zeroes the rest; ncl_p2p_progress advances a batch of them for up to wait_s
 * seconds (returning early when all are done: state 2), in list order per peer and direction.
 * The buffers stay the caller's until their op is done. */
typedef struct {
    int32_t is_send, peer, dtype, state;
    void* buf;
    size_t count;
    uint64_t done;        /* chunks moved */
    uint32_t last_chunk;  /* the channel's number of the last chunk posted */
    double deadline;      /* set when the op first moves: now + the communicator's timeout */
} ncl_p2p_op;
int ncl_p2p_progress(ncl_comm* comm, ncl_p2p_op* ops, int n, double wait_s);
/* A recv from whichever rank sends first (MPI_ANY_SOURCE); *src: that rank. */
int ncl_recv_any(ncl_comm* comm, void* buf, size_t count, int dtype, int* src);

/* MoE dispatch and combine of small batches in one step each (moe.c states how).  Experts are in
 * contiguous blocks of num_experts / nranks; ncl_moe_dispatch routes, publishes counts and records,
 * fills send_counts, send_token and the matrix [sender][receiver], and sets moved.  Normal mode
 * (slots 0): when the rows moved, ncl_moe_take (next, with no call between) copies this rank's
 * into recv_x, recv_idx and recv_w, packed by source rank; when they did not, only the counts
 * moved (the same on every rank).  Low-latency mode (slots > 0): the caller passes the outputs
 * (nranks * slots rows) with the call, which fills them: source s's rows at row s * slots, the
 * rest zero (ids -1), in as many steps as the largest block needs (moved 0 only when a record
 * is larger than a piece of staging: then only the counts moved). */
typedef struct {
    const void* x;            /* tokens rows of row_bytes */
    const void* topk_idx;     /* tokens x k expert ids (-1: none), idx_bytes (4 or 8) each */
    const void* weights;      /* tokens x k routing weights, weight_bytes each */
    uint64_t tokens, row_bytes;
    int32_t k, idx_bytes, weight_bytes, num_experts;
    uint64_t slots;           /* rows per source block of the outputs (low-latency mode); 0: packed */
    void* recv_x;             /* the outputs (take's, or the low-latency call's): rows of row_bytes, */
    int64_t* recv_idx;        /* k ids per row (-1 where this rank does not hold the expert), */
    void* recv_w;             /* k weights per row */
    uint64_t* send_counts;    /* out: nranks rows sent to each rank */
    int64_t* send_token;      /* out: the token of each row sent (tokens * min(k, nranks) room) */
    int64_t* matrix;          /* out: nranks x nranks rows [sender][receiver] */
    int32_t moved;            /* out: 1 the rows moved (take them); 0 only the counts */
    uint32_t step;            /* out: the step they moved in (take checks it is still the last) */
} ncl_moe_dispatch_args;
int ncl_moe_dispatch(ncl_comm* comm, ncl_moe_dispatch_args* args);
int ncl_moe_take(ncl_comm* comm, const ncl_moe_dispatch_args* args);
/* The rows of a dispatch back to their tokens' ranks, each token's summed in rank order (as
 * ncl_sum_rows) into y, in one step when each block fits one, else, given back (room for the
 * rows this rank dispatched), in as many steps as the largest block needs (moved = 1; else
 * nothing happened, the same on every rank: the caller passes back, or moves them the
 * ordinary way). */
typedef struct {
    const void* rows;         /* the received rows, processed: as recv_x was laid out */
    uint64_t width;           /* elements per row */
    int32_t dtype, moved;     /* moved: out */
    uint64_t slots;           /* as the dispatch's */
    const int64_t* matrix;    /* the dispatch's [sender][receiver] */
    const int64_t* send_token;  /* the dispatch's */
    uint64_t tokens;          /* this rank's tokens: y has tokens rows */
    void* y;
    void* back;               /* NULL, or room for the rows that come back, when a block does not fit one step */
} ncl_moe_combine_args;
int ncl_moe_combine(ncl_comm* comm, ncl_moe_combine_args* args);
/* The steps ncl_moe_combine would take with these args (matrix, width, dtype): 1, more (it then
 * needs back), or 0 (it would move nothing).  Reads the matrix only: no step, no call. */
int ncl_moe_combine_steps(ncl_comm* comm, const ncl_moe_combine_args* args);
/* END CDEF */

#endif
