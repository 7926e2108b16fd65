"""Tidy tables: every per-run output of the DAG gathered into long tables (run, step, metric,
value). Figures and paper tables read these only, never checkpoints.
"""

import json
import math
import re
from pathlib import Path

import pandas as pd

from opdgeo.delta.columns import flatten
from opdgeo.files import atomic

TIDY = ["run", "step", "metric", "value"]


def collect_summaries(paths: list[Path], final_steps: dict[str, int]) -> pd.DataFrame:
    """Tidy rows from the analysis's `summary.json` files (at the run's final step) and
    `trajectory.csv` files (its intermediate checkpoints), each naming its run (`--run`)."""
    rows, trajectories = [], []
    for path in map(Path, paths):
        if path.suffix == ".csv":
            trajectories.append(path)
            continue
        summary = json.loads(path.read_text())
        if "run" not in summary:
            raise ValueError(f"{path} names no run: analyse it with `opdgeo analyze --run NAME`")
        run = summary["run"]
        step = final_steps.get(run, math.nan)  # external runs have no step
        for metric, value in flatten(summary).items():
            rows.append((run, step, metric, value))
    if not trajectories:
        return pd.DataFrame(rows, columns=TIDY)
    return pd.concat([pd.DataFrame(rows, columns=TIDY), concat_csvs(trajectories)[TIDY]],
                     ignore_index=True)


def _overlap_files(paths: list[Path], name: str) -> list[Path]:
    """The `{a}__{b}/{name}` files among `paths`, or in the folders among them."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.glob(f"*__*/{name}"))
        elif path.is_file() and path.name == name and path.parent.name.count("__") == 1:
            files.append(path)
        else:
            raise ValueError(f"{path}: expected a folder of overlaps or an existing "
                             f"{{a}}__{{b}}/{name} file (written by `opdgeo overlap`)")
    return files


def collect_overlaps(paths: list[Path]) -> pd.DataFrame:
    """`{a}__{b}/overlap.json` files, or folders of them (`results/overlap/{group}`) -> rows
    (a, b, metric, value)."""
    rows = []
    for path in _overlap_files(paths, "overlap.json"):
        a, b = path.parent.name.split("__")
        for metric, value in flatten(json.loads(path.read_text())).items():
            rows.append((a, b, metric, value))
    return pd.DataFrame(rows, columns=["run_a", "run_b", "metric", "value"])


def collect_overlap_tensors(paths: list[Path]) -> pd.DataFrame:
    """The per-tensor `{a}__{b}/overlap.csv` files (mask counts), found as collect_overlaps
    finds the JSON beside them, each row with its pair's run_a and run_b."""
    frames = []
    for path in _overlap_files(paths, "overlap.csv"):
        a, b = path.parent.name.split("__")
        frames.append(pd.read_csv(path).assign(run_a=a, run_b=b))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def concat_csvs(paths: list[Path]) -> pd.DataFrame:
    """Concatenate per-run CSVs (each carries its own `run` column)."""
    frames = [pd.read_csv(path) for path in map(Path, paths)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_table(frame: pd.DataFrame, out: Path, formats=("csv",), caption: str = "",
                label: str = "", keys: list[str] | None = None, point: str = "tables.write"):
    """Write a table atomically, as CSV and optionally Markdown and LaTeX beside it (LaTeX:
    `latex_table`, with `caption` (reStructuredText, as the report's), `label` and the
    columns that name a row); `point`: its crash point (opdgeo.crash)."""
    out = Path(out)
    writers = {
        "csv": lambda p: frame.to_csv(p, index=False),
        # disable_numparse: a formatted cell ("41.70") keeps the decimals it was given
        "md": lambda p: p.write_text(frame.to_markdown(index=False, disable_numparse=True)
                                     + "\n"),
        "tex": lambda p: p.write_text(latex_table(frame, caption, label, keys)),
    }
    for fmt in formats:
        with atomic(out.with_suffix("." + fmt), point) as tmp:
            writers[fmt](tmp)


# Characters that pdflatex's default fonts lack, as math; LaTeX's specials escaped.
LATEX_SYMBOLS = {"Δ": r"$\Delta$", "‖": r"$\|$", "−": r"$-$", "²": r"$^2$", "≤": r"$\le$",
                 "≥": r"$\ge$", "×": r"$\times$", "ᵀ": r"$^\top$", "·": r"$\cdot$",
                 "ε": r"$\varepsilon$", "τ": r"$\tau$", "→": r"$\to$", "≈": r"$\approx$",
                 "—": "---", "–": "--", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                 "_": r"\_", "{": r"\{", "}": r"\}", "<": r"\textless{}", ">": r"\textgreater{}",
                 "|": r"\textbar{}"}
LATEX_ESCAPE = re.compile("|".join(map(re.escape, LATEX_SYMBOLS)))
MAX_LATEX_COLUMNS = 5  # value columns per LaTeX table; a wider table is split into parts


def latex_text(text) -> str:
    """Plain text as LaTeX typesets it."""
    return LATEX_ESCAPE.sub(lambda m: LATEX_SYMBOLS[m.group()], str(text))


def latex_caption(rst: str) -> tuple[str, str]:
    """(short, full) caption from a report caption in reStructuredText: the short one its
    bold title, the full one its text with ``literals`` as \\texttt and escapes undone."""
    title = re.match(r"\*\*(.+?)\*\*", rst.strip())
    # LaTeX numbers the float itself ("Table 3:"): the report's "Table:" is left out
    short = re.sub(r"^Table:\s*", "", title[1]) if title else ""
    short = short[:1].upper() + short[1:]
    rst = rst.strip()[title.end():] if title else rst

    def convert(text):
        parts = re.split(r"(``.+?``|\*\*.+?\*\*)", " ".join(text.split()))
        out = []
        for part in parts:
            if part.startswith("``"):
                out.append(r"\texttt{" + latex_text(part[2:-2]) + "}")
            elif part.startswith("**"):
                out.append(r"\textbf{" + convert(part[2:-2]) + "}")
            else:
                out.append(latex_text(re.sub(r"\\(.)", r"\1", part)))
        return "".join(out)

    return convert(short), (rf"\textbf{{{convert(short)}}} " if short else "") + convert(rst)


def key_columns(frame: pd.DataFrame) -> list[str]:
    """The leading text columns that name a row (series, method, arm ...): repeated in every
    part of a split table."""
    keys = []
    for column in frame.columns:
        if pd.api.types.is_numeric_dtype(frame[column]) or len(keys) == 3:
            break
        keys.append(column)
    return keys or list(frame.columns[:1])


def latex_table(frame: pd.DataFrame, caption: str = "", label: str = "",
                keys: list[str] | None = None) -> str:
    """A table a paper includes: booktabs rules (\\usepackage{booktabs}), scaled to the line
    width (\\usepackage{graphicx}), with its caption and label. A table of more than
    MAX_LATEX_COLUMNS value columns becomes parts, each repeating the columns that name a row,
    labelled `label`, `label:2`, ... (the CSV beside it has every column in one table)."""
    keys = key_columns(frame) if keys is None else keys
    values = [c for c in frame.columns if c not in keys]
    chunks = [values[i:i + MAX_LATEX_COLUMNS]
              for i in range(0, len(values), MAX_LATEX_COLUMNS)] or [[]]
    short, full = latex_caption(caption) if caption else ("", "")
    parts = []
    for i, chunk in enumerate(chunks, 1):
        part = frame[keys + chunk]
        columns = "l" * len(keys) + "r" * len(chunk)
        lines = [r"\begin{table}[htbp]", r"\centering"]
        if caption:
            text = full if i == 1 else (
                f"{short.rstrip('.')} (continued, part {i} of {len(chunks)})." if short
                else "(continued)")
            lines.append(rf"\caption[{short}]{{{text}}}" if i == 1 and short else
                         rf"\caption{{{text}}}")
        if label:
            lines.append(rf"\label{{{label}{'' if i == 1 else f':{i}'}}}")
        lines += [r"\resizebox{\linewidth}{!}{%", rf"\begin{{tabular}}{{{columns}}}",
                  r"\toprule", " & ".join(map(latex_text, part.columns)) + r" \\", r"\midrule",
                  *(" & ".join(latex_text("" if pd.isna(v) else v) for v in row) + r" \\"
                    for row in part.itertuples(index=False)),
                  r"\bottomrule", r"\end{tabular}}", r"\end{table}", ""]
        parts.append("\n".join(lines))
    header = "% written by opdgeo; needs \\usepackage{booktabs} and \\usepackage{graphicx}\n"
    return header + "\n".join(parts)
