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


def _rank_main(rank: int, port: int, out: str) -> None:
    import json
    import os
    import time

    import torch.distributed as dist

    from sysu30k.io import device

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    got = device.distributed("cpu")
    if rank == 0:
        time.sleep(2)                                 # rank 0 validating and writing checkpoints
    t0 = time.perf_counter()
    device.wait_for_rank0()
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"got": got, "backend": dist.get_backend(), "control": dist.get_backend(device._CONTROL),
                   "waited": time.perf_counter() - t0, "any": [device.any_rank(rank == 1), device.any_rank(False)]}, f)
    dist.destroy_process_group()


def test_cpu_ranks_use_gloo_and_wait_for_rank0_outside_the_default_group(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_main, args=(port, str(tmp_path / "r")), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"r.{i}").read_text()) for i in range(2))
    assert r0["got"] == [0, 2, 0] and r1["got"] == [1, 2, 1]
    assert r0["backend"] == r1["backend"] == "gloo" and r1["control"] == "gloo"
    assert r1["waited"] > 1.0 > r0["waited"]          # rank 1 waited for rank 0 in the control group
    assert r0["any"] == r1["any"] == [True, False]    # rank 1's flag reaches rank 0
