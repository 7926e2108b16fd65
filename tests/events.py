"""Waiting for an event that the processes under test cause (never for a length of time)."""

import time


def wait_for(condition, seconds=60.0):
    """Poll `condition` until it holds; `seconds` only bounds a hang, it paces nothing."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
