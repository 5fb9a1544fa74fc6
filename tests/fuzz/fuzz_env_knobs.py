"""Fuzzes the NCL_* environment knobs: env.parse_bytes and env.get for every knob in env.KNOBS.

Contract: parse_bytes gives a byte count (0 <= n < 2**63, what the C core's size_t fields take)
or raises ValueError; env.get, with the fuzzed bytes as the variable's value, returns a value or
raises ValueError naming the variable, and so does bootstrap.options (which hands every knob
to the C core's fixed-width fields).  Nothing else, for any bytes an environment can hold (all
but NUL), decoded as Python decodes the real environment (os.fsdecode).
"""
import os
import types

import atheris

from common import fuzz

with atheris.instrument_imports(include=["ncl"]):
    from ncl import bootstrap, env


def TestOneInput(data: bytes) -> None:
    text = os.fsdecode(data)
    try:
        n = env.parse_bytes(text)
        assert isinstance(n, int) and 0 <= n < 1 << 63, f"parse_bytes gave {n!r}"
    except ValueError:
        pass
    if "\0" in text:  # no environment can hold it
        return
    for name in env.KNOBS:
        env.os.environ[name] = text
        try:
            env.get(name)
            if name not in ("NCL_TUNING_FILE", "NCL_RANK", "NCL_WORLD_SIZE", "NCL_UNIQUE_ID"):  # read elsewhere
                bootstrap.options(2)
        except ValueError as exc:
            assert name in str(exc), f"the message does not name {name}: {exc}"
        finally:
            del env.os.environ[name]


if __name__ == "__main__":
    # glibc's setenv keeps every value it replaces, so millions of inputs through the real
    # environment would grow the process without bound: env reads os.environ only, and a dict
    # stands in for it here.
    env.os = types.SimpleNamespace(environ={})
    fuzz(TestOneInput, [b"4M", b"256KiB", b" 1g ", b"600.5", b"two_shot", b"0", b"-1", b"0x10", "١٢".encode()])
