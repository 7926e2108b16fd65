"""Tables written as files: CSV, and Markdown and LaTeX beside it (the LaTeX a paper
includes: booktabs rules, the report's caption, a label, wide tables in parts).
"""

import re
from pathlib import Path

import pandas as pd

from opdgeo.files import atomic


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
