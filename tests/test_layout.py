"""The package's layout rules, read from its source with ``ast``: no import circles,
argparse only in ``cli/``, nothing below ``methods/`` importing ``methods/``, no reach
for another module's private names; and run hashes unchanged by moves."""

from __future__ import annotations

import ast
from pathlib import Path

import ticketlab

ROOT = Path(ticketlab.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


ALL = {_module_name(p) for p in ROOT.rglob("*.py")}


def _imports() -> dict[str, set[tuple[str, tuple[str, ...]]]]:
    """Module -> {(imported module, names imported from it)}, top-level and lazy alike."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {(a.name, ()) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                names = tuple(a.name for a in node.names)
                # `from . import x` with x a submodule imports that submodule
                subs = [n for n in names if f"{target}.{n}" in ALL]
                edges |= {(f"{target}.{n}", ()) for n in subs}
                if len(subs) < len(names):
                    edges.add((target, names))
        graph[name] = edges
    return graph


GRAPH = _imports()
MODULES = set(GRAPH)


def _internal(graph):
    return {m: {t for t, _ in edges if t in MODULES and t != m} for m, edges in graph.items()}


def test_no_import_circles():
    deps = _internal(GRAPH)
    # depth-first search; a grey (1) module met again closes a circle
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for t in sorted(deps[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(deps):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_argparse_only_in_cli():
    users = sorted(m for m, edges in GRAPH.items() if any(t == "argparse" for t, _ in edges))
    assert users and all(m.startswith("ticketlab.cli") for m in users), users


def test_nothing_below_methods_imports_methods():
    above = ("ticketlab.methods", "ticketlab.cli")
    bad = sorted(
        (m, t)
        for m, ts in _internal(GRAPH).items()
        if not m.startswith(above) and m != "ticketlab"
        for t in ts
        if t.startswith("ticketlab.methods")
    )
    assert not bad, bad


def test_only_cli_imports_cli_or_the_package_root():
    bad = sorted(
        (m, t)
        for m, ts in _internal(GRAPH).items()
        # ``python -m ticketlab`` is a front end, as the ``ticketlab`` script is
        if not m.startswith("ticketlab.cli") and m != "ticketlab.__main__"
        for t in ts
        if t == "ticketlab" or t.startswith("ticketlab.cli")
    )
    assert not bad, bad


def test_no_private_names_across_modules():
    bad = sorted(
        (m, t, n)
        for m, edges in GRAPH.items()
        for t, names in edges
        if t in MODULES and t != m
        for n in names
        if n.startswith("_") and not n.startswith("__")
    )
    assert not bad, bad


def test_run_hashes_unchanged():
    """Hashes taken before the layout change: old run directories are still found."""
    from ticketlab.methods.dst import DSTSpec
    from ticketlab.methods.prune import PruneSpec
    from ticketlab.methods.supermask import SupermaskSpec
    from ticketlab.spec import Spec, identity, spec_hash

    cases = {
        "90983947f4c5": Spec(method="lottery", dataset="xor", model="mlp"),
        "209850ebdada": Spec(method="train"),
        "8401948623c4": PruneSpec(method="prune", criterion="snip", sparsity=0.9),
        "a9a40c35afb6": DSTSpec(method="dst", density=0.1),
        "f848c8a7750e": SupermaskSpec(method="supermask"),
    }
    for expected, spec in cases.items():
        assert spec_hash(identity(spec, 100)) == expected, spec.method


def test_run_directories_unchanged(tmp_path):
    """The directory the command line makes for a run is the one it made before."""
    from ticketlab.cli import main

    common = ["--dataset", "xor", "--model", "mlp_16", "--steps", "4it", "--eval-every", "2it"]
    common += ["--batch-size", "16", "--runs-dir", str(tmp_path), "--quiet"]
    assert main(["lottery", *common, "--levels", "1"]) == 0
    assert main(["dst", *common, "--density", "0.5"]) == 0
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == ["dst-ef9aa52971a9", "lottery-c8c061c98132"]
