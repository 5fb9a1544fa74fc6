/* args.c: argument checks shared by every entry point.  Python validates first and gives
 * the user the precise message; these keep a direct C caller from crashing the process.
 * One check is the core's first: all_reduce's fast path (ncl/comm.py) leaves the test that
 * recv is send (in place) or apart from it to ncl_all_reduce_checked, where it costs two
 * compares instead of Python's pointer arithmetic; a refusal returns before anything moves,
 * and Python then says what is wrong as its own checks would. */
#include "internal.h"

int ncl_check_args(ncl_comm* c, const void* send, const void* recv, size_t count, int dtype, int op, int root) {
    NCL_CHECK(ncl_comm_usable(c));
    if (dtype < 0 || dtype >= NCL_NUM_DTYPES) return ncl_error(NCL_ERR_ARGUMENT, "unknown dtype code %d", dtype);
    if (op >= NCL_NUM_OPS) return ncl_error(NCL_ERR_ARGUMENT, "unknown reduction op code %d", op);
    if (root >= c->nranks)
        return ncl_error(NCL_ERR_ARGUMENT, "root %d is not a rank of a %d-rank group", root, c->nranks);
    if (count > 0 && (!send || !recv)) return ncl_error(NCL_ERR_ARGUMENT, "NULL buffer with count %zu", count);
    if (count > SIZE_MAX / 8 / (size_t)c->nranks) return ncl_error(NCL_ERR_ARGUMENT, "count %zu is too large", count);
    return NCL_OK;
}

int ncl_all_reduce_checked(ncl_comm* c, const void* send, void* recv, size_t count, int dtype, int op, int algo) {
    if (send != recv && dtype >= 0 && dtype < NCL_NUM_DTYPES && count <= SIZE_MAX / 8) {
        /* peers read send while this rank writes recv: any other overlap would hand them half-written data */
        uintptr_t s = (uintptr_t)send, r = (uintptr_t)recv, bytes = count * (size_t)ncl_dtype_size(dtype);
        if (s < r + bytes && r < s + bytes)
            return ncl_error(NCL_ERR_ARGUMENT, "all_reduce: recv overlaps send without being send (in place)");
    }
    return ncl_all_reduce(c, send, recv, count, dtype, op, algo);
}
