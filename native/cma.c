/* cma.c: single-copy transfers of unregistered buffers through cross-memory attach
 * (process_vm_readv), as MPICH and Open MPI do for large messages.
 *
 * Staging costs two copies per byte (into the sender's slot, out of it); reading the peer's
 * buffer where it is costs one.  The kernel allows it between processes of one user unless a
 * security policy forbids it (Yama ptrace_scope, a container's seccomp profile), so every
 * communicator finds out when it is created: each rank reads a known word from the next rank's
 * memory, and the group uses CMA only if every rank could (and none set NCL_CMA=0).  Addresses
 * come from peers through shared memory and are not trusted: the kernel checks them against
 * the peer's address space, and lengths are always this rank's own. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <string.h>
#include <sys/uio.h>

#include "internal.h"

static const uint64_t probe_word = 0x6e636c2d636d6121ull; /* "ncl-cma!" */

void ncl_cma_publish_probe(ncl_comm* c) { c->ranks[c->rank].probe_addr = (uint64_t)(uintptr_t)&probe_word; }

static bool probe(ncl_comm* c, int peer) {
    uint64_t got = 0;
    struct iovec local = {&got, sizeof got}, remote = {(void*)(uintptr_t)c->ranks[peer].probe_addr, sizeof got};
    return process_vm_readv(atomic_load(&c->ranks[peer].pid), &local, 1, &remote, 1, 0) == (ssize_t)sizeof got &&
           got == probe_word;
}

int ncl_cma_agree(ncl_comm* c, bool allowed, double deadline) {
    bool ok = allowed && c->nranks > 1 && probe(c, (c->rank + 1) % c->nranks);
    atomic_store(&c->ranks[c->rank].cma_state, ok ? 1 : 2);
    c->cma = true;
    for (int r = 0; r < c->nranks; r++) {
        uint32_t state;
        for (unsigned i = 0; (state = atomic_load(&c->ranks[r].cma_state)) == 0; i++) {
            if ((i & 255) == 255) {
                NCL_CHECK(ncl_peer_alive(c, r));
                NCL_CHECK(ncl_interrupted("communicator setup"));
                if (ncl_now() > deadline)
                    return ncl_error(NCL_ERR_TIMEOUT, "communicator setup: rank %d never reported its CMA probe", r);
            }
            sched_yield();
        }
        c->cma = c->cma && state == 1;
    }
    return NCL_OK;
}

int ncl_cma_read(ncl_comm* c, int peer, void* local, uint64_t remote, size_t bytes) {
    uint8_t* dst = local;
    pid_t pid = atomic_load(&c->ranks[peer].pid);
    while (bytes) {
        struct iovec l = {dst, bytes}, r = {(void*)(uintptr_t)remote, bytes};
        ssize_t got = process_vm_readv(pid, &l, 1, &r, 1, 0);
        int err = errno;
        if (got <= 0) { /* a peer dying under us shows as ESRCH, EFAULT or nothing read: name it */
            for (double give_up = ncl_now() + 0.2;;) { /* it may still be on its way out */
                int alive = ncl_peer_alive(c, peer);
                if (alive != NCL_OK) return alive;
                if (ncl_now() > give_up) break;
                sched_yield();
            }
            if (err == ESRCH) return ncl_error(NCL_ERR_PEER, "rank %d (pid %d) died", peer, (int)pid);
            return ncl_error(NCL_ERR_SYSTEM, "reading %zu bytes from rank %d (pid %d) with process_vm_readv: %s; "
                             "set NCL_CMA=0 to stage every message through shared memory instead",
                             bytes, peer, (int)pid, got < 0 ? strerror(err) : "nothing read");
        }
        dst += got, remote += (uint64_t)got, bytes -= (size_t)got;
    }
    return NCL_OK;
}

bool ncl_use_cma(const ncl_comm* c, size_t bytes) { return c->cma && bytes >= c->cma_min_bytes && bytes > 0; }

int ncl_cma_exchange(ncl_comm* c, const void* mine, ncl_fingerprint* fp) {
    ncl_call_path(c, "cma");
    fp->extra |= NCL_EXTRA_CMA; /* ranks that would stage instead get a mismatch, not garbage */
    *(uint64_t*)ncl_step_begin(c, sizeof(uint64_t)) = (uint64_t)(uintptr_t)mine;
    return ncl_step_sync(c, fp);
}

uint64_t ncl_cma_peer_addr(ncl_comm* c, int peer) { return *(const uint64_t*)ncl_step_peer_slot(c, peer); }
