"""The import graph of the library (every .py outside tests/, bench/ and experiments/), read with ast: every
`import` statement wherever it sits (an import inside a function closes a circle as surely as one at the
top), except the `if __name__ == "__main__":` block of a script, which runs only when the file is the
program. A new circle fails here; README.md ("How the files depend on each other") says what imports what."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"tests", "bench", "experiments", ".venv", ".git"}


def library_modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in ROOT.rglob("*.py") if not SKIP & set(p.relative_to(ROOT).parts)}


def is_main_block(node) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def imports(path: Path, modules) -> set[str]:
    """The library modules `path` imports (`from support import x` counts as support.x when that is a module)."""
    out, todo = set(), [n for n in ast.parse(path.read_text()).body if not is_main_block(n)]
    while todo:
        node = todo.pop()
        todo += list(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        out |= {n for n in names if n in modules}
    return out


def graph() -> dict[str, set[str]]:
    modules = library_modules()
    return {m: imports(p, modules) - {m, "support"} for m, p in modules.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_reader_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_library():
    assert cycles(graph()) == []


def test_the_model_files_import_only_torch_and_the_core():
    g = graph()
    assert g["core"] == set() and g["sae"] == {"core"} and g["polysae"] == {"core"} and g["crosscoder"] == {"core"}
    assert g["fmxcoder"] == {"core", "crosscoder"}
