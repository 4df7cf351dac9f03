"""Writes each epoch's FFN weights alone (safetensors) so the checkpoint benchmark never reloads whole checkpoints:
``<run>/ffn_weights/epoch=NNN.safetensors`` with the last block's tensors ``W_bef [4d, d]``, ``b_bef [4d]``,
``W_aft [d, 4d]``, ``b_aft [d]`` (and ``ls_gamma [d]`` when the block has LayerScale) under these plain names, and
(``all_blocks=True``, the default) the same tensors of every other transformer block ``L`` under
``block=L.W_bef``, ``block=L.b_bef``, ... (:func:`block_key`; metadata ``num_blocks``). NNN counts completed
epochs, 000 = the start of training (as :class:`vitfl.callbacks.checkpoints.PerEpochCheckpoint`). Each file records
its content hash (``vitfl.core.io``), which :func:`load_ffn_weights` verifies, and holds finite values only.

Files written before per-block weights hold the plain (last-block) names only: they stay readable for the last
block, and :func:`block_ffn_weights` raises :class:`MissingBlockError` (naming the file) for another block, whose
weights the FL evaluation then reads from that epoch's checkpoint
(``vitfl.evaluation.checkpoint_benchmark.block_weights_of_epoch``). Size: a ViT-B FFN is 18.9 MB in float32, so
all 12 blocks are about 227 MB per epoch (the last alone 18.9 MB); ``all_blocks=False`` writes the last only."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from vitfl.core.io import CorruptFileError, FileFormatError, ResultError, load_tensors
from vitfl.core.runstore import RunStore
from vitfl.core.states import atomic_save_safetensors
from vitfl.localization.ffn import FFNHead, ffn_head, model_fingerprint, num_ffn_blocks

__all__ = ["ffn_state", "all_ffn_state", "block_key", "block_ffn_weights", "MissingBlockError", "load_ffn_weights",
           "LastFFNWeightsWriter"]


class MissingBlockError(LookupError):
    """A weight file without the tensors of the block asked for (written before per-block weights, or with
    ``all_blocks=False``)."""


def ffn_state(head: FFNHead) -> dict[str, torch.Tensor]:
    out = {"W_bef": head.fc_bef.weight, "b_bef": head.fc_bef.bias, "W_aft": head.fc_aft.weight,
           "b_aft": head.fc_aft.bias}
    gamma = getattr(head.layer_scale, "gamma", None)
    if gamma is not None:
        out["ls_gamma"] = gamma
    return {k: v.detach().float().cpu().clone() for k, v in out.items()}


def block_key(block: int, name: str) -> str:
    """The tensor name of ``name`` (``W_bef``, ``b_bef``, ``W_aft``, ``b_aft``, ``ls_gamma``) of block ``block`` (a
    non-negative index other than the last) in a per-epoch weight file: ``block=L.W_bef``."""
    return f"block={int(block)}.{name}"


def all_ffn_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The last FFN's tensors under their plain names (:func:`ffn_state` of ``ffn_head(model, -1)``, as every weight
    file before per-block weights) and every other block ``L``'s under :func:`block_key` names."""
    out = ffn_state(ffn_head(model, -1))
    n = num_ffn_blocks(model)
    for b in range(n - 1):
        out.update({block_key(b, k): v for k, v in ffn_state(ffn_head(model, b, tokens=True)).items()})
    return out


def block_ffn_weights(tensors: dict[str, torch.Tensor], block: int, num_blocks: int,
                      path: str | Path = "the weight file") -> dict[str, torch.Tensor]:
    """Block ``block``'s tensors (plain names) from a weight file's tensors: the plain names themselves for the last
    block (``block`` -1 or ``num_blocks - 1``), else the ``block=L.*`` ones; a file without them:
    :class:`MissingBlockError` naming it."""
    b = int(block) % int(num_blocks) if -num_blocks <= int(block) < num_blocks else None
    if b is None:
        raise ValueError(f"block {block} is out of range for a model of {num_blocks} blocks")
    if b == num_blocks - 1:
        return {k: v for k, v in tensors.items() if not k.startswith("block=")}
    prefix = block_key(b, "")
    out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not out:
        plain = sorted(k for k in tensors if not k.startswith("block="))
        others = " and other blocks" if len(plain) < len(tensors) else ""
        raise MissingBlockError(f"{path} holds no weights of block {b} (tensors {plain}{others}): it was written "
                                "before per-block FFN weights (or with all_blocks=False)")
    return out


def load_ffn_weights(path: str | Path, all_blocks: bool = False) -> dict[str, torch.Tensor]:
    """The last FFN's tensors of a per-epoch weight file (the plain names; ``all_blocks``: every tensor, other
    blocks' ``block=L.*`` too), its content hash verified (:class:`~vitfl.core.io.CorruptFileError`) and every value
    finite (:class:`~vitfl.core.io.ResultError` naming the file and tensor otherwise)."""
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
    return tensors if all_blocks else {k: v for k, v in tensors.items() if not k.startswith("block=")}


class LastFFNWeightsWriter(L.Callback):
    """Each epoch's FFN weights of every block in ffn_weights/epoch=NNN.safetensors (start of training, each epoch).

    Args:
        dirpath: the folder of the weight files (default: the run store's ``ffn_weights/``)
        all_blocks: every transformer block's FFN (the last block's tensors under their plain names, block L's as
            ``block=L.W_bef``, ...); false: the last FFN only, the format before per-block weights
    """

    def __init__(self, dirpath: str | None = None, all_blocks: bool = True):
        self.dirpath = dirpath
        self.all_blocks = all_blocks

    def _path(self, trainer: L.Trainer, epoch: int) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath) / f"epoch={epoch:03d}.safetensors"
        return RunStore(trainer.default_root_dir).ffn_weights(epoch)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        if trainer.is_global_zero:
            meta = {"epoch": str(epoch), "model_hash": model_fingerprint(pl_module)}
            if self.all_blocks:
                tensors = all_ffn_state(pl_module)
                meta["num_blocks"] = str(num_ffn_blocks(pl_module))
            else:
                tensors = ffn_state(ffn_head(pl_module, -1))
            atomic_save_safetensors(tensors, self._path(trainer, epoch), meta)

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0 and not self._path(trainer, 0).exists():
            self._write(trainer, pl_module, 0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, trainer.current_epoch + 1)
