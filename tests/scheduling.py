"""How the suite's modules are handed to pytest-xdist's workers (`make test`: `-n 2 --dist
loadfile --no-loadscope-reorder`); hooks that tests/conftest.py registers. Light on purpose
(no torch): tests/test_scheduling.py runs them in small pytest sessions of its own.

With `--dist loadfile` a module is one unit of work, run whole by one worker, so its module
fixtures (the rehearsal, the smoke DAG) are made once. `--no-loadscope-reorder` keeps the
units in collection order (xdist's default orders them by test count, which put the
rehearsal's 14 tests behind modules of 30 short ones), and xdist hands each worker the next
unit when at most two of its tests are left. Collected longest first, the two longest
modules start at once, one on each worker, and the other worker works through the rest while
the rehearsal runs.
"""

import pytest

# Markers of the tests that hold the suite's longest fixtures, longest first: the paper's DAG
# through SLURM (the SLURM tests' module), then the smoke DAG (the slow tests' module).
LONGEST_FIRST = ("slurm", "slow")


def module_rank(items) -> dict:
    """Each module's place: that of the longest-first marker its first marked test carries,
    after every marked module the modules without any."""
    rank = {}
    for item in items:
        marked = [i for i, name in enumerate(LONGEST_FIRST) if item.get_closest_marker(name)]
        rank[item.path] = min([rank.get(item.path, len(LONGEST_FIRST)), *marked])
    return rank


@pytest.hookimpl(trylast=True)  # after `-m` and `-k` have deselected: rank what runs
def pytest_collection_modifyitems(items):
    rank = module_rank(items)
    # A stable sort: each module's tests stay together and in their order, and modules of one
    # rank in collection order.
    items.sort(key=lambda item: rank[item.path])


@pytest.hookimpl(optionalhook=True)  # an xdist hook, called in the controller per worker
def pytest_configure_node(node):
    """Workers learn how tests are distributed (a worker's own `--dist` reads "no"): the
    SLURM cluster fixture refuses to start where another worker could start one as well."""
    node.workerinput["dist"] = node.config.getoption("dist")
