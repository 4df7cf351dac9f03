"""Writes the state cache from one ``Trainer.predict`` pass (format: ``core/states.py``).

Each process keeps its own rows on the CPU (the cache itself, nothing more: call ``trainer.predict(...,
return_predictions=False)``) and writes ``states/{split}.rank{r}.safetensors``; rank 0 then merges the shards
in sample order (dropping the duplicates a distributed sampler pads with) into ``states/{split}.safetensors``.

With ``block`` (a non-negative block index whose head is a token head) the writer captures, during each predict
batch, the token states entering that block's FFN (``x [B, T, d]``: :func:`vitfl.localization.ffn.capture_ffn_states`
with ``block``; no activations, which the head recomputes from ``x``) in place of the CLS states ``predict_step``
returns, and records the head's ``state_identity()`` in the cache's metadata (the block cache,
``RunStore.states(split, tag, block)``).
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from vitfl.core.runstore import RunStore
from vitfl.core.states import merge_shards, save_states, state_identity_text
from vitfl.localization.ffn import backbone_kind, capture_ffn_states, ffn_head, model_fingerprint


class StateCacheWriter(BasePredictionWriter):
    def __init__(self, split: str, path: str | None = None, extra_metadata: dict[str, str] | None = None,
                 block: int | None = None):
        super().__init__(write_interval="batch")
        self.split = split
        self.path = path
        self.extra = dict(extra_metadata or {})
        self.block = block
        self._rows: dict[str, list[torch.Tensor]] = {}
        self._capture = None

    def target(self, trainer: L.Trainer) -> Path:
        return Path(self.path) if self.path else RunStore(trainer.default_root_dir).states(self.split,
                                                                                            block=self.block)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._rows = {}
        self._hash = model_fingerprint(pl_module)
        self._backbone = backbone_kind(pl_module)
        if self.block is not None:
            view = ffn_head(pl_module.backbone, self.block)
            self.extra["state_identity"] = state_identity_text(view.state_identity())
            self.extra["d_ff"] = str(view.d_ff)
            self._capture = capture_ffn_states(pl_module.backbone, self.block)
            self._captured = self._capture.__enter__()

    def _release(self) -> None:
        if self._capture is not None:
            capture, self._capture = self._capture, None
            capture.__exit__(None, None, None)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._release()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._release()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if self._capture is not None:  # the block's token states of this batch, in place of the CLS ones
            prediction = {**{k: v for k, v in prediction.items() if k != "a"}, "x": self._captured["x"].float()}
        if "x" not in prediction:
            raise RuntimeError("predict_step returned no FFN states: the state cache needs a ViT backbone")
        for k, v in prediction.items():
            self._rows.setdefault(k, []).append(v.detach().cpu())

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        final = self.target(trainer)
        shard = final.with_name(f"{final.stem}.rank{trainer.global_rank}.safetensors")
        cat = {k: torch.cat(v) for k, v in self._rows.items()}
        meta = {"model_hash": self._hash, "split": self.split, "backbone": self._backbone, **self.extra}
        save_states(shard, cat["x"], cat.get("a"), cat["logits"], cat["label"], cat["index"], metadata=meta)
        self._rows = {}
        trainer.strategy.barrier("state_cache_shards")
        if trainer.is_global_zero:
            merge_shards([final.with_name(f"{final.stem}.rank{r}.safetensors") for r in range(trainer.world_size)],
                         final)
        trainer.strategy.barrier("state_cache_merged")
