"""The plugin's imports run one way: CLIs -> set-up -> shared helpers -> model, with no cycle.

The graph is read from the source with ``ast`` (module-level and function-level imports alike,
so a lazy import counts), over the flat modules of ``research/baichuan2``.
"""
import ast
import os
import subprocess
import sys

PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "research", "baichuan2")
MODULES = sorted(name[:-3] for name in os.listdir(PLUGIN) if name.endswith(".py"))
LIGHT = ("baichuan2_names", "baichuan2_cli", "baichuan2_checkpoints", "baichuan2_config", "baichuan2_preflight")


def is_cli(module):
    return module.startswith(("run_", "convert_")) or module in ("belle_preprocess", "merge_lora", "plan_memory",
                                                                  "train_tiny_tokenizer")


def imported_names(module):
    """Top-level names of every module ``module`` imports, anywhere in its source."""
    with open(os.path.join(PLUGIN, module + ".py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def import_graph():
    """``{module: set of plugin modules it imports}``."""
    return {module: imported_names(module) & set(MODULES) - {module} for module in MODULES}


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return path[path.index(child):] + [child]
            if child not in state:
                cycle = visit(child, path + [child])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_plugin_imports_have_no_cycle():
    graph = import_graph()
    assert "baichuan2_inference" in graph and "run_baichuan2" in graph
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_module_imports_a_cli():
    graph = import_graph()
    offenders = sorted(f"{module} imports {target}" for module, targets in graph.items()
                       for target in targets if is_cli(target))
    assert not offenders, offenders


def test_shared_helpers_import_nothing_heavy():
    """Importing the pre-flight layer (and the set-up modules) loads neither MindSpore, MindFormers nor torch."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            f"import {', '.join(LIGHT + ('baichuan2_run_setup', 'baichuan2_inference'))}; "
            "print(sorted(m for m in ('mindspore', 'mindformers', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, PLUGIN], capture_output=True, text=True, timeout=60,
                            check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
