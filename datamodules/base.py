"""The shared shape of every data module: splits, items, transforms, folds, validation.

Splits (names in :data:`SPLITS`):

- ``train``, ``val``: training data; ``val`` is a seeded (stratified where possible) part of the training data.
- ``eval``: the evaluation split (e.g. CIFAR-100's official test set).
- ``repair`` / ``test``: disjoint parts of ``eval`` from a k-fold split (:mod:`vitfl.datamodules.folds`): fold
  ``fold_index``'s held-out part is ``test``, the other ``n_folds - 1`` parts are ``repair``.

Every item of ``dm.dataset(split)`` is ``(image, label, index)``: ``image`` a normalised ``FloatTensor [C, H, W]``
(``H = W = image_size``), ``label`` an int in ``[0, num_classes)``, ``index`` the item's position within that split
(``0 .. len - 1``), so state caches can be keyed by it. :meth:`VisionDataModule.indices` maps those positions
back to the underlying source (for ``repair`` / ``test``: to positions in ``eval``), :meth:`VisionDataModule.labels`
gives a split's labels without loading any image.

A subclass says where its data lives and how to check it, and nothing else:

- :meth:`VisionDataModule._validate`: cheap format checks (presence, keys, counts; no image decoding) that raise
  one :class:`DatasetFormatError` naming the path, what was expected there and how to get it. Called by
  ``prepare_data()`` and again at the start of ``setup()``; may memoise what it read.
- :meth:`VisionDataModule._load_sources`: the raw ``train`` / ``val`` / ``eval`` :class:`SplitSource` s.

Unreadable images: the cheap checks open no image, so a corrupt file (e.g. a truncated JPEG) is normally met when a
loader reaches it, and then raises :class:`UnreadableImageError` naming the file (never a bare PIL traceback).
``verify_images=True`` (``--data.init_args.verify_images true``) decodes every image of every split once in
``setup()`` and raises one :class:`DatasetFormatError` listing *every* unreadable file; :meth:`verify_data` returns
that list without raising. ``on_bad_image="skip"`` runs the same full check and leaves the unreadable images out of
their splits (before the folds are cut), with a warning giving their count and paths (:attr:`skipped_images`).
Both run in every ``setup()`` of a fresh data module, so the later steps that rebuild it from a run's
``run_config.yaml`` see the same splits (and pay the same decoding time: ~0.35 ms per 64x64 JPEG on one CPU core,
~40 s for Tiny-ImageNet's 110000 images).

Shuffling: the training loader's sampler (:class:`EpochSeededSampler`) draws epoch ``e``'s order from
``(seed, e)`` alone, so a run resumed from a checkpoint sees the same batches as an uninterrupted one.

Nothing here downloads anything, imports a model, or decides a file path on its own (``root`` and ``folds_path``
come from the config / the script's ``RunStore``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from vitfl.core.registry import Registry, UnknownNameError

from vitfl.datamodules.folds import FoldSplit, load_or_create_folds

__all__ = ["DatasetFormatError", "UnreadableImageError", "BadImage", "BAD_IMAGE_POLICIES", "SPLITS", "SplitSource",
           "IndexedSplit", "EpochSeededSampler", "VisionDataModule", "holdout_split"]

SPLITS: tuple[str, ...] = ("train", "val", "eval", "repair", "test")
#: what to do with an image that cannot be decoded (``on_bad_image``)
BAD_IMAGE_POLICIES: tuple[str, ...] = ("raise", "skip")


class DatasetFormatError(ValueError):
    """The dataset on disk is missing or not in the expected format (message: path, expectation, how to get it)."""


class UnreadableImageError(DatasetFormatError):
    """One image cannot be decoded (message: the file, the decoder's error, how to list every such file)."""


@dataclass(frozen=True)
class BadImage:
    """One unreadable sample: ``where`` names it (a file path, or ``array row i`` of an in-memory source)."""

    where: str
    error: str

    def __str__(self) -> str:
        return f"{self.where}: {self.error}"


class SplitSource(Dataset):
    """Raw samples of one source: ``source[i] -> (raw image, label)`` where the raw image is anything
    ``torchvision.transforms.v2.ToImage`` accepts (PIL image, ``[C, H, W]`` tensor). ``labels`` is ``[N]`` int64,
    known without loading any image."""

    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """Where sample ``i`` lives (a file path for files), for error messages."""
        return f"{type(self).__name__} row {i}"

    def check(self, i: int) -> str | None:
        """Fully decode sample ``i``; ``None`` when it is readable, else the decoder's error as text."""
        try:
            self[i]
        except Exception as e:  # any failure to produce the sample is what the check reports
            return f"{type(e).__name__}: {e}"
        return None


class TensorSource(SplitSource):
    """Images held in memory: ``images [N, C, H, W]`` (uint8 or float in [0, 1]), ``labels [N]``."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int]):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def check(self, i: int) -> str | None:
        img = self.images[i]
        if img.is_floating_point() and not bool(torch.isfinite(img).all()):
            return "the image holds NaN or inf values"
        return None


class IndexedSplit(Dataset):
    """One split: positions ``indices`` of ``source``, transformed; item ``k`` is ``(image, label, k)``."""

    def __init__(self, name: str, source: SplitSource, indices: np.ndarray, transform: Callable):
        self.name = name
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels[self.indices]

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, int]:
        if not -len(self) <= k < len(self):
            raise IndexError(f"index {k} out of range for split {self.name!r} of size {len(self)}")
        k = int(k) % len(self)
        raw, label = self.source[int(self.indices[k])]
        return self.transform(raw), int(label), k

    def __repr__(self) -> str:
        return f"IndexedSplit({self.name!r}, n={len(self)})"


class EpochSeededSampler(torch.utils.data.RandomSampler):
    """A shuffle whose order in epoch ``e`` depends only on ``(seed, e)``: Lightning calls :meth:`set_epoch` before
    each epoch, so a resumed run draws the same orders as an uninterrupted one. A subclass of ``RandomSampler``, so
    under DDP Lightning replaces it by its (also epoch-seeded) ``DistributedSampler``."""

    def __init__(self, data_source, seed: int = 0):
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0
        #: the DataLoader's generator (its per-iteration base seed for workers), reseeded with the epoch, so that
        #: starting an epoch draws nothing from the global RNG that dropout and augmentation use
        self.loader_generator = torch.Generator()
        self.set_epoch(0)

    def _key(self, stream: int) -> int:
        key = np.random.SeedSequence([self.seed, self.epoch, stream]).generate_state(2, dtype=np.uint32)
        return int(key[0]) << 32 | int(key[1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.loader_generator.manual_seed(self._key(1))

    def __iter__(self):
        gen = torch.Generator().manual_seed(self._key(0))
        yield from torch.randperm(len(self.data_source), generator=gen).tolist()


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``arange(len(labels))`` into (kept, held out ``fraction``), stratified by label with
    ``sklearn.model_selection.train_test_split`` when every class can be stratified (else a plain seeded shuffle
    split, with a warning). Both parts sorted. ``fraction == 0`` holds out nothing."""
    n = len(labels)
    idx = np.arange(n)
    if fraction == 0:
        return idx, idx[:0]
    try:
        keep, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError as e:  # too few samples per class to stratify (tiny data sets)
        warnings.warn(f"cannot stratify a {fraction:g} hold-out of {n} samples ({e}); using a plain seeded split",
                      stacklevel=2)
        keep, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=None)
    return np.sort(keep), np.sort(held)


@dataclass
class _Sources:
    train: tuple[SplitSource, np.ndarray]
    val: tuple[SplitSource, np.ndarray]
    eval: tuple[SplitSource, np.ndarray]


class UnknownDataModuleError(UnknownNameError):
    """A data-module name no module registered."""


#: every data module, found by importing each module of the ``datamodules`` package (and the ``vitfl.datamodules``
#: entry points): a new data set is one file with a decorated :class:`VisionDataModule` subclass
DATAMODULES = Registry("data module", packages=("vitfl.datamodules",), entry_points="vitfl.datamodules",
                       error=UnknownDataModuleError)


def register_datamodule(name: str):
    """Class decorator: register a :class:`VisionDataModule` subclass as data module ``name``."""
    return DATAMODULES.register(name)


class VisionDataModule(L.LightningDataModule):
    """Base of the image-classification data modules (see the module docstring for the splits and items).

    Args:
        root: the folder that holds the dataset's standard folder (``None`` where the data is embedded).
        image_size: side of the square images the model sees (resized with torchvision if different).
        mean, std: per-channel normalisation (``None``: the dataset's default, :attr:`default_mean` / ``_std``).
        batch_size: training batch size; ``eval_batch_size`` (default ``batch_size``) for every other loader.
        num_workers: DataLoader workers.
        seed: seeds the train/val split and the training shuffle.
        n_folds, fold_seed, fold_index: the k-fold repair/test split of ``eval`` (:mod:`vitfl.datamodules.folds`).
        folds_path: where the fold indices are written on first use and read back afterwards (``None``: recompute).
        augment: random training augmentation (train loader only; ``dataset("train")`` stays deterministic).
        predict_split: the split ``predict_dataloader`` serves (not shuffled).
        verify_images: decode every image once in ``setup()`` and raise one error listing every unreadable file.
        on_bad_image: ``"raise"`` (default: an unreadable image is an error naming the file) or ``"skip"`` (decode
            every image once in ``setup()`` and leave the unreadable ones out of their splits, with a warning).
    """

    #: dataset facts, set by subclasses
    name: ClassVar[str] = ""
    in_channels: ClassVar[int] = 3
    default_image_size: ClassVar[int] = 224
    default_mean: ClassVar[tuple[float, ...]] = (0.5, 0.5, 0.5)
    default_std: ClassVar[tuple[float, ...]] = (0.5, 0.5, 0.5)
    #: how to get the data, appended to every DatasetFormatError (``{root}`` is replaced by ``root``)
    how_to_get: ClassVar[str] = ""

    def __init__(
        self,
        root: str | None = None,
        image_size: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        n_folds: int = 5,
        fold_seed: int = 777,
        fold_index: int = 0,
        folds_path: str | None = None,
        augment: bool = False,
        predict_split: str = "repair",
        verify_images: bool = False,
        on_bad_image: str = "raise",
    ):
        super().__init__()
        # with the subclass's own arguments (Lightning walks the __init__ frames); folds_path is where this run keeps its
        # folds (the run store decides it), not a setting: left out, so nothing stored in a run names its absolute path
        self.save_hyperparameters(ignore=["folds_path"])
        self.root = root
        self.image_size = int(image_size if image_size is not None else self.default_image_size)
        self.mean = tuple(float(m) for m in (mean if mean is not None else self.default_mean))
        self.std = tuple(float(s) for s in (std if std is not None else self.default_std))
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.n_folds = n_folds
        self.fold_seed = fold_seed
        self.fold_index = fold_index
        self.folds_path = folds_path
        self.augment = augment
        self.predict_split = predict_split
        self.verify_images = verify_images
        self.on_bad_image = on_bad_image
        self._check_args()
        #: the unreadable images left out by ``on_bad_image="skip"`` (filled by ``setup()``)
        self.skipped_images: list[BadImage] = []
        self._splits: dict[str, IndexedSplit] | None = None
        self._aug_train: IndexedSplit | None = None
        self.folds: FoldSplit | None = None

    def _check_args(self) -> None:
        def bad(msg: str):
            raise ValueError(f"{type(self).__name__}: {msg}")

        if self.image_size <= 0:
            bad(f"image_size must be a positive int, got {self.image_size}")
        for name, v in (("mean", self.mean), ("std", self.std)):
            if len(v) != self.in_channels:
                bad(f"{name} must have {self.in_channels} value(s) (one per channel), got {list(v)}")
        if any(s <= 0 for s in self.std):
            bad(f"std must be positive, got {list(self.std)}")
        for name in ("batch_size", "eval_batch_size", "num_workers", "seed", "n_folds", "fold_index"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                bad(f"{name} must be an int, got {v!r}")
        for name in ("batch_size", "eval_batch_size"):
            if int(getattr(self, name)) <= 0:
                bad(f"{name} must be a positive int, got {getattr(self, name)}")
        if self.num_workers < 0:
            bad(f"num_workers must be >= 0, got {self.num_workers}")
        if not isinstance(self.verify_images, bool):
            bad(f"verify_images must be true or false, got {self.verify_images!r}")
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            bad(f"on_bad_image must be one of {list(BAD_IMAGE_POLICIES)}, got {self.on_bad_image!r}")
        if self.n_folds < 2:
            bad(f"n_folds must be >= 2, got {self.n_folds}")
        if not 0 <= self.fold_index < self.n_folds:
            bad(f"fold_index must be in [0, {self.n_folds - 1}], got {self.fold_index}")
        if self.predict_split not in SPLITS:
            bad(f"predict_split must be one of {list(SPLITS)}, got {self.predict_split!r}")

    def _check_fraction(self, name: str, v: float, allow_zero: bool = True) -> None:
        if not ((0 <= v if allow_zero else 0 < v) and v < 1):
            raise ValueError(f"{type(self).__name__}: {name} must be in {'[0' if allow_zero else '(0'}, 1), "
                             f"got {v}")

    # ------------------------------------------------------------------ to implement in subclasses
    def _validate(self) -> None:
        """Cheap format checks; raise :class:`DatasetFormatError` (use :meth:`format_error`)."""

    def _load_sources(self) -> _Sources:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _train_augmentation(self) -> list[Callable]:
        """Random transforms applied (on the resized float image) to training images when ``augment``."""
        pad = max(1, self.image_size // 8)
        return [v2.RandomCrop(self.image_size, padding=pad, padding_mode="reflect"), v2.RandomHorizontalFlip()]

    def format_error(self, path: Any, expected: str) -> DatasetFormatError:
        """The one error for data on disk: ``PATH: expected ...; how to get it``."""
        how = self.how_to_get.format(root=self.root if self.root is not None else "ROOT")
        return DatasetFormatError(f"{path}: expected {expected}. {how}".rstrip())

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Check the data on disk (never downloads)."""
        self._validate()

    def setup(self, stage: str | None = None) -> None:
        """Validate, then build every split (index arrays only; images load lazily) and the repair/test folds."""
        self._validate()
        if self._splits is not None:
            return
        src = self._load_sources()
        if self.verify_images or self.on_bad_image == "skip":
            src = self._check_images(src)
        eval_source, eval_idx = src.eval
        self.folds = load_or_create_folds(
            self.folds_path, len(eval_idx), self.n_folds, self.fold_seed, self.fold_index,
            eval_labels=eval_source.labels[eval_idx], dataset=self.name, datamodule=type(self).__name__)
        tf = self.transform(augment=False)
        self._splits = {
            "train": IndexedSplit("train", *src.train, tf),
            "val": IndexedSplit("val", *src.val, tf),
            "eval": IndexedSplit("eval", eval_source, eval_idx, tf),
            "repair": IndexedSplit("repair", eval_source, eval_idx[self.folds.repair], tf),
            "test": IndexedSplit("test", eval_source, eval_idx[self.folds.test], tf),
        }
        self._aug_train = IndexedSplit("train", *src.train, self.transform(augment=True)) if self.augment else None

    # ------------------------------------------------------------------ the full image check
    def _bad_images(self, src: _Sources) -> dict[int, dict[int, BadImage]]:
        """Decode every sample each split uses, once; ``{id(source): {position: BadImage}}``."""
        wanted: dict[int, tuple[SplitSource, set[int]]] = {}
        for source, idx in (src.train, src.val, src.eval):
            wanted.setdefault(id(source), (source, set()))[1].update(int(i) for i in idx)
        bad: dict[int, dict[int, BadImage]] = {}
        for key, (source, positions) in wanted.items():
            for i in sorted(positions):
                err = source.check(i)
                if err is not None:
                    bad.setdefault(key, {})[i] = BadImage(source.describe(i), err)
        return bad

    def verify_data(self) -> list[BadImage]:
        """Decode every image of every split once (no transform); the unreadable ones (empty: all readable).
        Runs the cheap format checks first (they raise :class:`DatasetFormatError`)."""
        self._validate()
        bad = self._bad_images(self._load_sources())
        return [b for per_source in bad.values() for b in per_source.values()]

    def _check_images(self, src: _Sources) -> _Sources:
        bad = self._bad_images(src)
        found = [b for per_source in bad.values() for b in per_source.values()]
        if not found:
            return src
        listing = "\n  ".join(str(b) for b in found)
        if self.on_bad_image == "raise":
            raise DatasetFormatError(
                f"{len(found)} unreadable image(s) in the data under {self.root}:\n  {listing}\nexpected every image "
                f"to decode; replace these files (re-extract the archive), or set data.init_args.on_bad_image=skip to "
                f"leave them out")
        self.skipped_images = found
        warnings.warn(f"{type(self).__name__}: leaving out {len(found)} unreadable image(s) "
                      f"(on_bad_image=skip):\n  {listing}", stacklevel=3)

        def keep(pair: tuple[SplitSource, np.ndarray]) -> tuple[SplitSource, np.ndarray]:
            source, idx = pair
            drop = bad.get(id(source), {})
            return source, np.asarray([i for i in idx if int(i) not in drop], dtype=np.int64)

        return _Sources(train=keep(src.train), val=keep(src.val), eval=keep(src.eval))

    def transform(self, augment: bool = False) -> v2.Compose:
        """raw image -> normalised ``FloatTensor [C, image_size, image_size]``."""
        steps: list[Callable] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                 v2.Resize((self.image_size, self.image_size), antialias=True)]
        if augment:
            steps += self._train_augmentation()
        steps += [v2.Normalize(list(self.mean), list(self.std)), v2.ToPureTensor()]
        return v2.Compose(steps)

    # ------------------------------------------------------------------ splits
    def _ensure_setup(self) -> dict[str, IndexedSplit]:
        if self._splits is None:
            self.setup()
        assert self._splits is not None
        return self._splits

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")

    def dataset(self, split: str, augment: bool = False) -> IndexedSplit:
        """The split as a Dataset of ``(image [C,H,W], label, index within split)``; ``augment`` (train only)
        serves the randomly augmented training images."""
        self._check_split(split)
        splits = self._ensure_setup()
        if augment:
            if split != "train":
                raise ValueError(f"augment applies to the train split only, not {split!r}")
            return self._aug_train or IndexedSplit("train", splits["train"].source, splits["train"].indices,
                                                   self.transform(augment=True))
        return splits[split]

    def indices(self, split: str) -> np.ndarray:
        """``[len(split)]`` positions of the split's items in their source: for ``train`` / ``val`` the training
        source, for ``eval`` the evaluation source, for ``repair`` / ``test`` positions within ``eval``."""
        self._check_split(split)
        splits = self._ensure_setup()
        if split in ("repair", "test"):
            assert self.folds is not None
            return (self.folds.repair if split == "repair" else self.folds.test).copy()
        return splits[split].indices.copy()

    def labels(self, split: str) -> np.ndarray:
        """``[len(split)]`` int64 labels of the split, without loading images."""
        self._check_split(split)
        return self._ensure_setup()[split].labels.copy()

    # ------------------------------------------------------------------ loaders
    def dataloader(self, split: str, shuffle: bool = False, augment: bool = False,
                   batch_size: int | None = None) -> DataLoader:
        ds = self.dataset(split, augment=augment)
        bs = batch_size or (self.batch_size if split == "train" and shuffle else self.eval_batch_size)
        sampler = EpochSeededSampler(ds, seed=self.seed) if shuffle else None
        return DataLoader(ds, batch_size=bs, sampler=sampler, num_workers=self.num_workers,
                          generator=sampler.loader_generator if sampler is not None else None,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True, augment=self.augment, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.dataloader(self.predict_split)

    def __repr__(self) -> str:
        sizes = "" if self._splits is None else ", " + ", ".join(f"{k}={len(v)}" for k, v in self._splits.items())
        return f"{type(self).__name__}(image_size={self.image_size}{sizes})"
