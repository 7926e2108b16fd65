"""Named crash points: the moments in a job's life where a kill must lose nothing but time.

Every writer names its point here and calls `crash_point` there (most through
`opdgeo.files.atomic`, just before a finished file is renamed into place). With
OPDGEO_CRASH_AT=<point> in its environment, a job kills itself with SIGKILL at that point,
as a preemption, an out-of-memory kill or a pulled plug would: tests/test_crash.py kills a
job at each point, reruns it as Snakemake would, and compares its outputs with an
uninterrupted run's. Unset, a crash point costs one dictionary lookup.
"""

import os
import signal
import sys

VARIABLE = "OPDGEO_CRASH_AT"

POINTS = {
    # training a run (opdgeo.train, opdgeo.callbacks)
    "train.before-first-checkpoint": "the end of the first step, before any checkpoint",
    "train.mid-run": "the step after the first trainer checkpoint (its work is lost)",
    "train.past-data-pass": "the step after the first trainer checkpoint written in a later "
                            "pass over the data than the first",
    "train.after-last-checkpoint": "the trainer's checkpoint of the last step written, "
                                   "before final/ is",
    "train.optimizer-references": "inside the write of the optimizer-state log's references "
                                  "beside a trainer checkpoint",
    "train.snapshot": "inside a bf16 snapshot's save, before it is renamed into place",
    "train.final-save": "inside the final save: final/ written, not yet renamed",
    "train.fp32-save": "inside the fp32 save: the master weights written, not yet renamed",
    "train.promote": "final/ saved; the snapshots and logs being linked into place",
    # training a base model
    "model.final-save": "inside a base model's final save, before it is renamed into place",
    "model.score": "inside the write of a base model's score",
    # evaluation (opdgeo.evaluate)
    "evaluate.journal": "inside a checkpoint's journal write, before it is renamed",
    "evaluate.after-last-score": "every checkpoint scored and journaled, no table yet",
    "evaluate.table": "inside the evaluation table's write",
    # decomposition and analysis (opdgeo.delta)
    "decompose.tensor": "after a source matrix's file is written, before the next one",
    "decompose.index": "inside the geometry's index (summary) write",
    "analyze.tables": "inside the analysis folder's write (tensors, groups, summary)",
    "analyze.trajectory": "inside the trajectory table's write",
    "overlap.write": "inside the write of one pair's overlap folder",
    "overlap.group": "inside an overlap group's write (every pair's folder in it)",
    # masks, tables, renderers
    "masks.mask": "inside a mask's write",
    "masks.densities": "inside a mask's density table's write",
    "tables.write": "inside a table's write (CSV, Markdown or LaTeX)",
    "figures.save": "inside a figure's write",
    "findings.write": "inside the findings' Markdown write",
    "captions.write": "inside a report caption's write",
    "model-card.write": "inside a model card's write",
}


def crash_point(name: str) -> None:
    """Kill this process here when OPDGEO_CRASH_AT names this point."""
    if name not in POINTS:
        raise ValueError(f"unknown crash point {name!r}: declare it in opdgeo.crash.POINTS")
    if os.environ.get(VARIABLE) == name:
        print(f"crash point {name}: killing this process ({VARIABLE})", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
