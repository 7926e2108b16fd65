import pytest
import torch

from opdgeo.device import resolve_device


def test_auto_picks_cuda_only_when_visible():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
def test_cuda_without_a_gpu_names_the_fix():
    with pytest.raises(RuntimeError, match="use auto or cpu"):
        resolve_device("cuda")
