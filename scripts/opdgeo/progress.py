"""Progress of long work: a bar on standard error when it is a terminal, nothing otherwise
(a job log keeps its lines readable; training prints a line every twentieth of its steps)."""

import sys
import time


def on_terminal() -> bool:
    return sys.stderr.isatty()


def progress(iterable, *, desc: str, unit: str, total: int | None = None):
    """`iterable`, counted on a bar while it is consumed (on a terminal only)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=not on_terminal(),
                file=sys.stderr, leave=False, dynamic_ncols=True)


def duration(seconds: float) -> str:
    """`2 h 05 min`, `3 min 12 s`, `45 s`."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


class StepClock:
    """Lines `step 40/200 (20%), 1.20 s/step, 3 min 12 s left` at every twentieth of a run's
    steps, for logs, where a bar would be one unreadable line of carriage returns."""

    def __init__(self, total: int, start: int = 0):
        self.total, self.start = total, start
        self.every = max(total // 20, 1)
        self._started = time.perf_counter()

    def line(self, step: int) -> str | None:
        """The line to print after `step`, or None between lines."""
        if step <= self.start or (step % self.every and step != self.total):
            return None
        per_step = (time.perf_counter() - self._started) / (step - self.start)
        return (f"step {step}/{self.total} ({100 * step / self.total:.0f}%), "
                f"{per_step:.2f} s/step, {duration(per_step * (self.total - step))} left")
