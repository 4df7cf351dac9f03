"""The cache step: one ``Trainer.predict`` pass per split writes the state cache of the run's model (the CLS
cache of the last block, or a chosen block's token cache)."""
from __future__ import annotations

from typing import Any, Sequence

from vitfl.core.runstore import RunStore

__all__ = ["step_cache"]


def step_cache(store: RunStore, splits: Sequence[str] = ("repair", "test"), epoch: int | None = None,
               trainer_kwargs: dict[str, Any] | None = None, block: int = -1) -> dict[str, int]:
    """Cache ``splits`` for the last (or ``epoch``'s) checkpoint: the last epoch's cache is
    ``states/{split}.safetensors``, another epoch's ``states/{split}.epoch=NNN.safetensors``. A cache made by that
    checkpoint is kept (skipped); a missing, stale or unreadable one is made, and a stale one replaced only once the
    new one is complete. Returns the counts (done / skipped) of splits.

    ``block`` (default -1, the last; Python-style negative allowed, out of range: an error naming the number of
    blocks): the states of that transformer block's FFN head. The last block of a CLS-pooled model is the CLS cache
    above; another block's is the token cache ``states/{split}[.epoch=NNN].block=L.safetensors`` (``L`` >= 0)."""
    from vitfl.lightning_modules.runs import cache_run_states, cache_tag, load_run
    from vitfl.core.states import CacheError

    run = load_run(store, epoch, block)
    tag = cache_tag(store, epoch)
    todo = []
    for split in splits:
        try:
            run.states(split, tag)
        except (CacheError, FileNotFoundError, OSError):
            todo.append(split)
    if todo:
        cache_run_states(store, todo, epoch=epoch, trainer_kwargs=trainer_kwargs, block=block)
    return {"done": len(todo), "skipped": len(splits) - len(todo)}
