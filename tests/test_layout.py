"""The package's architecture, checked on its source: imports flow one way, config → tasks → data →
modeling → training → commands, with `checkpoints` and `cloud` as leaves that only the commands
wire in; no import cycle; and no code outside a task type's own module compares a task-type name.
Every import counts, those inside functions too; only `if TYPE_CHECKING:` blocks are left out."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "trainer"

# Low to high. A module may import its own layer and the layers below, never one above.
LAYERS = [
    {"trainer", "trainer.config", "trainer.fault_injection", "trainer.demo"},
    {"trainer.tasks"},
    {"trainer.data"},
    {"trainer.modeling"},
    {"trainer.training"},
    {"trainer.commands", "trainer.cli", "trainer.__main__"},
]
TOP = len(LAYERS) - 1
# The leaves, and all that each may import besides itself. Below the commands, nothing imports them.
LEAVES = {
    "trainer.checkpoints": {"trainer", "trainer.config"},
    "trainer.cloud": {"trainer", "trainer.config", "trainer.checkpoints.storage"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (ROOT / Path(*name.split(".")) / "__init__.py").is_file()


def is_module(name: str) -> bool:
    return is_package(name) or (ROOT / Path(*name.split("."))).with_suffix(".py").is_file()


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports_of(path: Path) -> set[str]:
    """The package's modules that the module at `path` imports (a name imported from a package is
    the submodule of that name where there is one)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            for child in getattr(node, "orelse", []):
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "trainer")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "trainer":
                subs = [f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}")]
                found.update(subs if len(subs) == len(node.names) else [target, *subs])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(name)
    return found


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


GRAPH = {module_name(p): imports_of(p) for p in sources()}


def group(name: str, groups) -> str | None:
    """The longest entry of `groups` that is `name` or a package above it (the root `trainer`
    only as itself: it holds the version)."""
    matches = [g for g in groups if name == g or (g != "trainer" and name.startswith(g + "."))]
    return max(matches, key=len) if matches else None


def layer(name: str) -> int | None:
    found = [(len(g), i) for i, members in enumerate(LAYERS) if (g := group(name, members))]
    return max(found)[1] if found else None


def wrong_arrows(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for name, imported in graph.items():
        leaf = group(name, LEAVES)
        for target in imported:
            target_leaf = group(target, LEAVES)
            if leaf:
                if target_leaf != leaf and group(target, LEAVES[leaf]) is None:
                    wrong.append(f"{name} -> {target} (a leaf imports only {sorted(LEAVES[leaf])})")
            elif target_leaf:
                if layer(name) != TOP:
                    wrong.append(f"{name} -> {target} (only the commands wire in a leaf)")
            elif layer(target) > layer(name):
                wrong.append(f"{name} -> {target} (layer {layer(name)} imports layer {layer(target)})")
    return sorted(wrong)


def cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    found = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            walk(start, [start])
    return found


def test_every_module_has_a_place_in_the_layers_or_the_leaves():
    unplaced = [name for name in GRAPH if layer(name) is None and group(name, LEAVES) is None]
    assert not unplaced
    assert {"trainer.tasks.types.base", "trainer.checkpoints.commits", "trainer.cloud.vertex"} <= set(GRAPH)


def test_imports_flow_from_config_up_to_the_commands_and_leaves_stay_leaves():
    assert not wrong_arrows(GRAPH), "\n".join(wrong_arrows(GRAPH))


def test_no_import_cycle():
    assert not cycles(GRAPH), "\n".join(cycles(GRAPH))


def test_the_checks_find_an_arrow_downwards_a_leaf_reaching_up_and_a_cycle():
    assert wrong_arrows({"trainer.data": {"trainer.training.trainer"},
                         "trainer.checkpoints.callback": {"trainer.training.trainer", "trainer.config"},
                         "trainer.training.trainer": {"trainer.checkpoints.callback"},
                         "trainer.cloud.aip": {"trainer.checkpoints.storage"}}) == [
        "trainer.checkpoints.callback -> trainer.training.trainer (a leaf imports only "
        "['trainer', 'trainer.config'])",
        "trainer.data -> trainer.training.trainer (layer 2 imports layer 4)",
        "trainer.training.trainer -> trainer.checkpoints.callback (only the commands wire in a leaf)",
    ]
    assert cycles({"trainer.tasks.spec": {"trainer.tasks.types"}, "trainer.tasks.types": {"trainer.tasks.spec"}}) == [
        "trainer.tasks.spec -> trainer.tasks.types -> trainer.tasks.spec"]
    # what the graph is read from: relative imports, `from package import module`, imports in functions
    assert "trainer.tasks.metrics" in GRAPH["trainer.tasks.types.base"]  # `from .. import metrics`
    assert "trainer.checkpoints.storage" in GRAPH["trainer.checkpoints.commits"]
    assert "trainer.checkpoints.callback" in GRAPH["trainer.commands"]  # imported inside `train`
    assert "trainer.tasks.spec" not in GRAPH["trainer.tasks.types.base"]  # only under TYPE_CHECKING


TYPE_MODULES = PACKAGE / "tasks" / "types"


def type_comparison():
    """What comparing a task-type name looks like: a type name's string beside ==, != or in; or
    `.type` / `type_name` compared with anything."""
    from trainer.tasks.types import TASK_TYPES

    names = "|".join(map(re.escape, TASK_TYPES))
    return re.compile(rf"""(==|!=|\bin\b)\s*[(\[{{]?\s*["']({names})["']|["']({names})["']\s*(==|!=|\bin\b)"""
                      r"|\.type\s*(==|!=|\bin\b)|\btype_name\s*(==|!=|\bin\b)")


def test_no_code_outside_the_task_type_modules_compares_a_task_type_name():
    """`spec.type == "regression"`, `type_name in ("classification", …)`: such a branch belongs in
    the type's module. Declarations (presets, the demo's tasks) may name types; code may not test them."""
    compare = type_comparison()
    found = []
    for path in sources():
        if TYPE_MODULES in path.parents:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if compare.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("line", ['if spec.type == "regression":', 'elif t in ("multiple_choice", "x"):',
                                  'kind = spec.type in TOKENS', 'if "token_classification" == name:'])
def test_the_type_name_check_catches_the_usual_spellings(line):
    assert type_comparison().search(line)
    assert not type_comparison().search('"type": "regression",')  # a declaration


def test_only_the_commands_reach_the_test_only_fault_injection():
    users = sorted(name for name, imported in GRAPH.items() if "trainer.fault_injection" in imported)
    assert users == ["trainer.commands"]


def test_every_registered_type_is_its_own_module():
    from trainer.tasks.types import TASK_TYPES

    for name, task_type in TASK_TYPES.items():
        assert type(task_type).__module__ == f"trainer.tasks.types.{name}", name
        assert (TYPE_MODULES / f"{name}.py").is_file()
