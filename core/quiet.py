"""The one list of warnings and info loggers the toolkit silences: messages that say nothing about the results
(Lightning's hints for other set-ups, known deprecations upstream, per-Trainer banners of the thousands of short
fits a sweep runs). Real warnings still show. :func:`quiet` applies it for a whole process (the scripts and the
experiment runner); :func:`quiet_lightning` for one block (one short Trainer inside a library call)."""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Iterator

__all__ = ["COMPUTE_BEFORE_UPDATE", "KNOWN_WARNINGS", "LIGHTNING_LOGGERS", "quiet", "quiet_lightning"]

#: torchmetrics' "compute before update": the point of an FL method that needs no inputs
COMPUTE_BEFORE_UPDATE = r".*compute.*before the ``update``.*"
#: message patterns (regular expressions) of the warnings that say nothing about the results
KNOWN_WARNINGS = (
    r".*does not have many workers.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*GPU available but not used.*",
    r".*LeafSpec.*is deprecated.*",
    r".*treespec.*deprecated.*",
    r".*`isinstance\(treespec, LeafSpec\)`.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*Starting from v1\.9\.0, `tensorboardX` has been removed.*",
    r".*You defined a `validation_step` but have no `val_dataloader`.*",
    r".*Total length of .* across ranks is zero.*",
    r".*`training_step` returned `None`.*",
    r".*torch\.meshgrid: in an upcoming release.*",
    r".*LightningCLI's args parameter is intended to run from within Python.*",
    r".*module\(s\) in eval mode.*",
    COMPUTE_BEFORE_UPDATE,
    r".*on_train_start.*",
    r".*resuming from a checkpoint that ended.*",
)
#: Lightning's info loggers: "GPU available: ...", "TPU available", "💡 Tip: ...", model summaries
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                     "lightning.pytorch.accelerators.cuda", "lightning.pytorch.callbacks.model_summary",
                     "pytorch_lightning.utilities.rank_zero", "lightning.pytorch.trainer.connectors",
                     "lightning.fabric.utilities.seed", "lightning.pytorch.utilities.seed")


def _ignore_known() -> None:
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def quiet() -> None:
    """For the whole process: Lightning's info loggers at WARNING, the known warnings ignored, no Lightning tips."""
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    _ignore_known()
    os.environ.setdefault("LITMODELS_DISABLE_TIPS", "1")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """For one block: Lightning's loggers at WARNING and the known warnings ignored; both restored afterwards."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            _ignore_known()
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
