"""`make test`'s two pytest-xdist workers: the longest modules start first, one worker runs
the SLURM module while the other runs every other module, and the SLURM test cluster is
never started by two workers. Each check runs a small pytest session of its own, with the
suite's hooks (tests/scheduling.py) and, for the distribution, the Makefile's own options."""

import os
import re
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace

from slurm_cluster import sharing_problem

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# The suite's hooks in a session of its own (the suite's conftest imports torch).
CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from scheduling import pytest_collection_modifyitems, pytest_configure_node
"""
MARKERS = """
[pytest]
markers =
    slow: the smoke DAG
    slurm: the SLURM cluster
"""


def xdist_options() -> list[str]:
    """The options `make test-fast` gives pytest to distribute the tests (as `make test`), as
    the Makefile sets them: not those of a `make test-fast PYTEST_WORKERS=0` running this."""
    environment = {name: value for name, value in os.environ.items()
                   if name not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "PYTEST_WORKERS")}
    shown = subprocess.run(["make", "-n", "test-fast"], cwd=ROOT, env=environment,
                           capture_output=True, text=True, check=True).stdout.replace("\\\n", " ")
    line = next(line for line in shown.splitlines() if "-m pytest" in line)
    words = shlex.split(line)
    options = []
    for i, word in enumerate(words):
        if word in ("-n", "--dist"):
            options += words[i:i + 2]
        elif word.endswith("loadscope-reorder"):
            options.append(word)
    assert "-n" in options and "--dist" in options, line
    return options


def session(pytester, **modules):
    pytester.makeconftest(CONFTEST)
    pytester.makeini(MARKERS)
    pytester.makepyfile(**modules)


def test_the_longest_modules_are_collected_first(pytester):
    session(pytester,
            test_a="def test_one(): pass\ndef test_two(): pass\n",
            test_b="import pytest\n\ndef test_one(): pass\n\n"
                   "@pytest.mark.slow\ndef test_two(): pass\n",
            test_c="import pytest\n\n@pytest.mark.slurm\ndef test_one(): pass\n\n"
                   "def test_two(): pass\n")
    collected = pytester.runpytest("--collect-only", "-q").stdout.lines
    assert [line for line in collected if "::" in line] == [
        "test_c.py::test_one", "test_c.py::test_two", "test_b.py::test_one",
        "test_b.py::test_two", "test_a.py::test_one", "test_a.py::test_two"]
    # ranked by what runs: without its slow test, test_b is one of the others
    collected = pytester.runpytest("--collect-only", "-q", "-m", "not slow").stdout.lines
    assert [line.split("::")[0] for line in collected if "::" in line] == [
        "test_c.py", "test_c.py", "test_a.py", "test_a.py", "test_b.py"]


# Every test of the other modules (more tests each than the SLURM module: xdist's default
# order would hand theirs out first) leaves a file; the SLURM module's first test returns once
# all of them are there, which happens only while the other worker runs all of them.
OTHER = """
def test_{n}():
    open({ran!r} + "/{module}-{n}", "w").close()
"""
SLURM = """
import os
import sys
import pytest
sys.path.insert(0, {tests!r})
from events import wait_for

pytestmark = pytest.mark.slurm

def test_waits_for_the_others():
    wait_for(lambda: len(os.listdir({ran!r})) == {others})

def test_two(): pass

def test_three(): pass
"""


def test_one_worker_runs_the_slurm_module_while_the_other_runs_the_rest(pytester):
    ran = pytester.mkdir("ran")
    others = {f"test_{name}": "".join(OTHER.format(module=name, n=n, ran=str(ran))
                                      for n in range(4))
              for name in ("a", "b", "c", "d")}
    session(pytester, test_z_slurm=SLURM.format(tests=str(TESTS), others=16, ran=str(ran)),
            **others)
    result = pytester.runpytest_subprocess(*xdist_options(), "-v")
    result.assert_outcomes(passed=19)
    workers = {}
    for worker, test in re.findall(r"^\[(gw\d+)\].* PASSED (\S+)", result.stdout.str(), re.M):
        workers.setdefault(test.split("::")[0], set()).add(worker)
    assert len(workers["test_z_slurm.py"]) == 1, workers
    rest = set().union(*(w for module, w in workers.items() if module != "test_z_slurm.py"))
    assert len(rest) == 1 and rest != workers["test_z_slurm.py"], workers


def items(*modules):
    return [SimpleNamespace(path=Path(f"tests/{module}"), fixturenames=["slurm_cluster"])
            for module in modules]


def test_only_one_worker_may_start_the_slurm_cluster():
    two = {"workercount": 2, "dist": "loadfile"}
    assert sharing_problem(items("test_slurm.py", "test_slurm.py"), None) is None
    assert sharing_problem(items("test_slurm.py", "test_other.py"), None) is None  # no xdist
    assert sharing_problem(items("test_slurm.py", "test_slurm.py"), two) is None
    assert sharing_problem(items("test_slurm.py", "test_other.py"),
                           {**two, "workercount": 1}) is None
    problem = sharing_problem(items("test_slurm.py", "test_other.py"), two)
    assert "test_other.py, test_slurm.py" in problem and "one module" in problem
    problem = sharing_problem(items("test_slurm.py"), {**two, "dist": "load"})
    assert "--dist loadfile (not load)" in problem


def test_the_cluster_fixture_fails_naming_the_fix_before_starting_anything(pytester):
    session(pytester, **{f"test_{name}": USES_CLUSTER for name in ("x", "y")})
    # were the check to let it through, the fixture would say so instead of starting a cluster
    pytester.makeconftest(CONFTEST + REFUSE_TO_START)
    result = pytester.runpytest_subprocess(*xdist_options())
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*the SLURM test cluster is used by test_x.py, test_y.py*"])
    result.stdout.no_fnmatch_line("*would start*")
    # one module, split test by test over the workers
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "load", "test_x.py")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*run it with --dist loadfile (not load)*"])


USES_CLUSTER = """
pytest_plugins = ["slurm_cluster"]

def test_on_the_cluster(slurm_cluster): pass
"""
REFUSE_TO_START = """
import contextlib
import slurm_cluster

@contextlib.contextmanager
def would_start(*args):
    raise AssertionError("the fixture would start a cluster")
    yield

slurm_cluster.require_slurm = lambda: None
slurm_cluster.running_cluster = would_start
"""
