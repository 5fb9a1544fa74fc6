"""Fuzzes the cost-model file ncl.tuning reads (calibration.json, or NCL_TUNING_FILE).

Contract: any content either loads or raises ValueError whose message names the file; a file
that loads gives thresholds and predictions for any rank count, or ValueError, and nothing else.
"""
import json
import os

import atheris

from common import JSON_TOKENS, ScratchFile, fuzz, json_document

with atheris.instrument_imports(include=["ncl"]):
    from ncl import tuning

FILE = ScratchFile("ncl-fuzz-tuning")
PACKAGED = os.path.join(os.path.dirname(tuning.__file__), "calibration.json")
RANK_COUNTS = (1, 2, 3, 8, 1000)


def _small_calibration() -> dict:
    """The shipped file cut to two rank counts and three sizes: a valid base to edit."""
    with open(PACKAGED) as f:
        data = json.load(f)
    keep = ("2", "4")
    return {"all_reduce": {a: {n: data["all_reduce"][a][n] for n in keep} for a in tuning.ALGORITHMS},
            "measured_us": {a: {n: data["measured_us"][a][n][:3] for n in keep} for a in tuning.ALGORITHMS}}


BASE = _small_calibration()


def TestOneInput(data: bytes) -> None:
    FILE.write(json_document(data, BASE))
    os.environ["NCL_TUNING_FILE"] = FILE.path  # what thresholds() and predict_us() read
    tuning.calibration.cache_clear()
    try:
        tuning.calibration()
    except ValueError as exc:
        assert FILE.path in str(exc), f"the message does not name the file: {exc}"
        return
    for n in RANK_COUNTS:
        try:
            tuning.thresholds(n)
            for algorithm in tuning.ALGORITHMS:
                tuning.predict_us(algorithm, 1 << 20, n)
        except ValueError:
            pass


def seeds():
    """The shipped file and the same without two algorithms (raw), and the base unedited."""
    with open(PACKAGED, "rb") as f:
        shipped = f.read()
    partial = json.loads(shipped)
    for algorithm in ("direct", "cma"):
        del partial["all_reduce"][algorithm], partial["measured_us"][algorithm]
    return [b"\0" + shipped, b"\0" + json.dumps(partial).encode(), b"\1"]


if __name__ == "__main__":
    for name in ("NCL_ONE_SHOT_MAX_BYTES", "NCL_DIRECT_MIN_BYTES"):  # thresholds must come from the file
        os.environ.pop(name, None)
    keys = [f'"{k}"' for k in ("all_reduce", "measured_us", *tuning.ALGORITHMS)]
    fuzz(TestOneInput, seeds(), JSON_TOKENS + tuple(keys))
