"""The `opdgeo` command."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from opdgeo.callbacks import ProgressLineCallback
from opdgeo.cli import EXAMPLES, build_parser
from opdgeo.version import commit, package_version


def opdgeo(*args, env=None):
    return subprocess.run([sys.executable, "-m", "opdgeo.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


def test_building_the_parser_imports_no_torch():
    """Every pipeline job builds the whole parser; table and figure jobs must not pay for
    torch (about 2.5 s each on 2 cores) because one subcommand needs it."""
    code = ("import sys; from opdgeo.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_help_says_what_each_verb_is_for_with_an_example():
    verbs = build_parser()._subparsers._group_actions[0].choices
    assert set(EXAMPLES) == set(verbs)
    text = opdgeo("--help").stdout
    assert "the only module" not in text.lower()  # written for users, not for developers
    for verb in verbs:
        assert f"    {verb}" in text, verb
        assert EXAMPLES[verb] in text and EXAMPLES[verb].startswith(f"opdgeo {verb} ")


def test_version_names_the_package_version_and_the_checkout_commit():
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__), check=True).stdout.strip()
    result = opdgeo("--version")
    assert result.returncode == 0
    assert result.stdout.startswith(f"opdgeo {package_version()} (commit {head}")
    assert commit().removesuffix("+dirty") == head
    assert package_version() != "unknown"


@pytest.mark.parametrize("how", ["default", "flag-before", "flag-after", "variable"])
def test_an_error_is_one_line_unless_debug_asks_for_the_traceback(tmp_path, how):
    args = ["collect", "summaries", str(tmp_path / "missing.json"), "--out",
            str(tmp_path / "t.csv")]
    args = {"flag-before": ["--debug", *args], "flag-after": [*args, "--debug"]}.get(how, args)
    result = opdgeo(*args, env={"OPDGEO_DEBUG": "1" if how == "variable" else ""})
    assert result.returncode == 1
    if how == "default":
        assert result.stderr.startswith("opdgeo collect: error: ")
        assert "missing.json" in result.stderr and len(result.stderr.splitlines()) == 1
    else:
        assert "Traceback (most recent call last)" in result.stderr
        assert "missing.json" in result.stderr.splitlines()[-1]


BAR = "from opdgeo.progress import progress; print(sum(progress(range(3), desc='counting', " \
      "unit='x')))"


def test_progress_bar_only_on_a_terminal():
    piped = subprocess.run([sys.executable, "-c", BAR], capture_output=True, text=True,
                           check=True)
    assert (piped.stdout, piped.stderr) == ("3\n", "")

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # 80 columns
    drawn = []
    reader = threading.Thread(target=lambda: drawn.extend(_read_until_closed(leader)))
    reader.start()
    with subprocess.Popen([sys.executable, "-c", BAR], stdout=subprocess.PIPE,
                          stderr=follower) as proc:
        os.close(follower)
        out, _ = proc.communicate(timeout=60)
    reader.join(timeout=60)
    os.close(leader)
    assert out == b"3\n"
    assert b"counting:   0%" in b"".join(drawn)


def _read_until_closed(fd):
    """What a terminal shows until its other end closes (Linux then says EIO)."""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            return
        if not chunk:
            return
        yield chunk


def test_training_prints_a_progress_line_every_twentieth_of_its_steps(capsys):
    callback = ProgressLineCallback()
    state = SimpleNamespace(max_steps=40, global_step=0)
    callback.on_train_begin(None, state, None)
    for step in range(1, 41):
        state.global_step = step
        callback.on_step_end(None, state, None)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"step {s}/40" for s in range(2, 41, 2)]
    assert lines[-1].startswith("step 40/40 (100%), ") and lines[-1].endswith(", 0 s left")


def test_figure_list_names_every_figure_and_its_tables_without_other_arguments(capsys):
    from opdgeo.cli import main
    from opdgeo.figures import FIGURES

    main(["figure", "--list"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(FIGURES)
    for line, (_, reads) in zip(lines, FIGURES.values(), strict=True):
        assert f"reads {', '.join(reads)}: " in line and not line.endswith(": ")
    with pytest.raises(SystemExit):  # without --list, a name, --tables and --out are needed
        main(["figure", "fig1_overview"])
    assert "give a figure name, --tables and --out" in capsys.readouterr().err


def test_check_cluster_names_a_missing_or_bad_config_before_its_dry_run(tmp_path):
    import yaml

    config = yaml.safe_load((Path(__file__).parents[1] / "config/smoke.yaml").read_text())
    config["training"]["sharding"] = "zero9"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    for config, named in ((tmp_path / "missing.yaml", "missing.yaml"), (bad, "zero9")):
        result = opdgeo("check-cluster", "--configfile", str(config), "--profile", "slurm")
        assert result.returncode == 1
        assert result.stderr.startswith("opdgeo check-cluster: error: "), result.stderr
        assert named in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
        assert "Snakemake" not in result.stdout + result.stderr  # no dry run was started
