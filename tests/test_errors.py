"""File-system errors a user meets (a full disk, no permission, a read-only file system)
are one line naming the path and the fix; --debug shows the traceback."""

import errno
import os

import pandas as pd
import pytest
import torch
from safetensors import SafetensorError

from opdgeo import masks
from opdgeo.cli import main

FIXES = {errno.ENOSPC: "free some", errno.EACCES: "chmod", errno.EROFS: "writable copy",
         errno.EDQUOT: "quota"}


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "a.csv"
    pd.DataFrame({"run": ["r"], "value": [1.0]}).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("code", FIXES)
def test_a_file_system_error_is_one_line_with_the_path_and_the_fix(table, tmp_path,
                                                                   monkeypatch, capsys, code):
    out = tmp_path / "out" / "table.csv"

    def fail(self, path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", fail)
    with pytest.raises(SystemExit) as exit:
        main(["collect", "csv", str(table), "--out", str(out)])
    assert exit.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert str(out) in lines[0] and FIXES[code] in lines[0], lines[0]
    assert not out.exists() and not list(out.parent.glob("*.tmp"))

    with pytest.raises(OSError):
        main(["collect", "csv", str(table), "--out", str(out), "--debug"])


def test_a_full_disk_in_a_library_without_oserror_names_the_file(tmp_path, monkeypatch,
                                                                   capsys):
    """safetensors reports a full disk as its own error: the line names the mask's path."""
    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                              'StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(masks, "save_file", full)
    monkeypatch.setattr(masks, "checkpoint_shapes", lambda source: {"w": (4, 4)})
    monkeypatch.setattr(masks, "random_mask_with_density",
                        lambda shapes, density, seed: {"w": torch.ones(4, 4, dtype=bool)})
    out = tmp_path / "m.safetensors"
    with pytest.raises(SystemExit):
        main(["make-mask", "--mask-spec",
              '{"method": "random_density", "density": 0.5, "seed": 0}', "--source", "s",
              "--trained", "t", "--out", str(out), "--densities", str(tmp_path / "d.csv")])
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and str(out) in line and "no space left" in line, line
