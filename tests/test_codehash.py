"""The code each `opdgeo` subcommand runs, as the text its jobs' `code` param holds."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from opdgeo.codehash import code_text, command_code, subcommands

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "envs" / "requirements.txt"


@pytest.fixture
def package(tmp_path):
    """A copy of the package's source, to edit."""
    return shutil.copytree(ROOT / "scripts" / "opdgeo", tmp_path / "opdgeo",
                           ignore=shutil.ignore_patterns("__pycache__"))


def hashes(command, package):
    return command_code(command, package)[0]


def every_command(package, requirements=REQUIREMENTS):
    return {command: code_text([command], requirements, package) for command in subcommands()}


def test_a_command_depends_on_the_modules_it_imports_and_no_other(package):
    figure, train, analyze = (hashes(c, package) for c in ("figure", "train-run", "analyze"))
    assert {"cli", "handover", "figures", "tidy"} <= figure.keys()
    assert "preload" not in figure.keys()  # the server runs a command; it is not its code
    assert not {"train", "evaluate", "distillation", "findings"} & figure.keys()
    assert {"train", "distillation", "callbacks", "models", "evaluate", "task"} <= train.keys()
    assert not {"figures", "findings", "delta.metrics", "delta.analyze"} & train.keys()
    # transitively: analyze imports delta.analyze, which imports delta.metrics
    assert {"delta.analyze", "delta.metrics", "delta.nulls", "naming"} <= analyze.keys()


def test_the_drawing_modules_the_figure_contract_names_are_the_figure_commands_code(package):
    """FIGURES names each drawing function as 'module:function', imported when the figure is
    drawn, not when the workflow reads the contract: those modules are still `figure`'s code."""
    from opdgeo.figures import FIGURES

    before = hashes("figure", package)
    drawing = {reference.split(":")[0].removeprefix("opdgeo.") for reference, _ in
               FIGURES.values()}
    assert drawing | {"figures.style", "figures.bands"} <= before.keys()
    with open(package / "figures" / "overview.py", "a") as source:
        source.write("\nEDITED = 1\n")
    after = hashes("figure", package)
    assert {m for m in before if after[m] != before[m]} == {"figures.overview"}
    assert "matplotlib==" in code_text(["figure"], REQUIREMENTS, package)


def test_a_statement_changes_the_hash_of_its_module_only(package):
    before = {c: hashes(c, package) for c in subcommands()}
    with open(package / "delta" / "metrics.py", "a") as source:
        source.write("\nEDITED = 1\n")
    after = {c: hashes(c, package) for c in subcommands()}
    changed = {c for c in before if after[c] != before[c]}
    assert {"analyze", "overlap", "decompose"} <= changed  # the source's geometry is redone
    assert not {"train-model", "train-run", "evaluate", "make-mask", "collect"} & changed
    for command in changed:
        assert {m for m in before[command] if after[command][m] != before[command][m]} == {
            "delta.metrics"}


def test_another_commands_handler_is_not_this_commands_code(package):
    before = every_command(package)
    cli = package / "cli.py"
    source = cli.read_text()
    assert "def cmd_train_run(args):\n" in source
    cli.write_text(source.replace("def cmd_train_run(args):\n",
                                  "def cmd_train_run(args):\n    args.edited = True\n"))
    after = every_command(package)
    assert {c for c in before if after[c] != before[c]} == {"train-run"}


def test_comments_docstrings_and_formatting_change_nothing(package):
    before = every_command(package)
    for path in (package / "delta" / "metrics.py", package / "cli.py",
                 package / "figures" / "__init__.py", package / "figures" / "style.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and (
                    isinstance(body[0].value, ast.Constant)):
                body[0].value.value = "Another docstring."
        # ast.unparse drops every comment and re-formats every line
        path.write_text("# a comment\n" + ast.unparse(tree) + "\n\n# another one\n")
    assert every_command(package) == before


def test_pins_count_for_the_commands_that_import_them(tmp_path, package):
    before = every_command(package)
    requirements = tmp_path / "requirements.txt"
    text = REQUIREMENTS.read_text()
    assert "torch==" in text and "matplotlib==" in text
    requirements.write_text(text.replace("torch==", "torch==9.9.9 # was ").replace(
        "matplotlib==", "matplotlib==9.9.9 # was "))
    after = every_command(package, requirements)
    changed = {c for c in before if after[c] != before[c]}
    assert {"train-model", "train-run", "evaluate", "analyze", "figure"} <= changed
    assert "collect" not in changed  # pandas only
    assert "torch==9.9.9" in after["train-run"] and "matplotlib" not in after["train-run"]
    # transformers requires no trl, but trl requires transformers and accelerate
    assert {"trl==", "transformers==", "accelerate=="} <= set(
        word.split("==")[0] + "==" for word in before["train-run"].split() if "==" in word)


def test_an_unknown_subcommand_is_an_error():
    with pytest.raises(ValueError, match="no subcommand"):
        command_code("train")


def test_hashing_imports_no_torch():
    """The workflow hashes every command when it is parsed, on every Snakemake start."""
    code = ("import sys; from pathlib import Path; from opdgeo.codehash import code_text; "
            f"code_text(['train-run', 'analyze'], Path({str(REQUIREMENTS)!r})); "
            "print(sorted({'torch', 'transformers', 'trl'} & sys.modules.keys()))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_the_data_files_a_module_reads_count_as_its_code_but_not_their_comments(tmp_path):
    package = shutil.copytree(ROOT / "scripts" / "opdgeo", tmp_path / "scripts" / "opdgeo",
                              ignore=shutil.ignore_patterns("__pycache__"))
    reference = shutil.copytree(ROOT / "config", tmp_path / "config") / "paper_reference.yaml"
    before = {c: hashes(c, package) for c in ("figure", "findings", "train-run")}
    assert "config/paper_reference.yaml" in before["findings"]
    assert not any(name.startswith("config/") for name in before["train-run"])

    reference.write_text("# a comment\n" + reference.read_text())
    assert {c: hashes(c, package) for c in before} == before

    text = reference.read_text()
    number = next(word for word in text.split() if word.rstrip(",]").replace(".", "").isdigit())
    reference.write_text(text.replace(number, "12345.6", 1))
    after = {c: hashes(c, package) for c in before}
    assert after["train-run"] == before["train-run"]
    for command in ("figure", "findings"):
        assert {m for m in after[command] if after[command][m] != before[command][m]} == {
            "config/paper_reference.yaml"}
