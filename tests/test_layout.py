"""The package's shape: every module sits in a stage package and imports only from its own
stage or the stages before it (core < data < modeling < training < evaluation < reporting < build)."""
from __future__ import annotations

import ast
from pathlib import Path

import bloodcell_lib

STAGES = ("core", "data", "modeling", "training", "evaluation", "reporting", "build")
PACKAGE = Path(bloodcell_lib.__file__).parent
ENTRY_POINTS = {"__init__", "__main__", "cli"}  # the command line may reach every stage


def _runtime_imports(tree: ast.AST) -> list[str]:
    """bloodcell_lib modules imported outside ``if TYPE_CHECKING:`` blocks (those only name types)."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bloodcell_lib"):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names if alias.name.startswith("bloodcell_lib"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _stage(module: str) -> int | None:
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 1 and parts[1] in STAGES else None


def test_every_module_sits_in_a_stage_package():
    loose = [p.stem for p in PACKAGE.glob("*.py") if p.stem not in ENTRY_POINTS]
    assert loose == [], f"modules outside a stage package: {loose}"
    assert sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()) == sorted(STAGES)


def test_no_import_runs_against_the_stage_order():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        module = "bloodcell_lib." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        own = _stage(module)
        if own is None:
            continue
        for imported in _runtime_imports(ast.parse(path.read_text())):
            theirs = _stage(imported)
            if theirs is not None and theirs > own:  # the root package itself holds only __version__
                wrong.append(f"{module} imports {imported}")
    assert wrong == [], "imports against the stage order:\n" + "\n".join(wrong)


def _module_graph() -> dict[str, set[str]]:
    """module -> the bloodcell_lib modules it imports (module level or inside functions; a
    ``from package import module`` counts as importing the module)."""
    modules = {"bloodcell_lib." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bloodcell_lib"):
                named = {f"{node.module}.{alias.name}" for alias in node.names} & modules.keys()
                edges |= named or {node.module}
            elif isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name.startswith("bloodcell_lib")}
        graph[module] = {m for m in edges if m in modules and m != module and "." in m.removeprefix("bloodcell_lib.")}
    return graph


def test_no_import_cycle_between_modules():
    """Late imports inside functions count too: a cycle dodged at run time is still a circle."""
    graph, cycles, state = _module_graph(), [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                cycles.append(" -> ".join(path[path.index(other):] + [module, other]) if other in path else other)
            elif other not in state:
                visit(other, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)
