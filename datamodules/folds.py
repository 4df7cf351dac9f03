"""The k-fold repair/test split of the evaluation split (one place, shared by every step of a run).

The evaluation split (e.g. CIFAR-100's official test set) of size ``n`` is cut with
``sklearn.model_selection.KFold(n_splits=n_folds, shuffle=True, random_state=fold_seed)`` applied to
``arange(n)``: fold ``fold_index``'s held-out part is the ``test`` split, the other ``n_folds - 1`` parts together
are the ``repair`` split. Both index arrays are sorted positions *within the evaluation split*.

Given a path (``RunStore.folds``), :func:`load_or_create_folds` writes the indices there on first use (atomic
JSON, with the settings and provenance) and reads them back afterwards, checking them against the current eval
size and settings, so every later step of the run (state caching, FL, repair, test evaluation) uses exactly the
same indices, even if a library's shuffling changed in between.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import KFold

from vitfl.core.io import CorruptFileError, atomic_write_json, provenance, read_json

__all__ = ["FoldSplit", "FoldsFileError", "kfold_split", "load_or_create_folds", "labels_fingerprint"]

FOLDS_FORMAT = "vit-fl-repair/folds"
FOLDS_VERSION = 1


class FoldsFileError(ValueError):
    """A folds file that is unreadable or does not match the current evaluation split / fold settings."""


@dataclass(frozen=True)
class FoldSplit:
    """The repair/test indices (sorted positions within the eval split) of one fold."""

    n_folds: int
    fold_seed: int
    fold_index: int
    eval_size: int
    repair: np.ndarray  # [eval_size - |test|] int64, sorted
    test: np.ndarray  # [~eval_size / n_folds] int64, sorted

    def to_json(self, eval_fingerprint: str | None = None) -> dict:
        return {
            "format": FOLDS_FORMAT,
            "version": FOLDS_VERSION,
            "splitter": "sklearn.model_selection.KFold(n_splits=n_folds, shuffle=True, random_state=fold_seed)",
            "n_folds": self.n_folds,
            "fold_seed": self.fold_seed,
            "fold_index": self.fold_index,
            "eval_size": self.eval_size,
            "eval_fingerprint": eval_fingerprint,
            "repair": self.repair.tolist(),
            "test": self.test.tolist(),
        }


def _check_settings(eval_size: int, n_folds: int, fold_index: int) -> None:
    if not isinstance(n_folds, int) or n_folds < 2:
        raise ValueError(f"n_folds must be an int >= 2, got {n_folds!r}")
    if not isinstance(fold_index, int) or not 0 <= fold_index < n_folds:
        raise ValueError(f"fold_index must be in [0, {n_folds - 1}] for n_folds={n_folds}, got {fold_index!r}")
    if eval_size < n_folds:
        raise ValueError(f"the eval split has {eval_size} samples, fewer than n_folds={n_folds}: cannot make folds")


def kfold_split(eval_size: int, n_folds: int = 5, fold_seed: int = 777, fold_index: int = 0) -> FoldSplit:
    """Fold ``fold_index`` of ``KFold(n_folds, shuffle=True, random_state=fold_seed)`` on ``arange(eval_size)``.

    >>> f = kfold_split(10, n_folds=5, fold_seed=0, fold_index=0)
    >>> len(f.test), len(f.repair), sorted(set(f.test) | set(f.repair)) == list(range(10))
    (2, 8, True)
    """
    _check_settings(eval_size, n_folds, fold_index)
    splits = KFold(n_splits=n_folds, shuffle=True, random_state=fold_seed).split(np.arange(eval_size))
    for k, (repair, test) in enumerate(splits):
        if k == fold_index:
            return FoldSplit(n_folds, fold_seed, fold_index, eval_size,
                             np.sort(repair).astype(np.int64), np.sort(test).astype(np.int64))
    raise AssertionError("unreachable: fold_index was checked")  # pragma: no cover


def labels_fingerprint(labels) -> str:
    """sha256 of the eval labels (int64), stored in the folds file to catch a different eval set of equal size."""
    return hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes()).hexdigest()


def load_or_create_folds(path: str | Path | None, eval_size: int, n_folds: int = 5, fold_seed: int = 777,
                         fold_index: int = 0, eval_labels=None, **provenance_extra) -> FoldSplit:
    """The fold split, read from ``path`` if it exists (checked), else computed and written there atomically.

    ``path=None`` only computes. ``eval_labels`` (optional, ``[eval_size]``) adds a fingerprint of the eval labels
    to the file and checks it on read. Raises :class:`FoldsFileError` naming the path when the file is unreadable,
    malformed, or was made for another eval size, ``n_folds``, ``fold_seed``, ``fold_index`` or eval set.
    """
    _check_settings(eval_size, n_folds, fold_index)
    fingerprint = labels_fingerprint(eval_labels) if eval_labels is not None else None
    if eval_labels is not None and len(eval_labels) != eval_size:
        raise ValueError(f"eval_labels has {len(eval_labels)} entries, eval_size is {eval_size}")
    if path is None:
        return kfold_split(eval_size, n_folds, fold_seed, fold_index)
    path = Path(path)
    if not path.exists():
        split = kfold_split(eval_size, n_folds, fold_seed, fold_index)
        atomic_write_json(path, {**split.to_json(fingerprint), "provenance": provenance(**provenance_extra)},
                          checksum=True)
        return split
    return _read_folds(path, eval_size, n_folds, fold_seed, fold_index, fingerprint)


def _read_folds(path: Path, eval_size: int, n_folds: int, fold_seed: int, fold_index: int,
                fingerprint: str | None) -> FoldSplit:
    hint = "delete it (or point folds_path elsewhere) to recompute the folds for the current settings"
    try:
        obj = read_json(path)  # its content hash verified (a hand-edited or damaged folds file is refused)
    except CorruptFileError as e:
        raise FoldsFileError(f"{e}. The folds decide which inputs are repaired and which tested: {hint} (and "
                             "rerun the steps after training)") from None
    except (OSError, ValueError) as e:
        raise FoldsFileError(f"{path}: cannot read the folds file as JSON ({e}); {hint}") from None
    if not isinstance(obj, dict) or obj.get("format") != FOLDS_FORMAT:
        raise FoldsFileError(f"{path}: not a folds file (expected a JSON object with format={FOLDS_FORMAT!r}); "
                             f"{hint}")
    missing = [k for k in ("n_folds", "fold_seed", "fold_index", "eval_size", "repair", "test") if k not in obj]
    if missing:
        raise FoldsFileError(f"{path}: folds file lacks the keys {missing}; {hint}")
    wanted = {"eval_size": eval_size, "n_folds": n_folds, "fold_seed": fold_seed, "fold_index": fold_index}
    diff = {k: (obj[k], v) for k, v in wanted.items() if obj[k] != v}
    if diff:
        txt = ", ".join(f"{k}: file has {a}, now {b}" for k, (a, b) in diff.items())
        raise FoldsFileError(f"{path}: the folds file was made for other settings ({txt}); {hint}")
    if fingerprint is not None and obj.get("eval_fingerprint") not in (None, fingerprint):
        raise FoldsFileError(f"{path}: the folds file was made for another evaluation set (its labels differ from "
                             f"the current eval split's); {hint}")
    try:
        repair = np.asarray(obj["repair"], dtype=np.int64)
        test = np.asarray(obj["test"], dtype=np.int64)
    except (TypeError, ValueError):
        raise FoldsFileError(f"{path}: 'repair' and 'test' must be lists of ints; {hint}") from None
    both = np.concatenate([repair, test])
    if repair.ndim != 1 or test.ndim != 1 or len(both) != eval_size or \
            not np.array_equal(np.sort(both), np.arange(eval_size)):
        raise FoldsFileError(f"{path}: 'repair' and 'test' must be disjoint and together cover 0..{eval_size - 1} "
                             f"exactly once; {hint}")
    return FoldSplit(n_folds, fold_seed, fold_index, eval_size, np.sort(repair), np.sort(test))
