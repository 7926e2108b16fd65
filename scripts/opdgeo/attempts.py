"""Jobs longer than their wall time run as a chain of SLURM attempts.

A training or evaluation job that runs inside a SLURM job reads the time it has left from
SLURM (`squeue -o %L`) when it starts. Before a step (training) or a checkpoint (evaluation)
that might not end in time, it stops where the next attempt can continue: training saves
the Trainer's checkpoint (opdgeo.callbacks.WallTimeCallback), evaluation has journalled every
checkpoint it scored. It then requeues its own job (`scontrol requeue`, allowed for a job's
owner on a job submitted with `--requeue`, which the profile's `slurm-requeue` gives): the
job goes back into the queue under the same id, with the same wall time, and Snakemake,
which sees the job pending again, waits for it. The next attempt resumes, and so on until
the work is done: no attempt count to size, no longer wall time to ask for. A job that
cannot requeue itself exits with EXIT_STOPPED instead, and Snakemake's retry continues.

Outside SLURM (a local run) there is no wall time and nothing stops.
"""

import os
import re
import subprocess
import sys
import time

# Seconds kept free before the wall time ends, beyond the longest step (or checkpoint) seen
# and the longest save: the Trainer's checkpoint of a 1.5B student with AdamW is ~18 GB. A
# site whose file system writes slower raises it (the variable reaches the jobs: sbatch
# --export=ALL).
MARGIN_ENV = "OPDGEO_STOP_MARGIN_S"
DEFAULT_MARGIN_S = 300.0
# sysexits' EX_TEMPFAIL: the job stopped early on purpose and is to be run again.
EXIT_STOPPED = 75


def parse_time_left(text: str) -> float | None:
    """Seconds of squeue's `%L` ([days-][hours:]minutes:seconds); None for no limit."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if match is None:
        return None
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


class WallClock:
    """The time a job has left, and whether the next piece of work fits in it."""

    def __init__(self, seconds_left: float, margin: float = DEFAULT_MARGIN_S):
        self.end = time.monotonic() + seconds_left
        self.margin = margin

    @classmethod
    def from_slurm(cls) -> "WallClock | None":
        """The clock of the SLURM job this process runs in; None outside one, for a job
        without a time limit, or when squeue does not answer (then nothing stops early)."""
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            return None
        try:
            answer = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True,
                                    text=True, timeout=60, check=True).stdout
        except (OSError, subprocess.SubprocessError) as error:
            print(f"warning: cannot read SLURM job {job}'s time left ({error}): the job runs "
                  "until it ends or is stopped at its time limit", file=sys.stderr)
            return None
        seconds = parse_time_left(answer)
        if seconds is None:
            return None
        return cls(seconds, float(os.environ.get(MARGIN_ENV, DEFAULT_MARGIN_S)))

    def left(self) -> float:
        return self.end - time.monotonic()

    def room_for(self, seconds: float) -> bool:
        """Whether work of `seconds` ends before the margin before the wall time."""
        return self.left() - self.margin >= seconds


def end_attempt(what: str):
    """Requeue this SLURM job for its next attempt, once everything to continue from is on
    disk; SLURM then stops this one. Without a requeue, exit EXIT_STOPPED."""
    job = os.environ["SLURM_JOB_ID"]
    print(f"{what}: the wall time is nearly up, requeueing SLURM job {job}; its next attempt "
          "continues from here", flush=True)
    requeue = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if requeue.returncode == 0:
        time.sleep(600)  # SLURM ends this attempt (SIGTERM, then SIGKILL after KillWait)
        failure = "the job was requeued but this attempt was not stopped"
    else:
        failure = f"scontrol requeue {job} failed: {requeue.stderr.strip()}"
    print(f"{failure}; exiting {EXIT_STOPPED}: a retry of the job continues from here",
          file=sys.stderr)
    sys.exit(EXIT_STOPPED)
