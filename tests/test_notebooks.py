"""The notebooks' nbval set-up does what it says.

1. Every comment that looks like an nbval marker is one nbval really honours. nbval strips the
   `#`s and compares the whole rest of the line with its list (`nbval.plugin.comment_markers`,
   case-sensitive), so `# NBVAL_IGNORE_OUTPUT (because ...)` is no marker at all: the cell's
   output is compared, and fails on the next machine.
2. The committed outputs pass strict nbval when the notebooks' training runs at another thread
   count than the one that made them (2 threads). A different thread count splits torch's
   reductions differently, which changes the order of the float sums as another CPU does; over
   a training run that moves every figure that comes from training (docs/reproducibility.md).
   This stands in for another machine on whatever machine CI runs.
"""
import io
import os
import re
import shlex
import subprocess
import sys
import tokenize

import nbformat
import pytest
from nbval.plugin import comment_markers, find_comment_markers, metadata_tags

from conftest import QUICK_NOTEBOOKS, ROOT, write_fake_cifar
import iaat_notebook
import iaat_run

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Starts like an nbval marker: "NBVAL..." as nbval spells it, or "nbval_..." in any case (nbval
# compares case-sensitively, so a lower-case marker is ignored too). Prose ("# nbval runs ...") is not.
LOOKS_LIKE_A_MARKER = re.compile(r"(NBVAL|PYTEST_VALIDATE)|(?i:(nbval|pytest_validate)[_-])")


def _comments(source):
    """(line number, comment text, alone on its line) for every comment in a cell's source."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):  # e.g. IPython magics
        return [(n, line.strip(), True) for n, line in enumerate(source.splitlines(), 1)
                if line.strip().startswith("#")]
    return [(tok.start[0], tok.string, not tok.line[:tok.start[1]].strip())
            for tok in tokens if tok.type == tokenize.COMMENT]


def nbval_marker_problems(nb, name):
    """Messages for the comments and tags in notebook `nb` that look like nbval markers but that
    nbval does not honour. Cells are numbered as nbval numbers them (code cells from 0)."""
    problems = []
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    for num, cell in enumerate(code_cells):
        where = f"{name}::Cell {num}"
        for line_no, comment, alone in _comments(cell.source):
            text = comment.lstrip("#").strip()
            if not LOOKS_LIKE_A_MARKER.match(text):
                continue
            if not alone:
                problems.append(f"{where}, line {line_no}: {comment!r} follows code on its line; "
                                "nbval reads markers only on a line of their own")
            elif text not in comment_markers:
                problems.append(
                    f"{where}, line {line_no}: {comment!r} is not an nbval marker, so nbval "
                    f"ignores it (nbval knows exactly: {', '.join(sorted(comment_markers))}; "
                    "put any explanation on the next line)")
        for tag in cell.get("metadata", {}).get("tags", []):
            if tag.lower().startswith(("nbval", "pytest-validate", "raises-exception")) \
                    and tag not in metadata_tags:
                problems.append(f"{where}: tag {tag!r} is not an nbval tag "
                                f"(nbval knows exactly: {', '.join(sorted(metadata_tags))})")
    return problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_markers_are_ones_nbval_honours(path):
    problems = nbval_marker_problems(nbformat.read(path, as_version=4),
                                     str(path.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


def test_marker_check_catches_markers_nbval_ignores():
    honoured = ["# NBVAL_IGNORE_OUTPUT\n# (exact values differ between machines)\nprint(0.805)",
                "#NBVAL_SKIP\nprint(1)", "## NBVAL_CHECK_OUTPUT\nprint(1)",
                "x = 1\n  # NBVAL_RAISES_EXCEPTION\nraise ValueError"]
    ignored = ["# NBVAL_IGNORE_OUTPUT (exact values can differ in the last digit between machines)\n"
               "print(0.805)",  # the cell that once failed on a second machine
               "# nbval_ignore_output\nprint(1)", "# NBVAL_IGNORE_OUTPUT:\nprint(1)",
               "# NBVAL-SKIP\nprint(1)", "# PYTEST_VALIDATE_IGNORE_OUTPUTS\nprint(1)",
               "print(1)  # NBVAL_IGNORE_OUTPUT"]
    # The check agrees with nbval itself: nbval honours the first list and ignores the second.
    assert all(list(find_comment_markers(s)) for s in honoured)
    assert not any(list(find_comment_markers(s)) for s in ignored)
    cells = [nbformat.v4.new_markdown_cell("# NBVAL_NOT_CODE: markdown is not checked"),
             nbformat.v4.new_code_cell("# nbval is named here in prose, which is fine\nprint(1)")]
    cells += [nbformat.v4.new_code_cell(s) for s in honoured + ignored]
    cells.append(nbformat.v4.new_code_cell("print(1)", metadata={"tags": ["nbval-ignore-outputs"]}))
    problems = nbval_marker_problems(nbformat.v4.new_notebook(cells=cells), "synthetic.ipynb")
    first_bad = 1 + len(honoured)  # code cells are numbered from 0, as nbval numbers them
    assert [p.split(",")[0].split(":")[:3] for p in problems] == \
        [["synthetic.ipynb", "", f"Cell {n}"] for n in range(first_bad, first_bad + len(ignored) + 1)]
    assert problems[0] == (
        f"synthetic.ipynb::Cell {first_bad}, line 1: '# NBVAL_IGNORE_OUTPUT (exact values can "
        "differ in the last digit between machines)' is not an nbval marker, so nbval ignores it "
        "(nbval knows exactly: NBVAL_CHECK_OUTPUT, NBVAL_IGNORE_OUTPUT, NBVAL_RAISES_EXCEPTION, "
        "NBVAL_SKIP, PYTEST_VALIDATE_IGNORE_OUTPUT; put any explanation on the next line)")


# A figure in the prose: a decimal or a percentage, not a paper reference ("section 5.1")
FIGURE = re.compile(r"(?<![\w.])(?<!section )(?<!Sec )(\d+\.\d+%?|\d+%)(?![\w.]*\d)")


def unprinted_figures(nb) -> list:
    """The figures in a notebook's markdown that none of its code cells prints or sets: a prose
    figure x with d decimals is printed if some number y in the outputs or the code rounds to it
    (y or 100 y, for a percentage of a fraction). Code spans and links are not prose."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "\n".join([c.source for c in code] + [str(o.get("text", "")) + str(o.get("data", {}).get(
        "text/plain", "")) for c in code for o in c.get("outputs", [])])
    printed = [float(v) for v in re.findall(r"\d+(?:\.\d+)?", text)]
    missing = []
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        prose = re.sub(r"`[^`]*`|\]\([^)]*\)", " ", cell.source)
        for figure in FIGURE.findall(prose):
            value = figure.rstrip("%")
            d = len(value.split(".")[1]) if "." in value else 0
            if not any(round(y, d) == float(value) or round(100 * y, d) == float(value)
                       for y in printed):
                missing.append(figure)
    return missing


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_every_figure_in_the_prose_is_printed_by_the_notebook(path):
    """A student can check each number the text cites against the output beside it."""
    missing = unprinted_figures(nbformat.read(path, as_version=4))
    assert not missing, f"{path.name}: the prose cites figures no cell prints: {missing}"


def test_the_figure_check_finds_a_figure_no_cell_prints():
    cells = [nbformat.v4.new_markdown_cell("IAAT gets 50.3% (PGD-20), 98.6% clean, Sec 5.1, "
                                           "`--eps 1.5`, 0.42 and 7%."),
             nbformat.v4.new_code_cell("LABEL_NOISE = 0.07")]
    cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="pgd 0.5030 nat 98.61\n")]
    assert unprinted_figures(nbformat.v4.new_notebook(cells=cells)) == ["0.42"]


@pytest.mark.slow
def test_notebooks_pass_strict_nbval_trained_at_one_thread(tmp_path):
    """All the notebooks retrained from scratch at 1 thread (their committed outputs come from
    2), then compared strictly, as `python -m pytest` compares them. Copies in tmp_path have an
    empty RUNS_DIR, so they really retrain instead of reading back the runs of the suite's own
    notebook pass; they run in order and share runs, as in that pass (notebook 03 reads back
    notebook 01's IAAT run). An extra last cell in each copy checks that its kernel ran at 1
    thread. About 10 minutes on 2 cores (586 s measured, niced, on a shared 2-core machine)."""
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        count = max(c.execution_count or 0 for c in nb.cells if c.cell_type == "code")
        check = nbformat.v4.new_code_cell("import torch\nprint(torch.get_num_threads())",
                                         execution_count=count + 1)
        check.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
        nb.cells.append(check)
        nbformat.write(nb, tmp_path / path.name)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the repository's addopts
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval", *(p.name for p in NOTEBOOKS),
         "--nbval-current-env", "--nbval-sanitize-with", str(ROOT / "notebooks" / "sanitize.cfg"),
         "-p", "no:cacheprovider", "-q"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    cells = sum(1 + sum(c.cell_type == "code" for c in nbformat.read(p, as_version=4).cells)
                for p in NOTEBOOKS)
    assert f"{cells} passed" in proc.stdout, proc.stdout[-2000:]
    assert len(list((tmp_path / "runs").glob("*/summary.json"))) >= 2  # trained here, not read


def _set_parameters(source: str, values: dict) -> str:
    """The parameter cell with NAME = value lines changed as a user edits them (comments kept)."""
    lines = []
    for line in source.splitlines():
        m = re.match(r"^(\w+) = .*?(\s+#.*)?$", line)
        if m and m.group(1) in values:
            line = f"{m.group(1)} = {values[m.group(1)]!r}{m.group(2) or ''}"
        lines.append(line)
    return "\n".join(lines)


@pytest.mark.parametrize("path", [  # the quick tier takes notebook 00's, the full tier every one
    pytest.param(p, id=p.name, marks=() if p.name in QUICK_NOTEBOOKS else pytest.mark.slow)
    for p in NOTEBOOKS])
def test_notebook_renders_cifar_runs_made_from_its_printed_commands(path, tmp_path, monkeypatch,
                                                                    no_md5):
    """The CIFAR path of a notebook, as a GPU user takes it: set DATASET = "cifar10" (here with
    the small network and 6 epochs, on 40 images in CIFAR's on-disk format) and TRAIN_MISSING =
    False; run the cells; where a cell stops because a run is missing, run the `python
    ../iaat.py ...` commands it printed (here, in this process), then run the cell again. Every
    cell must then run; the findings are reported, not asserted (CHECK_FINDINGS = False). A
    cell may print its commands and a later one train (the commands not run yet are run)."""
    import contextlib

    import matplotlib

    import iaat
    matplotlib.use("Agg")
    write_fake_cifar(tmp_path / "data", "cifar10", n_train=40, n_test=20)
    values = {"DATASET": "cifar10", "MODEL": "smallcnn", "EPOCHS": 6,
              "RUNS_DIR": str(tmp_path / "runs"), "DATA_ROOT": str(tmp_path / "data"),
              "TRAIN_MISSING": False, "CHECK_FINDINGS": False}
    monkeypatch.chdir(ROOT / "notebooks")
    cells = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    first = next(i for i, c in enumerate(cells) if re.search(r"^DATASET = ", c, re.M))
    cells[first] = _set_parameters(cells[first], values)
    assert all(f"{k} = {v!r}" in cells[first] for k, v in values.items()
               if k != "CHECK_FINDINGS" or not path.name.startswith("00"))  # 00 asserts no findings
    namespace, printed, trained = {"__name__": "__main__"}, [], []
    for n, source in enumerate(cells):
        code = "\n".join(line for line in source.splitlines()
                         if not line.lstrip().startswith(("%", "!")))  # IPython magics
        for attempt in range(2):
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    exec(compile(code, f"{path.name}::Cell {n}", "exec"), namespace)
                break
            except iaat_run.IAATError as err:  # a run is missing: train it as the cell says
                commands = [line for text in [*printed, out.getvalue()]  # this cell's, or an
                            for line in text.splitlines()                   # earlier cell's
                            if line.startswith("python ../iaat.py ") and line not in trained]
                assert attempt == 0 and "train it first" in str(err) and commands, str(err)
                for command in commands:
                    assert iaat.main(shlex.split(command, comments=True)[2:]) == 0, command
                trained += commands
            finally:
                printed.append(out.getvalue())
    assert trained and all("--dataset cifar10" in c for c in trained if " rank " not in c)
    text = "".join(printed)
    if path.name.startswith("00"):
        assert "all steps check out" in text  # the algebra of the step holds for any run
    else:
        assert re.search(r"^(holds|does NOT hold): ", text, re.M) and "all findings hold" not in text


def test_findings_are_asserted_on_digits_and_reported_elsewhere(capsys):
    claims = {"the radius follows the margin": True, "IAAT dominates": False}
    with pytest.raises(AssertionError, match="does not hold: IAAT dominates"):
        iaat_notebook.findings(claims, strict=True)
    assert iaat_notebook.findings({"the radius follows the margin": True}, strict=True) is None
    assert capsys.readouterr().out == "all findings hold\n"  # a notebook cell shows no value
    iaat_notebook.findings(claims, strict=False)
    assert capsys.readouterr().out == ("holds: the radius follows the margin\n"
                                       "does NOT hold: IAAT dominates\n")


def test_describe_says_a_runs_settings_in_the_clis_units():
    config = iaat_notebook.notebook_configs("digits", epochs=20)
    assert iaat_notebook.describe(config(label_noise=0.05)) == (
        "IAAT: eps_w 51/255, warmup 5 epochs, gamma 12.75/255, beta 0.1; PGD-10, step 12.75/255; "
        "smallcnn, 20 epochs of batch 64, LR 0.05 x0.1 at epochs 13, 17; seed 0; "
        "5% of the labels flipped")
    assert iaat_notebook.describe(config(method="at", eps_w=25.5 / 255)).startswith(
        "PGD-AT at eps 25.5/255; PGD-10")
