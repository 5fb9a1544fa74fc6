"""Topology files: read a YAML description and check every field, naming the file and the field path
of the first bad one.  The schema is documented in ncl/topology/__init__.py and topology/README.md."""
import importlib.util
import ast
import operator
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from . import measured, schedules
from .chip import CALIBRATED_FIELDS, FIELDS as CHIP_TYPE_FIELDS, NUMBER_FIELDS as CHIP_NUMBERS, ChipType


def _shipped_dir() -> str:
    """The folder of the shipped topology files: the package ncl.topology.shipped, which pyproject.toml maps to
    the checkout's topology/ folder, so that wheels and editable installs both carry it.  A checkout used without
    installing it (or installed before that mapping) has no such package: its topology/ beside ncl/ then."""
    spec = importlib.util.find_spec(__package__ + ".shipped")  # where it is, without running it
    if spec is None or not spec.submodule_search_locations:
        return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "topology")
    return os.path.abspath(list(spec.submodule_search_locations)[0])


SHIPPED_DIR = _shipped_dir()                      # topology/*.yaml
CHIPS_DIR = os.path.join(SHIPPED_DIR, "chips")    # topology/chips/<type>.yaml
NODE_KINDS = ("chip", "switch", "nic")
# A topology file is data from outside: bounded so that no file can make ncl spin or swallow memory.
MAX_FILE_BYTES = 1 << 20         # the largest shipped file is a few KiB
MAX_ITEMS = 1 << 16              # chips, switches, links or hosts after `count` is expanded
MAX_TEMPLATE_VALUE = 1 << 20     # any value inside a {...} template


@dataclass
class Chip:
    name: str
    memory_gib: float
    memory_bandwidth_gbps: float
    compute_tflops: Dict[str, float]
    type: Optional[ChipType] = None   # the chip type it was declared with (None: fields given inline)


@dataclass
class Switch:
    name: str
    kind: str = "pcie"
    bandwidth_gbps: Optional[float] = None   # aggregate over all ports (None: never the bottleneck)
    staging: bool = False                    # a memory chips copy into and out of (shared memory)
    slot_mib: Optional[float] = None         # staging: messages go through it in chunks of this size


@dataclass
class Link:
    a: str
    b: str
    bandwidth_gbps: float   # payload GB/s per direction: the line rate times the file's efficiency
    latency_us: float
    kind: str = ""
    energy_pj_per_bit: float = 0.0   # what moving a bit over it costs (0: not given)


@dataclass
class Host:
    name: str
    chips: List[str]
    nics: List[str] = field(default_factory=list)
    cpus: Optional[int] = None           # chips are processes sharing this many CPUs (this host only)
    cache_mib: Optional[float] = None    # while ranks x (send + recv) fit here, copies run cache_speedup x faster
    cache_speedup: float = 1.0
    busy_latency_factor: float = 1.0     # latency x this when all its chips are busy (linear from cpus chips)


@dataclass
class Spec:
    """A validated topology file."""
    name: str
    path: str
    description: str
    chips: List[Chip]
    switches: List[Switch]
    links: List[Link]
    hosts: List[Host]
    placement: List[str]
    scale: Dict[str, Any]
    raw: Dict[str, Any]
    measured: Dict[Tuple[str, int], Any] = field(default_factory=dict)   # measured.Curve by (collective, ranks)


class _Checker:
    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, what: str):
        raise ValueError(f"{self.path}: {where} {what}")

    def keys(self, obj, where: str, required: Tuple[str, ...], optional: Tuple[str, ...]) -> dict:
        if not isinstance(obj, dict):
            self.fail(where, f"must be a mapping, not {obj!r}")
        for k in obj:
            if k not in required and k not in optional:
                self.fail(f"{where}.{k}" if where else str(k),
                          f"is not a known field (known: {', '.join(required + optional)})")
        for k in required:
            if k not in obj:
                self.fail(f"{where}.{k}" if where else k, "is missing")
        return obj

    def number(self, obj: dict, key: str, where: str, default=None, positive=True, allow_zero=False):
        if key not in obj:
            return default
        v = obj[key]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and v not in (float("inf"),)
        if ok and positive:
            ok = v > 0 or (allow_zero and v == 0)
        if not ok:
            kind = "a non-negative number" if allow_zero else "a positive number" if positive else "a number"
            self.fail(f"{where}.{key}", f"must be {kind}, not {v!r}")
        return float(v)

    def string(self, obj: dict, key: str, where: str, default=None) -> str:
        if key not in obj:
            return default
        v = obj[key]
        if not isinstance(v, str) or not v.strip():
            self.fail(f"{where}.{key}", f"must be a non-empty string, not {v!r}")
        return v

    def list_of(self, obj, key: str, where: str) -> list:
        v = obj.get(key, [])
        if not isinstance(v, list):
            self.fail(f"{where}.{key}" if where else key, f"must be a list, not {v!r}")
        return v


def _expand(items: list, ck: _Checker, section: str, template_keys: Tuple[str, ...]) -> List[Tuple[str, dict]]:
    """Items with `count: N` stand for N items with {i} in template_keys replaced by 0..N-1."""
    out = []
    for k, item in enumerate(items):
        where = f"{section}[{k}]"
        if isinstance(item, dict) and "count" in item:
            n = item["count"]
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                ck.fail(f"{where}.count", f"must be a positive integer, not {n!r}")
            if len(out) + n > MAX_ITEMS:
                ck.fail(f"{where}.count", f"makes {section} hold more than {MAX_ITEMS} items")
            base = {key: v for key, v in item.items() if key != "count"}
            for i in range(n):
                one = dict(base)
                for t in template_keys:
                    if isinstance(one.get(t), str):
                        one[t] = _template(one[t], i, ck, f"{where}.{t}")
                out.append((where, one))
        else:
            out.append((where, item))
    return out


def _template(text: str, i: int, ck: _Checker, where: str) -> str:
    """"{i}", "{i+1}", "{i%4}", "{(i+1)%8}" and such: + - * / % on integers and i, nothing else (no power,
    no names, no calls), every value within MAX_TEMPLATE_VALUE.  A file is data: it is never evaluated."""
    def sub(m):
        expr = m.group(1)
        try:
            tree = ast.parse(expr, mode="eval") if len(expr) <= 64 else None
            value = _arithmetic(tree.body, i) if tree is not None else None
        except (SyntaxError, ValueError, ZeroDivisionError):
            value = None
        if value is None:
            ck.fail(where, "has a template {...} that is not bounded integer arithmetic on i (+ - * / %, at most "
                           f"{MAX_TEMPLATE_VALUE} in size)")
        return str(value)
    return re.sub(r"\{([^{}]*)\}", sub, text)


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.floordiv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


def _arithmetic(node, i: int) -> Optional[int]:
    """The value of a template's expression tree, or None if it is anything but small integer arithmetic."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        value = node.value
    elif isinstance(node, ast.Name) and node.id == "i":
        value = i
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _arithmetic(node.operand, i)
        value = None if inner is None else (-inner if isinstance(node.op, ast.USub) else inner)
    elif isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        a, b = _arithmetic(node.left, i), _arithmetic(node.right, i)
        value = None if a is None or b is None else _OPERATORS[type(node.op)](a, b)
    else:
        return None
    return value if value is not None and abs(value) <= MAX_TEMPLATE_VALUE else None


def parse(data: Any, path: str) -> Spec:
    ck = _Checker(path)
    top = ck.keys(data, "", ("name", "chips", "links"),
                  ("description", "chip_types", "switches", "hosts", "placement", "scale", "measured"))
    name = ck.string(top, "name", "")
    types: Dict[str, dict] = {}
    ct = top.get("chip_types", {})
    if not isinstance(ct, dict):
        ck.fail("chip_types", f"must be a mapping of type name to fields, not {ct!r}")
    chip_types: Dict[str, ChipType] = {}
    for tname, tval in ct.items():
        types[tname] = ck.keys(tval, f"chip_types.{tname}", ("memory_gib", "memory_bandwidth_gbps"),
                               CHIP_TYPE_FIELDS)
        chip_types[tname] = _chip_type(str(tname), types[tname], ck)
    nodes: Dict[str, str] = {}

    def add_node(n: str, kind: str, where: str):
        if n in nodes:
            ck.fail(where, f"{n!r} is already the name of a {nodes[n]}")
        nodes[n] = kind

    chips = []
    for where, item in _expand(ck.list_of(top, "chips", ""), ck, "chips", ("name",)):
        ck.keys(item, where, ("name",), ("type", "memory_gib", "memory_bandwidth_gbps", "compute_tflops"))
        fields = {}
        if "type" in item:
            t = ck.string(item, "type", where)
            if t not in types and t in shipped_chip_types():  # the shipped chip library (topology/chips/)
                types[t] = shipped_chip_types()[t]
                chip_types[t] = library_chip_type(t)
            if t not in types:
                ck.fail(f"{where}.type", f"{t!r} is neither one of chip_types ({', '.join(types) or 'none'}) nor "
                                         f"a shipped chip type ({', '.join(sorted(shipped_chip_types()))})")
            fields.update(types[t])
        fields.update({k: v for k, v in item.items() if k not in ("name", "type")})
        for key in ("memory_gib", "memory_bandwidth_gbps"):
            if key not in fields:
                ck.fail(f"{where}.{key}", "is missing (give it on the chip or its type)")
        tf = fields.get("compute_tflops", {})
        if not isinstance(tf, dict):
            ck.fail(f"{where}.compute_tflops", f"must be a mapping of dtype to TFLOP/s, not {tf!r}")
        compute = {str(k): ck.number(tf, k, f"{where}.compute_tflops") for k in tf}
        cname = ck.string(item, "name", where)
        add_node(cname, "chip", f"{where}.name")
        inline = set(item) - {"name", "type"}
        chips.append(Chip(cname, ck.number(fields, "memory_gib", where),
                          ck.number(fields, "memory_bandwidth_gbps", where), compute,
                          chip_types.get(item.get("type")) if not inline else None))
    if not chips:
        ck.fail("chips", "must list at least one chip")

    switches = []
    for where, item in _expand(ck.list_of(top, "switches", ""), ck, "switches", ("name",)):
        ck.keys(item, where, ("name",), ("kind", "bandwidth_gbps", "staging", "slot_mib"))
        sname = ck.string(item, "name", where)
        add_node(sname, "switch", f"{where}.name")
        staging = item.get("staging", False)
        if not isinstance(staging, bool):
            ck.fail(f"{where}.staging", f"must be true or false, not {staging!r}")
        switches.append(Switch(sname, ck.string(item, "kind", where, "pcie"), ck.number(item, "bandwidth_gbps", where),
                               staging, ck.number(item, "slot_mib", where)))

    hosts = []
    host_of: Dict[str, str] = {}
    for where, item in _expand(ck.list_of(top, "hosts", ""), ck, "hosts", ("name",)):
        ck.keys(item, where, ("name", "chips"), ("nics", "cpus", "cache_mib", "cache_speedup",
                                                         "busy_latency_factor"))
        hname = ck.string(item, "name", where)
        hchips = _name_list(item, "chips", where, ck)
        for j, c in enumerate(hchips):
            if nodes.get(c) != "chip":
                ck.fail(f"{where}.chips[{j}]", f"{c!r} is not a chip")
            if c in host_of:
                ck.fail(f"{where}.chips[{j}]", f"{c!r} is already on host {host_of[c]!r}")
            host_of[c] = hname
        nics = _name_list(item, "nics", where, ck) if "nics" in item else []
        for j, nic in enumerate(nics):
            add_node(nic, "nic", f"{where}.nics[{j}]")
        cpus = item.get("cpus")
        if cpus is not None and (not isinstance(cpus, int) or isinstance(cpus, bool) or cpus < 1):
            ck.fail(f"{where}.cpus", f"must be a positive integer, not {cpus!r}")
        hosts.append(Host(hname, hchips, nics, cpus, ck.number(item, "cache_mib", where),
                          ck.number(item, "cache_speedup", where, 1.0),
                          ck.number(item, "busy_latency_factor", where, 1.0)))
    if hosts:
        for c in chips:
            if c.name not in host_of:
                ck.fail("hosts", f"do not place chip {c.name!r} on any host")
    else:
        hosts = [Host("host0", [c.name for c in chips])]

    links = []
    for where, item in _expand(ck.list_of(top, "links", ""), ck, "links", ("a", "b")):
        ck.keys(item, where, ("a", "b", "bandwidth_gbps", "latency_us"), ("kind", "efficiency", "energy_pj_per_bit"))
        a, b = ck.string(item, "a", where), ck.string(item, "b", where)
        for key, end in (("a", a), ("b", b)):
            if end not in nodes:
                ck.fail(f"{where}.{key}", f"{end!r} is not a chip, switch or nic of this file")
        if a == b:
            ck.fail(f"{where}.b", f"joins {a!r} to itself")
        efficiency = ck.number(item, "efficiency", where, 1.0)
        if efficiency > 1:
            ck.fail(f"{where}.efficiency", f"is the payload share of the line rate, in (0, 1], not {efficiency!r}")
        links.append(Link(a, b, ck.number(item, "bandwidth_gbps", where) * efficiency,
                          ck.number(item, "latency_us", where, allow_zero=True), item.get("kind", ""),
                          ck.number(item, "energy_pj_per_bit", where, 0.0, allow_zero=True)))
    if not links and len(chips) > 1:
        ck.fail("links", "must join the chips (none given)")
    _check_connected(chips, links, ck)

    placement = _name_list(top, "placement", "", ck) if "placement" in top else [c.name for c in chips]
    for j, c in enumerate(placement):
        if nodes.get(c) != "chip":
            ck.fail(f"placement[{j}]", f"{c!r} is not a chip")
    if len(set(placement)) != len(placement):
        ck.fail("placement", "names a chip twice")
    scale = top.get("scale", {})
    ck.keys(scale, "scale", (), ("kind", "nic_bandwidth_gbps", "nic_latency_us", "nics_per_host", "nic_attach"))
    if scale.get("nic_attach", "switches") not in ("switches", "chips"):
        ck.fail("scale.nic_attach", f"must be switches or chips, not {scale.get('nic_attach')!r}")
    n = scale.get("nics_per_host", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        ck.fail("scale.nics_per_host", f"must be a positive integer, not {n!r}")
    if scale.get("kind", "servers") not in ("servers", "ring", "torus"):
        ck.fail("scale.kind", f"must be servers, ring or torus, not {scale.get('kind')!r}")
    for key in ("nic_bandwidth_gbps", "nic_latency_us"):
        ck.number(scale, key, "scale", allow_zero=key == "nic_latency_us")
    curves = measured.parse(top.get("measured", []), ck, schedules.COLLECTIVES, len(placement))
    return Spec(name, path, str(top.get("description", "")), chips, switches, links, hosts, placement, scale, top,
                curves)


def _chip_type(name: str, obj: dict, ck: _Checker) -> ChipType:
    """A chip type whose every figure names its source: `sources` maps each field given (and each
    compute_tflops precision, or compute_tflops as a whole) to where it comes from."""
    where = f"chip_types.{name}"
    sources = obj.get("sources", {})
    if not isinstance(sources, dict) or not all(isinstance(v, str) and v.strip() for v in sources.values()):
        ck.fail(f"{where}.sources", f"must map field names to non-empty source strings, not {sources!r}")
    tf = obj.get("compute_tflops", {})
    if not isinstance(tf, dict):
        ck.fail(f"{where}.compute_tflops", f"must be a mapping of precision to TFLOP/s, not {tf!r}")
    compute = {str(k): ck.number(tf, k, f"{where}.compute_tflops") for k in tf}
    numbers = {k: ck.number(obj, k, where) for k in CHIP_NUMBERS if k in obj}
    for key in ("compute_efficiency", "memory_efficiency"):
        if numbers.get(key, 1.0) > 1:
            ck.fail(f"{where}.{key}", f"is a share of the peak, in (0, 1], not {numbers[key]!r}")
    if "kernel_overhead_us" in obj:
        numbers["kernel_overhead_us"] = ck.number(obj, "kernel_overhead_us", where, allow_zero=True)
    if sources:  # a type that cites at all must cite everything it gives
        needed = [k for k in numbers] + ([] if "compute_tflops" in sources else [f"compute_tflops.{p}" for p in compute])
        missing = [k for k in needed if k not in sources]
        if missing:
            ck.fail(f"{where}.sources", f"gives no source for {', '.join(missing)}")
    calibrated, field_ = obj.get("calibrated_from"), obj.get("calibrated_field")
    if calibrated is not None and not (isinstance(calibrated, str) and calibrated.strip()):
        ck.fail(f"{where}.calibrated_from", f"must name a published point, not {calibrated!r}")
    if (calibrated is None) != (field_ is None) or (field_ is not None and field_ not in CALIBRATED_FIELDS):
        ck.fail(f"{where}.calibrated_field", f"must be one of {', '.join(CALIBRATED_FIELDS)}, given with "
                                            f"calibrated_from, not {field_!r}")
    return ChipType(name, compute_tflops=compute, sources=dict(sources), calibrated_from=calibrated,
                    calibrated_field=field_, **numbers)


def _name_list(obj: dict, key: str, where: str, ck: _Checker) -> List[str]:
    v = obj[key]
    at = f"{where}.{key}" if where else key
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        ck.fail(at, f"must be a list of names, not {v!r}")
    return list(v)


def _check_connected(chips: List[Chip], links: List[Link], ck: _Checker) -> None:
    adj: Dict[str, List[str]] = {}
    for lk in links:
        adj.setdefault(lk.a, []).append(lk.b)
        adj.setdefault(lk.b, []).append(lk.a)
    seen = {chips[0].name}
    todo = [chips[0].name]
    while todo:
        for m in adj.get(todo.pop(), []):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    lost = [c.name for c in chips if c.name not in seen]
    if lost:
        ck.fail("links", f"leave chip(s) {', '.join(lost[:8])} disconnected from {chips[0].name!r}")


def resolve(name_or_path: str) -> str:
    """A shipped name (pcie-gen5-8card) or a path to a file."""
    if os.path.isfile(name_or_path):
        return name_or_path
    for cand in (os.path.join(SHIPPED_DIR, name_or_path), os.path.join(SHIPPED_DIR, name_or_path + ".yaml")):
        if os.path.isfile(cand):
            return cand
    names = shipped_names()
    if not names:  # say where we looked: an install without its package data would otherwise look like a typo
        raise ValueError(f"no topology {name_or_path!r}: not a file, and {SHIPPED_DIR} holds no shipped topologies "
                         "(a broken install of ncl?)")
    raise ValueError(f"no topology {name_or_path!r}: neither a file nor one of {', '.join(names)}")


def shipped_chip_types() -> Dict[str, dict]:
    """The chip library: topology/chips/<type>.yaml, each one chip type's fields and sources (read once)."""
    if not _CHIP_LIBRARY:
        import yaml
        names = sorted(f[:-5] for f in os.listdir(CHIPS_DIR) if f.endswith(".yaml")) if os.path.isdir(CHIPS_DIR) else []
        for name in names:
            path = os.path.join(CHIPS_DIR, name + ".yaml")
            with open(path) as f:
                data = yaml.safe_load(f)
            _Checker(path).keys(data, "", ("memory_gib", "memory_bandwidth_gbps"), CHIP_TYPE_FIELDS)
            _CHIP_LIBRARY[name] = data
    return _CHIP_LIBRARY


_CHIP_LIBRARY: Dict[str, dict] = {}


def library_chip_type(name: str) -> ChipType:
    """The shipped chip type `name` (topology/chips/<name>.yaml), checked."""
    return _chip_type(name, shipped_chip_types()[name], _Checker(os.path.join(CHIPS_DIR, name + ".yaml")))


def forget_chip_types() -> None:
    """Read the chip library again at its next use (after a calibration rewrote a file)."""
    _CHIP_LIBRARY.clear()


def shipped_names() -> List[str]:
    try:
        return sorted(f[:-5] for f in os.listdir(SHIPPED_DIR) if f.endswith(".yaml"))
    except OSError:
        return []


def load(name_or_path: str) -> Spec:
    """Read and check a topology file.  Errors name the file and what is wrong, never echo its contents
    (an argument that is not a topology file may be anything)."""
    import yaml
    path = resolve(name_or_path)
    try:
        if os.path.getsize(path) > MAX_FILE_BYTES:
            raise ValueError(f"{path}: larger than {MAX_FILE_BYTES} bytes: not a topology file")
        with open(path, "rb") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it: {exc.strerror}") from None
    except yaml.MarkedYAMLError as exc:
        where = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark else ""
        raise ValueError(f"{path}: not valid YAML{where}: {exc.problem}") from None
    except yaml.YAMLError:
        raise ValueError(f"{path}: not valid YAML") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be a topology file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a topology file is a mapping (name, chips, links, ...), not a {type(data).__name__}")
    return parse(data, path)
