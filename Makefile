# Two commands do all set-up on a fresh machine:
#   make reproduce [CONFIG=config/smoke.yaml]   set up .venv, run the study, print where results are
#   make test                                   set up .venv with test tools, run the test suite
#   make test-fast                              the unit tests only (no training, Snakemake or SLURM)
# `make report [CONFIG=...]` reports the results of the last `make reproduce` (or of CONFIG).
LAST_CONFIG := results/.last-config
CONFIG ?= $(if $(filter report,$(MAKECMDGOALS)),$(shell cat $(LAST_CONFIG) 2>/dev/null))
CONFIG := $(or $(CONFIG),config/config.yaml)
CORES ?= 2
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: reproduce test test-fast report bench setup lint clean

$(BIN)/.installed: envs/requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r envs/requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed envs/requirements-test.txt
	$(BIN)/pip install --quiet -r envs/requirements-test.txt
	touch $@

setup: $(BIN)/.installed

reproduce: $(BIN)/.installed
	$(BIN)/opdgeo check-config "$(CONFIG)"  # a YAML error with its line and column
	mkdir -p results && echo "$(CONFIG)" > $(LAST_CONFIG)
	$(BIN)/snakemake --configfile "$(CONFIG)" --cores $(CORES)
	@echo
	@echo "Done. Results are in results/: tables/ (CSV, Markdown, LaTeX), figures/ (PNG, PDF),"
	@echo "findings.md (which of the paper's findings hold here); 'make report' builds report.html."

# Every rule but training: a report of existing results never retrains a model (a missing
# checkpoint is an error naming it), while tables and figures catch up with the config.
# (Listed once, when the recipe first needs them: the workflow is parsed after the set-up.)
REPORT_RULES = $(eval REPORT_RULES := $(shell $(BIN)/snakemake --configfile "$(CONFIG)" \
	--list-rules 2>/dev/null | grep -vx -e train_model -e train_run))$(REPORT_RULES)

report: $(BIN)/.installed
	@test -n "$(REPORT_RULES)" || { echo "make report: the workflow does not parse with" \
		"$(CONFIG); 'snakemake --configfile \"$(CONFIG)\" -n' says why" >&2; exit 1; }
	$(BIN)/snakemake --configfile "$(CONFIG)" --cores $(CORES) --allowed-rules $(REPORT_RULES) \
		|| { echo "make report trains nothing: for missing checkpoints named above, run" \
			"'make reproduce CONFIG=\"$(CONFIG)\"' first" >&2; exit 1; }
	$(BIN)/snakemake --configfile "$(CONFIG)" --report results/report.html \
		--allowed-rules $(REPORT_RULES)
	@echo "Report of $(CONFIG): results/report.html"

# Tests run in PYTEST_WORKERS pytest-xdist workers, one per core of CI's 2 (0: in pytest's own
# process). Each module runs whole in one worker (its module fixtures made once; the one that
# starts the SLURM test cluster alone needs it), handed out in collection order, which
# tests/scheduling.py makes longest first: one worker takes the rehearsal, the other the rest.
PYTEST_WORKERS ?= 2
XDIST = -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The workflow catalogue's lint (`snakemake --lint`, ~15 s) runs with every `make test`.
test: lint
	$(BIN)/python -m pytest -q --durations=25 $(XDIST)

test-fast: $(BIN)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=10 $(XDIST) \
		-m "not slow and not slurm and not train and not workflow"

bench: $(BIN)/.installed
	$(BIN)/python scripts/bench_analysis.py
	$(BIN)/python scripts/bench_masking.py

lint: $(BIN)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/snakemake --lint

clean:
	rm -rf results .snakemake
