"""The cache step: one ``Trainer.predict`` pass per split writes the CLS state cache of the run's model."""
from __future__ import annotations

import os

from typing import Any, Sequence

from core.runstore import RunStore

__all__ = ["step_cache"]


def step_cache(store: RunStore | str, splits: Sequence[str] = ("repair", "test"), epoch: int | None = None,
               trainer_kwargs: dict[str, Any] | None = None):
    """Cache ``splits`` for the last (or ``epoch``'s) checkpoint; a cache of that checkpoint on disk is kept."""
    from lightning_modules.runs import cache_states, load_run_model

    store = RunStore(store) if isinstance(store, (str, os.PathLike)) else store
    model, ep = load_run_model(store, epoch)
    kw = {}
    if epoch is not None and ep != (store.checkpoint_epochs() or [ep])[-1]:
        kw["tag"] = f"epoch={ep:03d}"  # another checkpoint's cache never replaces the last epoch's
    return cache_states(store, model, list(splits), trainer_kwargs=trainer_kwargs, **kw)
