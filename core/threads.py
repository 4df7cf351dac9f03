"""How torch's CPU threads wait: passively, so that a shared machine slows the toolkit about as much as its fair
share (docs/benchmarks.md, "Contention").

torch runs each CPU op above a small size in an OpenMP parallel region on ``torch.get_num_threads()`` threads
(default: one per core), and MKL runs its products in regions of the same OpenMP runtime. Between two regions the
idle threads of libgomp (the runtime of torch's Linux wheels) spin for ~300,000 iterations (~3 ms) before they
sleep (``OMP_WAIT_POLICY`` unset). A DE generation or an FL call at testbed shapes is hundreds of regions of
0.01-1 ms, so the threads never sleep: where other processes want the cores, the spinning threads take the time
slices the work (and the other processes) needed, and every region waits for a thread the scheduler has not run.
``benchmarks/contention.py`` measured the DE 11.5x slower (FL: 37x) with one CPU-bound competitor per core than on
an idle machine, the independent numpy reference 2.2x; with :data:`OPENMP_DEFAULTS` 3.9x (FL: 3.2x), with no
measurable cost on the idle machine and bit-identical results.

Why not fewer threads: two threads speed the same kernels up 1.35-1.65x when nothing competes, and MKL's products
are not bit-identical across thread counts at every shape (at testbed shapes the sparse fitness of a last chunk of
7 candidates differs in the last bit between 1 and 2 threads), so a thread count that followed the load could make
a seeded DE's patch depend on what else ran. How idle threads wait changes no arithmetic (``tests/test_threads.py``).

The OpenMP runtime reads these variables once, when it is loaded (``import torch``): :func:`configure_openmp` adds
the defaults to ``os.environ`` (call it before importing torch, e.g. in a script's first lines: later it only
reaches the child processes); :func:`openmp_env` adds them around the start of child processes
(``vitfl.pipeline.parallel`` starts its workers so). A user's own choice (any of :data:`WAIT_VARIABLES` set, e.g.
``OMP_WAIT_POLICY=ACTIVE``) is kept. This module imports nothing heavy (no torch).
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, MutableMapping

__all__ = ["OPENMP_DEFAULTS", "WAIT_VARIABLES", "openmp_defaults", "configure_openmp", "openmp_env",
           "openmp_runtime_loaded"]

#: what the toolkit's processes get unless the user chose how OpenMP threads wait: idle threads sleep (every
#: OpenMP runtime), after 1,000 spins (~10 us) in libgomp, which bridge the gap between two back-to-back ops (on an
#: idle machine passive waiting alone ran the DE ~12% slower, with the spins no measurably slower; docs/benchmarks.md)
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}
#: the variables that say how OpenMP threads wait (standard, libgomp's, Intel / LLVM OpenMP's): any one set by the
#: user means the defaults are not added
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "KMP_LIBRARY")
#: OpenMP runtimes as their shared libraries are named (libgomp: GCC's, torch's Linux wheels; libiomp5: Intel's;
#: libomp: LLVM's, torch's macOS wheels)
_RUNTIMES = ("libgomp", "libiomp5", "libomp.", "libomp-")


def openmp_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The variables :func:`configure_openmp` would add to ``environ`` (default ``os.environ``): none where the
    user set any of :data:`WAIT_VARIABLES`."""
    env = os.environ if environ is None else environ
    if any(env.get(k, "").strip() for k in WAIT_VARIABLES):
        return {}
    return dict(OPENMP_DEFAULTS)


def configure_openmp(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Add :data:`OPENMP_DEFAULTS` to ``environ`` (default: this process's, ``os.environ``) unless the user chose
    a wait policy; returns what was added. In this process it takes effect only when called before the OpenMP
    runtime is loaded (before ``import torch``; :func:`openmp_runtime_loaded`); child processes started after the
    call inherit it either way."""
    env = os.environ if environ is None else environ
    add = openmp_defaults(env)
    env.update(add)
    return add


@contextlib.contextmanager
def openmp_env() -> Iterator[dict[str, str]]:
    """Within: ``os.environ`` holds the defaults (unless the user chose a wait policy), so that child processes
    started here (``spawn``, ``subprocess``) run their OpenMP threads passively; restored after. Yields what was
    added."""
    add = openmp_defaults()
    os.environ.update(add)
    try:
        yield add
    finally:
        for k in add:
            os.environ.pop(k, None)


def openmp_runtime_loaded() -> bool:
    """Whether an OpenMP runtime is already loaded in this process (then it has read its wait policy): from
    ``/proc/self/maps`` on Linux, else whether torch is imported."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "torch" in sys.modules
    return any(name in maps for name in _RUNTIMES)
