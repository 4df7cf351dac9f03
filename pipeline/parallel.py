"""Run a shardable sweep on several worker processes of this machine, one sub-shard each.

The repair sweeps cut their grid into shards (``shard=(k, n)``: every n-th task from the k-th) and skip or lock
what another process has done or is doing, so ``workers`` processes on one machine are ``workers`` sub-shards of
the caller's shard: worker i runs shard ``(k + n i, n workers)``. Each worker starts with ``spawn`` (no CUDA or
OpenMP state inherited), gets ``threads`` intra-op threads (default: this process's threads split evenly, at
least 1: the testbed's small matrix products use 2 processes x 1 thread better than 1 x 2) and returns its rows,
which are concatenated in worker order. An exception in a worker is raised here after the others finished (what
they wrote stays on disk, so a rerun resumes).
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Callable, Mapping


def resolve_workers(workers: int | str | None) -> int:
    """``"auto"``: this machine's cores, at most 4 (every worker holds its own copy of the states and the
    libraries); None: 1; else the positive int given."""
    if workers is None:
        return 1
    if workers == "auto":
        return max(1, min(4, os.cpu_count() or 1))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int or 'auto', got {workers!r}")
    return workers


def sub_shards(shard: tuple[int, int], workers: int) -> list[tuple[int, int]]:
    """The ``workers`` disjoint sub-shards of ``shard = (k, n)`` whose union is ``shard``'s tasks."""
    k, n = shard
    return [(k + n * i, n * workers) for i in range(workers)]


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_sharded(fn: Callable[..., list], kwargs: Mapping[str, Any], workers: int, shard: tuple[int, int] = (0, 1),
                threads: int | None = None) -> list:
    """``fn(**kwargs, shard=s)`` for each sub-shard ``s`` of ``shard`` on ``workers`` spawned processes (``fn``
    must be importable by name, e.g. a module-level function); the returned lists concatenated."""
    import torch

    if workers == 1:
        return list(fn(**kwargs, shard=shard))
    threads = threads or max(1, torch.get_num_threads() // workers)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(fn, **kwargs, shard=s) for s in sub_shards(shard, workers)]
        errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e
    out: list = []
    for f in futures:
        out.extend(f.result())
    return out
