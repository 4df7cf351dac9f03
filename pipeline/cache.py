"""The cache step: one ``Trainer.predict`` pass per split writes the CLS state cache of the run's model."""
from __future__ import annotations

import os

from typing import Any, Sequence

from core.runstore import RunStore

__all__ = ["step_cache"]


def step_cache(store: RunStore | str, splits: Sequence[str] = ("repair", "test"), epoch: int | None = None,
               trainer_kwargs: dict[str, Any] | None = None):
    """Cache ``splits`` for the last (or ``epoch``'s) checkpoint: the last epoch's cache is
    ``states/{split}.safetensors``, another epoch's ``states/{split}.epoch=NNN.safetensors``; a cache of that
    checkpoint on disk is kept, a stale one replaced only once the new one is complete."""
    from lightning_modules.runs import cache_run_states

    store = RunStore(store) if isinstance(store, (str, os.PathLike)) else store
    return cache_run_states(store, list(splits), epoch=epoch, trainer_kwargs=trainer_kwargs)
