"""Runs started by `accelerate launch` (or `torchrun`): which process this is, its share of a list, and Python
objects gathered from every process. accelerate's `PartialState` joins the process group (gloo on CPUs, NCCL on
GPUs; one machine or several); `torch.distributed` carries the data. A plain `python` process is process 0 of 1,
and none of this touches accelerate or torch.distributed there.

The rule every multi-process path follows: the work is split with `share` (process p takes items p, p + N, ...),
results come back with `gather` in process order, and only the main process writes files or talks to vLLM.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from accelerate import PartialState

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place in the launch: `index` of `count` (0 of 1 outside a launch)."""

    index: int = 0
    count: int = 1

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def launched(self) -> bool:
        """More than one process: the collectives below talk to the others."""
        return self.count > 1


def launched_processes() -> int:
    """How many processes the launcher started (its WORLD_SIZE), without joining any process group."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def processes() -> Processes:
    """This process's place in the launch. Under `accelerate launch --num_processes N` (N > 1) the first call
    joins the process group through accelerate's `PartialState` (CPU processes on gloo, GPU ones on NCCL)."""
    if launched_processes() <= 1:
        return Processes()
    state = PartialState(cpu=not torch.cuda.is_available())
    return Processes(state.process_index, state.num_processes)


def share(items: Sequence[T], procs: Processes) -> list[T]:
    """This process's items: positions index, index + count, ... (every process gets a near-equal share)."""
    return list(items[procs.index::procs.count])


def unshare(shares: Sequence[Sequence[T]]) -> list[T]:
    """The items of `share`'s per-process lists back in their original order."""
    count = len(shares)
    out: list = [None] * sum(len(s) for s in shares)
    for p, part in enumerate(shares):
        out[p::count] = list(part)
    return out


def gather(value: Any, procs: Processes) -> list[Any]:
    """`value` from every process, in process order, on every process (pickled: keep it small and on the CPU)."""
    if not procs.launched:
        return [value]
    out: list = [None] * procs.count
    dist.all_gather_object(out, value)
    return out


def all_sum(tensor: torch.Tensor, procs: Processes) -> torch.Tensor:
    """The sum of `tensor` over every process (in place; returned)."""
    if procs.launched:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(procs: Processes) -> None:
    if procs.launched:
        dist.barrier()


__all__ = ["Processes", "all_sum", "barrier", "gather", "launched_processes", "processes", "share", "unshare"]
