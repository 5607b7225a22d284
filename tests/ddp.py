"""Launching the CLI under torchrun for the DDP tests (CPU ranks, gloo)."""

import socket
import sys
from pathlib import Path


def torchrun_cli(nproc: int = 2) -> list[str]:
    """The command prefix ``torchrun ... -m sysu30k -q`` with ``nproc`` ranks on a free local port."""
    with socket.socket() as sock:                              # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    return [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", port, "-m", "sysu30k", "-q"]
