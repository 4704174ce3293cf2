"""The import graph of the source tree: no cycles, nothing imports upward (the layer order below).

Every module of uniql_jax/, pallas_kernels/, converters/, experiments/ and benchmarks/ is
parsed with `ast` (nothing is imported), and every import it makes becomes an edge: module
level, inside functions (a lazy import still ties the two modules together), and
`importlib.import_module("literal")` / `import_module(f"pkg.{name}")` (an edge to every
module under the literal prefix, as `converters.hf` picks its mapping tables).
`from pkg import name` is an edge to the module `pkg.name` when that is a module, else to
`pkg`. The implicit execution of parent packages' `__init__` is not an edge (a sub-package
`__init__` is empty or, like `uniql_jax.checkpoint`'s and `uniql_jax/__init__.py`, re-exports
only; its own imports are edges like any module's).

Layers, lowest first (a module may import its own layer or lower ones, never a higher one):

0  formats and kernels: `uniql_jax.config`, `uniql_jax.paths`, `uniql_jax.host_memory`, the packed weight formats
   package `uniql_jax.quant.formats` (`qarray`, `bcq` and `packed`, their one interface),
   the empty `uniql_jax.quant` package that holds it; all of `pallas_kernels` (kernels,
   references, dispatchers, their benches): kernels sit below the models, so the dispatcher
   never imports a model; the pure RoPE reference lives in `pallas_kernels.rope.reference`
   and the models call it.
1  models and what runs them: `uniql_jax.models.*`, `uniql_jax.inference`, `uniql_jax.eval`,
   `uniql_jax.distributed` (runtime start-up, meshes, global batches, ordered sums),
   `uniql_jax.data`.
2  algorithms: `uniql_jax.compress.*`, every other `uniql_jax.quant.*` module (the pure
   cores `rtn`, `gptq`, `uniquan`, `bcq_fit`, `hadamard`, the shared calibration plan `quant.plan` and
   the drivers), `uniql_jax.finetune`.
3  products: the `uniql_jax.checkpoint` package, `uniql_jax.elastic` (ElasticModel),
   `converters.*` (they need only layer 0, but are
   products of the library, not a base of it), `uniql_jax.harness`, `uniql_jax.accuracy`
   (lm-eval accuracy per rate), `uniql_jax.pipeline` (the compress pipeline and its run
   folder), `uniql_jax.tiny` (the embedded defaults' trainer), and the public API `uniql_jax`
   (its `__init__`).
4  programs: `experiments.*` (thin mains: parse, call the library, write), `benchmarks.*`.

A module of the tree that no rule places fails the test: place it here when adding it.

Besides module cycles, the packages (formats split from the rest of quant) must form no
cycle either: compress <-> quant or models <-> quant through any pair of modules fails.
Tests never import other test files: only the library, `tests.helpers`, `conftest` and
non-test helper modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("uniql_jax", "pallas_kernels", "converters", "experiments", "benchmarks")

FORMATS = ("uniql_jax.quant.formats",)  # the package: qarray, bcq, packed
# (module or package prefix, layer); the longest matching prefix wins
LAYERS = {
    "uniql_jax.config": 0, "uniql_jax.paths": 0, "uniql_jax.host_memory": 0, "uniql_jax.quant": 0, **{m: 0 for m in FORMATS},
    "pallas_kernels": 0,
    "uniql_jax.models": 1, "uniql_jax.inference": 1, "uniql_jax.eval": 1, "uniql_jax.data": 1,
    "uniql_jax.distributed": 1,
    "uniql_jax.compress": 2, "uniql_jax.quant.": 2, "uniql_jax.finetune": 2,
    "uniql_jax.checkpoint": 3, "uniql_jax.elastic": 3, "converters": 3, "uniql_jax.harness": 3, "uniql_jax.accuracy": 3,
    "uniql_jax.pipeline": 3, "uniql_jax.tiny": 3, "uniql_jax": 3,
    "experiments": 4, "benchmarks": 4,
}

# Upward imports known and left in place, each with the reason. Keep this empty if you can.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}

# Test files allowed to import another test file: none (shared fixtures live in tests/helpers.py).
ALLOWED_TEST_IMPORTS: set[tuple[str, str]] = set()


def module_files(root: Path, packages) -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, is package __init__)} of every .py file under `packages`."""
    mods = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return mods


def _owner(name: str, mods) -> str | None:
    """The longest prefix of dotted `name` that is a module of the tree (None: outside the tree)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node, module: str, is_pkg: bool, mods) -> list[str]:
    """Dotted names the import statement / import_module call `node` makes."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = (module if is_pkg else module.rpartition(".")[0]).split(".")
            base = base[: len(base) - (node.level - 1)]
            src = ".".join(base + ([node.module] if node.module else []))
        else:
            src = node.module
        return [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
    if isinstance(node, ast.Call) and node.args:
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
        arg = node.args[0]
        if name != "import_module":
            return []
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return [arg.value]
        if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
            prefix = arg.values[0].value
            return [m for m in mods if m.startswith(prefix)]
    return []


def import_graph(root: Path = REPO, packages=PACKAGES) -> dict[str, dict[str, str]]:
    """{importer: {imported module: 'file:line' of the first import}} within the tree."""
    mods = module_files(root, packages)
    graph: dict[str, dict[str, str]] = {m: {} for m in mods}
    for module, (path, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for target in _targets(node, module, is_pkg, mods):
                dep = _owner(target, mods)
                if dep and dep != module:
                    graph[module].setdefault(dep, f"{path.relative_to(root)}:{node.lineno}")
    return graph


def strongly_connected(graph: dict[str, dict]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member (iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def one_cycle(graph: dict[str, dict], component: list[str]) -> list[str]:
    """A cycle a -> b -> ... -> a inside a strongly connected component (breadth-first back to a)."""
    members, start = set(component), component[0]
    parent, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child == start:
                    path = [node]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, node, start]
                if child in members and child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    return component


def _describe(graph, cycle) -> str:
    return " -> ".join(cycle) + "\n    " + "\n    ".join(
        f"{a} -> {b} at {graph[a][b]}" for a, b in zip(cycle, cycle[1:]))


def layer_of(module: str) -> int | None:
    best = max((p for p in LAYERS if module == p or module.startswith(p if p.endswith(".") else p + ".")),
               key=len, default=None)
    return None if best is None else LAYERS[best]


def package_of(module: str) -> str:
    """The unit of the package-level check: formats apart, else the first two dotted parts."""
    if layer_of(module) == 0 and module.startswith("uniql_jax."):
        return "uniql_jax.<formats, config, paths>"
    return ".".join(module.split(".")[:2])


GRAPH = import_graph()


def test_the_graph_sees_the_known_edges():
    """Guards the parser itself: a module-level, a lazy (in-function) and an import_module edge."""
    assert "uniql_jax.models.stacks" in GRAPH["uniql_jax.inference"]  # module level
    assert "pallas_kernels.dispatch" in GRAPH["uniql_jax.models.layers"]  # inside wdot
    assert "converters.mappings.llama" in GRAPH["converters.hf"]  # importlib.import_module(f"...")
    assert strongly_connected({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}, "d": {"a": ""}}) == [["a", "b", "c"]]
    assert layer_of("uniql_jax.quant.formats.qarray") == 0 and layer_of("uniql_jax.quant.gptq") == 2
    assert layer_of("uniql_jax.quant.formats.packed") == 0 and layer_of("uniql_jax.quant.bcq_fit") == 2
    assert "uniql_jax.quant.formats.packed" in GRAPH["pallas_kernels.dispatch"]


def test_no_import_cycles():
    cycles = [_describe(GRAPH, one_cycle(GRAPH, c)) for c in strongly_connected(GRAPH)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_package_cycles():
    packages: dict[str, dict[str, str]] = {}
    for a, deps in GRAPH.items():
        for b, where in deps.items():
            pa, pb = package_of(a), package_of(b)
            packages.setdefault(pa, {})
            packages.setdefault(pb, {})
            if pa != pb:
                packages[pa].setdefault(pb, f"{a} -> {b} at {where}")
    cycles = [" -> ".join(c) + "\n    " + "\n    ".join(packages[x][y] for x, y in zip(c, c[1:]))
              for c in (one_cycle(packages, comp) for comp in strongly_connected(packages))]
    assert not cycles, "package cycles:\n" + "\n".join(cycles)


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in GRAPH if layer_of(m) is None)
    assert not unplaced, f"modules with no layer (place them in tests/test_layering.py LAYERS): {unplaced}"


def test_nothing_imports_upward():
    upward = [f"{a} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)}) at {where}"
              for a, deps in sorted(GRAPH.items()) for b, where in sorted(deps.items())
              if (layer_of(a) or 0) < (layer_of(b) or 0) and (a, b) not in ALLOWED_UPWARD]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_allowed_exceptions_are_still_needed():
    stale = [pair for pair in ALLOWED_UPWARD if pair[1] not in GRAPH.get(pair[0], {})]
    assert not stale, f"remove from ALLOWED_UPWARD, no longer imported: {stale}"
    tests = import_graph(REPO, ("tests",))
    stale = [pair for pair in ALLOWED_TEST_IMPORTS if pair[1] not in tests.get(pair[0], {})]
    assert not stale, f"remove from ALLOWED_TEST_IMPORTS, no longer imported: {stale}"


def test_tests_import_no_other_test_file():
    """Shared test code lives in tests/helpers.py (or a conftest / non-test helper module)."""
    graph = import_graph(REPO, ("tests",))
    bad = [f"{a} -> {b} at {where}" for a, deps in sorted(graph.items()) for b, where in sorted(deps.items())
           if b.rpartition(".")[2].startswith("test_") and (a, b) not in ALLOWED_TEST_IMPORTS]
    assert not bad, "test files importing other test files:\n" + "\n".join(bad)
