"""The `opdgeo` command."""

import subprocess
import sys


def test_building_the_parser_imports_no_torch():
    """Every pipeline job builds the whole parser; table and figure jobs must not pay for
    torch (about 2.5 s each on 2 cores) because one subcommand needs it."""
    code = ("import sys; from opdgeo.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"
