/* wait.c: waiting for a peer's counter, fit for idle and oversubscribed hosts alike.
 *
 * Three phases: spin (cheapest wake-up, but steals the core a peer may need: skipped when the
 * host is oversubscribed, or when the peer posted its last step from this CPU), then
 * sched_yield (lets a runnable peer have the core), then sleep on a futex with the
 * counter as the futex word.  A poster wakes sleepers only when one is registered, so
 * the common path costs one atomic load.  Every phase checks the deadline and, about
 * every 50 ms, that the peers are still alive (pid exists and is not a zombie, and has
 * not set its aborted flag), so a dead peer is reported within a fraction of a second.
 * On the process's main thread every wait also calls the interrupt hook at least every
 * 50 ms, so that signal handlers (Ctrl-C) run during a wait and may end it. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define LIVENESS_PERIOD_S 0.05
#define INTERRUPT_PERIOD_S 0.05
#define FUTEX_SLICE_NS 20000000L /* re-check liveness and deadline at least this often */

double ncl_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static bool reached(_Atomic uint32_t* word, uint32_t target) {
    return (int32_t)(atomic_load_explicit(word, memory_order_acquire) - target) >= 0;
}

/* A pid that exists may still be a zombie (dead, parent has not reaped it yet). */
bool ncl_pid_running(pid_t pid) {
    if (pid <= 0) return true; /* not attached yet: not ours to judge */
    if (kill(pid, 0) != 0 && errno == ESRCH) return false;
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE* f = fopen(path, "r");
    if (!f) return true;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    const char* close_paren = strrchr(buf, ')'); /* the command name may contain spaces */
    return !(close_paren && (close_paren[2] == 'Z' || close_paren[2] == 'X'));
}

static _Atomic(ncl_interrupt_hook) interrupt_hook;

void ncl_set_interrupt_hook(ncl_interrupt_hook hook) { atomic_store(&interrupt_hook, hook); }

/* Signal handlers run on the main thread only: other threads never call the hook (and never
 * wait for the interpreter's lock to do so). */
static bool on_main_thread(void) {
    static _Thread_local int main_thread = -1;
    if (main_thread < 0) main_thread = syscall(SYS_gettid) == getpid();
    return main_thread;
}

int ncl_interrupted(const char* what) {
    static _Thread_local double next_poll;
    ncl_interrupt_hook hook = atomic_load_explicit(&interrupt_hook, memory_order_relaxed);
    if (!hook || !on_main_thread()) return NCL_OK;
    double now = ncl_now();
    if (now < next_poll) return NCL_OK;
    next_poll = now + INTERRUPT_PERIOD_S;
    char reason[128] = "";
    if (!hook(reason, sizeof reason)) return NCL_OK;
    reason[sizeof reason - 1] = 0;
    return ncl_error(NCL_ERR_INTERRUPTED, "%s: interrupted by %s", what, reason[0] ? reason : "a signal handler");
}

/* A peer's text from shared memory, as safe text: bounded, and every byte that is not
 * printable ASCII (terminal escapes, newlines) written as \xNN. */
static void safe_text(char* out, size_t cap, const char* in, size_t in_len) {
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    for (size_t i = 0; i < in_len && in[i] && o + 5 <= cap; i++) {
        unsigned char ch = (unsigned char)in[i];
        if (ch >= 0x20 && ch < 0x7f) {
            out[o++] = (char)ch;
        } else {
            out[o++] = '\\', out[o++] = 'x', out[o++] = hex[ch >> 4], out[o++] = hex[ch & 15];
        }
    }
    out[o] = 0;
}

/* NCL_OK while `peer` (or, for peer < 0, every other rank) is alive and in the group.  Ranks
 * that died without leaving word are looked for first: they are the root cause of the abort
 * flags others raise.  A rank that left word (aborted, then maybe exited) is reported by it. */
int ncl_peer_alive(ncl_comm* c, int peer) {
    int lo = peer < 0 ? 0 : peer, hi = peer < 0 ? c->nranks : peer + 1;
    for (int r = lo; r < hi; r++) {
        pid_t pid = atomic_load(&c->ranks[r].pid);
        if (r != c->rank && !atomic_load(&c->ranks[r].aborted) && !ncl_pid_running(pid))
            return ncl_error(NCL_ERR_PEER, "rank %d (pid %d) died", r, (int)pid);
    }
    for (int r = lo; r < hi; r++) {
        uint32_t gone = r == c->rank ? 0 : atomic_load(&c->ranks[r].aborted);
        if (gone == NCL_CLOSED) return ncl_error(NCL_ERR_PEER, "rank %d closed its communicator", r);
        if (gone) { /* a peer that timed out makes this a timeout too: the cause is the same */
            char raw[sizeof c->ranks[r].abort_reason], reason[4 * sizeof raw + 1];
            memcpy(raw, c->ranks[r].abort_reason, sizeof raw); /* one copy: the peer may still write */
            safe_text(reason, sizeof reason, raw, sizeof raw);  /* never trust shared memory's bytes */
            int status = c->ranks[r].abort_status == NCL_ERR_TIMEOUT ? NCL_ERR_TIMEOUT : NCL_ERR_PEER;
            return ncl_error(status, "rank %d aborted the group: %s", r, reason[0] ? reason : "no reason given");
        }
    }
    return NCL_OK;
}

/* Which ranks have left the group for good (what shrink excludes by default): out[r] = 1
 * when rank r's process is gone (dead, or a zombie), 2 when it closed its communicator,
 * 0 otherwise.  A living rank that aborted, or failed with the group, is still 0: it may
 * join the survivors. */
int ncl_comm_gone_ranks(ncl_comm* c, uint8_t* out) {
    if (!c || !out) return ncl_error(NCL_ERR_ARGUMENT, "ncl_comm_gone_ranks needs a communicator and nranks bytes");
    for (int r = 0; r < c->nranks; r++)
        out[r] = r == c->rank ? 0 : !ncl_pid_running(atomic_load(&c->ranks[r].pid)) ? 1
                 : atomic_load(&c->ranks[r].aborted) == NCL_CLOSED ? 2 : 0;
    return NCL_OK;
}

static void futex_wait(_Atomic uint32_t* word, uint32_t seen) {
    struct timespec ts = {0, FUTEX_SLICE_NS};
    syscall(SYS_futex, (uint32_t*)word, FUTEX_WAIT, seen, &ts, NULL, 0);
}

void ncl_futex_wait(_Atomic uint32_t* word, _Atomic uint32_t* waiters, uint32_t seen, double slice_s) {
    struct timespec ts = {(time_t)slice_s, (long)((slice_s - (double)(time_t)slice_s) * 1e9)};
    atomic_fetch_add(waiters, 1); /* registered before the last look: a poster after it wakes us */
    if (atomic_load(word) == seen) syscall(SYS_futex, (uint32_t*)word, FUTEX_WAIT, seen, &ts, NULL, 0);
    atomic_fetch_sub(waiters, 1);
}

void ncl_wake_word(_Atomic uint32_t* word, _Atomic uint32_t* waiters) {
    if (atomic_load(waiters) != 0) syscall(SYS_futex, (uint32_t*)word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

void ncl_post_word(_Atomic uint32_t* word, _Atomic uint32_t* waiters, uint32_t value) {
    atomic_store(word, value); /* seq_cst: ordered before the waiters load (Dekker with the waiter) */
    ncl_wake_word(word, waiters);
}

void ncl_own_reason(ncl_comm* c, char* out, size_t cap) {
    size_t n = ncl_min(cap, sizeof c->ranks[c->rank].abort_reason);
    memcpy(out, c->ranks[c->rank].abort_reason, n);
    out[n - 1] = 0;
}

/* Periodic checks: deadline and liveness.  `watch` is the peer whose death matters.  This rank
 * having left the group meanwhile (abort or revoke from another thread) ends the wait too. */
static int check_peers(ncl_comm* c, int watch, double now, double deadline, double* next_check, const char* what) {
    if (now < *next_check) return NCL_OK;
    *next_check = now + LIVENESS_PERIOD_S;
    NCL_CHECK(ncl_interrupted(what));
    if (atomic_load(&c->ranks[c->rank].aborted) == NCL_ABORTED) {
        char reason[sizeof c->ranks[c->rank].abort_reason];
        ncl_own_reason(c, reason, sizeof reason);
        return ncl_error(NCL_ERR_STATE, "%s: this rank left the group meanwhile: %s", what, reason);
    }
    int rc = ncl_peer_alive(c, watch);
    if (rc != NCL_OK) {
        char msg[768];
        snprintf(msg, sizeof msg, "%s", ncl_last_error());
        return ncl_error(rc, "%s: %s", what, msg);
    }
    if (now > deadline) return ncl_error(NCL_ERR_TIMEOUT, "%s: timed out after %.1f s", what, c->timeout_s);
    return NCL_OK;
}

static int wait_word(ncl_comm* c, int watch, _Atomic uint32_t* word, _Atomic uint32_t* waiters, uint32_t target,
                     double deadline, const char* what, bool spin) {
    if (reached(word, target)) return NCL_OK;
    double start = ncl_now(), now = start, next_check = start + LIVENESS_PERIOD_S;
    /* Phase 1: spin, unless the peer needs our core. */
    double spin_until = start + c->spin_us * 1e-6;
    for (unsigned i = 1; spin; i++) {
        cpu_relax();
        if (reached(word, target)) return NCL_OK;
        if ((i & 63) == 0) { /* a long NCL_SPIN_US still checks peers and interrupts */
            if ((now = ncl_now()) > spin_until) break;
            NCL_CHECK(check_peers(c, watch, now, deadline, &next_check, what));
        }
    }
    /* Phase 2: yield the core to whoever is runnable. */
    double yield_until = now + c->yield_us * 1e-6;
    while (now < yield_until) {
        sched_yield();
        if (reached(word, target)) return NCL_OK;
        now = ncl_now();
        NCL_CHECK(check_peers(c, watch, now, deadline, &next_check, what));
    }
    /* Phase 3: sleep on the futex; register first so that the poster knows to wake us. */
    for (;;) {
        atomic_fetch_add(waiters, 1);
        uint32_t seen = atomic_load(word);
        if ((int32_t)(seen - target) < 0) futex_wait(word, seen);
        atomic_fetch_sub(waiters, 1);
        if (reached(word, target)) return NCL_OK;
        now = ncl_now();
        NCL_CHECK(check_peers(c, watch, now, deadline, &next_check, what));
    }
}

/* Spinning holds the core: with the host oversubscribed, or with the peer last seen on this CPU
 * (other jobs hold the other one), the peer cannot run until we yield.  Two-shot waits twice a
 * call, and so lost 2 x NCL_SPIN_US a call to one-shot whenever the ranks shared a core (2026-12). */
int ncl_wait_word(ncl_comm* c, int watch, _Atomic uint32_t* word, _Atomic uint32_t* waiters, uint32_t target,
                  double deadline, const char* what) {
    return wait_word(c, watch, word, waiters, target, deadline, what, !c->oversubscribed);
}

void ncl_post_step(ncl_comm* c, uint32_t s) {
    ncl_rank_ctrl* me = &c->ranks[c->rank];
    atomic_store_explicit(&me->cpu, sched_getcpu(), memory_order_relaxed); /* the step's store publishes it */
    ncl_post_word(&me->step, &me->waiters, s);
}

int ncl_wait_step(ncl_comm* c, int r, uint32_t s, double deadline, const char* what) {
    ncl_rank_ctrl* peer = &c->ranks[r];
    if (reached(&peer->step, s)) return NCL_OK; /* the common case: no CPU to look up */
    bool spin = !c->oversubscribed && atomic_load_explicit(&peer->cpu, memory_order_relaxed) != sched_getcpu();
    return wait_word(c, -1, &peer->step, &peer->waiters, s, deadline, what, spin);
}
