"""CIFAR-100 from the standard ``cifar-100-python/`` folder under ``root`` (never downloaded here).

The folder holds three python pickles (read with :class:`CifarUnpickler`, ``encoding="bytes"``: only numpy's
array reconstruction may be imported, so a tampered file cannot run code):

- ``train``, ``test``: ``{b"data": uint8 [N, 3072] (1024 R, 1024 G, 1024 B, row-major 32x32), b"fine_labels": [N],
  b"filenames": [N], ...}`` (50000 and 10000 images);
- ``meta``: ``{b"fine_label_names": [100 names], ...}``.

``eval`` is the official ``test`` file; ``val`` a seeded, stratified ``val_fraction`` of ``train``. Images are
resized from 32x32 to ``image_size`` (224 for ViT-B/16, bilinear, antialiased) and normalised with ``mean`` /
``std`` (default (0.5, 0.5, 0.5), as the Hugging Face google/vit-base-patch16-224-in21k image processor).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from vitfl.datamodules.base import holdout_split, register_datamodule, _Sources, TensorSource, VisionDataModule

__all__ = ["CIFAR100DataModule", "CifarUnpickler", "ForbiddenPickleError", "CIFAR_PICKLE_GLOBALS"]

FOLDER = "cifar-100-python"
N_CLASSES = 100


class ForbiddenPickleError(pickle.UnpicklingError):
    """A pickle names a global (class or function) outside :data:`CIFAR_PICKLE_GLOBALS`."""


#: every global the real CIFAR-100 python pickles reference (numpy's array reconstruction, with the module names of
#: numpy 1 and 2); nothing else is ever imported or called while reading them
CIFAR_PICKLE_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
})


class CifarUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`CIFAR_PICKLE_GLOBALS`: the built-in containers and numbers
    need no global, so a pickle whose ``__reduce__`` names ``os.system``, ``subprocess.run``, ``builtins.eval``
    (or anything else) is refused before anything is called."""

    def find_class(self, module: str, name: str):
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise ForbiddenPickleError(f"it references the global {module}.{name}, which a CIFAR-100 file never "
                                       f"holds (allowed: {sorted(f'{m}.{n}' for m, n in CIFAR_PICKLE_GLOBALS)})")
        return super().find_class(module, name)


@register_datamodule("cifar100")
class CIFAR100DataModule(VisionDataModule):
    """CIFAR-100 (fine labels) as ``(image [3, S, S], label, index)`` items, ``S = image_size`` (default 224).

    Args (besides :class:`~vitfl.datamodules.base.VisionDataModule`'s):
        root: the folder that contains ``cifar-100-python/`` (or that folder itself).
        val_fraction: share of the 50000 training images held out as ``val`` (default 0.1; 0 = no val).
    """

    name: ClassVar[str] = "cifar100"
    in_channels: ClassVar[int] = 3
    default_image_size: ClassVar[int] = 224
    how_to_get: ClassVar[str] = ("Download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
                                 "and extract it under {root} (giving {root}/cifar-100-python/{{train,test,meta}}); "
                                 "data.init_args.root names that folder. Nothing is downloaded at run time")

    def __init__(self, val_fraction: float = 0.1, **kwargs):
        # every shared argument (root, image_size, batch_size, folds, ...) is VisionDataModule's
        super().__init__(**kwargs)
        self._check_fraction("val_fraction", val_fraction)
        self.val_fraction = val_fraction
        self._raw: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # split -> (data [N,3072], labels [N])
        self._names: list[str] | None = None

    # ------------------------------------------------------------------ on-disk format
    @property
    def folder(self) -> Path:
        if self.root is None:
            raise self.format_error("root=None", f"data.init_args.root set to the folder that contains {FOLDER}/")
        root = Path(self.root).expanduser()
        if root.name == FOLDER and (root / "meta").is_file():
            return root
        return root / FOLDER

    def _unpickle(self, path: Path, keys: tuple[bytes, ...], what: str) -> dict:
        if not path.is_file():
            raise self.format_error(path, f"the CIFAR-100 python pickle '{path.name}' ({what})")
        try:
            with open(path, "rb") as f:
                obj = CifarUnpickler(f, encoding="bytes").load()
        except ForbiddenPickleError as e:
            raise self.format_error(path, f"a CIFAR-100 python pickle ({what}) holding only dicts, lists, bytes, "
                                          f"numbers and numpy arrays; refusing to load it: {e}") from None
        except Exception as e:  # any unpickling failure is a format problem of this file
            raise self.format_error(path, f"a python pickle ({what}); reading it failed with "
                                          f"{type(e).__name__}: {e}") from None
        if not isinstance(obj, dict):
            raise self.format_error(path, f"a pickled dict ({what}), got {type(obj).__name__}")
        missing = [k for k in keys if k not in obj]
        if missing:
            raise self.format_error(path, f"a pickled dict with the keys {list(keys)} ({what}); missing {missing}, "
                                          f"found {sorted(obj)[:10]}")
        return obj

    def _validate(self) -> None:
        """Check folder, files, keys, shapes and labels; keeps the arrays read (the pickles are the data)."""
        if self._raw is not None:
            return
        folder = self.folder
        if not folder.is_dir():
            raise self.format_error(folder, f"the folder {FOLDER}/ with the files train, test and meta")
        meta = self._unpickle(folder / "meta", (b"fine_label_names",), "meta: b'fine_label_names'")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"fine_label_names"]]
        if len(names) != N_CLASSES:
            raise self.format_error(folder / "meta", f"{N_CLASSES} fine label names, found {len(names)}")
        raw = {}
        for split in ("train", "test"):
            path = folder / split
            d = self._unpickle(path, (b"data", b"fine_labels"), f"{split}: b'data' uint8 [N, 3072], b'fine_labels'")
            data = np.asarray(d[b"data"])
            labels = np.asarray(d[b"fine_labels"])
            if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8 or len(data) == 0:
                raise self.format_error(path, f"b'data' as a non-empty uint8 array [N, 3072], got "
                                              f"{data.dtype} {list(data.shape)}")
            if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
                raise self.format_error(path, f"b'fine_labels' as {len(data)} ints (one per image), got "
                                              f"{labels.dtype} {list(labels.shape)}")
            if labels.min() < 0 or labels.max() >= len(names):
                raise self.format_error(path, f"fine labels in [0, {len(names) - 1}] ({len(names)} classes in meta), "
                                              f"found [{labels.min()}, {labels.max()}]")
            raw[split] = (data, labels.astype(np.int64))
        self._names, self._raw = names, raw

    # ------------------------------------------------------------------ data module
    @property
    def class_names(self) -> list[str]:
        if self._names is None:
            self._validate()
        assert self._names is not None
        return list(self._names)

    @property
    def num_classes(self) -> int:
        return N_CLASSES

    def _load_sources(self) -> _Sources:
        self._validate()
        assert self._raw is not None

        def source(split: str) -> TensorSource:
            data, labels = self._raw[split]
            images = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)  # uint8 [N, 3, 32, 32]
            return TensorSource(images, labels)

        train, test = source("train"), source("test")
        train_idx, val_idx = holdout_split(train.labels, self.val_fraction, self.seed)
        return _Sources(train=(train, train_idx), val=(train, val_idx), eval=(test, np.arange(len(test))))
