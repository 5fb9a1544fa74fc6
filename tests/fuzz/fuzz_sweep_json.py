"""Fuzzes the sweep files `python -m ncl.perf.report X.json` reads (written by `ncl-perf --json`).

Contract: for any file content, `report.main([path])` prints the tables and returns 0, or exits
with status 2 and an error naming the file; nothing else, and its output is printable on a
strict UTF-8 terminal.
"""
import contextlib
import io
import json

import atheris

from common import JSON_TOKENS, ScratchFile, fuzz, json_document

with atheris.instrument_imports(include=["ncl"]):
    from ncl.perf import report

FILE = ScratchFile("ncl-fuzz-sweep")


def _sweep() -> dict:
    """A small sweep as `ncl-perf all_reduce -b 8 -e 64K -f 8192 -n 2 --repeat 2 --compare gloo`
    saves it: what both of main's tables read."""
    summary = [report.add_bandwidths({"backend": backend, "collective": "all_reduce", "nranks": 2, "size": size,
                                      "count": size // 4, "dtype": "float32", "op": "sum", "root": 0,
                                      "in_place": False, "time_us": 2.0 + size / 5e3 * (1 + (backend == "gloo")),
                                      "wrong": 0, "iters": 20, "rounds": 2, "spread": 1.05}, "all_reduce")
               for backend in ("ncl", "gloo") for size in (8, 65536)]
    settings = {"collective": "all_reduce", "min_bytes": 8, "max_bytes": 65536, "factor": 8192, "nranks": [2],
                "dtype": "float32", "op": "sum", "root": 0, "compare": ["gloo"], "repeat": 2}
    return {"command": ["ncl-perf", "all_reduce", "-b", "8", "-e", "64K", "-f", "8192", "-n", "2", "--repeat", "2",
                        "--compare", "gloo", "--json", "x.json"],
            "machine": {"date": "2026-01-01T00:00:00+00:00", "cpu": "some CPU", "cpus_usable": 2},
            "settings": settings, "rows": summary, "summary": summary}


BASE = _sweep()


def TestOneInput(data: bytes) -> None:
    FILE.write(json_document(data, BASE))
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8") for _ in range(2))  # strict, as a terminal
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = report.main([FILE.path])
    except SystemExit as exc:
        err.flush()
        message = err.buffer.getvalue().decode()
        assert exc.code == 2 and f"error: {FILE.path}" in message, f"exit {exc.code}: {message}"
        return
    assert code == 0, f"main returned {code}"


if __name__ == "__main__":
    keys = [f'"{k}"' for k in ("command", "machine", "settings", "summary", "collective", "repeat", "compare",
                               "backend", "nranks", "size", "in_place", "time_us", "busbw", "spread", "wrong")]
    fuzz(TestOneInput, [b"\0" + json.dumps(BASE).encode(), b"\1"], JSON_TOKENS + tuple(keys))
