"""The package's import graph, read from the source (ast; nothing is imported): no import
cycle in megatron/early_exit, counting imports inside functions too (a lazy import hides a
circle, it does not remove it), and no test module importing another one."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "megatron.early_exit"


def _modules(folder: str, prefix: str) -> dict:
    """Dotted module name -> file, for every .py file under `folder`."""
    found = {}
    for directory, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted[: -len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return {m: p for m, p in found.items() if m.startswith(prefix)}


def _imported_names(path: str, module: str):
    """Every name `module` imports (absolute or relative, at any depth of the file)."""
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package
                for _ in range(node.level - 1):
                    parent = parent.rpartition(".")[0]
                base = f"{parent}.{base}" if base else parent
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph(prefix: str = PACKAGE) -> dict:
    """Module -> the package's modules it imports. `from pkg import name` counts as an import
    of pkg.name where that is a module, else of pkg (its __init__); importing a.b.c also runs
    a.b's __init__ (unless the importer is inside a.b, which is then importing already)."""
    modules = _modules(os.path.join(ROOT, *prefix.split(".")), prefix)

    def resolve(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: set() for m in modules}
    for module, path in modules.items():
        for name in _imported_names(path, module):
            target = resolve(name) if name.startswith(prefix) else None
            if target is None or target == module:
                continue
            graph[module].add(target)
            parts = target.split(".")
            for i in range(len(prefix.split(".")) + 1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in modules and parent != module and not module.startswith(parent + "."):
                    graph[module].add(parent)
    return graph


def find_cycle(graph: dict):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_circle_and_its_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 50 and any(graph.values())  # the walk read the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_inference_runs_the_decoder_without_its_estimators_training():
    graph = import_graph()
    assert "megatron.early_exit.confidence_training" not in set().union(
        *(targets for module, targets in graph.items() if module.startswith(PACKAGE + ".inference"))
    )


def _reached(graph: dict, start: str) -> set:
    """Every module `start` imports, directly or through what it imports."""
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    return seen - {start}


CONVERTERS = ("hf.convert", "hf.add_exits", "legacy.convert")


def test_converters_and_the_checkpoint_package_import_no_training_module():
    graph = import_graph()
    training = PACKAGE + ".training"
    # The walk sees through lazy imports: the trainer reaches the checkpoint package and the model builder.
    assert {PACKAGE + ".checkpoint.writer", PACKAGE + ".models.builder"} <= _reached(graph, training + ".trainer")
    starts = [f"{PACKAGE}.{name}" for name in CONVERTERS] + [m for m in graph if m.startswith(PACKAGE + ".checkpoint")]
    offenders = {
        start: sorted(m for m in _reached(graph, start) if m == training or m.startswith(training + "."))
        for start in starts
    }
    assert not any(offenders.values()), f"imports of the training package: {offenders}"


def test_no_test_module_imports_another():
    offenders = []
    for path in sorted(_modules(os.path.join(ROOT, "tests"), "tests").values()):
        for name in _imported_names(path, os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")):
            if name.startswith("tests.test_") and name.count(".") == 1:
                offenders.append(f"{os.path.relpath(path, ROOT)} imports {name}")
    assert not offenders, "shared helpers belong in tests/helpers.py or a fixtures module:\n" + "\n".join(offenders)
