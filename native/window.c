/* window.c: registered (symmetric) memory, the way past staging copies.
 *
 * A window is one shared-memory segment with a slice per rank: a page of header, then n
 * slices of the same size.  Every rank maps the whole of it, so a collective on a buffer at
 * offset `off` of this rank's slice reaches the same offset of any peer's slice directly:
 * the one-copy (and for reductions, zero-staging) paths of the direct algorithms.
 *
 * Creation is collective (a fingerprinted step first, so ranks asking for different sizes
 * get a mismatch error before anything is created); like a communicator's segment it is a memfd
 * that rank 0 hands to the others through a door (segment.c, door.c): never named.  Windows are numbered in creation order, the
 * same on every rank; the number and offset go into each collective's fingerprint.
 * Freeing is local: it unmaps this rank's view only (peers keep theirs), and it may come
 * after the communicator is gone, since arrays can outlive it. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"

typedef struct {
    _Atomic uint32_t attached;
} window_header;

struct ncl_window {
    ncl_comm* owner;        /* NULL once the communicator is destroyed */
    ncl_window* next;
    uint8_t* base;
    size_t map_bytes, slice;
    size_t bytes;           /* what the caller asked for (<= slice) */
    uint32_t id;            /* 1, 2, ... in creation order */
    int rank;
};

#define WINDOW_HEADER NCL_PAGE
#define WINDOW_MAX_BYTES ((size_t)1 << 40)

static uint8_t* slice_of(const ncl_window* w, int rank) { return w->base + WINDOW_HEADER + (size_t)rank * w->slice; }

void* ncl_window_ptr(const ncl_window* w) { return w ? slice_of(w, w->rank) : NULL; }

static int wait_attached(ncl_comm* c, window_header* h, double deadline, const char* name) {
    for (unsigned i = 0; atomic_load(&h->attached) < (uint32_t)c->nranks; i++) {
        if ((i & 1023) == 1023) {
            NCL_CHECK(ncl_peer_alive(c, -1));
            NCL_CHECK(ncl_interrupted("comm.empty"));
            if (ncl_now() > deadline)
                return ncl_error(NCL_ERR_TIMEOUT, "registered buffer %s: peers did not attach in %.0f s", name,
                                 c->timeout_s);
        }
        sched_yield();
    }
    return NCL_OK;
}

static int create(ncl_comm* c, const char* name, size_t bytes, ncl_window** out) {
    ncl_fingerprint fp = {.coll = NCL_COLL_WINDOW, .dtype = NCL_UINT8, .root = -1, .count = bytes};
    NCL_CHECK(ncl_step_sync(c, &fp)); /* same size everywhere, before anything is created */
    size_t slice = ncl_div_up(bytes ? bytes : 1, NCL_PAGE) * NCL_PAGE;
    size_t total = WINDOW_HEADER + slice * (size_t)c->nranks;
    double deadline = ncl_now() + c->timeout_s;
    char suffix[32];
    snprintf(suffix, sizeof suffix, "/window%u", c->nwindows + 1);
    int fd = -1, door = -1;
    if (c->rank == 0) {
        NCL_CHECK(ncl_door_open(c->key, suffix, &door));
        int rc = ncl_shm_create(total, &fd, true);
        if (rc == NCL_OK) rc = ncl_shm_hand_out(c, door, fd, deadline, "registered buffer (comm.empty)", NULL);
        close(door);
        if (rc != NCL_OK) {
            if (fd >= 0) close(fd);
            return rc;
        }
    } else {
        NCL_CHECK(ncl_shm_receive(c->key, suffix, c->rank, name, total, deadline, &fd, c));
    }
    /* MAP_POPULATE: no page faults later, in the middle of a collective */
    void* base = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    int err = errno;
    close(fd);
    if (base == MAP_FAILED)
        return ncl_error(NCL_ERR_SYSTEM, "cannot map registered buffer %s (%zu bytes): %s", name, total,
                         strerror(err));
    ncl_window* w = calloc(1, sizeof *w);
    if (!w) {
        munmap(base, total);
        return ncl_error(NCL_ERR_SYSTEM, "out of memory");
    }
    *w = (ncl_window){.owner = c, .base = base, .map_bytes = total, .slice = slice, .bytes = bytes,
                      .id = ++c->nwindows, .rank = c->rank};
    window_header* h = base;
    atomic_fetch_add(&h->attached, 1);
    int rc = wait_attached(c, h, deadline, name);
    if (rc != NCL_OK) {
        munmap(base, total);
        free(w);
        return rc;
    }
    pthread_mutex_lock(&c->win_lock);
    w->next = c->windows;
    c->windows = w;
    pthread_mutex_unlock(&c->win_lock);
    *out = w;
    return NCL_OK;
}

int ncl_window_create(ncl_comm* c, const char* name, size_t bytes, ncl_window** out) {
    NCL_CHECK(ncl_comm_usable(c));
    if (!out || !name || name[0] != '/' || strchr(name + 1, '/'))
        return ncl_error(NCL_ERR_ARGUMENT, "window name must be '/' and a name without '/'");
    if (bytes > WINDOW_MAX_BYTES)
        return ncl_error(NCL_ERR_ARGUMENT, "registered buffer of %zu bytes is too large", bytes);
    return ncl_fail(c, create(c, name, bytes, out));
}

int ncl_window_free(ncl_window* w) {
    if (!w) return NCL_OK;
    ncl_comm* c = w->owner;
    if (c) {
        pthread_mutex_lock(&c->win_lock);
        for (ncl_window** p = &c->windows; *p; p = &(*p)->next)
            if (*p == w) {
                *p = w->next;
                break;
            }
        pthread_mutex_unlock(&c->win_lock);
    }
    munmap(w->base, w->map_bytes);
    free(w);
    return NCL_OK;
}

void ncl_windows_detach(ncl_comm* c) {
    pthread_mutex_lock(&c->win_lock);
    for (ncl_window* w = c->windows; w; w = w->next) w->owner = NULL;
    c->windows = NULL;
    pthread_mutex_unlock(&c->win_lock);
}

ncl_reg ncl_registered(ncl_comm* c, const void* p, size_t bytes) {
    ncl_reg r = {NULL, 0};
    /* Unlocked peek: only the calling thread adds windows; a free on another thread can only
     * empty the list, and a stale non-NULL read just takes the lock below. */
    if (!c->windows || !p) return r;
    const uint8_t* q = p;
    pthread_mutex_lock(&c->win_lock);
    for (ncl_window* w = c->windows; w; w = w->next) {
        const uint8_t* mine = slice_of(w, w->rank);
        if (q >= mine && q <= mine + w->bytes && bytes <= (size_t)(mine + w->bytes - q)) {
            r.win = w;
            r.off = (size_t)(q - mine);
            break;
        }
    }
    pthread_mutex_unlock(&c->win_lock);
    return r;
}

ncl_reg ncl_direct_source(ncl_comm* c, const void* p, size_t bytes) {
    ncl_reg none = {NULL, 0};
    if (c->nranks < 2 || bytes < c->direct_min_bytes || bytes == 0) return none;
    return ncl_registered(c, p, bytes);
}

uint8_t* ncl_window_peer(ncl_comm* c, uint32_t id, int rank) {
    uint8_t* at = NULL;
    pthread_mutex_lock(&c->win_lock);
    for (ncl_window* w = c->windows; w; w = w->next)
        if (w->id == id) {
            at = slice_of(w, rank);
            break;
        }
    pthread_mutex_unlock(&c->win_lock);
    return at;
}

uint8_t* ncl_reg_peer(const ncl_reg* r, int rank) { return slice_of(r->win, rank) + r->off; }

uint32_t ncl_reg_id(const ncl_reg* r) { return r->win ? r->win->id : 0; }

void ncl_fp_registered(ncl_fingerprint* fp, const ncl_reg* send, const ncl_reg* recv) {
    fp->win[0] = send ? ncl_reg_id(send) : 0;
    fp->win_off[0] = send ? send->off : 0;
    fp->win[1] = recv ? ncl_reg_id(recv) : 0;
    fp->win_off[1] = recv ? recv->off : 0;
}
