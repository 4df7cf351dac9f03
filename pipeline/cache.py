"""The cache step: one ``Trainer.predict`` pass per split writes the CLS state cache of the run's model."""
from __future__ import annotations

from typing import Any, Sequence

from vitfl.core.runstore import RunStore

__all__ = ["step_cache"]


def step_cache(store: RunStore, splits: Sequence[str] = ("repair", "test"), epoch: int | None = None,
               trainer_kwargs: dict[str, Any] | None = None) -> dict[str, int]:
    """Cache ``splits`` for the last (or ``epoch``'s) checkpoint: the last epoch's cache is
    ``states/{split}.safetensors``, another epoch's ``states/{split}.epoch=NNN.safetensors``. A cache made by that
    checkpoint is kept (skipped); a missing, stale or unreadable one is made, and a stale one replaced only once the
    new one is complete. Returns the counts (done / skipped) of splits."""
    from vitfl.lightning_modules.runs import cache_run_states, cache_tag, load_run
    from vitfl.core.states import CacheError

    run = load_run(store, epoch)
    tag = cache_tag(store, epoch)
    todo = []
    for split in splits:
        try:
            run.states(split, tag)
        except (CacheError, FileNotFoundError, OSError):
            todo.append(split)
    if todo:
        cache_run_states(store, todo, epoch=epoch, trainer_kwargs=trainer_kwargs)
    return {"done": len(todo), "skipped": len(splits) - len(todo)}
