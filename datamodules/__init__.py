"""LightningDataModules for the image-classification data sets, and a registry to build them by name.

>>> dm = build_datamodule("digits", seed=0)
>>> dm.num_classes, dm.in_channels, dm.image_size
(10, 1, 8)

Adding a data set: subclass :class:`~vitfl.datamodules.base.VisionDataModule` in its own file of this package and decorate
it with ``@register_datamodule("name")`` (found by the registry: no list to edit).
"""
from __future__ import annotations

from vitfl import refuse_bare_name

refuse_bare_name(__name__)  # 'import datamodules' stops here with the right name


from vitfl.datamodules.base import (DATAMODULES, SPLITS, DatasetFormatError, UnknownDataModuleError, VisionDataModule,
                              register_datamodule)
from vitfl.datamodules.cifar100 import CIFAR100DataModule
from vitfl.datamodules.digits import DigitsDataModule
from vitfl.datamodules.folds import FoldsFileError, FoldSplit, kfold_split, load_or_create_folds
from vitfl.datamodules.mnist_transfer import MNISTTransferDataModule
from vitfl.datamodules.tiny_imagenet import TinyImageNetDataModule

__all__ = [
    "DATAMODULES", "SPLITS", "DatasetFormatError", "FoldsFileError", "FoldSplit", "VisionDataModule",
    "DigitsDataModule", "CIFAR100DataModule", "TinyImageNetDataModule",
    "build_datamodule", "registered_datamodules", "register_datamodule", "UnknownDataModuleError", "kfold_split", "load_or_create_folds",
]

def registered_datamodules() -> list[str]:
    return DATAMODULES.names()


def build_datamodule(name: str, **kwargs) -> VisionDataModule:
    """The data module registered as ``name`` (digits, cifar100, tiny_imagenet, mnist_transfer, ...), built with
    ``kwargs``."""
    if not isinstance(name, str):
        raise UnknownDataModuleError(f"unknown data module {name!r}; registered: {registered_datamodules()}")
    return DATAMODULES.get(name)(**kwargs)
