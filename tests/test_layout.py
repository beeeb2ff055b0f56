"""The shape of the code: imports run one way, from iaat_run at the bottom to the evaluation and
notebook modules at the top, and no module grows past what a reader takes in."""
import ast

from conftest import ROOT

# each module may import only modules of a lower layer
LAYERS = {"iaat_run": 0, "iaat_plot": 1, "iaat_fp16": 1, "iaat": 2, "iaat_autoattack": 3,
          "iaat_report": 4, "iaat_eval": 5, "iaat_radius": 6, "iaat_notebook": 6,
          "iaat_export": 6}
# the command line's hand-over: `python iaat.py eval|rank|export` imports these inside iaat.main
HANDED_OVER = {("iaat", "main"): {"iaat_eval", "iaat_radius", "iaat_export"}}
LIMITS = {"iaat": 1100}  # lines; every other module at most 700


def _imports(tree):
    """(function or None, module) for every import of a project module, at any depth."""
    found = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                else func
            if isinstance(child, ast.Import):
                found.extend((func, a.name.split(".")[0]) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((func, child.module.split(".")[0]))
            visit(child, name if func is None else func)
    visit(tree, None)
    return [(f, m) for f, m in found if m in LAYERS]


def test_imports_run_one_way():
    assert set(LAYERS) == {p.stem for p in ROOT.glob("iaat*.py")}  # every module has a layer
    wrong = []
    for module, layer in LAYERS.items():
        tree = ast.parse((ROOT / f"{module}.py").read_text())
        for func, imported in _imports(tree):
            allowed = LAYERS[imported] < layer or imported in HANDED_OVER.get((module, func), ())
            if not allowed:
                wrong.append(f"{module}{'.' + func if func else ''} imports {imported}")
    assert not wrong, wrong


def test_the_launcher_and_scripts_take_run_machinery_from_iaat_run():
    """iaat.py uses iaat_run's names but is not where others get them."""
    import iaat_run
    machinery = {n for n in vars(iaat_run) if not n.startswith("_")} - {"Path", "Optional",
                                                                        "Callable", "dataclass"}
    for path in [ROOT / "imagenet" / "train.py", *ROOT.glob("scripts/*.py"),
                 *ROOT.glob("benchmarks/*.py"), *ROOT.glob("iaat_*.py")]:
        tree = ast.parse(path.read_text())
        through_iaat = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                        and isinstance(n.value, ast.Name) and n.value.id == "iaat"}
        through_iaat |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                         and n.module == "iaat" for a in n.names}
        assert not through_iaat & machinery, (path.name, sorted(through_iaat & machinery))


def test_no_module_is_too_long_to_read():
    for path in ROOT.glob("iaat*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= LIMITS.get(path.stem, 700), (path.name, lines)


def test_every_module_is_installed():
    """`pip install -e .` installs every module, so that notebooks import them from anywhere."""
    import re
    text = (ROOT / "pyproject.toml").read_text()
    listed = re.findall(r'"(\w+)"', re.search(r"py-modules = \[([^\]]*)\]", text).group(1))
    assert sorted(listed) == sorted(LAYERS)
