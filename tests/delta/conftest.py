"""Delta-analysis tests: the package from scripts/, one thread (the test machine is shared)."""

import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

torch.set_num_threads(1)
