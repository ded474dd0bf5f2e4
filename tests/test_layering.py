"""The dependency direction (CONTRIBUTING.md): each part of the package imports only the layers
below it. Read from the source (every import, top-level or inside a function), not from
sys.modules."""
import ast
import pathlib

import phi_reason

ROOT = pathlib.Path(phi_reason.__file__).parent
LEAVES = {"errors", "files", "hardware", "resources", "host_allocator"}
# part -> the parts it may import (besides itself and the leaves)
ALLOWED = {
    "sharding": set(),  # knows no model: logical axes -> mesh axes for any array
    "model": {"sharding"},
    "train": {"model", "sharding"},  # pure numerics: no data files, checkpoints or jobs
    "engine": {"model", "sharding"},
    "eval": set(),  # text in, verdict out: neither JAX nor the model
    "data": {"eval"},  # answer extraction from reference solutions is the grader's
    "checkpoint": {"model", "sharding"},
    "config": {"model", "train"},  # registries of names
    "jobs": {"model", "sharding", "train", "engine", "eval", "data", "checkpoint", "config"},
    "__init__": {"model", "checkpoint", "engine", "data", "eval"},
}
TOP = {"cli", "demo", "demo_real"}  # may use anything


def imported_parts(path: pathlib.Path):
    rel = path.relative_to(ROOT)
    package = list(rel.parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            names = node.module.split(".") if node.module else [node.names[0].name]
            yield (base + names)[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("phi_reason."):
            yield node.module.split(".")[1], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("phi_reason."):
                    yield alias.name.split(".")[1], node.lineno


def part_of(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_part_imports_only_the_layers_below():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        part = part_of(path)
        if part in TOP:
            continue
        allowed = ALLOWED.get(part, set()) | LEAVES | {part}
        for imported, line in imported_parts(path):
            if imported not in allowed:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {part} imports {imported}")
    assert not bad, "\n".join(bad)


def test_no_part_below_the_jobs_imports_them():
    users = {part_of(p) for p in ROOT.rglob("*.py") if any(
        imported == "jobs" for imported, _ in imported_parts(p))}
    assert users <= TOP | {"jobs"}, users
