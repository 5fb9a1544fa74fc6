/* error.c: the last-error message of each thread, and names used in messages. */
#include <stdarg.h>
#include <stdio.h>

#include "internal.h"

static _Thread_local char last_error[1024];

int ncl_error(int status, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

const char* ncl_last_error(void) { return last_error; }

const char* ncl_coll_name(int coll) {
    static const char* names[] = {"?", "barrier", "all_reduce", "reduce", "broadcast", "all_gather",
                                  "gather", "reduce_scatter", "scatter", "all_to_all", "all_to_allv",
                                  "send", "comm.empty", "recv", "moe_dispatch", "moe_combine"};
    return coll > 0 && coll <= NCL_COLL_MOE_COMBINE ? names[coll] : "?";
}

const char* ncl_dtype_name(int dtype) {
    static const char* names[] = {"int8", "uint8", "int32", "int64",
                                  "float16", "bfloat16", "float32", "float64",
                                  "float8_e4m3fn", "float8_e5m2"}; /* numpy's (ml_dtypes') and torch's names */
    return dtype >= 0 && dtype < NCL_NUM_DTYPES ? names[dtype] : "?";
}

const char* ncl_op_name(int op) {
    static const char* names[] = {"sum", "prod", "min", "max", "avg"};
    return op >= 0 && op < NCL_NUM_OPS ? names[op] : "?";
}

const char* ncl_algo_name(int algo) {
    static const char* names[] = {"auto", "one_shot", "two_shot", "direct", "cma"};
    return algo >= 0 && algo < NCL_NUM_ALGOS ? names[algo] : "?";
}

const char* ncl_status_name(int status) {
    static const char* names[] = {"ok", "bad argument", "system error", "timeout", "peer failed", "mismatch",
                                  "unusable", "interrupted"};
    return status >= NCL_OK && status <= NCL_ERR_INTERRUPTED ? names[status] : "?";
}
