/* internal.h: what the C core's files share and nothing outside native/ sees.
 *
 * Segment layout (one POSIX shared-memory segment per communicator, 4 KiB aligned parts):
 *   header                       magic, sizes, attach count
 *   rank_ctrl[nranks]            each rank's step counter, pid, abort flag, fingerprints
 *   pair_ctrl[nranks*nranks]     send/recv counters of each ordered pair (src*nranks + dst)
 *   staging[nranks][2][slot]     each rank's two staging slots (collectives)
 *   p2p[nranks*nranks][2][pslot] each ordered pair's two send/recv slots
 * Everything a peer writes and another reads is on its own cache line. */
#ifndef NCL_INTERNAL_H
#define NCL_INTERNAL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "ncl.h"

#define NCL_CACHE_LINE 64
#define NCL_PAGE 4096
#define NCL_MAGIC 0x6e636c31u /* "ncl1" */
#define NCL_MAX_RANKS 1024
#define NCL_ABORTED 1 /* values of ncl_rank_ctrl.aborted */
#define NCL_CLOSED 2

/* Records a message for ncl_last_error() (thread-local) and returns status. */
int ncl_error(int status, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

#define NCL_CHECK(call)                   \
    do {                                  \
        int ncl_rc_ = (call);             \
        if (ncl_rc_ != NCL_OK) return ncl_rc_; \
    } while (0)

/* What a rank is doing; peers compare these before moving data (mismatch detection). */
typedef struct {
    uint32_t step;
    uint16_t coll;   /* ncl_coll_kind */
    uint8_t dtype;
    uint8_t op;
    int32_t root;
    uint32_t reserved;
    uint64_t count;
    uint64_t extra;  /* collective-specific (e.g. total bytes for all_to_allv) */
} ncl_fingerprint;

typedef enum {
    NCL_COLL_BARRIER = 1, NCL_COLL_ALL_REDUCE, NCL_COLL_REDUCE, NCL_COLL_BROADCAST,
    NCL_COLL_ALL_GATHER, NCL_COLL_GATHER, NCL_COLL_REDUCE_SCATTER, NCL_COLL_SCATTER,
    NCL_COLL_ALL_TO_ALL, NCL_COLL_ALL_TO_ALLV, NCL_COLL_SEND
} ncl_coll_kind;

const char* ncl_coll_name(int coll);
const char* ncl_dtype_name(int dtype);
const char* ncl_op_name(int op);

typedef struct {
    _Alignas(NCL_CACHE_LINE) _Atomic uint32_t step;  /* futex word: last step this rank posted */
    _Atomic uint32_t waiters;                        /* sleepers on `step` (wake only if > 0) */
    _Alignas(NCL_CACHE_LINE) _Atomic int32_t pid;
    _Atomic uint32_t aborted;                        /* NCL_ABORTED or NCL_CLOSED: gone from the group */
    _Alignas(NCL_CACHE_LINE) ncl_fingerprint fp[2];  /* fingerprint of the step of each parity */
    _Alignas(NCL_CACHE_LINE) int32_t abort_status;   /* why this rank aborted: an ncl_status ... */
    char abort_reason[188];                          /* ... and its message (peers copy it, bounded) */
} ncl_rank_ctrl;

typedef struct {
    _Alignas(NCL_CACHE_LINE) _Atomic uint32_t sent;   /* chunks the sender posted */
    _Atomic uint32_t sent_waiters;
    _Alignas(NCL_CACHE_LINE) _Atomic uint32_t acked;  /* chunks the receiver consumed */
    _Atomic uint32_t acked_waiters;
    _Alignas(NCL_CACHE_LINE) ncl_fingerprint fp[2];   /* fingerprint of each slot's chunk */
} ncl_pair_ctrl;

typedef struct {
    _Atomic uint32_t magic;  /* written last by the creator */
    uint32_t nranks;
    uint64_t total_bytes;
    uint64_t slot_bytes;
    uint64_t p2p_slot_bytes;
    uint64_t rank_ctrl_off, pair_ctrl_off, staging_off, p2p_off;
    _Alignas(NCL_CACHE_LINE) _Atomic uint32_t attached;
} ncl_header;

struct ncl_comm {
    int rank, nranks;
    uint8_t* base;          /* the mapped segment */
    size_t map_bytes;
    ncl_header* hdr;
    size_t staging_off, p2p_off; /* from this rank's own layout: shared values are never offsets */
    ncl_rank_ctrl* ranks;
    ncl_pair_ctrl* pairs;
    size_t slot_bytes, p2p_slot_bytes;
    uint32_t step;          /* last step this rank completed */
    uint32_t* p2p_sent;     /* [nranks] chunks sent to each peer */
    uint32_t* p2p_recvd;    /* [nranks] chunks received from each peer */
    double timeout_s;
    int spin_us, yield_us;
    bool oversubscribed;    /* more local ranks than CPUs we may run on */
    int broken;             /* a group error happened: refuse further use */
    char name[256];
};

/* segment.c */
uint8_t* ncl_slot(ncl_comm* c, int rank, uint32_t step);
uint8_t* ncl_p2p_slot(ncl_comm* c, int src, int dst, uint32_t chunk);

/* wait.c: wait until *word - target >= 0 (wrap-safe), watching `peer` for death/abort. */
double ncl_now(void);
int ncl_wait_word(ncl_comm* c, int peer, _Atomic uint32_t* word, _Atomic uint32_t* waiters,
                  uint32_t target, double deadline, const char* what);
void ncl_post_word(_Atomic uint32_t* word, _Atomic uint32_t* waiters, uint32_t value);
int ncl_peer_alive(ncl_comm* c, int peer);

/* step.c: the collective engine.  A step is: write into my slot of ncl_step_begin(),
 * then ncl_step_sync() posts it and waits for every rank's same step, checking that all
 * fingerprints agree; after that every rank's slot of this step may be read until the
 * next-but-one step begins. */
uint8_t* ncl_step_begin(ncl_comm* c);            /* my slot for the next step */
int ncl_step_sync(ncl_comm* c, const ncl_fingerprint* fp);
uint8_t* ncl_step_peer_slot(ncl_comm* c, int rank);  /* a rank's slot of the current step */
int ncl_comm_usable(ncl_comm* c);                 /* error if closed or broken */
/* Copy elements [off, off+m) of each of n consecutive blocks of `count` elements from
 * `send` into `slot`, packed block after block (reduce_scatter, all_to_all, scatter). */
void ncl_pack_blocks(uint8_t* slot, const uint8_t* send, size_t n, size_t count, size_t off, size_t m, size_t es);
/* args.c: the core's own last line of defence (Python validates first); op < 0 or
 * root < 0 means "not used by this call". */
int ncl_check_args(ncl_comm* c, const void* send, const void* recv, size_t count, int dtype, int op, int root);
int ncl_fail(ncl_comm* c, int status);            /* mark broken + aborted, pass status on */

static inline size_t ncl_min(size_t a, size_t b) { return a < b ? a : b; }
static inline size_t ncl_div_up(size_t a, size_t b) { return (a + b - 1) / b; }

#endif
