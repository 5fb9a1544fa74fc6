/* args.c: argument checks shared by every entry point.  Python validates first and gives
 * the user the precise message; these keep a direct C caller from crashing the process. */
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
