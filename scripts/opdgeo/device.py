"""The config's `device` (auto | cpu | cuda) resolved to the device a job runs on.

Its own module so that every job (training, evaluation, analysis) can resolve the device
without importing TRL or transformers, which cost seconds per job.
"""

import os

import torch


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config asks for device cuda, but no GPU is visible: use auto or cpu")
    return device


def process_device(device: str) -> str:
    """With one process per GPU (`accelerate launch` and torchrun set LOCAL_RANK), the GPU of
    this process: its models go there when they are loaded, not all onto the first GPU."""
    local_rank = os.environ.get("LOCAL_RANK")
    if device != "cuda" or local_rank is None:
        return device
    torch.cuda.set_device(int(local_rank))
    return f"cuda:{local_rank}"
