"""The analysis benchmark's own arithmetic and arguments (its figures come from its runs)."""

import subprocess
import sys
from pathlib import Path

import bench_analysis

SCRIPT = Path(bench_analysis.__file__)


def test_rounds_are_summarised_by_their_median_clocks_and_largest_peak():
    runs = [{"seconds": s, "cpu_seconds": c, "peak_rss_gb": m}
            for s, c, m in ((3.0, 30.0, 1.2), (1.0, 10.0, 1.5), (2.0, 50.0, 1.1))]
    assert bench_analysis.median_result(runs) == {"seconds": 2.0, "cpu_seconds": 30.0,
                                                  "peak_rss_gb": 1.5}


def test_a_repeat_below_one_is_refused_before_the_pair_is_built(tmp_path):
    for bad in ("0", "-2", "two"):
        result = subprocess.run([sys.executable, str(SCRIPT), "--repeat", bad],
                                capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 2
        assert "--repeat takes a number of rounds >= 1" in result.stderr
        assert not list(tmp_path.iterdir())
