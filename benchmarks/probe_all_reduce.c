/* probe_all_reduce.c: what this host allows a 2-process float32 all-reduce, with no library
 * in the way: the reference that registered ncl buffers (comm.empty) are held to.
 *
 * Both processes' inputs and outputs already live in one shared mapping (as registered
 * buffers do).  Per call: barrier, each rank sums its half of both inputs into its own
 * output, barrier, each copies the other half from the peer's output.  The next call's
 * barrier keeps a rank from overwriting what its peer still reads.  Flags sit on their own
 * cache lines and are spun on, yielding the core after a while (a pure spin collapses when
 * the host has other work: the peer waits for a core the spinner holds); every wait gives up
 * after TIMEOUT_S (no hang if a rank dies).
 *
 *     cc -O3 -march=native -o probe probe_all_reduce.c && ./probe 1048576 16777216 67108864
 * prints per size: bytes, µs per call (the slower rank's mean), busbw in GB/s (= algbw at 2 ranks). */
#define _GNU_SOURCE
#include <immintrin.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define LINE 64
#define TIMEOUT_S 30.0
#define MIN_SECONDS 0.2 /* each size repeats until it lasts about this long */

typedef struct {
    _Alignas(LINE) _Atomic uint64_t phase[2][LINE / 8]; /* phase[r][0]: rank r's barrier count */
    _Alignas(LINE) _Atomic uint64_t iters;              /* rank 0 decides, rank 1 reads */
    double seconds[2];
} control;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void barrier(control* c, int rank, uint64_t* count) {
    atomic_store_explicit(&c->phase[rank][0], ++*count, memory_order_release);
    double deadline = now() + TIMEOUT_S;
    for (unsigned i = 0; atomic_load_explicit(&c->phase[1 - rank][0], memory_order_acquire) < *count; i++) {
        _mm_pause();
        if (i > 4096) sched_yield();
        if ((i & 0xfff) == 0 && now() > deadline) {
            fprintf(stderr, "probe rank %d: peer rank %d never reached barrier %llu\n", rank, 1 - rank,
                    (unsigned long long)*count);
            exit(2);
        }
    }
}

static void all_reduce(float* const in[2], float* const out[2], size_t count, int rank) {
    size_t half = count / 2 / 16 * 16, lo = rank ? half : 0, hi = rank ? count : half;
    float *a = in[0], *b = in[1], *mine = out[rank];
    for (size_t i = lo; i < hi; i++) mine[i] = a[i] + b[i];
    (void)out;
}

static void copy_peer_half(float* const out[2], size_t count, int rank) {
    size_t half = count / 2 / 16 * 16, lo = rank ? 0 : half, hi = rank ? half : count;
    memcpy(out[rank] + lo, out[1 - rank] + lo, (hi - lo) * sizeof(float));
}

static double run(control* c, float* const in[2], float* const out[2], size_t count, int rank, uint64_t iters,
                  uint64_t* barriers) {
    barrier(c, rank, barriers);
    double t0 = now();
    for (uint64_t it = 0; it < iters; it++) {
        barrier(c, rank, barriers);
        all_reduce(in, out, count, rank);
        barrier(c, rank, barriers);
        copy_peer_half(out, count, rank);
    }
    barrier(c, rank, barriers); /* the last copy is part of the call */
    return (now() - t0) / (double)iters;
}

int main(int argc, char** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s BYTES...  (float32 all-reduce sizes, 2 processes)\n", argv[0]);
        return 1;
    }
    size_t largest = 0;
    for (int i = 1; i < argc; i++) {
        long long v = atoll(argv[i]);
        if (v < 64) {
            fprintf(stderr, "sizes must be >= 64 bytes, not %s\n", argv[i]);
            return 1;
        }
        if ((size_t)v > largest) largest = (size_t)v;
    }
    size_t buf = (largest + 4095) / 4096 * 4096, total = 4096 + 4 * buf;
    uint8_t* base = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    memset(base, 0, total); /* resident before any timing */
    control* c = (control*)base;
    float* in[2] = {(float*)(base + 4096), (float*)(base + 4096 + buf)};
    float* out[2] = {(float*)(base + 4096 + 2 * buf), (float*)(base + 4096 + 3 * buf)};
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 1;
    }
    int rank = child == 0;
    if (rank == 1) prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlives rank 0 */
    for (size_t i = 0; i < largest / sizeof(float); i++) in[rank][i] = (float)((i + rank) % 4 + 1);
    uint64_t barriers = 0;
    for (int s = 1; s < argc; s++) {
        size_t count = (size_t)atoll(argv[s]) / sizeof(float);
        run(c, in, out, count, rank, 3, &barriers); /* warm-up */
        if (rank == 0) { /* enough calls to last MIN_SECONDS, from a short first measurement */
            double guess = run(c, in, out, count, rank, 5, &barriers);
            uint64_t iters = (uint64_t)(MIN_SECONDS / (guess > 1e-7 ? guess : 1e-7)) + 1;
            atomic_store(&c->iters, iters < 100000 ? iters : 100000);
        } else {
            run(c, in, out, count, rank, 5, &barriers);
        }
        barrier(c, rank, &barriers);
        c->seconds[rank] = run(c, in, out, count, rank, atomic_load(&c->iters), &barriers);
        barrier(c, rank, &barriers);
        if (rank == 0) {
            for (size_t i = 0; i < count; i += 4097) { /* the sum of (i%4+1) and ((i+1)%4+1) */
                float want = (float)(i % 4 + 1 + (i + 1) % 4 + 1);
                if (out[0][i] != want || out[1][i] != want) {
                    fprintf(stderr, "probe: wrong result at %zu: %g %g, want %g\n", i, out[0][i], out[1][i], want);
                    return 3;
                }
            }
            double t = c->seconds[0] > c->seconds[1] ? c->seconds[0] : c->seconds[1];
            printf("%zu %.3f %.3f\n", count * sizeof(float), t * 1e6, count * sizeof(float) / t / 1e9);
            fflush(stdout);
        }
    }
    if (rank == 1) _exit(0);
    int status;
    waitpid(child, &status, 0);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 4;
}
