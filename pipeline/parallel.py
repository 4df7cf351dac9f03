"""Run a shardable sweep on several worker processes of this machine, one sub-shard each.

The repair sweeps cut their grid into shards (``shard=(k, n)``: every n-th task from the k-th) and skip or lock
what another process has done or is doing, so ``workers`` processes on one machine are ``workers`` sub-shards of
the caller's shard: worker i runs shard ``(k + n i, n workers)``. Each worker starts with ``spawn`` (no CUDA or
OpenMP state inherited), gets ``threads`` intra-op threads (default: this process's threads split evenly, at
least 1: the testbed's small matrix products use 2 processes x 1 thread better than 1 x 2) and returns its rows,
which are concatenated in worker order. Workers start with passive OpenMP waiting in their environment
(:data:`vitfl.core.threads.OPENMP_DEFAULTS`, unless the user chose a wait policy; :func:`vitfl.core.threads.openmp_env`): their
idle OpenMP threads sleep instead of spinning on cores that the other workers or processes need (results do not
change). An exception in a worker is raised here after the others finished (what they wrote stays on disk, so a
rerun resumes).

Workers die with their parent: a ``kill -9`` of the main process must not leave workers that finish (or idle)
unsupervised, holding the run's claims. Each worker asks Linux for ``SIGKILL`` when its parent dies
(``prctl(PR_SET_PDEATHSIG)``, via ctypes) and, on every platform, runs a watchdog thread that exits the worker as
soon as ``os.getppid()`` is no longer the parent's pid (the portable fallback; it also covers a parent that died
before the worker started). With the workers gone, multiprocessing's resource tracker sees its pipe close and
exits too. A task killed this way leaves no half-written result (every write is atomic) and its claim is taken over
by the next run (the claim's process is dead).

Signals: a run stopped by SIGTERM or SIGINT ends as :class:`Interrupted` (a ``BaseException``: no ``except
Exception`` of a sweep that goes on after a failed task takes it for one), never as a normal exit. The scripts
install :func:`interrupt_handlers` (``scripts/_cli.guard``), each worker installs them too, and a worker's
interruption (or a ``SystemExit`` of Lightning's SIGTERM handling) comes back to the parent as :class:`Interrupted`,
which then stops the other workers at once instead of waiting for their sub-shards. :func:`set_step` names the step
a run is in, for the message that says where it stopped.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any, Callable, Iterator, Mapping

#: the signals that stop a run (each ends it with :class:`Interrupted` and exit status 128 + the signal's number)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """The run was stopped by a signal (``signum``: SIGTERM, SIGINT) during ``step`` (None: not known here).

    A ``BaseException``, like ``KeyboardInterrupt``: ``except Exception`` (a sweep's ``on_error="continue"``, a
    benchmark that records a failed method) lets it through, so a signal ends the run instead of one task."""

    def __init__(self, signum: int, step: str | None = None):
        super().__init__(signum, step)
        self.signum = int(signum)
        self.step = step

    @property
    def signame(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_status(self) -> int:
        """128 + the signal's number (the shell's convention: 143 for SIGTERM, 130 for SIGINT)."""
        return 128 + self.signum

    def __str__(self) -> str:
        return f"stopped by {self.signame}" + (f" during {self.step}" if self.step else "")


#: the step the run is in (:func:`set_step`), the signal that stopped it, whether a worker runs a task
_STATE: dict[str, Any] = {"step": None, "signal": None, "in_task": False}


def set_step(step: str | None) -> None:
    """Name the step this process is in (the experiment runner: ``localize``, ``repair de`` ...), for the message
    of an interrupted run; None: none."""
    _STATE["step"] = step


def current_step() -> str | None:
    return _STATE["step"]


def _raise_interrupted(signum: int, frame: Any) -> None:
    if _STATE["signal"] is not None:  # a second signal while the first one's exception unwinds: stop now
        with contextlib.suppress(OSError):
            os.write(2, f"second signal ({signal.Signals(signum).name}): stopping at once\n".encode())
        os._exit(128 + signum)
    _STATE["signal"] = signum
    raise Interrupted(signum, _STATE["step"])


@contextlib.contextmanager
def interrupt_handlers(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within: SIGTERM / SIGINT raise :class:`Interrupted` in the main thread (a second one ends the process at
    once); the previous handlers are restored after. Lightning's trainer keeps them (it calls a handler it finds
    after its own). Off the main thread (where Python cannot set handlers): nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signals}
    before = _STATE["signal"]
    _STATE["signal"] = None
    for s in signals:
        signal.signal(s, _raise_interrupted)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _STATE["signal"] = before


def as_interrupted(err: BaseException) -> Interrupted | None:
    """``err`` as the interruption it is: an :class:`Interrupted`, Lightning's ``SIGTERMException``, or a
    ``KeyboardInterrupt`` / ``SystemExit`` raised while a signal was being handled; None for anything else."""
    if isinstance(err, Interrupted):
        return err
    sig = _STATE["signal"]
    if type(err).__name__ == "SIGTERMException":  # Lightning's loops raise it (a SystemExit, status 0) on SIGTERM
        return Interrupted(sig or signal.SIGTERM, _STATE["step"])
    if isinstance(err, KeyboardInterrupt):
        return Interrupted(sig or signal.SIGINT, _STATE["step"])
    if isinstance(err, SystemExit) and sig is not None:
        return Interrupted(sig, _STATE["step"])
    return None


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


def _worker_signal(signum: int, frame: Any) -> None:
    """A worker's SIGTERM / SIGINT: inside a task, :class:`Interrupted` (it goes back to the parent as the task's
    exception); between tasks, exit at once (nothing of a task is running)."""
    if not _STATE["in_task"] or _STATE["signal"] is not None:
        os._exit(128 + signum)
    _STATE["signal"] = signum
    raise Interrupted(signum, _STATE["step"])


def _init_worker(threads: int, parent: int | None = None) -> None:
    if parent is not None:
        die_with_parent(parent)
    for s in STOP_SIGNALS:
        signal.signal(s, _worker_signal)
    import torch

    torch.set_num_threads(threads)


def _worker_task(fn: Callable[..., list], kwargs: Mapping[str, Any], shard: tuple[int, int]) -> list:
    """One sub-shard in a worker. An interruption (this worker's signal, or Lightning's ``SIGTERMException``, a
    ``SystemExit`` of status 0 that would read as success) goes back as :class:`Interrupted`."""
    _STATE["in_task"] = True
    try:
        return list(fn(**kwargs, shard=shard))
    except BaseException as e:  # noqa: BLE001 - only interruptions are translated
        stop = as_interrupted(e)
        if stop is not None:
            raise stop from None
        if isinstance(e, SystemExit):
            raise RuntimeError(f"a worker's task (shard {shard}) called sys.exit({e.code!r})") from None
        raise
    finally:
        _STATE["in_task"] = False


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """End the pool's workers now (an interrupted run: their tasks are not waited for; every write is atomic and a
    dead worker's claims are taken over by the next run)."""
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            p.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def run_sharded(fn: Callable[..., list], kwargs: Mapping[str, Any], workers: int, shard: tuple[int, int] = (0, 1),
                threads: int | None = None) -> list:
    """``fn(**kwargs, shard=s)`` for each sub-shard ``s`` of ``shard`` on ``workers`` spawned processes (``fn``
    must be importable by name, e.g. a module-level function); the returned lists concatenated."""
    import torch

    if workers == 1:
        return list(fn(**kwargs, shard=shard))
    from vitfl.core.threads import openmp_env

    threads = threads or max(1, torch.get_num_threads() // workers)
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                               initargs=(threads, os.getpid()))
    try:
        with openmp_env():  # the workers start (spawn) on their first tasks: they inherit the wait policy
            futures = [pool.submit(_worker_task, fn, dict(kwargs), s) for s in sub_shards(shard, workers)]
        pending = set(futures)
        while pending:  # an interrupted worker stops the others at once; any other error waits for them
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                if isinstance(f.exception(), Interrupted):
                    raise f.exception()
        errors = [f.exception() for f in futures]
    except BaseException:  # this process's own signal, or a worker's: the workers stop with it
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)
    for e in errors:
        if e is not None:
            raise e
    out: list = []
    for f in futures:
        out.extend(f.result())
    return out
