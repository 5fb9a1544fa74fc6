"""The emulated interconnect: topology files, rings and trees over their links, and a link cost model
that predicts what a collective's traffic would take on the described hardware; chip types (chip.py) and
the operator-level cost model of sharded inference on them (arch.py, inference.py, predict.py).

    from ncl.topology import load_topology, default_topology
    topo = load_topology("pcie-gen5-8card")          # a shipped name (topology/*.yaml) or a path
    topo.predict("all_reduce", 64 << 20, 8)          # seconds, nbytes as nccl-tests' size column
    topo.best_algorithm("all_reduce", 64 << 20, 8)   # "ring", "tree", "one_shot", ...
    topo.predict_transfers([(0, 1, 4096), (2, 3, 8192)])
    topo.scaled(64)                                  # 8 such servers joined by their NICs

Schema of a topology file (YAML; unknown keys are errors, every number positive unless noted):

    name: str                          # required
    description: str
    chip_types:                        # optional shared fields, referenced by chips[].type; a type not
      TYPE: {memory_gib, memory_bandwidth_gbps,          # declared here comes from topology/chips/TYPE.yaml
             compute_tflops: {PRECISION: dense TFLOP/s}, sram_mib, tdp_w, idle_w, compute_efficiency,
             memory_efficiency, kernel_overhead_us, calibrated_from, calibrated_field,
             sources: {FIELD: where the figure comes from}}   # a type that cites must cite every field
    chips:                             # required, at least one
      - {name, type | memory_gib + memory_bandwidth_gbps [+ compute_tflops]}
      - {name: "npu{i}", count: 8, type: rngd}       # count: N expands {i}, {i+1}, {(i+1)%8}, ...
    switches:
      - {name, kind: pcie|nvswitch|ethernet|memory|cpu, bandwidth_gbps (aggregate, optional),
         staging: bool (a shared memory chips copy through), slot_mib (its chunk size)}
    links:                             # required; a and b: chip, switch or nic names
      - {a, b, bandwidth_gbps (GB/s per direction), efficiency (payload share, default 1), latency_us, kind}
      - {a: "chip{i}", b: "chip{(i+1)%8}", count: 8, ...}
    hosts:                             # default: one host with every chip
      - {name, chips: [names], nics: [names], cpus (chips are processes sharing them),
         cache_mib, cache_speedup (while the ranks' send + receive buffers fit cache_mib, copies run
         cache_speedup x faster), busy_latency_factor (latency x this with all chips busy on the cpus)}
    placement: [chip names]            # rank r runs on placement[r]; default: chips in order
    scale: {kind: servers|ring|torus, nic_bandwidth_gbps, nic_latency_us, nics_per_host}   # see scale.py

Every chip must be reachable from every other; a bad file raises ValueError naming the file and the
field, e.g. `topology/x.yaml: links[3].bandwidth_gbps must be a positive number, not 'fast'`.
"""
from .core import BUS_FACTOR, DEFAULT, Topology, default_topology, load_topology
from .schedules import COLLECTIVES

__all__ = ["BUS_FACTOR", "COLLECTIVES", "DEFAULT", "Topology", "default_topology", "load_topology"]
