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
