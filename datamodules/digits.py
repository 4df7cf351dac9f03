"""scikit-learn's bundled digits (``sklearn.datasets.load_digits``): the embedded data set that needs no file.

1797 grey 8x8 images of the digits 0-9 (pixel values 0..16, scaled here to [0, 1]), ~180 per class. The whole set
is split once, stratified by label and seeded by ``seed`` (``sklearn.model_selection.train_test_split``):
``train_fraction`` (0.6) / ``val_fraction`` (0.1) / the rest (0.3) = ``eval``, which the k-fold split cuts into
``repair`` / ``test``. Images stay 8x8 unless another ``image_size`` is asked (then resized, bilinear).
"""
from __future__ import annotations

from typing import Callable, ClassVar

import numpy as np
import torch
from torchvision.transforms import v2

from vitfl.datamodules.base import holdout_split, register_datamodule, _Sources, TensorSource, VisionDataModule

__all__ = ["DigitsDataModule", "DIGITS_MEAN", "DIGITS_STD"]

#: mean / std of all 1797 images after scaling to [0, 1] (computed once from ``load_digits().images / 16``)
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3760,)


@register_datamodule("digits")
class DigitsDataModule(VisionDataModule):
    """``load_digits`` as ``(image [1, S, S], label, index)`` items; ``S = image_size`` (default 8).

    Args (besides :class:`~vitfl.datamodules.base.VisionDataModule`'s; ``root`` is accepted and ignored):
        train_fraction: share of the 1797 images in ``train`` (default 0.6).
        val_fraction: share in ``val`` (default 0.1); ``eval`` gets the rest.
    """

    name: ClassVar[str] = "digits"
    in_channels: ClassVar[int] = 1
    default_image_size: ClassVar[int] = 8
    default_mean: ClassVar[tuple[float, ...]] = DIGITS_MEAN
    default_std: ClassVar[tuple[float, ...]] = DIGITS_STD

    def __init__(self, train_fraction: float = 0.6, val_fraction: float = 0.1, **kwargs):
        # every shared argument (root, image_size, batch_size, folds, ...) is VisionDataModule's
        super().__init__(**kwargs)
        self._check_fraction("train_fraction", train_fraction, allow_zero=False)
        self._check_fraction("val_fraction", val_fraction)
        if train_fraction + val_fraction >= 1:
            raise ValueError(f"DigitsDataModule: train_fraction + val_fraction must be < 1 (eval gets the rest), "
                             f"got {train_fraction} + {val_fraction}")
        self.train_fraction = train_fraction
        self.val_fraction = val_fraction

    @property
    def class_names(self) -> list[str]:
        return [str(d) for d in range(10)]

    @property
    def num_classes(self) -> int:
        return 10

    def _load_sources(self) -> _Sources:
        from sklearn.datasets import load_digits

        bunch = load_digits()  # bundled with scikit-learn: no file, no download
        images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)  # [N, 1, 8, 8]
        source = TensorSource(images, bunch.target)
        rest, eval_idx = holdout_split(source.labels, 1.0 - self.train_fraction - self.val_fraction, self.seed)
        if self.val_fraction > 0:
            tr, va = holdout_split(source.labels[rest], self.val_fraction / (self.train_fraction + self.val_fraction),
                                   self.seed)
            train_idx, val_idx = rest[tr], rest[va]
        else:
            train_idx, val_idx = rest, rest[:0]
        return _Sources(train=(source, train_idx), val=(source, val_idx), eval=(source, eval_idx))

    def _train_augmentation(self) -> list[Callable]:
        # small random shifts (up to 1/8 of the side, i.e. 1 pixel at 8x8); no flips: digits are not symmetric
        return [v2.RandomAffine(degrees=0, translate=(0.125, 0.125))]
