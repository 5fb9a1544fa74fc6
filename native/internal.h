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
#include <pthread.h>
#include <sys/types.h>

#include "ncl.h"

#define NCL_CACHE_LINE 64
#define NCL_PAGE 4096
#define NCL_MAGIC 0x6e636c31u /* "ncl1" */
#define NCL_ABORTED 1 /* values of ncl_rank_ctrl.aborted */
#define NCL_CLOSED 2
#define NCL_LEARN_CLASSES 12 /* learn.c: size classes 32 KiB, 64 KiB, ... 64 MiB and up */
#define NCL_STORES_CACHED 1    /* values of ncl_header.streaming */
#define NCL_STORES_STREAMING 2
#define NCL_KEY_CHARS 64 /* a group's key (hex digest of the job's secret): door name + ticket (door.c) */

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
    uint32_t win[2]; /* registered send / recv: window number (0: not registered) ... */
    uint64_t win_off[2]; /* ... and offset in the slice (must match: peers read there) */
} ncl_fingerprint;

typedef enum {
    NCL_COLL_BARRIER = 1, NCL_COLL_ALL_REDUCE, NCL_COLL_REDUCE, NCL_COLL_BROADCAST,
    NCL_COLL_ALL_GATHER, NCL_COLL_GATHER, NCL_COLL_REDUCE_SCATTER, NCL_COLL_SCATTER,
    NCL_COLL_ALL_TO_ALL, NCL_COLL_ALL_TO_ALLV, NCL_COLL_SEND, NCL_COLL_WINDOW,
    NCL_COLL_RECV, /* flight recorder only: a recv carries its sender's fingerprint */
    NCL_COLL_MOE_DISPATCH, NCL_COLL_MOE_COMBINE /* moe.c */
} ncl_coll_kind;


typedef struct {
    _Alignas(NCL_CACHE_LINE) _Atomic uint32_t step;  /* futex word: last step this rank posted */
    _Atomic uint32_t waiters;                        /* sleepers on `step` (wake only if > 0) */
    uint64_t digest[2];                              /* hash of fp[parity], on the line waiters poll */
    _Atomic int32_t cpu;                             /* where this rank posted its last step (wait.c) */
    uint64_t slot_off[2];                            /* where in its staging its step of each parity is */
    _Alignas(NCL_CACHE_LINE) _Atomic int32_t pid;
    _Atomic uint32_t aborted;                        /* NCL_ABORTED or NCL_CLOSED: gone from the group */
    uint64_t probe_addr;                             /* cma.c: a word peers try to read at setup */
    _Atomic uint32_t cma_state;                      /* cma.c: 0 not yet probed, 1 can read the next rank, 2 cannot */
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
    uint64_t note_ino;       /* inode of the rendezvous note in /dev/shm (segment.c), 0 if none */
    uint32_t central_sync;   /* rank 0's choice, the same for all: steps meet at `generation` */
    _Atomic uint32_t revoked; /* 1 + the first rank that revoked the group, else 0 (read by every call) */
    _Alignas(NCL_CACHE_LINE) _Atomic uint32_t attached;   /* futex word: ranks counted in at setup */
    _Atomic uint32_t attach_waiters;                      /* sleepers on `attached` (segment.c) */
    _Alignas(NCL_CACHE_LINE) _Atomic uint32_t arrived;    /* central sync: ranks at the current step */
    _Alignas(NCL_CACHE_LINE) _Atomic uint32_t generation; /* central sync: last step every rank reached */
    _Atomic uint32_t gen_waiters;
    _Atomic uint32_t bad_step;    /* central sync: a step whose fingerprints differ (checked by the last arrival) */
    _Atomic uint32_t last_rank;   /* central sync: who arrived last at the latest step */
    /* learn.c: rank 0's choices per size class (0: not measured yet): all_reduce's algorithm for
     * staged [0] and registered [1] buffers, {effective step, old, new}; its stores per algorithm */
    _Alignas(NCL_CACHE_LINE) _Atomic uint64_t algo_word[2][NCL_LEARN_CLASSES];
    _Atomic uint8_t streaming[NCL_NUM_ALGOS][NCL_LEARN_CLASSES];
} ncl_header;

/* learn.c, rank 0: a duel's timed calls (ns per byte of the last one, and the ratios challenger /
 * incumbent of neighbouring ones so far), and what react() follows the stores by */
#define NCL_DUEL_PAIRS 3
#define NCL_RECENT 8 /* streaming calls react() keeps per algorithm */
typedef struct {
    float first;
    float ratio[NCL_DUEL_PAIRS];
    uint8_t pairs;
    float streamed[NCL_NUM_ALGOS][NCL_RECENT]; /* ns per byte of the last streaming calls (a ring) */
    uint8_t streamed_n[NCL_NUM_ALGOS];         /* calls in the ring (up to NCL_RECENT) */
    uint8_t streamed_at[NCL_NUM_ALGOS];        /* where the next goes */
    uint8_t slower[NCL_NUM_ALGOS];     /* calls in a row that ask react to change the stores */
    uint8_t settling[NCL_NUM_ALGOS];   /* calls after a change of stores not to judge by (react) */
} ncl_duel;

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
    /* step.c: the staging ring, this rank's next free byte in the half it fills (ncl_step_begin) */
    int ring_half;
    size_t ring_pos;
    uint32_t placed_step;   /* the step whose slot ncl_step_begin placed last, at placed_off */
    size_t placed_off;
    bool ring_faulted;      /* this rank's staging is faulted in (the ring's first use) */
    uint32_t* p2p_sent;     /* [nranks] chunks sent to each peer */
    uint32_t* p2p_recvd;    /* [nranks] chunks received from each peer */
    double timeout_s;
    int spin_us, yield_us;
    bool oversubscribed;    /* more local ranks than CPUs we may run on */
    bool central_sync;      /* steps meet at one shared word (oversubscribed hosts, see step.c) */
    bool cma;               /* every rank can read every other's memory (cma.c) */
    size_t cma_min_bytes;   /* ... and messages from this size up do so */
    size_t cma_all_reduce_min_bytes; /* all_reduce AUTO: the CMA two-shot from here up */
    uint8_t* cma_scratch;   /* all_reduce through CMA: peers' pieces land here (malloc'd on first use) */
    size_t one_shot_max_bytes, direct_min_bytes; /* algorithm thresholds (ncl_options) */
    int streaming;          /* ncl_options.streaming: 0 learned, 1 streaming, 2 ordinary */
    /* learn.c: all_reduce calls per size class and, on rank 0, the duel in progress in each */
    uint32_t algo_calls[2][NCL_LEARN_CLASSES];                 /* [registered] */
    ncl_duel duels[2][NCL_LEARN_CLASSES];
    ncl_window* windows;    /* registered memory of this communicator (list, under win_lock) */
    uint32_t nwindows;      /* windows ever created: the next one's number */
    pthread_mutex_t win_lock;
    int broken;             /* a group error happened: refuse further use */
    bool verify_calls;      /* compare fingerprint digests at every step (ncl_options) */
    int cpus;
    size_t cache_bytes;     /* the largest CPU cache (sysfs) */
    size_t out_stream_min_bytes; /* outputs copied from staging stream from here up (copy.c) */
    ncl_flight_entry* flight; /* flight recorder: a ring of flight_cap calls (flight.c) */
    uint32_t flight_cap;
    uint64_t calls;         /* calls begun on this communicator */
    ncl_flight_entry* current; /* the call in progress, if recorded */
    char name[256];
    char key[NCL_KEY_CHARS + 1]; /* the group's key: its windows' doors and tickets (door.c) */
};

/* A buffer inside a registered window: where the same bytes sit in any rank's slice. */
typedef struct {
    ncl_window* win;   /* NULL: not registered */
    size_t off;
} ncl_reg;

/* copy.c: writes that a peer will read (non-temporal stores for large ones); the _stores forms
 * stream only when told to (learn.c decides for all_reduce) */
void ncl_copy_shared(void* dst, const void* src, size_t n);
int ncl_reduce_shared(void* dst, const void** srcs, int nsrc, size_t count, int dtype, int op);
void ncl_copy_stores(void* dst, const void* src, size_t n, bool stream);
void ncl_zero_stores(void* dst, size_t n, bool stream); /* memset, streaming as ncl_copy_stores */
size_t ncl_output_stream_min_bytes(const ncl_comm* c);
int ncl_reduce_stores(void* dst, const void** srcs, int nsrc, size_t count, int dtype, int op, bool stream);
/* Copy n bytes that every rank copies at once, from this rank's n-th share of them round to it
 * (see ncl_reader_turn) */
void ncl_copy_from_own_share(const ncl_comm* c, void* dst, const void* src, size_t n, bool stream);

/* learn.c: one all_reduce call's algorithm and stores, learned per size class while running */
typedef struct {
    int algo, model;  /* the algorithm to run; the cost model's (or NCL_ALGO's) */
    int incumbent;    /* the algorithm in force for this class (what runs outside duels) */
    bool forced;      /* NCL_ALGO: the algorithm is not learned */
    int table, cls;   /* [registered][size class]; cls < 0: below the floor, nothing learned */
    bool stream;      /* streaming stores for what peers read */
    int at;           /* this call's place in a duel (0 .. 2 * NCL_DUEL_PAIRS - 1), -1: none */
    int rival;        /* the duel's challenger: an algorithm, or NCL_OTHER_STORES */
    bool challenger;  /* this call runs the challenger */
    size_t bytes;
    double t0;        /* rank 0: when the call began */
} ncl_learned;
#define NCL_OTHER_STORES (-1) /* a challenger: the incumbent algorithm with the other kind of stores */
ncl_learned ncl_learn_pick(ncl_comm* c, int algo, bool forced, bool registered, size_t bytes);
void ncl_learn_from(ncl_comm* c, const ncl_learned* l, int status); /* after the call: rank 0 learns */

/* cma.c: single-copy reads of peers' unregistered buffers */
#define NCL_EXTRA_CMA (1ull << 32) /* fingerprint.extra flag: this call reads peers through CMA */
void ncl_cma_publish_probe(ncl_comm* c);
int ncl_cma_agree(ncl_comm* c, bool allowed, double deadline);
bool ncl_use_cma(const ncl_comm* c, size_t bytes);
/* One step publishing this rank's buffer address; afterwards ncl_cma_peer_addr() gives each
 * rank's, and the caller ends with another step before anyone reuses a buffer. */
int ncl_cma_exchange(ncl_comm* c, const void* mine, ncl_fingerprint* fp);
uint64_t ncl_cma_peer_addr(ncl_comm* c, int peer);
int ncl_cma_read(ncl_comm* c, int peer, void* local, uint64_t remote, size_t bytes);

/* window.c */
ncl_reg ncl_registered(ncl_comm* c, const void* p, size_t bytes);
uint8_t* ncl_reg_peer(const ncl_reg* r, int rank);
/* Where rank's slice of window `id` (numbered alike on every rank) is mapped here; NULL if
 * this rank has freed its view of it. */
uint8_t* ncl_window_peer(ncl_comm* c, uint32_t id, int rank);
uint32_t ncl_reg_id(const ncl_reg* r);
/* The registration of a collective's source when the direct path should take it (registered,
 * more than one rank, at least direct_min_bytes); else an unregistered ncl_reg. */
ncl_reg ncl_direct_source(ncl_comm* c, const void* p, size_t bytes);
/* Record registration in the fingerprint, so ranks that disagree on it get a mismatch error. */
void ncl_fp_registered(ncl_fingerprint* fp, const ncl_reg* send, const ncl_reg* recv);
void ncl_windows_detach(ncl_comm* c);   /* the communicator is going: windows live on alone */

/* segment.c: a job's shared memory (communicator segments and windows): anonymous (memfd),
 * handed from rank 0 to the others through a door (door.c) named by key + suffix. */
int ncl_shm_create(size_t bytes, int* fd_out, bool window);  /* rank 0; window: comm.empty */
/* Rank 0: hand `fd` out through `door` until every rank has it (liveness, interrupts and, with a
 * note, the note's name checked every 50 ms); `what` names the setup in errors. */
int ncl_shm_hand_out(ncl_comm* c, int door, int fd, double deadline, const char* what, const char* note);
/* Other ranks: rank 0's descriptor.  `group` (NULL while a communicator is set up: then the
 * note in /dev/shm names rank 0's pid) is watched, so that rank 0's death is an error at once. */
int ncl_shm_receive(const char* key, const char* suffix, int rank, const char* note, size_t bytes, double deadline,
                    int* fd_out, ncl_comm* group);

/* door.c: abstract Unix sockets handing a descriptor to the job's ranks only */
int ncl_door_open(const char* key, const char* suffix, int* door_out); /* bind (rank 0), not listening yet */
int ncl_door_listen(int door);
/* Answer the knocks that come within slice_s: a rank with the ticket gets fd, admitted[rank] = true. */
int ncl_door_answer(int door, int fd, const char* key, int nranks, bool* admitted, double slice_s);
/* NCL_OK with *fd_out = rank 0's descriptor, or -1 when nobody listens (yet); an error if refused. */
int ncl_door_knock(const char* key, const char* suffix, int rank, double deadline, int* fd_out);

uint8_t* ncl_staging(ncl_comm* c, int rank); /* a rank's staging: two slots' worth, its ring (step.c) */
uint8_t* ncl_p2p_slot(ncl_comm* c, int src, int dst, uint32_t chunk);

/* wait.c: wait until *word - target >= 0 (wrap-safe), watching `peer` for death/abort. */
double ncl_now(void);
int ncl_wait_word(ncl_comm* c, int peer, _Atomic uint32_t* word, _Atomic uint32_t* waiters,
                  uint32_t target, double deadline, const char* what);
/* Sleep on futex word `word` while it still holds `seen`, at most `slice_s` (a setup wait's
 * polling period: whoever changes the word wakes it at once with ncl_post_word). */
void ncl_futex_wait(_Atomic uint32_t* word, _Atomic uint32_t* waiters, uint32_t seen, double slice_s);
void ncl_post_word(_Atomic uint32_t* word, _Atomic uint32_t* waiters, uint32_t value);
void ncl_wake_word(_Atomic uint32_t* word, _Atomic uint32_t* waiters); /* after changing *word (seq_cst) */
int ncl_peer_alive(ncl_comm* c, int peer);
bool ncl_pid_running(pid_t pid);  /* false once it died (a zombie counts as dead); true for pid <= 0 */
void ncl_own_reason(ncl_comm* c, char* out, size_t cap); /* why this rank left the group, NUL-terminated */
/* Post step s of this rank (with the CPU it runs on), and wait for rank r's step s: as
 * ncl_wait_word, without spinning while r last posted from this rank's own CPU. */
void ncl_post_step(ncl_comm* c, uint32_t s);
int ncl_wait_step(ncl_comm* c, int r, uint32_t s, double deadline, const char* what);
/* NCL_ERR_INTERRUPTED when the interrupt hook (main thread, at most every 50 ms) says stop. */
int ncl_interrupted(const char* what);

/* step.c: the collective engine.  A step is: write into my slot of ncl_step_begin(),
 * then ncl_step_sync() posts it and waits for every rank's same step, checking that all
 * fingerprints agree; after that every rank's slot of this step may be read until the
 * next-but-one step begins. */
uint8_t* ncl_step_begin(ncl_comm* c, size_t bytes); /* my slot for the next step: `bytes` from it */
int ncl_step_sync(ncl_comm* c, const ncl_fingerprint* fp);
uint8_t* ncl_step_peer_slot(ncl_comm* c, int rank);  /* a rank's slot of the current step */
uint8_t* ncl_step_slot(ncl_comm* c, int rank, uint32_t step); /* ... of step `step` (the current one) */
/* With central sync (oversubscribed hosts) the last rank to arrive at a step runs `run` once,
 * for everyone, before releasing them (it may write its own slot of step s); afterwards
 * ncl_step_last_rank() names it.  Without central sync `run` is not called: callers check
 * c->central_sync and do the work themselves. */
typedef struct {
    void (*run)(ncl_comm* c, uint32_t step, void* arg);
    void* arg;
} ncl_on_last;
int ncl_step_sync_last(ncl_comm* c, const ncl_fingerprint* fp, const ncl_on_last* last);
static inline int ncl_step_last_rank(const ncl_comm* c) { return (int)atomic_load(&c->hdr->last_rank); }
int ncl_comm_usable(ncl_comm* c);                 /* error if closed or broken */
/* Copy elements [off, off+m) of each of n consecutive blocks of `count` elements from
 * `send` into `slot`, packed block after block (reduce_scatter, all_to_all, scatter). */
void ncl_pack_blocks(uint8_t* slot, const uint8_t* send, size_t n, size_t count, size_t off, size_t m, size_t es);
/* args.c: the core's own last line of defence (Python validates first); op < 0 or
 * root < 0 means "not used by this call". */
int ncl_check_args(ncl_comm* c, const void* send, const void* recv, size_t count, int dtype, int op, int root);
int ncl_fail(ncl_comm* c, int status);
/* flight.c: every public call is bracketed by these (after its arguments are checked);
 * ncl_call_end returns ncl_fail(c, status). */
void ncl_call_begin(ncl_comm* c, int coll, int dtype, size_t count, int op, int root);
int ncl_call_end(ncl_comm* c, int status);
void ncl_call_path(ncl_comm* c, const char* algorithm);   /* name the path the current call took */
void ncl_call_stores(ncl_comm* c, bool streaming);        /* ... and the stores all_reduce wrote with */
void ncl_wake_waiters(ncl_comm* c);            /* mark broken + aborted, pass status on */

/* The i-th rank (0 <= i < n) whose data this rank reads when every rank reads every rank's:
 * its own first, then the next ones, so that no two ranks read the same lines at once (they
 * contend for them: two-shot's gather in rank order made a 2 MiB all_reduce at np=2 1.4x
 * slower, 2026-12). */
static inline int ncl_reader_turn(const ncl_comm* c, int i) { return (c->rank + i) % c->nranks; }

static inline size_t ncl_min(size_t a, size_t b) { return a < b ? a : b; }
static inline size_t ncl_max(size_t a, size_t b) { return a > b ? a : b; }
static inline size_t ncl_div_up(size_t a, size_t b) { return (a + b - 1) / b; }

#endif
