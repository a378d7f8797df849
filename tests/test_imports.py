"""The package's modules import each other without cycles (imports inside functions included)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ddpm_jax"


def module_name(path: pathlib.Path) -> str:
    """'train' for ddpm_jax/train.py, 'data' for ddpm_jax/data/__init__.py, 'data.decode' for
    ddpm_jax/data/decode.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The ddpm_jax modules that `path` imports, anywhere in the file: for `from P import x`,
    the module P.x if there is one (a subpackage's module), else P itself."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]  # '' top level

    def resolve(dotted: str) -> str | None:  # "ddpm_jax.data.decode" -> "data.decode"
        parts = dotted.split(".")
        if parts[0] != "ddpm_jax":
            return None
        for end in range(len(parts), 1, -1):  # the longest prefix that is a module
            if (module := ".".join(parts[1:end])) in modules:
                return module
        return None

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [[a.name] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:  # relative: from the file's package, one level up per extra dot
                parts = ["ddpm_jax", *filter(None, package.split("."))]
                base = ".".join(parts[: len(parts) + 1 - node.level] + [node.module or ""])
                base = base.rstrip(".")
            candidates = [[f"{base}.{a.name}", base] for a in node.names]
        else:
            continue
        for options in candidates:
            for dotted in options:
                if (module := resolve(dotted)) is not None:
                    found.add(module)
                    break
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"}
    modules = set(paths)
    return {m: imported_modules(p, modules) - {m} for m, p in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" after
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "sampling" in graph["main"]  # imported inside main(), only for --mode=sample


def test_the_graph_sees_the_data_package():
    graph = import_graph()
    assert "data" in graph["train"]  # from ddpm_jax import data
    assert "data.decode" in graph["data.sources"]  # from ddpm_jax.data import decode
    assert "data.settings" in graph["data.sources"]  # from ddpm_jax.data.settings import ...
    assert {"data.dataset", "data.settings"} <= graph["data"]  # the re-exports


def test_the_data_package_imports_only_itself():
    """ddpm_jax.data sits below every other module: validate, unet and train import it."""
    graph = import_graph()
    for module in (m for m in graph if m.split(".")[0] == "data"):
        outside = {m for m in graph[module] if m.split(".")[0] != "data"}
        assert not outside, f"{module} imports {outside}"


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
