"""Set-up files stay in step: conda users get the same packages as pip users."""
import ast
import json
import re
import sys

from conftest import ROOT


def _pins(lines):
    return sorted(m.group(0) for line in lines
                  if (m := re.match(r"[A-Za-z0-9_.-]+==[^\s#]+", line.strip().lstrip("- "))))


def test_environment_yml_pins_match_requirements():
    req = _pins((ROOT / "requirements.txt").read_text().splitlines())
    env = _pins((ROOT / "environment.yml").read_text().splitlines())
    assert req == env and "torch==2.15.0" in req


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    # the README gives both tiers; CI runs the full one
    assert re.search(r"^python -m pytest( +#|$)", readme, re.M)
    assert re.search(r"^python -m pytest --full( +#|$)", readme, re.M)
    assert ci.strip().endswith("\npython -m pytest --full")
    assert "pip install -r requirements.txt -e ." in readme
    assert "pip install -q -r requirements.txt -e ." in ci


# import name -> the distribution that provides it, where the two differ
DISTRIBUTIONS = {"sklearn": "scikit-learn", "PIL": "pillow", "pyautoattack": "pyautoattack"}


def _imports(source: str) -> set:
    tree = ast.parse(source)
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
              and n.level == 0}
    return {name.split(".")[0] for name in names}


def test_every_third_party_import_is_pinned():
    """What the code, the tests, the scripts and the notebooks import is installed by the
    README's set-up command itself, not only through another package's dependencies."""
    files = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "build" not in p.parts]
    used = set().union(*(_imports(p.read_text()) for p in files))
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        used |= set().union(*(_imports("".join(c["source"])) for c in cells
                              if c["cell_type"] == "code"))
    own = {p.stem for p in files} | {"conftest"}
    third_party = {n for n in used - own - set(sys.stdlib_module_names) if n != "__future__"}
    pinned = {line.split("==")[0].lower() for line in
              (ROOT / "requirements.txt").read_text().splitlines() if "==" in line}
    missing = {n for n in third_party if DISTRIBUTIONS.get(n, n).lower() not in pinned}
    assert not missing, f"imported but not in requirements.txt: {sorted(missing)}"
    assert {"scipy", "nbformat", "PIL"} <= third_party  # the check sees them
