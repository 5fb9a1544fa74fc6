"""The topology layer: file validation, rings and trees over real links, the link cost model on cases
computed by hand, scaled-out topologies and the ncl-topo command line."""
import copy
import os

import pytest

yaml = pytest.importorskip("yaml")

from ncl.perf import report as perf_report  # noqa: E402
from ncl.topology import cli, graph  # noqa: E402
from ncl.topology import calibrate as calib  # noqa: E402
from ncl.topology.core import Topology, default_topology, load_topology  # noqa: E402
from ncl.topology.schema import parse, shipped_names  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ["pcie-gen5-8card", "ring-8chip", "nvswitch-8gpu", "torus-4x4", "two-servers-400g", "this-host",
           "hgx-h200-8gpu", "mi300x-8gpu", "l40s-pcie-8gpu"]
HUGE = 1e9  # GB/s of chip memory: reductions cost nothing beside the links in the hand-computed cases


def small(links=None, chips=("c0", "c1"), **extra):
    raw = {"name": "t", "chips": [{"name": c, "memory_gib": 1, "memory_bandwidth_gbps": HUGE} for c in chips],
           "links": links if links is not None else [{"a": "c0", "b": "c1", "bandwidth_gbps": 10, "latency_us": 2}]}
    raw.update(extra)
    return raw


def topo_of(raw) -> Topology:
    return Topology(parse(raw, "test.yaml"))


# ---- files

def test_every_shipped_name_is_tested():
    assert sorted(shipped_names()) == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_file_loads(name):
    topo = load_topology(name)
    assert topo.name == name and topo.num_chips == len(topo.spec.chips) >= 8
    assert os.path.dirname(topo.spec.path) == os.path.join(REPO, "topology")


def _bad_cases():
    def link(**kw):
        r = small()
        r["links"][0].update(kw)
        return r

    def chip(**kw):
        r = small()
        r["chips"][0].update(kw)
        return r

    def with_(key, value):
        r = small()
        r[key] = value
        return r
    return [
        (link(bandwidth_gbps="fast"), "links[0].bandwidth_gbps must be a positive number, not 'fast'"),
        (link(bandwidth_gbps=0), "links[0].bandwidth_gbps must be a positive number, not 0"),
        (link(latency_us=-1), "links[0].latency_us must be a non-negative number, not -1"),
        (link(b="nowhere"), "links[0].b 'nowhere' is not a chip, switch or nic"),
        (link(b="c0"), "links[0].b joins 'c0' to itself"),
        (link(colour="red"), "links[0].colour is not a known field"),
        (chip(memory_gib=True), "chips[0].memory_gib must be a positive number, not True"),
        (chip(type="tpu"), "chips[0].type 'tpu' is neither one of chip_types"),
        (chip(name="c1"), "chips[1].name 'c1' is already the name of a chip"),
        (with_("colour", 1), "colour is not a known field"),
        (with_("placement", ["c0", "c9"]), "placement[1] 'c9' is not a chip"),
        (with_("switches", [{"name": "s", "staging": "yes"}]), "switches[0].staging must be true or false"),
        (with_("hosts", [{"name": "h", "chips": ["c0", "cX"]}]), "hosts[0].chips[1] 'cX' is not a chip"),
        (with_("hosts", [{"name": "h", "chips": ["c0"]}]), "hosts do not place chip 'c1' on any host"),
        (with_("hosts", [{"name": "h", "chips": ["c0", "c1"], "cpus": 0}]), "hosts[0].cpus must be a positive"),
        (with_("scale", {"kind": "mesh"}), "scale.kind must be servers, ring or torus"),
        (small(chips=("c0", "c1", "c2")), "links leave chip(s) c2 disconnected from 'c0'"),
        ({"name": "t", "links": []}, "chips is missing"),
        ({"name": "t", "chips": [{"name": "c{i}", "count": 0, "memory_gib": 1, "memory_bandwidth_gbps": 1}],
          "links": []}, "chips[0].count must be a positive integer"),
        ({"name": "t", "chips": [{"name": "c{__import__}", "count": 2, "memory_gib": 1, "memory_bandwidth_gbps": 1}],
          "links": []}, "chips[0].name has a template {...} that is not bounded integer arithmetic on i"),
        ([1, 2], "must be a mapping"),
        (with_("measured", {"all_reduce": 1}), "measured must be a list"),
        (with_("measured", [{"collective": "all_reduce", "ranks": 3, "source": "s", "times_us": {8: 1, 16: 2}}]),
         "measured[0].ranks must be an integer from 2 to the file's 2 chips, not 3"),
        (with_("measured", [{"collective": "allreduce", "ranks": 2, "source": "s", "times_us": {8: 1, 16: 2}}]),
         "measured[0].collective must be one of"),
        (with_("measured", [{"collective": "all_reduce", "ranks": 2, "times_us": {8: 1, 16: 2}}]),
         "measured[0].source is missing"),
        (with_("measured", [{"collective": "all_reduce", "ranks": 2, "source": "s", "times_us": {8: 1}}]),
         "measured[0].times_us must map 2 to 64 sizes"),
        (with_("measured", [{"collective": "all_reduce", "ranks": 2, "source": "s", "times_us": {"8B": 1, 16: 2}}]),
         "measured[0].times_us sizes must be positive integers (bytes), not '8B'"),
        (with_("measured", [{"collective": "all_reduce", "ranks": 2, "source": "s", "times_us": {8: -1, 16: 2}}]),
         "measured[0].times_us.8 must be a positive number, not -1"),
    ]


@pytest.mark.parametrize("raw,message", _bad_cases())
def test_bad_file_names_the_field(raw, message):
    with pytest.raises(ValueError) as err:
        parse(copy.deepcopy(raw), "topology/bad.yaml")
    assert str(err.value).startswith("topology/bad.yaml: ")
    assert message in str(err.value)


def test_bad_yaml_and_unknown_name(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match=r"x.yaml: not valid YAML \(line 2\)"):
        load_topology(str(bad))
    with pytest.raises(ValueError, match="no topology 'nope'"):
        load_topology("nope")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("template", ["chip{9**9**9**9}", "chip{i*1000000*1000000}", "chip{(lambda: 1)()}",
                                      "chip{i.__class__}", "chip{1/0}", "chip{" + "(" * 40 + "i" + ")" * 40 + "}"])
def test_a_topology_file_is_data_never_evaluated(tmp_path, template):
    """The template of a chip's name is bounded integer arithmetic: a power tower, a huge product, a call or
    an attribute is an error at once (the old evaluator let `**` through to eval, which spun forever)."""
    raw = small(chips=())
    raw["chips"] = [{"name": template, "count": 2, "memory_gib": 1, "memory_bandwidth_gbps": 1}]
    with pytest.raises(ValueError, match="not bounded integer arithmetic on i"):
        parse(raw, "evil.yaml")


@pytest.mark.timeout(20)
def test_a_topology_file_is_bounded_in_size_depth_and_items(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="deep.yaml: nested too deeply|deep.yaml: not valid YAML"):
        load_topology(str(deep))
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ValueError, match="big.yaml: larger than"):
        load_topology(str(big))
    raw = small(chips=())
    raw["chips"] = [{"name": "c{i}", "count": 10 ** 6, "memory_gib": 1, "memory_bandwidth_gbps": 1}]
    with pytest.raises(ValueError, match=r"chips\[0\].count makes chips hold more than 65536 items"):
        parse(raw, "many.yaml")
    secret = tmp_path / "notes.yaml"
    secret.write_text("password: hunter2\n  - broken: [\n")
    with pytest.raises(ValueError) as err:
        load_topology(str(secret))
    assert "hunter2" not in str(err.value)                 # a file that is not a topology is not echoed
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="a topology file is a mapping"):
        load_topology(str(listing))


# ---- rings and trees

def _real_hops(topo, hops):
    g = topo.model.g
    for a, b in hops:
        dirs, _, _ = g.path(a, b)
        assert dirs, f"no route {a} -> {b}"
        node = a
        for d in dirs:  # consecutive link directions join up from a to b
            x, y = g.link_ends(d)
            assert x == node
            node = y
        assert node == b


@pytest.mark.parametrize("name", SHIPPED)
def test_ring_and_tree_visit_every_chip_once_over_real_links(name):
    topo = load_topology(name)
    chips = topo.chips_of(topo.num_chips)
    assert topo.ring() == topo.rings()[0] or len(topo.rings()) > 1
    for ring in [topo.ring()] + topo.rings():
        assert sorted(ring) == sorted(chips) and len(set(ring)) == len(ring)
        _real_hops(topo, [(ring[i], ring[(i + 1) % len(ring)]) for i in range(len(ring))])
    tree = topo.tree()
    assert sorted(tree) == sorted(chips)
    roots = [c for c, p in tree.items() if p is None]
    assert len(roots) == 1
    for c in chips:  # every chain of parents ends at the root, without cycles
        seen, node = set(), c
        while tree[node] is not None:
            assert node not in seen
            seen.add(node)
            node = tree[node]
        assert node == roots[0]
    _real_hops(topo, [(c, p) for c, p in tree.items() if p is not None])


def test_ring_search_prefers_direct_links():
    torus = load_topology("torus-4x4")
    ring = torus.ring()
    assert all(len(torus.model.g.path(ring[i], ring[(i + 1) % 16])[0]) == 1 for i in range(16))
    pcie = load_topology("pcie-gen5-8card")  # crosses between the two switches only twice
    ring = pcie.ring()
    crossings = sum((int(ring[i][-1]) < 4) != (int(ring[(i + 1) % 8][-1]) < 4) for i in range(8))
    assert crossings == 2
    assert graph.depth(pcie.tree()) == 3


# ---- the cost model, against hand computation

def test_two_chips_one_link():
    topo = topo_of(small())
    for s in (0, 1, 1000, 1 << 20):
        want = 2e-6 + s / 10e9 if s else 2e-6
        assert topo.predict("send_recv", s, 2) == pytest.approx(want, rel=1e-12)
    assert topo.predict_transfers([(0, 1, 4096)]) == pytest.approx(2e-6 + 4096 / 10e9, rel=1e-12)
    assert topo.predict_transfers([(0, 1, 0)]) == 0.0


def test_ring_all_reduce_on_four_chips():
    n, bw, lat = 4, 20.0, 1.5
    links = [{"a": f"c{i}", "b": f"c{(i + 1) % n}", "bandwidth_gbps": bw, "latency_us": lat} for i in range(n)]
    topo = topo_of(small(links, chips=[f"c{i}" for i in range(n)]))
    assert topo.ring() == ["c0", "c1", "c2", "c3"]
    for s in (4096, 1 << 20, 1 << 30):
        want = 2 * (n - 1) * (lat * 1e-6 + s / n / (bw * 1e9))
        assert topo.predict("all_reduce", s, n, "ring") == pytest.approx(want, rel=1e-9)
        assert topo.predict("all_gather", s, n, "ring") == pytest.approx(want / 2, rel=1e-9)


def test_pipelined_chain_broadcast():
    n, bw, lat = 4, 20.0, 1.5
    links = [{"a": f"c{i}", "b": f"c{(i + 1) % n}", "bandwidth_gbps": bw, "latency_us": lat} for i in range(n)]
    topo = topo_of(small(links, chips=[f"c{i}" for i in range(n)]))
    s = 1 << 20  # the chain c0 -> c1 -> c2 -> c3: three latencies, each link carries s once
    assert topo.predict("broadcast", s, n, "ring") == pytest.approx(3 * lat * 1e-6 + s / (bw * 1e9), rel=1e-12)


def test_contended_switch_uplink():
    chips = ["a0", "a1", "b0", "b1"]
    links = [{"a": c, "b": "swA" if c[0] == "a" else "swB", "bandwidth_gbps": 100, "latency_us": 0.5} for c in chips]
    links.append({"a": "swA", "b": "swB", "bandwidth_gbps": 10, "latency_us": 1.0})
    topo = topo_of(small(links, chips=chips, switches=[{"name": "swA"}, {"name": "swB"}]))
    s = 1 << 20
    path_lat = (0.5 + 1.0 + 0.5) * 1e-6
    one = topo.predict_transfers([(0, 2, s)])
    assert one == pytest.approx(path_lat + s / 10e9, rel=1e-12)
    both = topo.predict_transfers([(0, 2, s), (1, 3, s)])  # share the uplink: twice the bytes on it
    assert both == pytest.approx(path_lat + 2 * s / 10e9, rel=1e-12)
    apart = topo.predict_transfers([(0, 2, s), (3, 1, s)])  # opposite directions: no contention
    assert apart == pytest.approx(one, rel=1e-12)


def test_switch_aggregate_bandwidth_is_shared():
    links = [{"a": f"c{i}", "b": "m", "bandwidth_gbps": 10, "latency_us": 1} for i in range(4)]
    topo = topo_of(small(links, chips=[f"c{i}" for i in range(4)], switches=[{"name": "m", "bandwidth_gbps": 15}]))
    s = 1 << 20
    # two flows through m: 2s bytes at 15 GB/s beat each link's s at 10 GB/s
    assert topo.predict_transfers([(0, 1, s), (2, 3, s)]) == pytest.approx(2e-6 + 2 * s / 15e9, rel=1e-12)


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("collective", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast",
                                        "reduce", "gather", "scatter"])
def test_predict_grows_with_size_and_best_is_cheapest(name, collective):
    topo = load_topology(name)
    n = topo.num_chips
    sizes = [n * 8 * 4 ** k for k in range(14)]
    times = [topo.predict(collective, s, n) for s in sizes]
    assert all(t > 0 for t in times)
    assert all(b >= a for a, b in zip(times, times[1:])), times
    for s in sizes[::4]:
        best = topo.best_algorithm(collective, s, n)
        assert best in topo.algorithms(collective, n)
        modelled = min(topo.predict(collective, s, n, a) for a in topo.algorithms(collective, n))
        assert topo.predict(collective, s, n, best) == modelled
        curve = topo.spec.measured.get((collective, n))  # a stack's measured times replace the model's
        assert topo.predict(collective, s, n) == (curve.time(s, lambda m: topo.predict(
            collective, m, n, topo.best_algorithm(collective, m, n))) if curve else modelled)


def test_measured_times_replace_the_model_for_their_collective_and_rank_count():
    curve = {"collective": "all_reduce", "ranks": 2, "source": "a test",
             "times_us": {1024: 10, 4096: 16, 2048: 12, 64: 30}}  # 64 B: a warm-up outlier, capped at 10
    topo = topo_of(small(measured=[curve]))
    plain = topo_of(small())
    # by hand: the first row below it, linear between rows, beyond the last the link model's increment
    assert topo.predict("all_reduce", 8, 2) == topo.predict("all_reduce", 64, 2) == pytest.approx(10e-6)
    assert topo.predict("all_reduce", 1536, 2) == pytest.approx(11e-6)
    assert topo.predict("all_reduce", 3072, 2) == pytest.approx(14e-6)
    assert topo.predict("all_reduce", 8192, 2) == pytest.approx(
        16e-6 + plain.predict("all_reduce", 8192, 2) - plain.predict("all_reduce", 4096, 2))
    assert plain.predict("all_reduce", 8192, 2) - plain.predict("all_reduce", 4096, 2) == pytest.approx(
        4096 / 10e9)  # two chips, one 10 GB/s link: every added byte crosses it once each way
    for kind, n, algo in (("all_gather", 2, None), ("all_reduce", 2, "ring")):  # not measured, or chosen
        assert topo.predict(kind, 4096, n, algo) == plain.predict(kind, 4096, n, algo)


def test_too_many_ranks_names_both_numbers():
    topo = load_topology("pcie-gen5-8card")
    with pytest.raises(ValueError, match="9 ranks do not fit .* of 8 chips"):
        topo.predict("all_reduce", 1024, 9)
    with pytest.raises(ValueError, match="rank 8, but topology 'pcie-gen5-8card' has 8 chips"):
        topo.predict_transfers([(0, 8, 10)])
    with pytest.raises(ValueError, match="no algorithm 'nope'"):
        topo.predict("all_reduce", 1024, 8, "nope")
    with pytest.raises(ValueError, match="unknown collective"):
        topo.predict("all_sum", 1024, 8)


def test_default_topology(monkeypatch):
    monkeypatch.delenv("NCL_TOPOLOGY", raising=False)
    assert default_topology().name == "pcie-gen5-8card"
    monkeypatch.setenv("NCL_TOPOLOGY", "ring-8chip")
    assert default_topology().name == "ring-8chip"


def test_topology_changes_the_choice():
    size = 256 << 20
    assert load_topology("nvswitch-8gpu").best_algorithm("all_reduce", size, 8) != \
        load_topology("ring-8chip").best_algorithm("all_reduce", size, 8)


# ---- scaled-out topologies

@pytest.mark.parametrize("name,n", [("pcie-gen5-8card", 16), ("pcie-gen5-8card", 64), ("two-servers-400g", 32),
                                    ("nvswitch-8gpu", 64), ("ring-8chip", 12), ("torus-4x4", 64)])
def test_scaled_sizes(name, n):
    big = load_topology(name).scaled(n)
    assert big.num_chips == n
    ring = big.ring()
    assert sorted(ring) == sorted(big.chips_of(n))
    small_t = load_topology(name).predict("all_reduce", 1 << 26, 8)
    assert big.predict("all_reduce", 1 << 26, n) >= small_t * 0.5


def test_rings_across_servers_use_every_nic():
    assert len(load_topology("two-servers-400g").rings()) == 2  # one NIC per PCIe switch, two per server
    big = load_topology("nvswitch-8gpu").scaled(16)  # rail-optimized: a NIC per GPU
    assert len(big.rings()) == 8
    one = big.predict("all_reduce", 1 << 30, 16, "ring")
    assert big.busbw("all_reduce", 1 << 30, 16, one) > 8 * 40  # eight 50 GB/s NICs carry it, not one


def test_scaled_rejects_odd_counts():
    with pytest.raises(ValueError, match="multiple of the 8 chips"):
        load_topology("pcie-gen5-8card").scaled(12)
    with pytest.raises(ValueError, match="a, b >= 2"):
        load_topology("torus-4x4").scaled(17)


# ---- this host

def test_this_host_validates_against_committed_measurements():
    files = [os.path.join(REPO, "benchmarks", "results", f) for f in
             ("all_reduce_np2_4_8_pow2.json", "all_gather_np2_np8.json", "all_to_all_np2_np8.json")]
    if not all(os.path.exists(f) for f in files):
        pytest.skip("the committed benchmark results are not here")
    rows = calib.validation_rows([r for f in files for r in perf_report.load(f)["summary"]])
    assert {(c, n) for c, n, _, _ in rows} >= {("all_reduce", 2), ("all_reduce", 8), ("all_to_all", 8)}
    text, median = calib.validate(load_topology("this-host"), rows)
    assert "median absolute error" in text
    assert median <= 0.25


def test_calibrate_from_committed_sweeps_writes_a_valid_topology(tmp_path, capsys):
    """ncl-topo calibrate --measured: the fit from ncl-perf JSON files, no rank started."""
    files = [os.path.join(REPO, "benchmarks", "results", f + "_np2_np8.json") for f in ("broadcast", "all_gather")]
    if not all(os.path.exists(f) for f in files):
        pytest.skip("the committed benchmark results are not here")
    out = tmp_path / "host.yaml"
    assert cli.main(["calibrate", "--measured", *files, "--out", str(out)]) == 0
    assert f"# wrote {out}" in capsys.readouterr().out
    assert load_topology(str(out)).num_chips == 8


def test_calibration_figures_from_sweeps():
    """Latency: the fastest small broadcast; copy rates: bytes over (time - latency), best in cache."""
    bc = {8: 5.0, 512: 4.0, 1 << 20: 4.0 + (1 << 20) / 20e3, 64 << 20: 4.0 + (64 << 20) / 10e3}
    ag = {1 << 20: 4.0 + 2 * (1 << 20) / 40e3, 64 << 20: 4.0 + 2 * (64 << 20) / 16e3}
    m = calib.figures({"broadcast": bc, "all_gather": ag, "broadcast8": {8: 30.0, 512: 24.0}})
    assert (m["latency_us"], m["latency8_us"]) == (4.0, 24.0)
    got = [m[k] for k in ("core_gbps", "core_cached_gbps", "all_gbps", "all_cached_gbps")]
    assert got == pytest.approx([10.0, 20.0, 16.0, 40.0])
    slow = {"collective": "broadcast", "nranks": 2, "backend": "ncl", "in_place": False, "size": 8, "time_us": 9.0}
    fast = dict(slow, time_us=3.0)
    eight = dict(slow, nranks=8)
    gather = dict(slow, collective="all_gather")
    sweeps = calib.sweeps_from_rows({"a.json": [slow, eight, gather], "b.json": [fast, dict(slow, in_place=True)]})
    assert sweeps == {"broadcast": {8: 3.0}, "broadcast8": {8: 9.0}, "all_gather": {8: 9.0}}  # the best of the files
    with pytest.raises(ValueError, match="none of a.json has an ncl sweep of all_gather"):
        calib.sweeps_from_rows({"a.json": [slow, eight]})


def test_calibrated_file_is_a_valid_topology(tmp_path):
    m = {"latency_us": 3.0, "latency8_us": 24.0, "core_gbps": 11.0, "core_cached_gbps": 17.0, "all_gbps": 18.0,
         "all_cached_gbps": 36.0}
    path = tmp_path / "host.yaml"
    path.write_text(calib.host_yaml(m, source="test"))
    topo = load_topology(str(path))
    assert topo.num_chips == 8 and topo.model.staging == "shm"
    link = topo.spec.links[0]
    assert (link.bandwidth_gbps, link.latency_us) == (11.0, 1.5)
    # one step of 8 B on 2 ranks: copy in, copy out (in cache), each half the step latency
    speedup = topo.spec.hosts[0].cache_speedup
    assert speedup == pytest.approx((17 / 11 * 36 / 18) ** 0.5, rel=1e-3)
    assert topo.predict("broadcast", 8, 2, "direct") == pytest.approx(3e-6 + 2 * 8 / 11e9 / speedup, rel=1e-9)


# ---- ncl-topo

def test_cli_show_writes_a_png(tmp_path, capsys):
    png = tmp_path / "t.png"
    assert cli.main(["show", "pcie-gen5-8card", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "ring (8 chips" in out and "tree (depth" in out and "bottleneck" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_predict_prints_rows(tmp_path, capsys):
    csv_path = tmp_path / "p.csv"
    assert cli.main(["predict", "pcie-gen5-8card", "--collective", "all_reduce", "-b", "8", "-e", "1G", "-f", "64",
                     "--scaled", "16", "--csv", str(csv_path)]) == 0
    out = capsys.readouterr().out
    assert "# all_reduce on 2 chips" in out and "# all_reduce on 16 chips of pcie-gen5-8card-x16" in out
    assert "1073741824" in out
    assert len(csv_path.read_text().splitlines()) == 1 + 8 * 6  # chips 2..8 and 16; 8, 512, 32K, 2M, 128M, 1G


@pytest.mark.parametrize("argv", [
    ["show", "nope"],
    ["show", "pcie-gen5-8card", "-n", "9"],
    ["predict", "pcie-gen5-8card", "-b", "lots"],
    ["predict", "pcie-gen5-8card", "-b", "1M", "-e", "1K"],
    ["predict", "pcie-gen5-8card", "-f", "1"],
    ["predict", "pcie-gen5-8card", "--collective", "all_sum"],
    ["predict", "pcie-gen5-8card", "--algorithm", "nope"],
    ["predict", "pcie-gen5-8card", "--scaled", "1"],
    ["calibrate", "--out", "/no/such/dir/x.yaml"],
    ["calibrate", "--validate", "/no/such/file.json", "--no-measure"],
    ["frobnicate"],
])
def test_cli_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
