"""The one device rule of training, evaluation and clustering."""

import pytest
import torch

from sysu30k.errors import UserError
from sysu30k.io.device import resolve_device


def test_auto_is_this_ranks_gpu_or_the_cpu():
    assert resolve_device("auto") == (torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))
    assert resolve_device(None) == resolve_device("auto")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_without_an_index_is_this_ranks_gpu():
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda:1")


def test_cpu_is_the_cpu_and_nonsense_is_a_user_error():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="--device"):
        resolve_device("gpu-please")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_a_gpu_that_is_not_there_is_a_user_error(name):
    with pytest.raises(UserError, match="no GPU"):
        resolve_device(name)
