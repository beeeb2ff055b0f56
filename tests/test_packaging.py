"""Set-up files stay in step: conda users get the same packages as pip users."""
import re

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
    assert "python -m pytest" in readme and ci.strip().endswith("python -m pytest")
    assert "pip install -r requirements.txt -e ." in readme
    assert "pip install -q -r requirements.txt -e ." in ci
