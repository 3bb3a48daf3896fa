"""The package's layers and no import cycles. Every import counts, also one inside a function: a lazy import hides
a cycle, it does not remove it.

Data flows data → models → tools → workflows → agent / batch → report (DESIGN §3); as imports, the report is a
library the agent and batch call at their end (it reads the run store and needs only tools), and the demo runs
the whole job, the audit included."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "aspire"
# a module may import from its own layer and the layers before it (the longest prefix names a module's layer);
# the modules directly under aspire/ (config, errors, store, schemas, llm, ...) are the base every layer may use
LAYERS = [("aspire.data",), ("aspire.models",), ("aspire.tools",), ("aspire.report",), ("aspire.workflows",),
          ("aspire.agent",), ("aspire.batch",), ("aspire.workflows.demo", "aspire.store_docs"), ("aspire.cli",)]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("aspire"):
                # `from aspire.agent import nodes` imports the module aspire.agent.nodes, not the package's names
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                graph[name] |= subs if len(subs) == len(node.names) else subs | {node.module}
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in modules}
        graph[name] -= {name}
    return graph


def layer(module: str) -> int:
    matches = [(len(prefix), i) for i, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1] if matches else -1


def test_no_module_imports_a_later_layer():
    wrong = [f"{m} imports {t}" for m, targets in import_graph().items() for t in targets if layer(t) > layer(m)]
    assert not wrong, "\n".join(sorted(wrong))


def test_there_are_no_import_cycles():
    graph, done, path, cycles = import_graph(), set(), [], []

    def visit(m: str) -> None:
        if m in path:
            cycles.append(" -> ".join(path[path.index(m):] + [m]))
            return
        if m in done:
            return
        path.append(m)
        for t in sorted(graph[m]):
            visit(t)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    assert not cycles, "\n".join(cycles)
