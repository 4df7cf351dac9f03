"""Tiny-ImageNet from the standard ``tiny-imagenet-200/`` tree under ``root`` (never downloaded here)::

    tiny-imagenet-200/
        wnids.txt                       one WordNet id per line (200 in the real set: the class count comes from here)
        words.txt                       "wnid<TAB>name, synonym, ..." (class names: the first name)
        train/<wnid>/images/*.JPEG      64x64 training images (500 per class in the real set)
        val/val_annotations.txt         "file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1" per validation image
        val/images/*.JPEG               the validation images (10000 in the real set)

``eval`` is the ``val`` folder (the ``test`` folder has no labels and is not used); ``val`` a seeded, stratified
``val_fraction`` of ``train``. Class ``k`` is the k-th wnid in *sorted* order (as torchvision's ``ImageFolder`` and
the Hugging Face ``zh-plus/tiny-imagenet`` copy number them), training files are taken in sorted order, validation
files in the annotation file's order. Images are opened lazily with PIL (converted to RGB: a few are grey), resized
to ``image_size`` and normalised (default mean/std (0.5, 0.5, 0.5), as the ViT-in21k image processor).

The checks before any training only list folders and read the two text files: no image is opened. A file that
cannot be decoded raises :class:`~vitfl.datamodules.base.UnreadableImageError` naming it when a loader reaches it;
``verify_images=True`` decodes all of them in ``setup()`` and lists every unreadable one (see
:mod:`vitfl.datamodules.base`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from vitfl.datamodules.base import (holdout_split, register_datamodule, _Sources, SplitSource, UnreadableImageError,
                              VisionDataModule)

__all__ = ["TinyImageNetDataModule"]

FOLDER = "tiny-imagenet-200"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


#: what PIL raises for a file it cannot decode (truncated, not an image, corrupt header, decompression bomb)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class FileSource(SplitSource):
    """Images on disk, opened lazily with PIL and fully decoded (converted to RGB). A file that cannot be decoded
    raises :class:`~vitfl.datamodules.base.UnreadableImageError` naming it."""

    def __init__(self, paths: list[str], labels: list[int]):
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)

    def describe(self, i: int) -> str:
        return self.paths[i]

    def _decode(self, i: int) -> Image.Image:
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB")  # convert() decodes the whole file: a truncated one fails here

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        try:
            image = self._decode(i)
        except _DECODE_ERRORS as e:
            raise UnreadableImageError(
                f"{self.paths[i]}: cannot decode this image ({type(e).__name__}: {e}); replace the file (re-extract "
                f"the archive). To list every unreadable file at once, run with data.init_args.verify_images=true; "
                f"to leave them out, data.init_args.on_bad_image=skip") from None
        return image, int(self.labels[i])

    def check(self, i: int) -> str | None:
        try:
            self._decode(i)
        except _DECODE_ERRORS as e:
            return f"{type(e).__name__}: {e}"
        return None


@dataclass
class _Scan:
    wnids: list[str]  # sorted; class k = wnids[k]
    words: list[str]  # full words.txt entry per class
    train: FileSource
    val: FileSource


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


@register_datamodule("tiny_imagenet")
class TinyImageNetDataModule(VisionDataModule):
    """Tiny-ImageNet as ``(image [3, S, S], label, index)`` items, ``S = image_size`` (default 224).

    Args (besides :class:`~vitfl.datamodules.base.VisionDataModule`'s):
        root: the folder that contains ``tiny-imagenet-200/`` (or that folder itself).
        val_fraction: share of the training images held out as ``val`` (default 0.1; 0 = no val).
    """

    name: ClassVar[str] = "tiny_imagenet"
    in_channels: ClassVar[int] = 3
    default_image_size: ClassVar[int] = 224
    how_to_get: ClassVar[str] = ("Download tiny-imagenet-200.zip from http://cs231n.stanford.edu/tiny-imagenet-200.zip "
                                 "and unzip it under {root} (giving {root}/tiny-imagenet-200/wnids.txt, words.txt, "
                                 "train/, val/); data.init_args.root names that folder. Nothing is downloaded at "
                                 "run time")

    def __init__(self, val_fraction: float = 0.1, **kwargs):
        # every shared argument (root, image_size, batch_size, folds, ...) is VisionDataModule's
        super().__init__(**kwargs)
        self._check_fraction("val_fraction", val_fraction)
        self.val_fraction = val_fraction
        self._scan: _Scan | None = None

    # ------------------------------------------------------------------ on-disk format
    @property
    def folder(self) -> Path:
        if self.root is None:
            raise self.format_error("root=None", f"data.init_args.root set to the folder that contains {FOLDER}/")
        root = Path(self.root).expanduser()
        if root.name == FOLDER and (root / "wnids.txt").is_file():
            return root
        return root / FOLDER

    def _read_lines(self, path: Path, what: str) -> list[str]:
        if not path.is_file():
            raise self.format_error(path, what)
        try:
            return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise self.format_error(path, f"{what}; reading it failed with {type(e).__name__}: {e}") from None

    def _validate(self) -> None:
        """Check the tree (listing folders, reading wnids/words/annotations; no image opened); keeps the file
        lists."""
        if self._scan is not None:
            return
        folder = self.folder
        if not folder.is_dir():
            raise self.format_error(folder, f"the folder {FOLDER}/ with wnids.txt, words.txt, train/ and val/")

        wnids_path = folder / "wnids.txt"
        wnid_lines = self._read_lines(wnids_path, "a text file with one WordNet id (e.g. n01443537) per line")
        if not wnid_lines:
            raise self.format_error(wnids_path, "at least one WordNet id (one per line), found an empty file")
        if len(set(wnid_lines)) != len(wnid_lines):
            dup = sorted({w for w in wnid_lines if wnid_lines.count(w) > 1})
            raise self.format_error(wnids_path, f"distinct WordNet ids, found duplicates {dup[:5]}")
        wnids = sorted(wnid_lines)
        label_of = {w: k for k, w in enumerate(wnids)}

        words_path = folder / "words.txt"
        words: dict[str, str] = {}
        for ln in self._read_lines(words_path, "a text file of 'wnid<TAB>names' lines"):
            wnid, _, text = ln.partition("\t")
            if wnid in label_of:
                words[wnid] = text.strip()
        missing = [w for w in wnids if not words.get(w)]
        if missing:
            raise self.format_error(words_path, f"a 'wnid<TAB>names' line for every id in wnids.txt, missing "
                                                f"{len(missing)} (e.g. {missing[:3]})")

        train_dir = folder / "train"
        if not train_dir.is_dir():
            raise self.format_error(train_dir, "the training folder train/<wnid>/images/*.JPEG")
        extra = sorted(set(os.listdir(train_dir)) - set(wnids))
        extra = [e for e in extra if (train_dir / e).is_dir()]
        if extra:
            raise self.format_error(train_dir, f"one class folder per id in wnids.txt ({len(wnids)} classes), found "
                                               f"{len(extra)} folder(s) not in wnids.txt: {extra[:5]}")
        train_paths: list[str] = []
        train_labels: list[int] = []
        for wnid in wnids:
            img_dir = train_dir / wnid / "images"
            if not img_dir.is_dir():
                raise self.format_error(img_dir, f"the training images of class {wnid} (train/{wnid}/images/*.JPEG)")
            files = sorted(f for f in os.listdir(img_dir) if _is_image(f))
            if not files:
                raise self.format_error(img_dir, f"at least one image (*.JPEG) of class {wnid}, found none")
            train_paths += [str(img_dir / f) for f in files]
            train_labels += [label_of[wnid]] * len(files)

        val_dir = folder / "val"
        ann_path = val_dir / "val_annotations.txt"
        ann = self._read_lines(ann_path, "the validation annotations 'file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1'")
        if not ann:
            raise self.format_error(ann_path, "at least one annotation line 'file<TAB>wnid<TAB>box', found none")
        img_dir = val_dir / "images"
        if not img_dir.is_dir():
            raise self.format_error(img_dir, "the validation images named in val/val_annotations.txt")
        present = set(os.listdir(img_dir))
        val_paths: list[str] = []
        val_labels: list[int] = []
        for lineno, ln in enumerate(ann, 1):
            fields = ln.split("\t")
            if len(fields) < 2:
                raise self.format_error(ann_path, f"tab-separated 'file<TAB>wnid<TAB>box' lines, line {lineno} is "
                                                  f"{ln!r}")
            fname, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in label_of:
                raise self.format_error(ann_path, f"wnids listed in wnids.txt, line {lineno} names the unknown wnid "
                                                  f"{wnid!r}")
            if fname not in present:
                raise self.format_error(img_dir / fname, f"the validation image named on line {lineno} of "
                                                         f"{ann_path}, it is missing")
            val_paths.append(str(img_dir / fname))
            val_labels.append(label_of[wnid])
        self._scan = _Scan(wnids=wnids, words=[words[w] for w in wnids],
                           train=FileSource(train_paths, train_labels), val=FileSource(val_paths, val_labels))

    def _scanned(self) -> _Scan:
        self._validate()
        assert self._scan is not None
        return self._scan

    # ------------------------------------------------------------------ data module
    @property
    def wnids(self) -> list[str]:
        """The WordNet id of each class (class k = ``wnids[k]``, sorted)."""
        return list(self._scanned().wnids)

    @property
    def class_names(self) -> list[str]:
        """The first name of each class's words.txt entry (e.g. 'goldfish')."""
        return [w.split(",")[0].strip() for w in self._scanned().words]

    @property
    def class_descriptions(self) -> list[str]:
        """Each class's full words.txt entry (e.g. 'goldfish, Carassius auratus')."""
        return list(self._scanned().words)

    @property
    def num_classes(self) -> int:
        return len(self._scanned().wnids)

    def _load_sources(self) -> _Sources:
        scan = self._scanned()
        train_idx, val_idx = holdout_split(scan.train.labels, self.val_fraction, self.seed)
        return _Sources(train=(scan.train, train_idx), val=(scan.train, val_idx),
                        eval=(scan.val, np.arange(len(scan.val))))
