/* segment.c: a communicator's shared-memory segment, from creation to unmapping.
 *
 * Invariant: a live job's segment is never reachable by name.  Rank 0 creates it as a memfd
 * (anonymous, sealed at its size), lays it out, and hands the descriptor to the other ranks
 * through a door (door.c: an abstract Unix socket, the job's secret as the ticket, same user
 * only), then closes the door.  Nothing in /dev/shm or anywhere else names the segment: it lives
 * while a rank maps it, so a kill -9 of anyone leaves nothing behind.  The only file is the
 * rendezvous note, /dev/shm/<name> (from the job's secret id), one page holding rank 0's pid and
 * nothing of the segment: a rank arriving after rank 0 died reads whom to name, and its removal
 * during setup is reported.  The last rank to attach removes it; the launcher removes what a
 * crash during setup leaves.  Every rank waits for the attach count on a futex. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

static size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

/* Lay the segment out; every rank computes the same layout from the same options. */
static void layout(ncl_header* h, int nranks, size_t slot, size_t pslot) {
    size_t n = (size_t)nranks;
    h->nranks = (uint32_t)nranks;
    h->slot_bytes = slot;
    h->p2p_slot_bytes = pslot;
    h->rank_ctrl_off = align_up(sizeof(ncl_header), NCL_PAGE);
    h->pair_ctrl_off = align_up(h->rank_ctrl_off + n * sizeof(ncl_rank_ctrl), NCL_PAGE);
    h->staging_off = align_up(h->pair_ctrl_off + n * n * sizeof(ncl_pair_ctrl), NCL_PAGE);
    h->p2p_off = align_up(h->staging_off + n * 2 * slot, NCL_PAGE);
    h->total_bytes = align_up(h->p2p_off + (nranks > 1 ? n * n * 2 * pslot : 0), NCL_PAGE);
}

uint8_t* ncl_staging(ncl_comm* c, int rank) { return c->base + c->staging_off + (size_t)rank * 2 * c->slot_bytes; }

uint8_t* ncl_p2p_slot(ncl_comm* c, int src, int dst, uint32_t chunk) {
    size_t pair = (size_t)src * (size_t)c->nranks + (size_t)dst;
    return c->base + c->p2p_off + (pair * 2 + (chunk & 1)) * c->p2p_slot_bytes;
}

/* The kernel's estimate of memory available without swapping (MemAvailable), 0 when unknown. */
static size_t mem_available(void) {
    FILE* f = fopen("/proc/meminfo", "r");
    if (!f) return 0;
    char line[128];
    unsigned long long kib = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %llu kB", &kib) == 1) break;
    fclose(f);
    return (size_t)kib * 1024;
}

/* `what` needs `need` bytes of /dev/shm, which is memory: both must have room (a /dev/shm larger than
 * the RAM would let a segment push the machine into swap or the OOM killer); `remedy` says what else
 * than more shared memory would help. */
static int check_free_space(size_t need, const char* what, const char* remedy) {
    size_t mem = mem_available();
    if (mem && mem < need)
        return ncl_error(NCL_ERR_SYSTEM, "%s needs %.1f MiB of shared memory, but the machine has %.1f MiB of "
                                         "memory available; %s", what, need / 1048576.0, mem / 1048576.0, remedy);
    struct statvfs st;
    if (statvfs("/dev/shm", &st) != 0) return NCL_OK; /* no /dev/shm to inspect: let shm_open speak */
    size_t avail = (size_t)st.f_bavail * st.f_frsize;
    if (avail < need)
        return ncl_error(NCL_ERR_SYSTEM,
                         "/dev/shm has %.1f MiB free but %s needs %.1f MiB; free space there, %s, or give "
                         "the container more shared memory (docker run --shm-size=...)",
                         avail / 1048576.0, what, need / 1048576.0, remedy);
    return NCL_OK;
}

static void sleep_s(double s) {
    struct timespec ts = {0, (long)(s * 1e9)};
    nanosleep(&ts, NULL);
}

/* Rank 0: a new segment with no name, sealed at its size (a rank cannot shrink it under the others). */
int ncl_shm_create(size_t bytes, int* fd_out, bool window) {
    NCL_CHECK(window ? check_free_space(bytes, "this registered buffer (every rank's copy)", "allocate less")
                     : check_free_space(bytes, "this communicator", "lower NCL_BUFFSIZE / NCL_P2P_BUFFSIZE"));
    int fd = memfd_create(window ? "ncl-window" : "ncl-segment", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) return ncl_error(NCL_ERR_SYSTEM, "cannot create a shared-memory segment: %s", strerror(errno));
    if (ftruncate(fd, (off_t)bytes) != 0) {
        int err = errno;
        close(fd);
        return ncl_error(NCL_ERR_SYSTEM, "cannot size a shared-memory segment to %zu bytes: %s", bytes, strerror(err));
    }
    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
    *fd_out = fd;
    return NCL_OK;
}

/* The rendezvous note: rank 0's pid, in a file of the job's name (mode 0600). */
static int note_create(const char* name, ino_t* ino) {
    int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0)
        return ncl_error(NCL_ERR_SYSTEM, "cannot create rendezvous note %s: %s%s", name, strerror(errno),
                         errno == EEXIST ? " (a unique id was reused: take a fresh ncl.get_unique_id())" : "");
    int32_t pid = (int32_t)getpid();
    struct stat st = {0};
    bool ok = write(fd, &pid, sizeof pid) == (ssize_t)sizeof pid && fstat(fd, &st) == 0;
    int err = errno;
    close(fd);
    if (!ok) {
        shm_unlink(name);
        return ncl_error(NCL_ERR_SYSTEM, "cannot write rendezvous note %s: %s", name, strerror(err));
    }
    *ino = st.st_ino;
    return NCL_OK;
}

/* An error naming rank 0 if the note says it died (and the note removed: nobody can use it now). */
static int creator_alive(const char* note) {
    int fd = shm_open(note, O_RDONLY, 0);
    if (fd < 0) return NCL_OK; /* not created yet */
    int32_t pid = 0;
    bool read_it = read(fd, &pid, sizeof pid) == (ssize_t)sizeof pid;
    close(fd);
    if (!read_it || ncl_pid_running(pid)) return NCL_OK;
    shm_unlink(note);
    return ncl_error(NCL_ERR_PEER, "rank 0 (pid %d) died", (int)pid);
}

int ncl_shm_receive(const char* key, const char* suffix, int rank, const char* note, size_t bytes, double deadline,
                    int* fd_out, ncl_comm* group) {
    int fd = -1;
    for (double pause = 50e-6, next_check = 0;; pause = pause < 1e-3 ? 2 * pause : 1e-3) {
        NCL_CHECK(ncl_door_knock(key, suffix, rank, deadline, &fd));
        if (fd >= 0) break;
        double now = ncl_now();
        if (now >= next_check) { /* at once, then every 50 ms: rank 0 gone is an error now, not at the deadline */
            next_check = now + 0.05;
            NCL_CHECK(group ? ncl_peer_alive(group, 0) : creator_alive(note));
        }
        if (now > deadline)
            return ncl_error(NCL_ERR_TIMEOUT, "rank 0 did not create shared-memory segment %s in time (or its "
                             "rendezvous note was removed from /dev/shm before this rank joined)", note);
        NCL_CHECK(ncl_interrupted("communicator setup"));
        sleep_s(pause);
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || (uint64_t)st.st_size != bytes) {
        close(fd);
        return ncl_error(NCL_ERR_MISMATCH, "shared-memory segment %s has %lld bytes but this rank expects %llu: "
                         "ranks disagree on the world size, NCL_BUFFSIZE or NCL_P2P_BUFFSIZE", note,
                         (long long)st.st_size, (unsigned long long)bytes);
    }
    *fd_out = fd;
    return NCL_OK;
}

/* The largest CPU cache (sysfs: cpu0's highest level; on this 2-vCPU host the L3, 32 MiB, shared by
 * both), or 32 MiB where sysfs does not say.  (glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) says 320 MiB here.) */
static size_t last_level_cache_bytes(void) {
    size_t best = 0;
    int best_level = 0;
    for (int i = 0; i < 8; i++) {
        char path[80], text[32];
        int level = 0;
        unsigned long long size = 0;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/level", i);
        FILE* f = fopen(path, "r");
        if (!f) break;
        bool ok = fscanf(f, "%d", &level) == 1;
        fclose(f);
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", i);
        if (!ok || !(f = fopen(path, "r"))) continue;
        char unit = 0;
        ok = fgets(text, sizeof text, f) && sscanf(text, "%llu%c", &size, &unit) >= 1;
        fclose(f);
        size *= unit == 'K' ? 1ull << 10 : unit == 'M' ? 1ull << 20 : unit == 'G' ? 1ull << 30 : 1;
        if (ok && size && level >= best_level) best = (size_t)size, best_level = level;
    }
    return best ? best : (size_t)32 << 20;
}

static int count_cpus(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

/* Whether `name` still names the rendezvous note rank 0 made (inode `ino`). */
static bool still_named(const char* name, ino_t ino) {
    int fd = shm_open(name, O_RDONLY, 0);
    if (fd < 0) return errno != ENOENT;
    struct stat st;
    bool same = fstat(fd, &st) != 0 || st.st_ino == ino;
    close(fd);
    return same;
}

#define SETUP_CHECK_PERIOD_S 0.05 /* liveness, interrupts and the name, this often while ranks attach */

/* Ranks [..] that have not attached yet, for a timeout's message. */
static void missing_ranks(ncl_comm* c, const bool* admitted, char* out, size_t cap) {
    size_t len = 0;
    out[0] = 0;
    for (int r = 0; r < c->nranks && len < cap - 16; r++)
        if (admitted ? r > 0 && !admitted[r] : atomic_load(&c->ranks[r].pid) == 0)
            len += (size_t)snprintf(out + len, cap - len, "%s%d", len ? ", " : "", r);
}

/* The periodic checks of a setup wait: attached ranks alive, no interrupt, the note (if any)
 * still there while some rank may still need it, the deadline. */
static int setup_checks(ncl_comm* c, const char* note, double deadline, const bool* admitted, const char* what) {
    NCL_CHECK(ncl_peer_alive(c, -1));
    NCL_CHECK(ncl_interrupted(what));
    /* the last rank to attach removes the note after counting itself in: look again */
    if (note && !still_named(note, c->hdr->note_ino) && atomic_load(&c->hdr->attached) < (uint32_t)c->nranks)
        return ncl_error(NCL_ERR_SYSTEM, "rendezvous note %s was removed from /dev/shm before every rank had joined "
                                         "(by another process of this user?)", note);
    if (ncl_now() <= deadline) return NCL_OK;
    char missing[512];
    missing_ranks(c, admitted, missing, sizeof missing);
    return ncl_error(NCL_ERR_TIMEOUT, "%s timed out after %.0f s: ranks [%s] never attached", what, c->timeout_s,
                     missing);
}

int ncl_shm_hand_out(ncl_comm* c, int door, int fd, double deadline, const char* what, const char* note) {
    bool admitted[NCL_MAX_RANKS] = {false};
    NCL_CHECK(ncl_door_listen(door));
    for (int n = 1; n < c->nranks;) {
        NCL_CHECK(ncl_door_answer(door, fd, c->key, c->nranks, admitted, SETUP_CHECK_PERIOD_S));
        n = 1;
        for (int r = 1; r < c->nranks; r++) n += admitted[r];
        if (n < c->nranks) NCL_CHECK(setup_checks(c, note, deadline, admitted, what));
    }
    return NCL_OK;
}

/* Wait until every rank is counted in; name the missing ones otherwise.  Until then no rank
 * has finished setup, so an attached rank that died or gave up, and the note removed (the
 * missing ranks could not name rank 0 if it died), are errors at once.  The wait sleeps on the
 * attach count (a futex each attaching rank wakes), so the last one releases everybody at once. */
static int wait_all_attached(ncl_comm* c, double deadline) {
    for (double next_check = ncl_now() + SETUP_CHECK_PERIOD_S;;) {
        uint32_t seen = atomic_load(&c->hdr->attached);
        if (seen >= (uint32_t)c->nranks) return NCL_OK;
        double now = ncl_now();
        if (now >= next_check) {
            next_check = now + SETUP_CHECK_PERIOD_S;
            NCL_CHECK(setup_checks(c, c->name, deadline, NULL, "communicator setup"));
        }
        ncl_futex_wait(&c->hdr->attached, &c->hdr->attach_waiters, seen, SETUP_CHECK_PERIOD_S);
    }
}

/* Rank 0's part before the segment exists: the door bound (so that nobody else can take its name),
 * then the note, then the segment.  On failure nothing is left. */
static int create_as_rank0(const char* name, const char* key, size_t bytes, int* door, int* fd, ino_t* ino) {
    NCL_CHECK(ncl_door_open(key, "", door));
    int rc = note_create(name, ino);
    if (rc == NCL_OK && (rc = ncl_shm_create(bytes, fd, false)) != NCL_OK) shm_unlink(name);
    if (rc != NCL_OK) close(*door);
    return rc;
}

int ncl_comm_create(const char* name, const char* key, int rank, int nranks, const ncl_options* opts,
                    ncl_comm** out) {
    if (!name || name[0] != '/' || strlen(name) >= sizeof(((ncl_comm*)0)->name) || strchr(name + 1, '/'))
        return ncl_error(NCL_ERR_ARGUMENT, "segment name must be '/' followed by at most 254 characters, no '/'");
    if (!key || strlen(key) != NCL_KEY_CHARS)
        return ncl_error(NCL_ERR_ARGUMENT, "a group's key must be %d characters", NCL_KEY_CHARS);
    if (nranks < 1 || nranks > NCL_MAX_RANKS || rank < 0 || rank >= nranks)
        return ncl_error(NCL_ERR_ARGUMENT, "rank %d of %d is out of range (1..%d ranks)", rank, nranks, NCL_MAX_RANKS);
    if (!opts || opts->staging_bytes < 4096 || opts->p2p_bytes < 4096 || !(opts->timeout_s > 0))
        return ncl_error(NCL_ERR_ARGUMENT, "options: staging and p2p buffers need >= 4096 bytes, timeout > 0");
    size_t slot = opts->staging_bytes / 2 / NCL_CACHE_LINE * NCL_CACHE_LINE;
    size_t pslot = opts->p2p_bytes / 2 / NCL_CACHE_LINE * NCL_CACHE_LINE;
    if (slot < 16 * (size_t)nranks)
        return ncl_error(NCL_ERR_ARGUMENT, "NCL_BUFFSIZE of %zu bytes is too small for %d ranks (need %zu)",
                         opts->staging_bytes, nranks, 32 * (size_t)nranks);
    ncl_header want;
    memset(&want, 0, sizeof want);
    layout(&want, nranks, slot, pslot);

    double deadline = ncl_now() + opts->timeout_s;
    int fd = -1, door = -1;
    ino_t note_ino = 0;
    NCL_CHECK(rank == 0 ? create_as_rank0(name, key, want.total_bytes, &door, &fd, &note_ino)
                        : ncl_shm_receive(key, "", rank, name, want.total_bytes, deadline, &fd, NULL));
    void* base = mmap(NULL, want.total_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int map_err = errno;
    ncl_comm* c = base == MAP_FAILED ? NULL : calloc(1, sizeof *c);
    uint32_t* counters = calloc(2 * (size_t)nranks, sizeof *counters);
    ncl_flight_entry* flight = opts->flight_entries ? calloc(opts->flight_entries, sizeof *flight) : NULL;
    if (!c || !counters || (opts->flight_entries && !flight)) {
        free(c);
        free(counters);
        free(flight);
        close(fd);
        if (rank == 0) close(door), shm_unlink(name);
        if (base == MAP_FAILED)
            return ncl_error(NCL_ERR_SYSTEM, "cannot map shared-memory segment %s (%zu bytes): %s", name,
                             (size_t)want.total_bytes, strerror(map_err));
        munmap(base, want.total_bytes);
        return ncl_error(NCL_ERR_SYSTEM, "out of memory creating a communicator");
    }
    c->rank = rank;
    c->nranks = nranks;
    c->base = base;
    c->map_bytes = want.total_bytes;
    c->hdr = base;
    c->slot_bytes = slot;
    c->p2p_slot_bytes = pslot;
    c->p2p_sent = counters;
    c->p2p_recvd = counters + nranks;
    c->flight = flight;
    c->flight_cap = flight ? opts->flight_entries : 0;
    c->verify_calls = opts->verify_calls != 0;
    c->timeout_s = opts->timeout_s;
    c->spin_us = opts->spin_us;
    c->yield_us = opts->yield_us;
    c->cpus = count_cpus();
    c->cache_bytes = last_level_cache_bytes();
    /* Ranks outside this group count too (a sub-communicator, an emulated host): they need
     * the same CPUs, so a spinning waiter would steal theirs. */
    c->oversubscribed = (int)ncl_max((size_t)nranks, opts->host_ranks) > c->cpus;
    c->out_stream_min_bytes = ncl_output_stream_min_bytes(c);
    c->one_shot_max_bytes = opts->one_shot_max_bytes;
    c->direct_min_bytes = opts->direct_min_bytes;
    c->cma_min_bytes = opts->cma_min_bytes;
    c->cma_all_reduce_min_bytes = opts->cma_all_reduce_min_bytes;
    c->streaming = opts->streaming;
    pthread_mutex_init(&c->win_lock, NULL);
    strcpy(c->name, name);
    strcpy(c->key, key);

    if (rank == 0) {
        want.central_sync = c->oversubscribed;
        want.note_ino = note_ino;
        memcpy((char*)c->hdr + sizeof(uint32_t), (char*)&want + sizeof(uint32_t), sizeof want - sizeof(uint32_t));
        atomic_store_explicit(&c->hdr->magic, NCL_MAGIC, memory_order_release);
    } else if (atomic_load_explicit(&c->hdr->magic, memory_order_acquire) != NCL_MAGIC) {
        close(fd);
        ncl_comm_destroy(c); /* rank 0 hands the segment out only once it is laid out */
        return ncl_error(NCL_ERR_MISMATCH, "segment %s was handed over without its header", name);
    }
    if (c->hdr->nranks != want.nranks || c->hdr->slot_bytes != want.slot_bytes ||
        c->hdr->p2p_slot_bytes != want.p2p_slot_bytes || c->hdr->staging_off != want.staging_off) {
        close(fd);
        ncl_comm_destroy(c);
        return ncl_error(NCL_ERR_MISMATCH, "segment %s was laid out for other options than this rank's: ranks "
                         "disagree on the world size, NCL_BUFFSIZE or NCL_P2P_BUFFSIZE", name);
    }
    c->central_sync = c->hdr->central_sync != 0;
    c->staging_off = want.staging_off;
    c->p2p_off = want.p2p_off;
    c->ranks = (ncl_rank_ctrl*)(c->base + want.rank_ctrl_off);
    c->pairs = (ncl_pair_ctrl*)(c->base + want.pair_ctrl_off);
    /* Staging pages are not faulted in here: a fresh page costs ~2 us to allocate and clear here, 2-3 ms for
     * 4 MiB of staging, which made setup (split, new_group) 10-30 ms on a loaded host.  Like the send/recv
     * slots, they fault in on first use: a small call touches one page. */
    ncl_cma_publish_probe(c);
    atomic_store(&c->ranks[rank].pid, (int32_t)getpid());
    if (atomic_fetch_add(&c->hdr->attached, 1) + 1 == (uint32_t)nranks) shm_unlink(name);
    ncl_wake_word(&c->hdr->attached, &c->hdr->attach_waiters);
    int rc = rank == 0 ? ncl_shm_hand_out(c, door, fd, deadline, "communicator setup", name) : NCL_OK;
    close(fd);
    if (rank == 0) close(door); /* every rank has the segment: its door's name is gone */
    if (rc == NCL_OK) rc = wait_all_attached(c, deadline);
    if (rc == NCL_OK) rc = ncl_cma_agree(c, opts->cma_min_bytes > 0, deadline);
    if (rc != NCL_OK) {
        snprintf(c->ranks[rank].abort_reason, sizeof c->ranks[rank].abort_reason, "setup failed: %s",
                 ncl_last_error());
        atomic_store(&c->ranks[rank].aborted, NCL_ABORTED);
        shm_unlink(name); /* nobody else may join now */
        ncl_comm_destroy(c);
        return rc;
    }
    *out = c;
    return NCL_OK;
}

int ncl_comm_destroy(ncl_comm* c) {
    if (!c) return NCL_OK;
    if (c->ranks) { /* peers still waiting for this rank learn at once that it left */
        uint32_t none = 0;
        atomic_compare_exchange_strong(&c->ranks[c->rank].aborted, &none, NCL_CLOSED);
        ncl_wake_waiters(c);
    }
    if (c->base) munmap(c->base, c->map_bytes);
    ncl_windows_detach(c);
    pthread_mutex_destroy(&c->win_lock);
    free(c->p2p_sent);
    free(c->cma_scratch);
    free(c->flight);
    free(c);
    return NCL_OK;
}

uint64_t ncl_comm_segment_bytes(const ncl_comm* c) { return c ? c->map_bytes : 0; }

int ncl_comm_set_timeout(ncl_comm* c, double timeout_s) {
    if (!c || !(timeout_s > 0)) return ncl_error(NCL_ERR_ARGUMENT, "timeout must be > 0 seconds");
    c->timeout_s = timeout_s;
    return NCL_OK;
}
