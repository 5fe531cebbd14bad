"""The folders form layers (docs/design.md §1): a module imports only from its own folder and the folders below it,
and no chain of imports comes back to where it started. Read from the source, so nothing is imported to check."""
import ast
import itertools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["tools", "RL", "workers", "rewards", "algorithms", "monet_models", "common"]  # top first (docs/design.md §1)


def project_modules() -> dict[str, Path]:
    modules = {}
    for folder in LAYERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(module: str, path: Path) -> set[str]:
    """Every project module `module` imports, at the top or inside a function, absolute or relative."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in names if name.split(".")[0] in LAYERS}


def import_graph() -> dict[str, set[str]]:
    """Edges between project modules; `import a.b.c` counts as an edge to the longest existing module prefix."""
    modules = project_modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    return {module: {target for name in imported_names(module, path) if (target := resolve(name)) and target != module}
            for module, path in modules.items()}


def test_every_import_points_down_the_layers():
    rank = {folder: index for index, folder in enumerate(LAYERS)}
    upward = sorted(f"{module} imports {target}" for module, targets in import_graph().items() for target in targets
                    if rank[target.split(".")[0]] < rank[module.split(".")[0]])
    assert not upward, "imports from a folder above (docs/design.md §1):\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    # A package's __init__ re-exporting its own modules is not a cycle a reader follows: leave those edges out.
    edges = {module: {target for target in targets if not module_is_parent(module, target)}
             for module, targets in graph.items()}
    cycles = find_cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def module_is_parent(module: str, target: str) -> bool:
    return target.startswith(module + ".")


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], itertools.count()

    def visit(node: str) -> None:
        index[node] = low[node] = next(counter)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return cycles
