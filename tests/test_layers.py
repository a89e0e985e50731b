"""The layering the README states, checked on the source (every import, lazy ones included)."""

from __future__ import annotations

import ast
import pathlib
import types

import ckpt_callbacks as cc

PACKAGE = pathlib.Path(cc.__file__).parent
RANK = {"errors": 0, "distributed": 0, "format": 1, "storage": 1, "directory": 2, "layouts": 2}
RANK |= {"saving": 3, "restoring": 3, "manager": 4, "interop": 4, "cli": 5, "clu": 6}
# A subpackage imports only subpackages of a lower rank (never a sibling): lint-imports checks
# the same with import-linter's contracts (setup.cfg); this scan also sees lazy imports.


def _imports(source: pathlib.Path) -> set[str]:
    """Every module ``source`` imports (``from ckpt_callbacks import x`` gives ``ckpt_callbacks.x``)."""
    out = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names}
    return out


def _subpackage_modules() -> list[tuple[str, pathlib.Path]]:
    return [(p.relative_to(PACKAGE).parts[0], p) for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE]


def test_format_imports_no_tensorstore_or_fsspec():
    modules = [p for name, p in _subpackage_modules() if name == "format"]
    assert len(modules) >= 7
    for source in modules:
        bad = {m for m in _imports(source) if m.split(".")[0] in ("tensorstore", "fsspec")}
        assert not bad, (source.name, bad)


def test_restoring_never_imports_saving():
    for name, source in _subpackage_modules():
        if name == "restoring":
            assert not any(m.startswith("ckpt_callbacks.saving") for m in _imports(source)), source.name


def test_imports_only_go_down_the_layers():
    crossings = set()
    for name, source in _subpackage_modules():
        for module in _imports(source):
            parts = module.split(".")
            inside = parts[0] == "ckpt_callbacks" and len(parts) > 1 and parts[1] in RANK and parts[1] != name
            if inside and RANK[parts[1]] >= RANK[name]:
                crossings.add((name, parts[1]))
    assert crossings == set()


def test_root_exports_exactly_the_public_names():
    # Submodules show up as attributes once anything imported them (``clu`` after the clu tests), so
    # modules are left out by type, whatever the test order; the names below are the API.
    public = {n for n in dir(cc) if not n.startswith("_") and not isinstance(getattr(cc, n), types.ModuleType)}
    names = {
        "Checkpoint", "CheckpointCallback", "CheckpointError", "CheckpointExistsError", "CheckpointFormatError",
        "CheckpointInfo", "CheckpointInterval", "CheckpointNotFoundError", "CheckpointPathError", "CheckpointReader",
        "CheckpointStorageError", "Checkpointer", "CorruptCheckpointError", "Decision", "KeepPolicy", "LayoutCounts",
        "LeafShape", "PeerSaveError", "RestoreMismatchError", "SaveHandle", "SaveOptions", "SavePolicy", "SaveStats",
        "ScalarWriter", "ShardingRuleError", "StorageNotSharedError", "StorageOptions", "StorageTimeoutError",
        "find_latest_checkpoint", "list_checkpoints", "match_partition_rules", "open_checkpoint", "plan_layout",
        "restore", "save", "save_async", "save_items", "save_items_async", "shardings_from_rules", "verify",
        "VerifyReport", "VerifyProblem", "MissingFileError", "DeletedArrayError", "LocalTier",
        "export_safetensors",
    }  # fmt: skip
    assert public == names
    assert callable(cc.restore)  # the function, not a module of that name


def _module_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name imported from a package is that
    package's submodule when there is one; the packages above a module are not counted)."""
    files = {
        p: ".".join(("ckpt_callbacks", *p.relative_to(PACKAGE).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")
    }
    names = {m.removesuffix(".__init__") for m in files.values()}
    graph = {}
    for path, module in files.items():
        wanted = {m for m in _imports(path) if m.startswith("ckpt_callbacks")}
        me = module.removesuffix(".__init__")
        ancestors = {".".join(me.split(".")[:i]) for i in range(1, me.count(".") + 1)}  # imported implicitly first
        graph[me] = {m for m in wanted if m in names} - {me} - ancestors
    return graph


def test_no_import_cycle_between_modules():
    graph, state, cycles = _module_graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # Through its facade a package's module may import a sibling module; a module importing its own
    # package's facade (which imports it back) is a cycle.
    assert cycles == []


def test_longest_chain_of_layers_is_at_most_seven():
    graph: dict[str, set[str]] = {}
    for name, source in _subpackage_modules():
        for module in _imports(source):
            parts = module.split(".")
            if parts[0] == "ckpt_callbacks" and len(parts) > 1 and parts[1] in RANK and parts[1] != name:
                graph.setdefault(name, set()).add(parts[1])

    def depth(node: str) -> int:
        return 1 + max((depth(n) for n in graph.get(node, ())), default=0)

    assert max(depth(n) for n in RANK) <= 7
