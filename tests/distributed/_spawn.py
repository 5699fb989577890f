"""Spawning gloo workers for the multi-process tests."""

from __future__ import annotations

import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, args_without_port: tuple, nprocs: int) -> None:
    """``mp.start_processes(worker, (port, *args))``, tried twice if a worker dies by a signal.

    Every check is made in the parent on the files the workers write, so a retry cannot hide a wrong number; it
    only covers a crash in gloo's teardown, seen once in CI ("terminate called without an active exception").
    """
    for attempt in range(2):
        try:
            mp.start_processes(worker, args=(free_port(), *args_without_port), nprocs=nprocs, start_method="spawn")
            return
        except mp.ProcessExitedException as e:
            if attempt == 1 or e.signal_name is None:
                raise
