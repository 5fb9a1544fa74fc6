"""The cost model's thresholds (ncl/tuning.py) from calibrations made up for the purpose: where
all_reduce stops starting one-shot, on the measured medians."""
import json

import pytest

from ncl import tuning

SIZES = [8 * 4 ** k for k in range(13)]  # 8 B ... 128 MiB, as ncl.perf.calibrate measures them


def _write(path, two_over_one):
    """A calibration of np=2 where one-shot takes 2 µs + 0.1 ns/B and two-shot two_over_one(size) times that."""
    one = [[s, 2.0 + 1e-4 * s] for s in SIZES]
    two = [[s, t * two_over_one(s)] for s, t in one]
    per_byte = {"one_shot": 0.1, "two_shot": 0.1 * two_over_one(SIZES[-1])}
    data = {"all_reduce": {a: {"2": [2.0, per_byte.get(a, 1.0)]} for a in tuning.ALGORITHMS},
            "measured_us": {a: {"2": {"one_shot": one, "two_shot": two}.get(a, [[8, 1e6], [SIZES[-1], 1e9]])}
                            for a in tuning.ALGORITHMS}}
    path.write_text(json.dumps(data))


@pytest.fixture
def calibrated(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("NCL_TUNING_FILE", str(path))
    monkeypatch.delenv("NCL_ONE_SHOT_MAX_BYTES", raising=False)

    def one_shot_max(two_over_one):
        _write(path, two_over_one)
        tuning.calibration.cache_clear()
        return tuning.thresholds(2)[0]
    yield one_shot_max
    tuning.calibration.cache_clear()


def test_one_shot_stops_where_two_shot_becomes_faster(calibrated):
    assert 2048 < calibrated(lambda s: 1.4 if s <= 2048 else 0.7) <= 8192


def test_a_tie_at_the_largest_size_does_not_keep_one_shot(calibrated):
    """The shipped calibration's np=4 shape: two-shot 0.6-0.8 of one-shot from 8 KiB on, 1% slower
    at the top (within the noise): one-shot must stop near 8 KiB, not past the largest size."""
    assert 2048 < calibrated(lambda s: 1.4 if s <= 2048 else 1.01 if s == SIZES[-1] else 0.7) <= 8192


def test_a_real_loss_at_the_top_keeps_one_shot_and_noise_at_tiny_sizes_starts_nothing(calibrated):
    assert calibrated(lambda s: 1.2 if s >= SIZES[-2] else 0.7) == tuning.NEVER
    # two-shot a little faster at 32 B only: from the top down, one-shot is never left there
    assert 2048 < calibrated(lambda s: 0.95 if s == 32 else 1.4 if s <= 2048 else 0.7) <= 8192
