"""The layout: the tutorial at the top level, everything else in longlora/, and imports that run one way.

    lower (longlora.cli, .tokenizer, .weights, .data, .memory) <- attention <- model <- lora
        <- middle (longlora.adapter, .shard, .checkpoint, .caches, .run, .estimate) <- train, sample
        <- tools (longlora.export, .eval, .bench, .gpu_check, .inspect, .draw, demo)

A module imports only its own layer or lower ones, and the import graph has no cycle. The imports are read
from the source with `ast`, never by importing it, so an import inside a function (a lazy import) counts as
much as one at the top of the file: it is the same dependency, only later.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ("model.py", "attention.py", "lora.py", "train.py", "sample.py")
PACKAGES = ("longlora",)  # `from longlora import x` imports the module longlora.x

# The layers, lowest first. A new file gets a place here on purpose, or test_every_module_has_a_layer fails.
LAYERS = [
    ["longlora", "longlora.cli", "longlora.output", "longlora.tokenizer", "longlora.weights", "longlora.data", "longlora.memory"],
    ["attention"],
    ["model"],
    ["lora"],
    ["longlora.adapter", "longlora.devices", "longlora.shard", "longlora.checkpoint", "longlora.caches", "longlora.run", "longlora.estimate"],
    ["train", "sample"],
    ["longlora.export", "longlora.eval", "longlora.bench", "longlora.gpu_check", "longlora.inspect", "longlora.draw",
     "demo"],
]
LAYER = {module: n for n, modules in enumerate(LAYERS) for module in modules}


def is_main_block(stmt) -> bool:
    """`if __name__ == "__main__":` (either way round)."""
    if not (isinstance(stmt, ast.If) and isinstance(stmt.test, ast.Compare) and len(stmt.test.comparators) == 1):
        return False
    sides = [stmt.test.left, stmt.test.comparators[0]]
    return (isinstance(stmt.test.ops[0], ast.Eq) and any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
            and any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides))


def imported_names(source: str, package: str = "") -> set:
    """The absolute names of the modules `source` imports, anywhere in it (functions, classes, if, try).

    `from m import y` imports m; `from longlora import x` imports longlora.x; a relative import is resolved
    against `package` (the package the file is in, "" at the top level). A top-level
    `if __name__ == "__main__":` block hands the command line over to another module: it is not a
    dependency of the module, so its body is left out (its `else:` runs on import and is kept).
    """
    roots = []
    for stmt in ast.parse(source).body:
        roots += stmt.orelse if is_main_block(stmt) else [stmt]
    names = set()
    for node in (node for root in roots for node in ast.walk(root)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # `from . import x` in longlora/y.py: level 1 is longlora itself, level 2 its parent
                parts = package.split(".") if package else []
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            if base in PACKAGES:
                names |= {f"{base}.{alias.name}" for alias in node.names if alias.name != "*"}
            else:
                names.add(base)
    return names


def project_modules() -> dict:
    """{module name: file} for every top-level *.py (`model`) and every longlora/*.py (`longlora.cli`)."""
    modules = {}
    for path in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("longlora/*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def project_module(name: str, known: set):
    """The project module an imported name belongs to (`longlora.cli.Parser` -> `longlora.cli`), or None."""
    parts = name.split(".")
    return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in known), None)


def import_graph():
    """(modules, graph): {module: file}, and {module: the project modules it imports}."""
    modules = project_modules()
    known = set(modules) | set(LAYER)  # a module listed in LAYERS counts even without a file
    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        names = imported_names(path.read_text(encoding="utf-8"), package)
        graph[module] = {m for m in (project_module(n, known) for n in names) if m}
    return modules, graph


def find_cycle(graph: dict):
    """One cycle as a path [a, b, ..., a], or None. Depth first: a cycle is an edge back onto the current path."""
    path, done = [], set()

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if cycle := visit(nxt):
                return cycle
        path.pop()
        done.add(node)
        return None

    return next((cycle for node in sorted(graph) if (cycle := visit(node))), None)


def lines(name: str) -> int:
    return len((ROOT / name).read_text(encoding="utf-8").splitlines())


def test_the_import_parser_sees_lazy_package_and_relative_imports_but_not_the_main_block():
    source = '''
import os
from model import Transformer
from longlora import data, weights as w
from .cli import Parser
from . import memory

def load():
    import lora  # a lazy import is still an import

try:
    from longlora.shard import shard_model
except ImportError:
    pass

if __name__ == "__main__":
    from longlora.export import main  # the command line handed over: not counted
'''
    assert imported_names(source, package="longlora") == {
        "os", "model", "longlora.data", "longlora.weights", "longlora.cli", "longlora.memory", "lora", "longlora.shard"}


def test_the_cycle_finder_prints_the_cycle_it_finds():
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"train": {"lora", "model"}, "lora": {"model"}, "model": set()}) is None


def test_every_module_has_a_layer():
    modules = project_modules()
    missing = [f"{modules[m].relative_to(ROOT)} has no layer: give it a place in LAYERS in tests/test_layout.py"
               for m in modules if m not in LAYER]
    assert not missing, "\n".join(missing)


def test_imports_only_go_down_the_layers():
    modules, graph = import_graph()
    upward = [f"{modules[a].relative_to(ROOT)} imports {b} (layer {LAYER[b]}) from layer {LAYER[a]}"
              for a in sorted(graph) for b in sorted(graph[a]) if a in LAYER and b in LAYER and LAYER[b] > LAYER[a]]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph()[1])
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_top_level_is_the_tutorial_and_at_most_two_more_files():
    top = sorted(path.name for path in ROOT.glob("*.py"))
    missing = [name for name in TUTORIAL if name not in top]
    others = [name for name in top if name not in TUTORIAL]
    assert not missing, "tutorial files missing at the top level: " + ", ".join(missing)
    assert len(others) <= 2, f"{len(others)} .py files at the top level besides the tutorial (at most 2): " + ", ".join(others)


def test_each_tutorial_file_reads_in_one_sitting():
    long = [f"{name} has {lines(name)} lines (at most 450)" for name in TUTORIAL if (ROOT / name).exists() and lines(name) > 450]
    assert not long, "\n".join(long)


def test_the_tutorial_together_is_at_most_1700_lines():
    total = sum(lines(name) for name in TUTORIAL if (ROOT / name).exists())
    assert total <= 1700, f"the five tutorial files have {total} lines together (at most 1,700)"
