"""Checkpoints of a training run: per-epoch weights for the FL benchmark, and one full checkpoint to resume from.

- :class:`PerEpochCheckpoint` is Lightning's ``ModelCheckpoint`` set to keep every epoch (``save_top_k=-1``,
  ``every_n_epochs=1``, weights only) under ``<run>/checkpoints/epoch=NNN.ckpt`` where NNN counts *completed*
  epochs, plus ``epoch=000.ckpt`` = the untrained / pretrained start written when fit starts; so "epoch e-1 vs e"
  always exists.
- :class:`ResumeCheckpoint` writes ``<run>/checkpoints/last.ckpt`` after every epoch: the *full* training state
  (weights, optimizer, LR scheduler, loops, callbacks, and the CPU/CUDA/numpy/python RNG states), so
  ``scripts/train.py fit ... --ckpt_path last`` continues where a killed run stopped and ends with the same
  weights as an uninterrupted run.

Every checkpoint file is written atomically (a temporary file in the same folder, then ``os.replace``): a kill
during a save leaves the previous file intact, never a truncated one. Its sha256 is recorded in a sidecar
``<name>.ckpt.sha256`` (``sha256sum`` format; :func:`vitfl.core.io.write_sidecar`): the old sidecar is removed just before
the rename and the new one written after it, so a file never stands beside another file's hash (a kill in between
leaves it unverified, as a checkpoint of an older run). torch does not check its zip CRC, so this hash is what
catches flipped bytes: :mod:`vitfl.lightning_modules.runs` verifies it before loading. The run directory is the
Trainer's ``default_root_dir`` unless ``dirpath`` is given.
"""
from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vitfl.core.io import sha256_file, sidecar_path, write_sidecar
from vitfl.core.runstore import LAYOUT, RunStore

#: the full-state checkpoint's file name (the run store's ``last_checkpoint``: ``RunStore(root).last_checkpoint``)
LAST_CHECKPOINT = Path(LAYOUT["last_checkpoint"][0]).name


def atomic_save_checkpoint(trainer: L.Trainer, filepath: str | Path, weights_only: bool) -> None:
    """``trainer.save_checkpoint`` to ``.{name}.tmp`` beside ``filepath``, then rename it into place (rank 0).

    Every rank must call this (``save_checkpoint`` holds a barrier); the temporary name is the same on every rank.
    """
    filepath = Path(filepath)
    tmp = filepath.with_name(f".{filepath.name}.tmp")
    trainer.save_checkpoint(str(tmp), weights_only=weights_only)
    if trainer.is_global_zero:
        digest = sha256_file(tmp)  # hashed once, here; verified by its readers
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sidecar_path(filepath))
        os.replace(tmp, filepath)
        write_sidecar(filepath, digest)
    trainer.strategy.barrier("atomic_checkpoint_renamed")


class _AtomicSave(ModelCheckpoint):
    def _resolve_dirpath(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = str(RunStore(trainer.default_root_dir).checkpoints)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        atomic_save_checkpoint(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            from weakref import proxy

            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


class PerEpochCheckpoint(_AtomicSave):
    def __init__(self, dirpath: str | None = None):
        super().__init__(dirpath=dirpath, filename="epoch={epoch:03d}", auto_insert_metric_name=False,
                         save_top_k=-1, every_n_epochs=1, save_weights_only=True, save_on_train_epoch_end=True,
                         enable_version_counter=False)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._resolve_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def format_checkpoint_name(self, metrics, filename=None, ver=None, prefix=None) -> str:
        metrics = dict(metrics)
        if "epoch" in metrics:  # name by completed epochs: the checkpoint after the first epoch is epoch=001
            metrics["epoch"] = int(metrics["epoch"]) + 1
        return super().format_checkpoint_name(metrics, filename, ver, prefix)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        start = Path(self.dirpath) / "epoch=000.ckpt"
        # rank 0 decides for all: a rank that already saw rank 0's fresh file would skip save_checkpoint's barrier
        if trainer.strategy.broadcast(trainer.current_epoch == 0 and not start.exists()):
            atomic_save_checkpoint(trainer, start, weights_only=True)


def _rng_state() -> dict[str, Any]:
    """Every RNG training draws from, as plain types and tensors (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _plain_python_state(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain_python_state(s):
    return [s[0], list(s[1]), s[2]]


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeCheckpoint(_AtomicSave):
    """The full training state in ``<run>/checkpoints/last.ckpt``, replaced atomically after every epoch.

    Besides Lightning's state (weights, optimizer, LR scheduler, loops, callbacks) it stores the global RNG states
    at the end of the epoch and puts them back when a resumed fit starts its epochs, so dropout and
    augmentation draw the same numbers as in an uninterrupted run (the training shuffle is seeded per epoch by the
    data module).
    """

    CHECKPOINT_NAME_LAST = "last"

    def __init__(self, dirpath: str | None = None):
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, save_weights_only=False,
                         save_on_train_epoch_end=True, every_n_epochs=1, enable_version_counter=False)
        self._pending_rng: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._resolve_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": _rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self._pending_rng = state_dict.pop("rng", None)
        super().load_state_dict(state_dict)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ModelCheckpoint writes "last" only after a top-k save; this callback keeps no top-k, only last.ckpt
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the last hook before the epochs run: after a resume, the RNGs as the saved epoch's end left them
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None
