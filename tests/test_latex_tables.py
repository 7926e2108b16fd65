"""The paper tables' LaTeX a paper includes: booktabs rules, the report's caption and a label,
one precision per column, no more than MAX_LATEX_COLUMNS value columns per table, units in
parentheses; compiled by pdflatex where one is installed (Debian: texlive-latex-base and
texlive-latex-recommended), checked by structure everywhere."""

import re
import shutil
import subprocess

import pandas as pd
import pytest
import tidy_fixtures as tf

from opdgeo.captions import table_captions
from opdgeo.cli import main
from opdgeo.paper_tables import PAPER_NULL_TABLE, TABLE_NAMES, decimals
from opdgeo.table_formats import MAX_LATEX_COLUMNS, latex_caption, latex_table


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every paper table from two seeds of the synthetic tables, as the rule writes them."""
    out = tmp_path_factory.mktemp("paper_tables")
    tables = tf.write(out / "tidy", tf.tables(tf.config(seeds=(0, 1), external=True,
                                                         vision=True)))
    main(["paper-tables", "--tables", str(tables), "--out", str(out)])
    main(["paper-null", "--std", "0.02", "--out", str(out)])
    return out


def tabulars(tex: str) -> list[list[list[str]]]:
    """Each tabular's rows (header first) as cells."""
    found = []
    for body in re.findall(r"\\midrule\n(.*?)\\bottomrule", tex, re.S):
        found.append([row.split(" & ") for row in body.strip().split(" \\\\\n")])
    return found


@pytest.mark.parametrize("name", [*TABLE_NAMES, PAPER_NULL_TABLE])
def test_every_paper_table_has_caption_label_and_booktabs_rules(written, name):
    tex = (written / f"{name}.tex").read_text()
    parts = tex.count(r"\begin{table}")
    assert parts >= 1 and tex.count(r"\end{table}") == parts
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == parts, rule
    assert r"\hline" not in tex
    # the caption is the report's (its title as the short caption), the label the table's
    short, full = latex_caption(table_captions()[name])
    assert short and tex.count(rf"\caption[{short}]{{{full}}}") == 1
    assert tex.count(r"\caption") == parts
    assert rf"\label{{tab:{name}}}" in tex
    assert all(f"\\label{{tab:{name}:{i}}}" in tex for i in range(2, parts + 1))
    # units read "(\%)", never "\% \%"
    assert r"\% \%" not in tex
    if name == "table_global_delta":
        assert r"principal cov. 10\% (\%)" in tex
    for header in re.findall(r"\\toprule\n(.*?) \\\\", tex):
        cells = header.split(" & ")
        assert len(cells) <= 3 + MAX_LATEX_COLUMNS, cells


def test_one_precision_per_column_interval_bounds_included(written):
    """Every number of a column, and its interval's bounds, has the same decimals."""
    tex = (written / "table_global_delta.tex").read_text()
    checked = 0
    for table in tabulars(tex):
        for column in zip(*table, strict=True):
            numbers = [re.findall(r"-?\d+(?:\.(\d+))?(?![\d-])", cell) for cell in column]
            places = {len(d) for cell in numbers for d in cell}
            if numbers and all(numbers):
                assert len(places) == 1, column
                checked += 1
    assert checked >= 6  # the paper's columns at least, each with its interval


def test_decimals_follow_the_columns_typical_magnitude():
    assert decimals(pd.Series([58.43, 7.99, 68.35])) == 1
    assert decimals(pd.Series([0.2727, 0.8702, 1.912])) == 3
    assert decimals(pd.Series([1, 2, 3])) == 0
    assert decimals(pd.Series([float("nan")])) == 0


def test_a_wide_table_is_split_into_parts_that_repeat_the_row_names():
    frame = pd.DataFrame({"series": ["a", "b"], "method": ["OPD", "SFT"],
                          **{f"x{i} %": [1.5, 2.5] for i in range(2 * MAX_LATEX_COLUMNS + 1)}})
    tex = latex_table(frame, "**Table: wide.** Many columns.", "tab:wide")
    assert tex.count(r"\begin{table}") == 3
    assert [len(t[0]) for t in tabulars(tex)] == [2 + MAX_LATEX_COLUMNS] * 2 + [3]
    assert all(t[0][:2] == ["a", "OPD"] for t in tabulars(tex))
    assert r"\caption{Wide (continued, part 3 of 3).}" in tex


def test_text_is_escaped_for_latex():
    tex = latex_table(pd.DataFrame({"run_a": ["x_1 & ΔW ‖"], "cov. 10% %": [1.0]}),
                      "**Table: t.** ``plots.x`` and \\|ΔW\\| ≤ 1e-5.", "tab:t")
    assert r"run\_a" in tex and r"x\_1 \& $\Delta$W $\|$" in tex
    assert r"\texttt{plots.x} and \textbar{}$\Delta$W\textbar{} $\le$ 1e-5." in tex


@pytest.mark.skipif(shutil.which("pdflatex") is None,
                    reason="no pdflatex (Debian: texlive-latex-base, texlive-latex-recommended); "
                           "the structure is checked above")
def test_every_paper_table_compiles_in_a_document(written, tmp_path):
    names = [*TABLE_NAMES, PAPER_NULL_TABLE]
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage{booktabs}\n"
        "\\usepackage{graphicx}\n\\begin{document}\n"
        + "".join(f"\\input{{{written / name}.tex}}\n\\clearpage\n" for name in names)
        + "\\end{document}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    log = (tmp_path / "doc.log").read_text()
    assert "Overfull" not in log and "Missing character" not in log
    assert (tmp_path / "doc.pdf").stat().st_size > 10_000
