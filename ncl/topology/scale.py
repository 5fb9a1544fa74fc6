"""Scaled-out topologies (`scale:` in a file): what the same design looks like with more chips.

    kind: servers   copies of the first host (its chips, switches and NICs) joined through one
                    non-blocking network switch (a full-bisection fabric, as a rail-optimized fat tree
                    gives); a host without NICs gets nics_per_host of them, one per switch in turn
                    (nic_attach: chips: one per chip in turn, rail-optimized as in DGX servers), at
                    nic_bandwidth_gbps.  Each NIC link costs nic_latency_us / 2 each way.
    kind: ring      a ring of nchips of the first chip, joined by copies of the first link.
    kind: torus     a 2D torus of nchips (the most square a x b) of the first chip and link.
Chips of server k are named "s<k>.<name>"."""
import math
from typing import Dict

from .schema import Spec, parse


def _chip(c) -> dict:
    if c.type is not None:  # keeps the chip type (its rates, power and sources) in the grown file
        return {"name": c.name, "type": c.type.name}
    return {"name": c.name, "memory_gib": c.memory_gib, "memory_bandwidth_gbps": c.memory_bandwidth_gbps,
            "compute_tflops": dict(c.compute_tflops)}


def _link(lk, a=None, b=None) -> dict:
    return {"a": a or lk.a, "b": b or lk.b, "bandwidth_gbps": lk.bandwidth_gbps, "latency_us": lk.latency_us,
            "kind": lk.kind or "link", "energy_pj_per_bit": lk.energy_pj_per_bit}


def scale(spec: Spec, nchips: int) -> Spec:
    if not isinstance(nchips, int) or isinstance(nchips, bool) or nchips < 1:
        raise ValueError(f"nchips must be a positive integer, not {nchips!r}")
    kind = spec.scale.get("kind", "servers")
    raw = {"name": f"{spec.name}-x{nchips}", "description": f"{spec.name} scaled to {nchips} chips",
           "chip_types": spec.raw.get("chip_types", {})}
    if kind in ("ring", "torus"):
        shape = _torus_shape(nchips, spec) if kind == "torus" else (nchips,)
        raw["chips"] = [dict(_chip(spec.chips[0]), name=f"chip{i}") for i in range(nchips)]
        raw["links"] = []
        for i in range(nchips):
            x, y = (i % shape[0], i // shape[0])
            nbrs = [((x + 1) % shape[0]) + y * shape[0]]
            if kind == "torus":
                nbrs.append(x + ((y + 1) % shape[1]) * shape[0])
            for j in nbrs:
                if j != i and (shape[0] > 2 or j > i or kind == "torus"):
                    raw["links"].append(_link(spec.links[0], f"chip{i}", f"chip{j}"))
        return parse(raw, f"{spec.path} scaled to {nchips} chips")
    return _servers(spec, nchips, raw)


def _torus_shape(n: int, spec: Spec):
    a = int(math.isqrt(n))
    while a > 1 and n % a:
        a -= 1
    if a < 2:
        raise ValueError(f"{spec.path}: a 2D torus of {n} chips needs n = a x b with a, b >= 2")
    return (n // a, a)


def _servers(spec: Spec, nchips: int, raw: dict) -> Spec:
    host = spec.hosts[0]
    unit = set(host.chips) | set(host.nics)
    # the host's switches: reached from its chips without passing a NIC or another host's chip
    switches = {s.name for s in spec.switches}
    grow = list(host.chips)
    while grow:
        node = grow.pop()
        for lk in spec.links:
            for x, y in ((lk.a, lk.b), (lk.b, lk.a)):
                if x == node and y in switches and y not in unit:
                    unit.add(y)
                    grow.append(y)
    per = len(host.chips)
    if nchips % per:
        raise ValueError(f"{spec.path}: scaled({nchips}) must be a multiple of the {per} chips of one server")
    inner = [lk for lk in spec.links if lk.a in unit and lk.b in unit]
    outer = [lk for lk in spec.links if (lk.a in host.nics) != (lk.b in host.nics)
             and not (lk.a in unit and lk.b in unit)]
    nic_bw = spec.scale.get("nic_bandwidth_gbps") or (outer[0].bandwidth_gbps if outer else None)
    nic_lat = spec.scale.get("nic_latency_us")
    if nic_lat is None:
        nic_lat = 2 * outer[0].latency_us if outer else None
    if nic_bw is None or nic_lat is None:
        raise ValueError(f"{spec.path}: scale.nic_bandwidth_gbps and scale.nic_latency_us are needed to add servers")
    nics = list(host.nics)
    attach: Dict[str, str] = {}
    if not nics:  # one per switch in turn, or (nic_attach: chips) one per chip in turn: rail-optimized
        rail = spec.scale.get("nic_attach") == "chips"
        sws = list(host.chips) if rail else sorted(unit & switches) or list(host.chips)
        k = int(spec.scale.get("nics_per_host", len(sws)))
        nics = [f"nic{i}" for i in range(k)]
        attach = {nic: sws[i % len(sws)] for i, nic in enumerate(nics)}
    chips_by = {c.name: c for c in spec.chips}
    sw_by = {s.name: s for s in spec.switches}
    raw.update(chips=[], switches=[{"name": "net", "kind": "ethernet"}], links=[], hosts=[])
    for s in range(nchips // per):
        p = f"s{s}."
        raw["chips"] += [dict(_chip(chips_by[c]), name=p + c) for c in host.chips]
        for name in sorted(unit & switches):
            sw = sw_by[name]
            d = {"name": p + name, "kind": sw.kind, "staging": sw.staging}
            if sw.bandwidth_gbps:
                d["bandwidth_gbps"] = sw.bandwidth_gbps
            if sw.slot_mib:
                d["slot_mib"] = sw.slot_mib
            raw["switches"].append(d)
        raw["links"] += [_link(lk, p + lk.a, p + lk.b) for lk in inner]
        for nic in nics:
            if nic in attach:  # a NIC the file did not have: a PCIe Gen5 x16 slot is faster than 400G
                raw["links"].append({"a": p + nic, "b": p + attach[nic], "bandwidth_gbps": nic_bw,
                                     "latency_us": nic_lat / 2, "kind": "pcie"})
            raw["links"].append({"a": p + nic, "b": "net", "bandwidth_gbps": nic_bw, "latency_us": nic_lat / 2,
                                 "kind": "ethernet"})
        h = {"name": f"s{s}", "chips": [p + c for c in host.chips], "nics": [p + n for n in nics]}
        if host.cpus:
            h["cpus"] = host.cpus
        if host.cache_mib:
            h.update(cache_mib=host.cache_mib, cache_speedup=host.cache_speedup)
        raw["hosts"].append(h)
    raw["scale"] = dict(spec.scale)
    return parse(raw, f"{spec.path} scaled to {nchips} chips")

