#!/usr/bin/env bash
# Snakemake runs this inside the new environment of envs/opdgeo.yaml (`--sdm conda`), from the
# folder it runs in, the repository root: the rules' `opdgeo` command is this package. Editable,
# so that an edit reaches the environment as it reaches .venv (the code param reruns its jobs).
set -euo pipefail
python -m pip install --no-deps -e .
