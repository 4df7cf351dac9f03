"""Run a shardable sweep on several worker processes of this machine, one sub-shard each.

The repair sweeps cut their grid into shards (``shard=(k, n)``: every n-th task from the k-th) and skip or lock
what another process has done or is doing, so ``workers`` processes on one machine are ``workers`` sub-shards of
the caller's shard: worker i runs shard ``(k + n i, n workers)``. Each worker starts with ``spawn`` (no CUDA or
OpenMP state inherited), gets ``threads`` intra-op threads (default: this process's threads split evenly, at
least 1: the testbed's small matrix products use 2 processes x 1 thread better than 1 x 2) and returns its rows,
which are concatenated in worker order. An exception in a worker is raised here after the others finished (what
they wrote stays on disk, so a rerun resumes).

Workers die with their parent: a ``kill -9`` of the main process must not leave workers that finish (or idle)
unsupervised, holding the run's claims. Each worker asks Linux for ``SIGKILL`` when its parent dies
(``prctl(PR_SET_PDEATHSIG)``, via ctypes) and, on every platform, runs a watchdog thread that exits the worker as
soon as ``os.getppid()`` is no longer the parent's pid (the portable fallback; it also covers a parent that died
before the worker started). With the workers gone, multiprocessing's resource tracker sees its pipe close and
exits too. A task killed this way leaves no half-written result (every write is atomic) and its claim is taken over
by the next run (the claim's process is dead).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
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


#: seconds between two looks of the watchdog at the parent pid
WATCHDOG_INTERVAL = 0.5
_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Linux: ask the kernel to send ``sig`` to this process when its parent dies; False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # pragma: no cover - no libc / no prctl
        return False


def _watch_parent(parent: int, interval: float = WATCHDOG_INTERVAL) -> None:
    """Exit this process (at once, no cleanup: the parent that would collect its work is gone) when its parent is
    no longer ``parent``."""
    import time

    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(interval)


def die_with_parent(parent: int) -> None:
    """Make this process end when ``parent`` (the pid that started it) dies: the parent-death signal where the OS
    has one, and a daemon watchdog thread everywhere; exits now if the parent is already gone."""
    _set_parent_death_signal()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watchdog", daemon=True).start()


def _init_worker(threads: int, parent: int | None = None) -> None:
    if parent is not None:
        die_with_parent(parent)
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
                             initargs=(threads, os.getpid())) as pool:
        futures = [pool.submit(fn, **kwargs, shard=s) for s in sub_shards(shard, workers)]
        errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e
    out: list = []
    for f in futures:
        out.extend(f.result())
    return out
