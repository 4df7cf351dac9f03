"""The LightningCLI shared by ``scripts/train.py``: ImageClassifier + any VisionDataModule (``data.class_path``).

- ``model.num_classes`` is linked from the datamodule, so one data YAML decides it;
- per-epoch checkpoints, a full ``checkpoints/last.ckpt`` to resume from, and last-FFN weight files are always
  written (``callbacks/``), under the run directory ``trainer.default_root_dir``;
- the default logger is TensorBoard under ``<run>/tb``;
- the repair/test folds are stored in ``<run>/folds.json`` and the fit config in ``<run>/run_config.yaml``.

``fit`` checks everything before any work and refuses a run that would do nothing: the data module is set up (data
root, format, optional full image check) *before* ``run_config.yaml`` is written, so a failed ``fit`` (a typo in
the data root) leaves the run's config as it was. ``--ckpt_path last`` resumes from ``<run>/checkpoints/last.ckpt``
(an error if there is none, or if that run already reached ``max_epochs``); a weights-only per-epoch file is
refused as a resume point with a hint. A fresh ``fit`` (no ``--ckpt_path``) into a run directory that already
holds trained checkpoints is refused rather than overwriting them. Checkpoints are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from callbacks.checkpoints import LAST_CHECKPOINT, PerEpochCheckpoint, ResumeCheckpoint
from callbacks.ffn_weights import LastFFNWeightsWriter
from datamodules.base import VisionDataModule
from core.io import atomic_write_text
from core.runstore import RunStore
from lightning_modules.classifier import ImageClassifier
from lightning_modules.runs import CHECKPOINT_SAFE_GLOBALS, resolve_datamodule_class, safe_torch_load


class FitOptionError(ValueError):
    """A fit option is invalid or would make the run do nothing (raised before any work)."""


class ToolkitCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(ImageClassifier, VisionDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(PerEpochCheckpoint, "per_epoch_checkpoint")
        parser.add_lightning_class_args(ResumeCheckpoint, "resume_checkpoint")
        parser.add_lightning_class_args(LastFFNWeightsWriter, "ffn_weights")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        root = cfg.trainer.default_root_dir
        if not root:
            raise FitOptionError("give the run directory: --trainer.default_root_dir <run_dir> (every artifact of the "
                                 "run lands there)")
        if cfg.trainer.logger in (None, True):
            # fit logs to tb/, test / validate / predict to tb/<subcommand>/: a later test never appends to or
            # overwrites fit's event files and config.yaml; hp_metric is the test accuracy (ImageClassifier)
            cfg.trainer.logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                  "init_args": {"save_dir": root, "name": "tb", "default_hp_metric": False,
                                                "version": "" if self.subcommand == "fit" else self.subcommand}}
        if cfg.trainer.logger not in (None, False) and self.subcommand == "fit":  # the learning rate in TensorBoard
            callbacks = list(cfg.trainer.callbacks or [])
            if not any("LearningRateMonitor" in str(c) for c in callbacks):
                callbacks.append({"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                                  "init_args": {"logging_interval": "step"}})
            cfg.trainer.callbacks = callbacks
        layout = RunStore(root)
        class_path = cfg.data.get("class_path") if hasattr(cfg.data, "get") else None
        if class_path is not None:  # only the toolkit's own data modules (checked before anything is imported)
            resolve_datamodule_class(class_path, source="data.class_path")
        data_args = cfg.data.get("init_args") if hasattr(cfg.data, "get") else None
        if data_args is not None and data_args.get("folds_path") is None:
            data_args["folds_path"] = str(layout.folds)  # every later step reads the same repair/test folds
        if self.subcommand == "fit":
            _check_trainer_options(cfg.trainer)
            # what later steps (state cache, FL, repair) rebuild the data and model from; written by fit() once
            # the data module's setup has succeeded
            self._run_config_text = yaml.safe_dump(_plain(cfg.as_dict()), sort_keys=False)
            self._layout = layout

    def fit(self, model, datamodule=None, ckpt_path: str | None = None, weights_only: bool | None = None,
            **kwargs: Any) -> None:
        """Check the options, set the data up, write ``run_config.yaml``, then ``Trainer.fit`` (resuming from
        ``ckpt_path``, ``"last"`` = ``<run>/checkpoints/last.ckpt``)."""
        layout: RunStore = self._layout
        if weights_only is False:
            raise FitOptionError("--weights_only false is not supported: checkpoints are read with "
                                 "weights_only=True so that a shared checkpoint cannot run code")
        ckpt = _resume_point(layout, ckpt_path, self.trainer)
        if datamodule is not None:  # data root, format, image check: fail here, before anything is written
            datamodule.prepare_data()
            datamodule.setup("fit")
        if self.trainer.is_global_zero:
            atomic_write_text(layout.run_config, self._run_config_text)
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True, **kwargs)


def _check_trainer_options(t) -> None:
    def bad(msg: str):
        raise FitOptionError(f"trainer.{msg}")

    if t.get("max_epochs") is not None:
        if t.max_epochs == 0:
            bad("max_epochs=0 trains nothing; give the number of epochs (>= 1, or -1 with max_steps)")
        if t.max_epochs < -1:
            bad(f"max_epochs must be >= 1 (or -1), got {t.max_epochs}")
    if t.get("max_steps") == 0:
        bad("max_steps=0 trains nothing; give a positive number of steps (or -1 for no limit)")
    ltb = t.get("limit_train_batches")
    if ltb is not None and not isinstance(ltb, bool) and ltb <= 0:
        bad(f"limit_train_batches={ltb} trains nothing; give a positive number of batches or fraction")
    dev = t.get("devices")
    if isinstance(dev, str) and dev.strip().lstrip("-").isdigit():
        dev = int(dev)
    if isinstance(dev, int) and not isinstance(dev, bool) and (dev == 0 or dev < -1):
        bad(f"devices must be a positive int, -1 (all), 'auto' or a list of device ids, got {dev}")


def _check_fresh_start(layout: RunStore) -> None:
    """A fresh fit would overwrite the run's checkpoints: refused once the run has trained anything (a last.ckpt or
    a checkpoint after epoch 0; the untrained start ``epoch=000.ckpt`` alone is rewritten)."""
    from lightning_modules.runs import checkpoint_epochs

    trained = [e for e in checkpoint_epochs(layout) if e > 0]
    last = layout.checkpoints / LAST_CHECKPOINT
    if trained or last.exists():
        raise FitOptionError(
            f"{layout.checkpoints} already holds this run's checkpoints (epochs {trained}"
            f"{', ' + LAST_CHECKPOINT if last.exists() else ''}); a fresh fit would overwrite them. Resume with "
            f"--ckpt_path last, or train into another --trainer.default_root_dir (to retrain from scratch here, "
            f"move or delete {layout.root} yourself)")


def _resume_point(layout: RunStore, ckpt_path: str | None, trainer) -> str | None:
    """The checkpoint to resume from (``None``: a fresh start, refused if it would overwrite trained checkpoints),
    checked: full state, not past ``max_epochs``."""
    if ckpt_path is None:
        _check_fresh_start(layout)
        return None
    if ckpt_path in ("best", "hpc") or "://" in str(ckpt_path):
        raise FitOptionError(f"--ckpt_path {ckpt_path} is not supported; use 'last' (this run's "
                             f"{layout.checkpoints / LAST_CHECKPOINT}) or the path of a last.ckpt")
    path = layout.checkpoints / LAST_CHECKPOINT if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise FitOptionError(f"--ckpt_path {ckpt_path}: no checkpoint at {path} to resume from (a run writes "
                             f"checkpoints/{LAST_CHECKPOINT} after its first epoch; drop --ckpt_path to start fresh)")
    ckpt = safe_torch_load(path, mmap=True)
    if not isinstance(ckpt, dict) or "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise FitOptionError(f"--ckpt_path {path} holds the weights only (the per-epoch files are for the FL "
                             f"benchmark); resume from the full checkpoint: --ckpt_path last "
                             f"({path.parent / LAST_CHECKPOINT})")
    done = int(ckpt.get("epoch", -1)) + 1  # Lightning stores the 0-based epoch that was running
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0 and done >= max_epochs:
        raise FitOptionError(f"--ckpt_path {path}: that run already completed {done} epoch(s), and max_epochs is "
                             f"{max_epochs}, so resuming would train nothing; raise --trainer.max_epochs to "
                             f"continue training")
    return str(path)


def _plain(obj):
    """A config as plain YAML types (drops jsonargparse's ``__path__`` entries)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if not str(k).startswith("__")}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)
