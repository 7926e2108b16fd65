"""The config's `device` (auto | cpu | cuda) resolved to the device a job runs on.

Its own module so that every job (training, evaluation, analysis) can resolve the device
without importing TRL or transformers, which cost seconds per job.
"""

import torch


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config asks for device cuda, but no GPU is visible: use auto or cpu")
    return device
