"""Regression tests for what the fuzz harnesses (tests/fuzz) found in the parsers of untrusted
bytes: each input here once raised something other than a ValueError naming its source."""
import json
import re

import pytest

import os

from ncl import env, flight, tuning
from ncl.perf import calibrate, report


def _calibration(**fields) -> dict:
    """A valid cost-model file (one rank count), with some fields replaced."""
    data = {"all_reduce": {a: {"2": [1.0, 0.1]} for a in tuning.ALGORITHMS},
            "measured_us": {a: {"2": [[8, 1.0], [1024, 2.0]]} for a in tuning.ALGORITHMS}}
    data.update(fields)
    return data


@pytest.fixture
def tuning_file(tmp_path, monkeypatch):
    """write(text) puts a cost-model file where NCL_TUNING_FILE points; gives its path."""
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("NCL_TUNING_FILE", str(path))
    monkeypatch.delenv("NCL_ONE_SHOT_MAX_BYTES", raising=False)
    monkeypatch.delenv("NCL_DIRECT_MIN_BYTES", raising=False)

    def write(text: str) -> str:
        path.write_text(text)
        tuning.calibration.cache_clear()
        return str(path)

    yield write
    tuning.calibration.cache_clear()


@pytest.mark.parametrize("text", [
    "[" * 5000,                                                         # was RecursionError (json)
    json.dumps(_calibration(all_reduce={"one_shot": [1]})),              # was AttributeError
    json.dumps(_calibration(all_reduce={"one_shot": "two_shot"})),       # was AttributeError
    json.dumps(_calibration(all_reduce={"one_shot": {"2": [1, 10 ** 400]}})),  # was OverflowError
    json.dumps(_calibration(measured_us={a: {"2": [[10 ** 400, 1]]} for a in tuning.ALGORITHMS})),  # OverflowError
])
def test_malformed_tuning_file_raises_value_error_naming_it(tuning_file, text):
    path = tuning_file(text)
    with pytest.raises(ValueError, match=f"tuning file {path}"):
        tuning.thresholds(2)


def test_tuning_file_without_rank_counts_never_chooses_that_algorithm(tuning_file):
    """An algorithm given no rank count was max() of nothing (a ValueError without the file's name)."""
    tuning_file(json.dumps(_calibration(all_reduce={a: {"2": [1.0, 0.1]} if a != "cma" else {}
                                                    for a in tuning.ALGORITHMS})))
    assert tuning.thresholds(2)[2] == tuning.NEVER


@pytest.fixture
def no_tuning_file(tmp_path, monkeypatch):
    """No NCL_TUNING_FILE, and XDG_CACHE_HOME in tmp_path; the calibration read afresh."""
    for name in ("NCL_TUNING_FILE", "NCL_ONE_SHOT_MAX_BYTES", "NCL_DIRECT_MIN_BYTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tuning.calibration.cache_clear()
    yield tmp_path
    tuning.calibration.cache_clear()


def test_the_tests_never_use_the_real_user_cache():
    """conftest points XDG_CACHE_HOME at the session's own directory."""
    assert not tuning.user_cache_path().startswith(os.path.join(os.path.expanduser("~"), ".cache"))


def test_tuning_file_order_is_env_then_user_cache_then_shipped(no_tuning_file, monkeypatch):
    shipped = tuning.thresholds(2)
    assert tuning.tuning_file() == tuning._PACKAGED
    # this host's calibration, as ncl.perf.calibrate writes it: two-shot always faster here
    fast = {a: a == "two_shot" for a in tuning.ALGORITHMS}
    fast_two_shot = _calibration(all_reduce={a: {"2": [1.0, 0.01] if fast[a] else [5.0, 1.0]} for a in fast},
                                 measured_us={a: {"2": [[8, 1.0], [1024, 2.0]] if fast[a] else [[8, 5.0], [1024, 9.0]]}
                                              for a in fast})
    cached = calibrate.save(tuning.user_cache_path(), fast_two_shot)
    assert cached.startswith(str(no_tuning_file / "cache" / "ncl" / "tuning-"))
    assert tuning.tuning_file() == cached
    tuning.calibration.cache_clear()
    assert tuning.thresholds(2)[0] == 0 != shipped[0]  # one-shot never: the cache's model, not the shipped one
    explicit = calibrate.save(str(no_tuning_file / "mine.json"), _calibration())
    monkeypatch.setenv("NCL_TUNING_FILE", explicit)
    assert tuning.tuning_file() == explicit


def test_user_cache_without_xdg_cache_home_is_under_home(no_tuning_file, monkeypatch):
    monkeypatch.setenv("HOME", str(no_tuning_file))
    for xdg in ("", "relative/dir"):  # unset, or relative: the XDG spec says to ignore it
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        path = tuning.user_cache_path()
        assert path == str(no_tuning_file / ".cache" / "ncl" / f"tuning-{tuning.host_fingerprint()}.json")


def test_a_broken_user_cache_is_an_error_naming_it(no_tuning_file):
    path = tuning.user_cache_path()
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write("{")
    with pytest.raises(ValueError, match=f"tuning file {path}.*python -m ncl.perf.calibrate"):
        tuning.thresholds(2)


def test_calibrate_saves_whole_files_into_new_directories(tmp_path):
    path = calibrate.save(str(tmp_path / "a" / "b" / "t.json"), _calibration())
    assert os.listdir(tmp_path / "a" / "b") == ["t.json"]  # no partial file left beside it
    tuning.calibration.cache_clear()
    assert tuning.calibration(path)["two_shot"][2][:2] == [(8.0, 1.0), (1024.0, 2.0)]


@pytest.mark.parametrize("text", ["-1", "-4K", str(1 << 63), "8589934592G"])
def test_byte_counts_out_of_range_are_refused(text, monkeypatch):
    """These were returned, then failed with OverflowError where ncl.bootstrap.options put them
    into the C core's size_t fields."""
    with pytest.raises(ValueError, match="byte count"):
        env.parse_bytes(text)
    monkeypatch.setenv("NCL_CMA_MIN_BYTES", text)
    with pytest.raises(ValueError, match="NCL_CMA_MIN_BYTES"):
        env.get("NCL_CMA_MIN_BYTES")


def test_byte_counts_still_parse():
    assert [env.parse_bytes(t) for t in ("0", "4M", " 256KiB ", "1g", str((1 << 63) - 1))] == \
        [0, 4 << 20, 256 << 10, 1 << 30, (1 << 63) - 1]


def _sweep(**settings) -> dict:
    row = {"backend": "ncl", "nranks": 2, "size": 8, "in_place": False, "time_us": 2.0, "busbw": 0.1, "wrong": 0,
           "spread": 1.0}
    peer = dict(row, backend="gloo")
    return {"command": ["ncl-perf", "all_reduce"], "machine": {"date": "today", "cpu": "x"},
            "settings": dict({"collective": "all_reduce", "repeat": 2, "compare": ["gloo"]}, **settings),
            "summary": [row, peer]}


def test_saved_sweep_prints_its_tables(tmp_path, capsys):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(_sweep()))
    assert report.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "median over rounds" in out and "ncl/gloo" in out


@pytest.mark.parametrize("text", [
    b"\xff",                                                   # was UnicodeDecodeError
    b"[]",                                                     # was TypeError
    b"{}",                                                     # was KeyError
    json.dumps(_sweep() | {"summary": [_sweep()["summary"][0], dict(_sweep()["summary"][1], time_us=0)]}).encode(),
    # ^ a peer's time of 0: was ZeroDivisionError (the ncl/gloo ratio)
    json.dumps(_sweep() | {"command": ["\ud800"]}).encode(),   # was UnicodeEncodeError on a UTF-8 terminal
    json.dumps(_sweep(repeat="2")).encode(),                   # was TypeError
])
def test_malformed_sweep_exits_2_naming_the_file(tmp_path, capsys, text):
    path = tmp_path / "sweep.json"
    path.write_bytes(text)
    with pytest.raises(ValueError, match=f"{path} is not a sweep"):
        report.load(str(path))
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(path)])
    assert exit_info.value.code == 2 and f"error: {path} is not a sweep" in capsys.readouterr().err


def _flight_record(**other) -> dict:
    """A rank file as flight.dump writes it: one call that stopped at step 2."""
    return {"traceEvents": [{"ph": "X", "name": "all_reduce", "args": {"seq": 7, "collective": "all_reduce",
                                                                    "state": "running", "steps": 2}}],
            "otherData": {"communicator": "world", "rank": 1, "reason": "NclTimeoutError: ...",
                          "posted_steps": [9, 8], **other}}


def test_flight_records_are_summarized(tmp_path, capsys):
    (tmp_path / "ncl-trace-job-world-rank1.json").write_text(json.dumps(_flight_record()))
    assert flight.main([str(tmp_path)]) == 0
    assert re.search(r"world\s+1\s+7\s+all_reduce\s+running\s+2", capsys.readouterr().out)


@pytest.mark.parametrize("text", [
    json.dumps(_flight_record())[:-20].encode(),                        # truncated: was JSONDecodeError
    b"[1, 2]",                                                          # was TypeError
    b"\xff",                                                            # was UnicodeDecodeError
    json.dumps(_flight_record(rank="1")).encode(),                      # wrong-shaped
    json.dumps({"traceEvents": [1], "otherData": {}}).encode(),         # was AttributeError
])
def test_malformed_flight_record_exits_2_naming_the_file(tmp_path, capsys, text):
    path = tmp_path / "ncl-trace-job-world-rank0.json"
    path.write_bytes(text)
    with pytest.raises(SystemExit) as exit_info:
        flight.main([str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"error: {path} is not a flight record written by ncl" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("name, text", [("NCL_KERNEL_ISA", "AVX2x"), ("NCL_KERNEL_ISA", "avx1024"), ("NCL_CMA", "maybe"),
                                        ("NCL_CHECK_CALLS", "sometimes"), ("NCL_ALGO", "ring")])
def test_an_unknown_knob_value_is_an_error_not_ignored(name, text, monkeypatch):
    """NCL_KERNEL_ISA=avx1024 was silently ignored and NCL_CMA=maybe taken as on."""
    monkeypatch.setenv(name, text)
    with pytest.raises(ValueError, match=f"environment variable {name}={text!r} is not valid"):
        env.get(name)


@pytest.mark.parametrize("name, text, value", [("NCL_KERNEL_ISA", "AVX2", "avx2"), ("NCL_KERNEL_ISA", " Generic ", "generic"),
                                               ("NCL_CMA", "OFF", False), ("NCL_CMA", "Yes", True),
                                               ("NCL_CHECK_CALLS", "0", False), ("NCL_ALGO", "Two_Shot", "two_shot")])
def test_knob_values_match_in_any_case(name, text, value, monkeypatch):
    monkeypatch.setenv(name, text)
    assert env.get(name) == value


def test_a_bad_kernel_isa_is_refused_before_a_communicator_exists(monkeypatch):
    import ncl
    monkeypatch.setenv("NCL_KERNEL_ISA", "avx1024")
    with pytest.raises(ValueError, match="NCL_KERNEL_ISA"):
        tuning.options(2)
    assert ncl.kernel_isa() in ("generic", "avx2", "avx512")
