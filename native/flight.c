/* flight.c: the flight recorder, a ring of this rank's last calls on a communicator, and
 * what a communicator decided at setup.
 *
 * Every public call is recorded when it begins (after its arguments passed the checks) and
 * completed when it returns, with the path it took and how many steps it finished, so that
 * after a timeout or a dead peer each rank can say which call it was in and how far it got
 * (python: ncl/flight.py dumps it as a Chrome trace).  Recording is a few stores and two
 * clock reads per call, in private memory: nothing is shared, nothing waits.
 * A reader on another thread may see an entry half-written; the dump is diagnostic only. */
#include <string.h>

#include "internal.h"

void ncl_call_begin(ncl_comm* c, int coll, int dtype, size_t count, int op, int root) {
    if (!c->flight_cap) return;
    c->calls++;
    ncl_flight_entry* e = &c->flight[(c->calls - 1) % c->flight_cap];
    *e = (ncl_flight_entry){.seq = c->calls, .coll = coll, .dtype = dtype, .op = op, .root = root,
                            .count = count, .first_step = c->step, .status = -1, .t_begin = ncl_now(),
                            .algorithm = coll == NCL_COLL_SEND || coll == NCL_COLL_RECV ? "p2p"
                                         : coll == NCL_COLL_BARRIER                        ? "-"
                                                                                           : "staged"};
    c->current = e;
}

void ncl_call_path(ncl_comm* c, const char* algorithm) {
    if (c->current) c->current->algorithm = algorithm;
}

void ncl_call_stores(ncl_comm* c, bool streaming) {
    if (c->current) c->current->stores = streaming ? 1 : 2;
}

int ncl_call_end(ncl_comm* c, int status) {
    ncl_flight_entry* e = c->current;
    if (e) {
        e->steps = c->step - e->first_step;
        e->status = status;
        e->t_end = ncl_now();
        c->current = NULL;
    }
    return ncl_fail(c, status);
}

int ncl_flight_entries(const ncl_comm* c, ncl_flight_entry* out, int cap) {
    if (!c || !out || cap <= 0 || !c->flight_cap) return 0;
    uint64_t n = ncl_min(ncl_min(c->calls, c->flight_cap), (uint64_t)cap);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t seq = c->calls - n + i + 1;
        out[i] = c->flight[(seq - 1) % c->flight_cap];
        if (out[i].status < 0) out[i].steps = c->step - out[i].first_step; /* progress so far */
    }
    return (int)n;
}

int ncl_comm_peer_steps(const ncl_comm* c, uint32_t* out) {
    if (!c || !out) return ncl_error(NCL_ERR_ARGUMENT, "ncl_comm_peer_steps needs a communicator and an array");
    for (int r = 0; r < c->nranks; r++) out[r] = atomic_load(&c->ranks[r].step);
    return NCL_OK;
}

int ncl_comm_get_info(const ncl_comm* c, ncl_comm_info* out) {
    if (!c || !out) return ncl_error(NCL_ERR_ARGUMENT, "ncl_comm_get_info needs a communicator and an output");
    *out = (ncl_comm_info){.segment_bytes = c->map_bytes, .slot_bytes = c->slot_bytes,
                           .p2p_slot_bytes = c->p2p_slot_bytes, .cpus = c->cpus,
                           .oversubscribed = c->oversubscribed, .central_sync = c->central_sync, .cma = c->cma,
                           .cache_bytes = c->cache_bytes,
                           .out_stream_min_bytes = c->out_stream_min_bytes};
    return NCL_OK;
}
