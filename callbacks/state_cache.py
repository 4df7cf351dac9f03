"""Writes the state cache from one ``Trainer.predict`` pass (format: ``core/states.py``).

Each process keeps its own rows on the CPU (the cache itself, nothing more: call ``trainer.predict(...,
return_predictions=False)``) and writes ``states/{split}.rank{r}.safetensors``; rank 0 then merges the shards
in sample order (dropping the duplicates a distributed sampler pads with) into ``states/{split}.safetensors``.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from vitfl.core.runstore import RunStore
from vitfl.core.states import merge_shards, save_states
from vitfl.localization.ffn import backbone_kind, model_fingerprint


class StateCacheWriter(BasePredictionWriter):
    def __init__(self, split: str, path: str | None = None, extra_metadata: dict[str, str] | None = None):
        super().__init__(write_interval="batch")
        self.split = split
        self.path = path
        self.extra = dict(extra_metadata or {})
        self._rows: dict[str, list[torch.Tensor]] = {}

    def target(self, trainer: L.Trainer) -> Path:
        return Path(self.path) if self.path else RunStore(trainer.default_root_dir).states(self.split)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._rows = {}
        self._hash = model_fingerprint(pl_module)
        self._backbone = backbone_kind(pl_module)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if "x" not in prediction:
            raise RuntimeError("predict_step returned no FFN states: the state cache needs a ViT backbone")
        for k, v in prediction.items():
            self._rows.setdefault(k, []).append(v.detach().cpu())

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        final = self.target(trainer)
        shard = final.with_name(f"{final.stem}.rank{trainer.global_rank}.safetensors")
        cat = {k: torch.cat(v) for k, v in self._rows.items()}
        meta = {"model_hash": self._hash, "split": self.split, "backbone": self._backbone, **self.extra}
        save_states(shard, cat["x"], cat["a"], cat["logits"], cat["label"], cat["index"], metadata=meta)
        self._rows = {}
        trainer.strategy.barrier("state_cache_shards")
        if trainer.is_global_zero:
            merge_shards([final.with_name(f"{final.stem}.rank{r}.safetensors") for r in range(trainer.world_size)],
                         final)
        trainer.strategy.barrier("state_cache_merged")
