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

The config written into the run (``run_config.yaml``, and the logger's ``config.yaml``) holds no path of the
machine (:func:`run_relative_config`): the run directory itself is ``.``, paths inside it (``folds_path``, the
logger's ``save_dir``, a ``pretrained_path`` or config file in the run) are relative to the run root, and inputs
outside it are recorded once under ``external_inputs`` by a symbolic name (``toolkit:configs/...`` for the
toolkit's own files, ``external:<file name>`` otherwise) with their content hash. A relative
``backbone_kwargs.pretrained_path`` that exists in the run directory (the main job's ``pretrain/export``) is read
from there, so a resumed fit of a moved run reads its own pretraining export.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from vitfl.callbacks.checkpoints import LAST_CHECKPOINT, PerEpochCheckpoint, ResumeCheckpoint
from vitfl.callbacks.ffn_weights import LastFFNWeightsWriter
from vitfl.datamodules.base import VisionDataModule
from vitfl.core.io import atomic_write_text, sha256_file
from vitfl.core.runstore import RunStore
from vitfl.lightning_modules.classifier import ImageClassifier
from vitfl.lightning_modules.runs import CHECKPOINT_SAFE_GLOBALS, resolve_datamodule_class, safe_torch_load


class FitOptionError(ValueError):
    """A fit option is invalid or would make the run do nothing (raised before any work)."""


#: the toolkit's folder (``toolkit:<path>`` names a file in it)
TOOLKIT = Path(__file__).resolve().parents[1]


def _content_hash(path: Path) -> str | None:
    """sha256 (16 hex) of a file, or of a folder's files (relative names and contents); None if absent."""
    if path.is_file():
        return sha256_file(path)[:16]
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()[:16]


def _run_relative(value: Any, root: Path, inputs: dict[str, str | None]) -> Any:
    """A path value as the run records it: relative to ``root`` (``.`` for the root) when it lies inside, else a
    symbolic name (``toolkit:<path>`` / ``external:<name>``) whose content hash goes into ``inputs``."""
    if value is None or isinstance(value, bool) or not isinstance(value, (str, os.PathLike)):
        return value
    text = str(value)
    if not text or text.startswith(("toolkit:", "external:")) or "://" in text:
        return value
    p = Path(text).expanduser()
    real = (p if p.is_absolute() else Path.cwd() / p).resolve()
    if real == root or root in real.parents:
        return real.relative_to(root).as_posix()
    if TOOLKIT in real.parents:
        name = f"toolkit:{real.relative_to(TOOLKIT).as_posix()}"
    else:
        name = f"external:{real.name}"
    inputs[name] = _content_hash(real)
    return name


def run_relative_config(cfg: dict[str, Any], root: str | Path) -> dict[str, Any]:
    """``cfg`` (a plain fit config) with every path of the machine replaced, for writing into the run ``root``: the
    ``config`` list of source YAML files, ``trainer.default_root_dir``, the loggers' ``save_dir``, checkpoint
    ``dirpath``s, ``data.init_args.folds_path``, ``backbone_kwargs.pretrained_path`` and a ``ckpt_path`` file are
    made relative to the run root, or (outside it) a symbolic name recorded with its content hash under
    ``external_inputs``. The data module's ``root`` (where the dataset lives) is left as given."""
    import copy

    cfg = copy.deepcopy(cfg)
    root = Path(root).expanduser()
    root = (root if root.is_absolute() else Path.cwd() / root).resolve()
    inputs: dict[str, str | None] = {}

    def fix(d: Any, key: str) -> None:
        if isinstance(d, dict) and d.get(key) is not None:
            d[key] = _run_relative(d[key], root, inputs)

    if isinstance(cfg.get("config"), list):
        cfg["config"] = [_run_relative(c, root, inputs) for c in cfg["config"]]
    trainer = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else {}
    fix(trainer, "default_root_dir")
    loggers = trainer.get("logger")
    for lg in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(lg, dict):
            fix(lg.get("init_args"), "save_dir")
    for cb in trainer.get("callbacks") or []:
        if isinstance(cb, dict):
            fix(cb.get("init_args"), "dirpath")
    for section in ("per_epoch_checkpoint", "resume_checkpoint", "ffn_weights"):
        fix(cfg.get(section), "dirpath")
    data = cfg.get("data")
    if isinstance(data, dict):
        fix(data.get("init_args") if "class_path" in data else data, "folds_path")
    model = cfg.get("model")
    if isinstance(model, dict):
        model = model.get("init_args") if "class_path" in model else model
        fix((model or {}).get("backbone_kwargs"), "pretrained_path")
    if cfg.get("ckpt_path") not in (None, "last", "best", "hpc"):
        fix(cfg, "ckpt_path")
    if inputs:
        cfg["external_inputs"] = {k: (f"sha256:{v}" if v else "absent") for k, v in sorted(inputs.items())}
    return cfg


def _ns_get(ns: Any, key: str) -> Any:
    if ns is None:
        return None
    if isinstance(ns, dict):
        return ns.get(key)
    return ns.get(key) if hasattr(ns, "get") else getattr(ns, key, None)


def _pretrained_in_run(model_cfg: Any, root: str | Path) -> None:
    """A relative ``backbone_kwargs.pretrained_path`` that exists in the run directory but not in the working
    directory is read from the run directory (a run records its own files relative to its root)."""
    kw = _ns_get(model_cfg, "backbone_kwargs")
    if kw is None:
        kw = _ns_get(_ns_get(model_cfg, "init_args"), "backbone_kwargs")
    if not isinstance(kw, dict) or not isinstance(kw.get("pretrained_path"), str):
        return
    p = Path(kw["pretrained_path"])
    if not p.is_absolute() and not p.exists() and (Path(root) / p).exists():
        kw["pretrained_path"] = str(Path(root) / p)


class RunRelativeConfig(SaveConfigCallback):
    """Lightning's ``config.yaml`` in the log folder, written with :func:`run_relative_config` (no machine paths)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        if self.save_to_log_dir:
            log_dir = trainer.log_dir  # broadcasts the folder
            if log_dir is not None and trainer.is_global_zero:
                cfg = run_relative_config(_plain(self.config.as_dict()), trainer.default_root_dir)
                atomic_write_text(Path(log_dir) / self.config_filename, yaml.safe_dump(cfg, sort_keys=False))
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class ToolkitCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", RunRelativeConfig)
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
            # each subcommand logs to its own named run tb/<subcommand>/ (tb/fit, tb/test, ...): a later test never
            # appends to or overwrites fit's event files and config.yaml; hp_metric is the test accuracy
            cfg.trainer.logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                  "init_args": {"save_dir": root, "name": "tb", "default_hp_metric": False,
                                                "version": self.subcommand or "fit"}}
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
        _pretrained_in_run(cfg.get("model") if hasattr(cfg, "get") else None, root)
        if self.subcommand == "fit":
            _check_trainer_options(cfg.trainer)
            # what later steps (state cache, FL, repair) rebuild the data and model from, with every path relative
            # to the run root; written by fit() once the data module's setup has succeeded
            self._run_config_text = yaml.safe_dump(run_relative_config(_plain(cfg.as_dict()), root),
                                                   sort_keys=False)
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
    from vitfl.lightning_modules.runs import checkpoint_epochs

    trained = [e for e in checkpoint_epochs(layout) if e > 0]
    last = layout.last_checkpoint
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
                             f"{layout.last_checkpoint}) or the path of a last.ckpt")
    path = layout.last_checkpoint if ckpt_path == "last" else Path(ckpt_path)
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
