"""The library's shape: `import ncl` loads the core only (numpy and cffi; torch, yaml and the tools load
when asked), and ncl/ has no import cycle (DESIGN.md: tools import the library, never the other way)."""
import ast
import os
import subprocess
import sys
from typing import Dict, List, Set

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# libraries only a tool or the torch integration needs
HEAVY = ("torch", "yaml", "tabulate", "tqdm", "matplotlib", "openpyxl", "safetensors", "ml_dtypes", "mpi4py")
# ncl's tools, models and frameworks, and the launcher: the core never imports them
TOOLS = ("ncl.perf", "ncl.bench", "ncl.topology", "ncl.models", "ncl.torch", "ncl.launch")
CORE_THIRD_PARTY = {"numpy", "cffi", "_cffi_backend"}
# the command-line tools (ncl-perf, ncl-bench, ncl-topo, ncl-run) and the demo: nothing else imports them
TOOL_MODULES = ("ncl.perf", "ncl.bench", "ncl.topology.cli", "ncl.topology.__main__", "ncl.launch", "ncl.run",
                "ncl.demo")
# Function-level imports that point up a layer, each kept for a reason; a cycle through any other fails.
KNOWN_UPWARD = {
    # Communicator.from_mpi (public API) returns a HierarchicalCommunicator, a Communicator over a
    # HierarchicalBackend whose class ncl.moe and the tests still tell multi-host communicators by; the edge
    # goes with that class (the backend itself needs nothing of ncl.comm).
    ("ncl.comm", "ncl.hierarchical"),
}


def _new_modules(statement: str) -> List[str]:
    """The modules a fresh interpreter loads for `statement` (beyond what it had at start-up)."""
    code = f"import sys\nbefore = set(sys.modules)\n{statement}\nprint('\\n'.join(sorted(set(sys.modules) - before)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def _in(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_import_ncl_loads_the_core_only():
    loaded = _new_modules("import ncl")
    assert "ncl.comm" in loaded
    wrong = [m for m in loaded if m.split(".")[0] in HEAVY or _in(m, TOOLS)]
    assert not wrong, f"`import ncl` loads {', '.join(wrong)}: import them in the function that needs them"
    if hasattr(sys, "stdlib_module_names"):  # Python 3.10+
        third_party = {m.split(".")[0] for m in loaded} - set(sys.stdlib_module_names) - CORE_THIRD_PARTY - {"ncl"}
        assert not third_party, f"`import ncl` loads {', '.join(sorted(third_party))} besides numpy and cffi"


def test_import_ncl_moe_leaves_torch_distributed_alone():
    """ncl.moe needs torch, not the torch.distributed backend: only `import ncl.torch` registers "ncl"."""
    pytest.importorskip("torch")
    loaded = _new_modules("import ncl.moe, torch.distributed as dist\nassert 'ncl' not in dist.Backend.backend_list")
    assert not [m for m in loaded if _in(m, ("ncl.torch", "ncl.launch", "ncl.perf", "ncl.bench"))]


# ---- import cycles

def _modules() -> Dict[str, str]:
    """{dotted name: path} of every module under ncl/."""
    found = {}
    for root, dirs, files in os.walk(os.path.join(REPO, "ncl")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                parts = os.path.relpath(os.path.join(root, f), REPO)[:-3].split(os.sep)
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(root, f)
    return found


def _targets(node, module: str, is_package: bool, modules: Dict[str, str]) -> Set[str]:
    """The ncl modules an import statement names (`from pkg import name`: pkg.name when it is a module)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        base = ".".join(parts[:len(parts) - node.level + is_package] + ([node.module] if node.module else []))
    out = set()
    for a in node.names:
        sub = f"{base}.{a.name}"
        if sub in modules:
            out.add(sub)
        elif base in modules:
            out.add(base)  # a name the package's __init__ defines
    return out


def _graph(module_level_only: bool) -> Dict[str, Set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        edges: Set[str] = set()
        todo = list(ast.iter_child_nodes(tree))
        while todo:
            node = todo.pop()
            if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # runs when called, after every module finished importing
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(node, name, path.endswith("__init__.py"), modules)
            todo.extend(ast.iter_child_nodes(node))
        graph[name] = edges - {name}
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle through each strongly connected group of modules (Tarjan), as a list of names."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    groups = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_round(min(g), g, graph) for g in groups]


def _path_round(start: str, group: Set[str], graph: Dict[str, Set[str]]) -> List[str]:
    """A shortest path start -> ... -> start inside the group (breadth first)."""
    came = {w: start for w in graph[start] if w in group}
    todo = list(came)
    while start not in came:
        v = todo.pop(0)
        for w in sorted(graph[v] & group):
            if w not in came:
                came[w] = v
                todo.append(w)
    path, v = [start], came[start]
    while v != start:
        path.append(v)
        v = came[v]
    return path[:1] + path[:0:-1] + [start]


def _message(cycles: List[List[str]]) -> str:
    return "import cycles in ncl/:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_no_import_cycle_between_modules():
    """Imports at module level (what runs while a module loads) form no cycle."""
    cycles = _cycles(_graph(module_level_only=True))
    assert not cycles, _message(cycles)


def test_no_import_cycle_hidden_in_functions():
    """Nor do they with the imports inside functions, which hide a cycle from the interpreter but not from a
    reader: each direction depends on the other.  KNOWN_UPWARD lists the edges kept on purpose."""
    graph = _graph(module_level_only=False)
    for a, b in KNOWN_UPWARD:
        assert b in graph.get(a, ()), f"{a} no longer imports {b}: remove it from KNOWN_UPWARD"
        graph[a].discard(b)
    cycles = _cycles(graph)
    assert not cycles, _message(cycles)


def test_the_library_never_imports_a_tool():
    """Not even inside a function: a tool may import another tool and the library, never the reverse."""
    graph = _graph(module_level_only=False)
    wrong = [f"{a} -> {b}" for a in sorted(graph) if not _in(a, TOOL_MODULES)
             for b in sorted(graph[a]) if _in(b, TOOL_MODULES)]
    assert not wrong, "library modules import tools:\n  " + "\n  ".join(wrong)


def test_the_cycle_finder_names_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
