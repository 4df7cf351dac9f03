"""LightningDataModules for the image-classification data sets, and a registry to build them by name.

>>> dm = build_datamodule("digits", seed=0)
>>> dm.num_classes, dm.in_channels, dm.image_size
(10, 1, 8)

Adding a data set: subclass :class:`~datamodules.base.VisionDataModule` in its own file and add its name below.
"""
from __future__ import annotations

from datamodules.base import SPLITS, DatasetFormatError, VisionDataModule
from datamodules.cifar100 import CIFAR100DataModule
from datamodules.digits import DigitsDataModule
from datamodules.folds import FoldsFileError, FoldSplit, kfold_split, load_or_create_folds
from datamodules.mnist_transfer import MNISTTransferDataModule
from datamodules.tiny_imagenet import TinyImageNetDataModule

__all__ = [
    "DATAMODULES", "SPLITS", "DatasetFormatError", "FoldsFileError", "FoldSplit", "VisionDataModule",
    "DigitsDataModule", "CIFAR100DataModule", "TinyImageNetDataModule",
    "build_datamodule", "registered_datamodules", "kfold_split", "load_or_create_folds",
]

DATAMODULES: dict[str, type[VisionDataModule]] = {
    "digits": DigitsDataModule,
    "cifar100": CIFAR100DataModule,
    "tiny_imagenet": TinyImageNetDataModule,
}


class UnknownDataModuleError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return self.args[0]


def registered_datamodules() -> list[str]:
    return list(DATAMODULES)


def build_datamodule(name: str, **kwargs) -> VisionDataModule:
    """The data module registered as ``name`` (digits, cifar100, tiny_imagenet), built with ``kwargs``."""
    try:
        cls = DATAMODULES[name]
    except (KeyError, TypeError):
        raise UnknownDataModuleError(f"unknown data module {name!r}; registered: {registered_datamodules()}") from None
    return cls(**kwargs)
