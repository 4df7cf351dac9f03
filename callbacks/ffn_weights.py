"""Writes each epoch's last-FFN weights alone (safetensors, a few MB for ViT-B) so the checkpoint benchmark
never reloads whole checkpoints: ``<run>/ffn_weights/epoch=NNN.safetensors`` with tensors ``W_bef [4d, d]``,
``b_bef [4d]``, ``W_aft [d, 4d]``, ``b_aft [d]`` (and ``ls_gamma [d]`` when the block has LayerScale); NNN counts
completed epochs, 000 = the start of training (as :class:`vitfl.callbacks.checkpoints.PerEpochCheckpoint`). Each file
records its content hash (``vitfl.core.io``), which :func:`load_ffn_weights` verifies, and holds finite values only."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from vitfl.core.io import CorruptFileError, FileFormatError, ResultError, load_tensors
from vitfl.core.runstore import RunStore
from vitfl.core.states import atomic_save_safetensors
from vitfl.localization.ffn import FFNHead, last_ffn_head, model_fingerprint


def ffn_state(head: FFNHead) -> dict[str, torch.Tensor]:
    out = {"W_bef": head.fc_bef.weight, "b_bef": head.fc_bef.bias, "W_aft": head.fc_aft.weight,
           "b_aft": head.fc_aft.bias}
    gamma = getattr(head.layer_scale, "gamma", None)
    if gamma is not None:
        out["ls_gamma"] = gamma
    return {k: v.detach().float().cpu().clone() for k, v in out.items()}


def load_ffn_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a last-FFN weight file, its content hash verified (:class:`~vitfl.core.io.CorruptFileError`) and
    every value finite (:class:`~vitfl.core.io.ResultError` naming the file and tensor otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no last-FFN weights at {path}: train with callbacks.ffn_weights.LastFFNWeightsWriter")
    advice = ("restore it from a backup, or retrain the run (the training callback writes it with each epoch's "
              "checkpoint)")
    try:
        tensors, _ = load_tensors(path, advice=advice)
    except CorruptFileError:
        raise
    except FileFormatError as e:
        raise ResultError(f"{e}; {advice}") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ResultError(f"last-FFN weight file {path}: tensor {name!r} holds NaN or inf values (a weight file "
                              f"written by training never does); {advice}")
    return tensors


class LastFFNWeightsWriter(L.Callback):
    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def _path(self, trainer: L.Trainer, epoch: int) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath) / f"epoch={epoch:03d}.safetensors"
        return RunStore(trainer.default_root_dir).ffn_weights(epoch)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        if trainer.is_global_zero:
            atomic_save_safetensors(ffn_state(last_ffn_head(pl_module)), self._path(trainer, epoch),
                                    {"epoch": str(epoch), "model_hash": model_fingerprint(pl_module)})

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0 and not self._path(trainer, 0).exists():
            self._write(trainer, pl_module, 0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, trainer.current_epoch + 1)
