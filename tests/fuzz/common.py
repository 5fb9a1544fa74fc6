"""What the fuzz harnesses share: libFuzzer (through atheris) started from seeds made at run
time, a scratch file for parsers that take a path, and JSON documents built from fuzzed bytes.

Every harness is a script: `python tests/fuzz/fuzz_X.py [libFuzzer flags] [CORPUS_DIR...]`.  The
first corpus directory gets the harness's seeds, written afresh each run; without one,
$TMPDIR/ncl-fuzz-corpus/<harness> is used (and keeps what earlier runs found).  This module must
not import ncl: a harness imports ncl inside `atheris.instrument_imports()`, and only modules
first imported there get coverage feedback.
"""
import copy
import json
import os
import sys
import tempfile
from typing import Any, Callable, Iterable, Sequence

import atheris


class ScratchFile:
    """A file that lives only in memory (memfd), for parsers that open a path: libFuzzer ends
    the process without running Python's exit handlers, and this leaves nothing on disk."""

    def __init__(self, name: str):
        self.fd = os.memfd_create(name)
        self.path = f"/proc/self/fd/{self.fd}"

    def write(self, data: bytes) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)


# Tokens for the JSON harnesses: coverage comes from ncl's Python code only (json's scanner is
# C), so mutations need help to make structure and the numbers that break arithmetic (libFuzzer
# takes tokens of up to 64 bytes).
JSON_TOKENS = ("{", "}", "[", "]", ",", ":", '""', "[]", "{}", "[[[[[[[[", "null", "true", "false", "NaN",
               "Infinity", "-Infinity", "0", "-1", "1e400", "1e-400", "9" * 64, "\\ud800")


def json_document(data: bytes, base: Any) -> bytes:
    """What a JSON harness feeds its parser: after an even first byte, the rest as it is (any
    bytes at all); after an odd one, `base` (a valid document) with a few edits the rest chooses,
    each replacing or deleting one node found by walking down from the root.  Raw mutations
    rarely get past a parser's first checks (json's scanner gives no coverage); the edits put
    every type and number in every field of a valid file."""
    if not data or data[0] % 2 == 0:
        return data[1:]
    fdp = atheris.FuzzedDataProvider(data[1:])
    doc = copy.deepcopy(base)
    for _ in range(fdp.ConsumeIntInRange(0, 4)):  # none when the bytes run out: `base` itself
        doc = _edit(doc, fdp)
    return json.dumps(doc).encode()  # NaN and Infinity included, as json.dump writes them


def _edit(node: Any, fdp) -> Any:
    """`node` with one descendant (or itself) replaced by a fuzzed value, or deleted from its dict."""
    if isinstance(node, (dict, list)) and node and fdp.ConsumeIntInRange(0, 3) < 3:
        keys = list(node) if isinstance(node, dict) else range(len(node))
        key = keys[fdp.ConsumeIntInRange(0, len(keys) - 1)]
        if isinstance(node, dict) and fdp.ConsumeIntInRange(0, 7) == 0:
            del node[key]
        else:
            node[key] = _edit(node[key], fdp)
        return node
    return _value(fdp, 2)


def _value(fdp, depth: int) -> Any:
    """Any JSON value, including ints too large for a float, NaN, infinities and lone surrogates."""
    kind = fdp.ConsumeIntInRange(0, 8 if depth > 0 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 8))
    if kind == 3:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(9, 200))
    if kind == 4:
        return fdp.ConsumeFloat()
    if kind in (5, 6):
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 12))
    if kind == 7:
        return [_value(fdp, depth - 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    return {fdp.ConsumeUnicode(4): _value(fdp, depth - 1) for _ in range(fdp.ConsumeIntInRange(0, 4))}


def fuzz(test_one_input: Callable[[bytes], None], seeds: Iterable[bytes], tokens: Sequence[str] = ()) -> None:
    """Write the seeds into the first corpus directory, and the tokens into a libFuzzer
    dictionary beside it, and hand over to libFuzzer (never returns)."""
    dirs = [a for a in sys.argv[1:] if not a.startswith("-")]
    if not dirs:
        harness = os.path.splitext(os.path.basename(sys.argv[0]))[0]
        dirs = [os.path.join(tempfile.gettempdir(), "ncl-fuzz-corpus", harness)]
        sys.argv.append(dirs[0])
    os.makedirs(dirs[0], exist_ok=True)
    for i, seed in enumerate(seeds):
        with open(os.path.join(dirs[0], f"seed-{i}"), "wb") as f:
            f.write(seed)
    if tokens:
        with open(dirs[0].rstrip("/") + ".dict", "w") as f:
            f.writelines(f"{json.dumps(t)}\n" for t in tokens)
        sys.argv.append(f"-dict={dirs[0].rstrip('/')}.dict")
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
