/* handover_probe.c: what a staged two-shot all-reduce of two processes costs on this host, with
 * no library in the way, as the two choices that ncl's staging makes vary (native/step.c,
 * ncl_reader_turn in native/internal.h):
 *   - slots: how many staging slots each side cycles through (ncl once used 2, alternately; its
 *     ring now uses ~2 slots' worth of small ones): a line is written again only after `slots`
 *     steps, and a line that the reader still holds in its cache must first be taken from it;
 *   - order: whether both sides gather the reduced blocks in rank order (both reading block 0,
 *     then block 1: the same lines at once) or each from its own block on.
 * Two threads pinned to CPUs 0 and 1 (the memory behaves as between processes), float32 sums.
 * Per call: copy the other half of my input into my slot, barrier, sum my half of both inputs
 * into my next slot, barrier, copy both halves of the output from the two slots, in ORDER:
 * ncl's two-shot at 2 ranks as it was before it also summed its own half straight into the
 * output (native/all_reduce.c), where the order mattered.
 *
 *     cc -O2 -pthread -o handover_probe handover_probe.c
 *     ./handover_probe BYTES SLOTS ORDER    (ORDER: rank or own; prints µs per call)
 *     for s in 2 8 32; do ./handover_probe 262144 $s own; done
 * The host's speed changes within seconds (benchmarks/results/staging_ring.md): compare rows
 * run back to back, several times. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_SLOTS 64
#define CALLS 2000

static size_t bytes, slots;
static int own_first;
static float *input[2], *output[2], *slot[2][MAX_SLOTS];
static _Alignas(64) _Atomic long arrived[2][16]; /* each on its own line */
static double seconds[2];

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void barrier(int me, long* gen) {
    atomic_store_explicit(&arrived[me][0], ++*gen, memory_order_release);
    while (atomic_load_explicit(&arrived[1 - me][0], memory_order_acquire) < *gen) sched_yield();
}

static void sum(float* a, const float* x, const float* y, size_t n) {
    for (size_t i = 0; i < n; i++) a[i] = x[i] + y[i];
}

static void* run(void* arg) {
    int me = (int)(long)arg, peer = 1 - me;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(me, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    size_t half = bytes / 2 / sizeof(float);
    long gen = 0;
    double t0 = 0;
    for (int call = 0; call < CALLS; call++) {
        if (call == CALLS / 4) t0 = now(); /* the first quarter warms up */
        size_t in = (2 * (size_t)call) % slots, out = (2 * (size_t)call + 1) % slots;
        barrier(me, &gen);
        memcpy(slot[me][in] + peer * half, input[me] + peer * half, half * sizeof(float));
        barrier(me, &gen);
        sum(slot[me][out] + me * half, input[me] + me * half, slot[peer][in] + me * half, half);
        barrier(me, &gen);
        for (int i = 0; i < 2; i++) {
            int r = own_first ? (me + i) % 2 : i;
            memcpy(output[me] + r * half, slot[r][out] + r * half, half * sizeof(float));
        }
    }
    seconds[me] = now() - t0;
    return NULL;
}

int main(int argc, char** argv) {
    if (argc != 4 || !(bytes = strtoull(argv[1], NULL, 0)) || bytes % 128 || !(slots = strtoull(argv[2], NULL, 0)) ||
        slots < 2 || slots > MAX_SLOTS || slots % 2 || (strcmp(argv[3], "rank") && strcmp(argv[3], "own"))) {
        fprintf(stderr, "usage: %s BYTES (a multiple of 128) SLOTS (even, 2..%d) ORDER (rank or own)\n", argv[0],
                MAX_SLOTS);
        return 2;
    }
    own_first = strcmp(argv[3], "own") == 0;
    for (int r = 0; r < 2; r++) {
        input[r] = aligned_alloc(4096, bytes), output[r] = aligned_alloc(4096, bytes);
        memset(input[r], 0, bytes), memset(output[r], 0, bytes);
        for (size_t s = 0; s < slots; s++) slot[r][s] = aligned_alloc(4096, bytes), memset(slot[r][s], 0, bytes);
    }
    pthread_t t[2];
    for (long r = 0; r < 2; r++) pthread_create(&t[r], NULL, run, (void*)r);
    for (int r = 0; r < 2; r++) pthread_join(t[r], NULL);
    double us = (seconds[0] > seconds[1] ? seconds[0] : seconds[1]) / (CALLS - CALLS / 4) * 1e6;
    printf("%zu bytes, %zu slots, %s order: %.1f us per call\n", bytes, slots, argv[3], us);
    return 0;
}
