"""The package's layout rules (docs/ARCHITECTURE.md): no import circle, modules of a readable size,
function-level imports only for heavy dependencies, with their reason."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mlxqat"
MAX_LINES = 600
LAZY_OK = ("mlx_lm", "transformers", "xllamacpp", "jinja2", "matplotlib")  # heavy or optional


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _resolve(name: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _graph():
    """module -> the mlxqat modules it imports anywhere in its body (function-level imports included)."""
    mods = dict(_modules())
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                full = _resolve(name, path, node)
                subs = [f"{full}.{a.name}" for a in node.names]
                deps.update(s for s in subs if s in mods) if any(s in mods for s in subs) else deps.add(full)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d not in (name, "mlxqat")}
    return graph


def _cycle(graph):
    """One import circle as a list of modules, or None."""
    state, stack = {}, []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        state[v] = 2
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_no_import_circle():
    graph = _graph()
    assert len(graph) > 30 and graph["mlxqat.training.job"]  # the walk found the package and its imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_circle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_modules_are_a_readable_size_or_say_why_not():
    long = []
    for name, path in _modules():
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if len(text.splitlines()) > MAX_LINES and f"past the project's {MAX_LINES}" not in doc:
            long.append(f"{name}: {len(text.splitlines())} lines")
    assert not long, long


def test_function_level_imports_are_heavy_dependencies_with_a_reason():
    found = []
    for name, path in _modules():
        if path.name in ("train.py", "finetune.py", "verify.py", "imatrix.py", "__main__.py") and path.parent == PKG:  # `python -m` entry points only
            continue
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                continue
            mod = node.module if isinstance(node, ast.ImportFrom) and node.level == 0 else (
                node.names[0].name if isinstance(node, ast.Import) else "." + (node.module or ""))
            reason = "#" in lines[node.end_lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
            if not mod.startswith(LAZY_OK) or not reason:
                found.append(f"{name}:{node.lineno} {mod}")
    assert not found, found
