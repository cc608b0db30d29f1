"""``torch.distributed`` helpers: no-ops in a single process.

Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` set) :func:`init` starts the
process group: nccl on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as td

__all__ = ["init", "is_dist", "rank", "world_size", "barrier", "all_reduce_sum",
           "all_gather_objects", "broadcast_object", "shutdown", "local_device"]


def is_dist() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_dist() else 0


def world_size() -> int:
    return td.get_world_size() if is_dist() else 1


def init(device: str) -> str:
    """Start the process group when launched by torchrun; returns the device to use (under
    CUDA, ``cuda:LOCAL_RANK``)."""
    dev = torch.device(device)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not is_dist():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        td.init_process_group(backend)
    elif dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def local_device(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and is_dist():
        return f"cuda:{torch.cuda.current_device()}"
    return str(dev)


def barrier() -> None:
    if is_dist():
        td.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (returns ``t``)."""
    if is_dist():
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def all_gather_objects(obj) -> list:
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_dist():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def shutdown(owned: Optional[bool] = True) -> None:
    if owned and is_dist():
        td.destroy_process_group()
