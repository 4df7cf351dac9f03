"""The state-cache format (docs/run_store.md): the one reader and writer of cached CLS states.

A cache is one safetensors file per split, ``states/{split}.safetensors``, holding for N samples of that split::

    x       float32 [N, d]     CLS token's residual stream entering the last FFN's LayerNorm
    a       float32 [N, 4d]    the FFN's post-GELU activation at the CLS token
    logits  float32 [N, C]     the full model's logits
    label   int64   [N]        true label
    index   int64   [N]        the sample's index in the split (rows are sorted by it)

and string metadata: ``format`` (= ``FORMAT``), ``model_hash`` (:func:`vitfl.localization.ffn.model_fingerprint` of the
model that produced it), ``split``, ``backbone``, ``d``, ``d_ff``, ``num_classes``, ``n``.

A **block cache** (``states/{split}.block=L.safetensors``, ``RunStore.states(split, tag, block=L)``) holds the token
states of transformer block L's FFN instead: ``x [N, T, d]`` (every token entering the FFN's LayerNorm) and no
activations (``a`` is None: block L's ``fc1`` recomputes them from ``x``; stored, they would be four times the size of
``x``), the rest as above, plus the metadata ``tokens`` (= T), ``d_ff`` and ``state_identity`` (the JSON of the
head's ``state_identity()``: block, pooling, tokens), which :func:`load_states` checks (``expected_states``) so a
cache of another block or view is never read as this one. The CLS cache of the last block of a CLS-pooled model
(state identity ``{}``) is the file above, unchanged.
A multi-process ``predict`` writes one shard per rank (``{split}.rank{r}.safetensors``);
:func:`merge_shards` joins them in sample order, dropping the duplicates a DistributedSampler pads with.
Writes are atomic (temp file, then rename): an existing cache is replaced only once its successor is complete.
The file records its content hash (``vitfl.core.io``: the metadata key ``content_sha256``, hashed once when written);
:func:`load_states` verifies it once per process and file version, and a cache whose bytes changed is
:class:`CorruptCacheError` naming the file (the cache step rebuilds it).
A cache belongs to one checkpoint: the last epoch's is ``states/{split}.safetensors``, another epoch's
``states/{split}.epoch=NNN.safetensors`` (``RunStore.states(split, tag)``, tag from
``vitfl.lightning_modules.runs.cache_tag``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from vitfl.core.io import CorruptFileError, FileFormatError, atomic_save_tensors, load_tensors, read_tensor_metadata

FORMAT = "vitfl-state-cache/1"
KEYS = ("x", "a", "logits", "label", "index")


class CacheError(RuntimeError):
    """A state cache is missing, malformed, or belongs to another model."""


class StaleCacheError(CacheError):
    """The cache was made by a model whose fingerprint differs from the one in use."""


class CorruptCacheError(CacheError):
    """The cache's content differs from the content hash recorded when it was written (a :class:`CacheError`, so
    the cache step rebuilds it and every other step stops at once, naming it)."""


#: what a corrupt cache's error tells the user to do
REBUILD = ("delete it and rerun the cache step (`python scripts/cache_states.py --run_dir RUN`; the main job does), "
           "which rebuilds it from the checkpoint")


@dataclass
class StateCache:
    x: Tensor
    a: Tensor | None  # None in a token cache (x [N, T, d]): the head recomputes the activations from x
    logits: Tensor
    label: Tensor
    index: Tensor
    metadata: dict[str, str]

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def pred(self) -> Tensor:
        return self.logits.argmax(-1)

    @property
    def correct(self) -> Tensor:
        return self.pred == self.label

    def subset(self, rows: Tensor) -> "StateCache":
        """Rows by position (not by sample index)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return StateCache(self.x[rows], None if self.a is None else self.a[rows], self.logits[rows], self.label[rows], self.index[rows],
                          dict(self.metadata))

    def rows_of(self, sample_indices: Tensor) -> Tensor:
        """Positions of the given sample indices (raises if one is absent)."""
        sample_indices = torch.as_tensor(sample_indices, dtype=torch.long)
        pos = torch.searchsorted(self.index, sample_indices)
        pos = pos.clamp(max=len(self) - 1)
        if len(sample_indices) and not bool((self.index[pos] == sample_indices).all()):
            raise CacheError("some requested sample indices are not in the cache")
        return pos


def atomic_save_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` (safetensors) atomically, with the user's umask (``vitfl.core.io``)."""
    atomic_save_tensors(path, tensors, {k: str(v) for k, v in metadata.items()})


def save_states(path: str | Path, x: Tensor, a: Tensor | None, logits: Tensor, label: Tensor, index: Tensor,
                metadata: dict[str, str]) -> None:
    """Write a cache. A CLS cache (``x [N, d]``) holds the activations ``a [N, d_ff]``; a token cache (``x [N, T,
    d]``) holds none (``a`` None; ``metadata`` gives ``d_ff``): block L's ``fc1`` recomputes them from ``x``."""
    n = x.shape[0]
    tokens = x.dim() == 3
    if tokens and a is not None:
        raise CacheError(f"a token cache (x {list(x.shape)}) stores no activations: pass a=None (the head "
                         "recomputes them from x)")
    if not tokens and a is None:
        raise CacheError(f"a CLS cache (x {list(x.shape)}) needs the activations a [N, d_ff]")
    for name, t in (("a", a), ("logits", logits), ("label", label), ("index", index)):
        if t is not None and t.shape[0] != n:
            raise CacheError(f"cache tensor {name!r} has {t.shape[0]} rows, x has {n}")
    d_ff = a.shape[-1] if a is not None else metadata.get("d_ff")
    if d_ff is None:
        raise CacheError("a token cache's metadata must give d_ff (its activations are not stored)")
    order = torch.argsort(index)
    meta = {"format": FORMAT, "n": str(n), "d": str(x.shape[-1]), **{k: str(v) for k, v in metadata.items()},
            "d_ff": str(d_ff), "num_classes": str(logits.shape[1]), **({"tokens": str(x.shape[1])} if tokens else {})}
    tensors = {"x": x.float()[order], **({"a": a.float()[order]} if a is not None else {}),
               "logits": logits.float()[order], "label": label.long()[order], "index": index.long()[order]}
    atomic_save_safetensors(tensors, path, meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"no state cache at {path}: run `python scripts/cache_states.py` (the main job does) first")
    try:
        return read_tensor_metadata(path)
    except (FileFormatError, OSError) as e:
        raise CacheError(f"{path} is not a readable safetensors state cache ({e})") from None


def state_identity_text(state_identity: Mapping[str, Any] | None) -> str:
    """The ``state_identity`` metadata of a cache of a head's states (canonical JSON); "" for the CLS cache."""
    return json.dumps(dict(state_identity), sort_keys=True, separators=(",", ":")) if state_identity else ""


def load_states(path: str | Path, expected_hash: str | None = None,
                expected_states: Mapping[str, Any] | None = None) -> StateCache:
    """Load a cache; refuse it when ``expected_hash`` is given and differs from the cache's ``model_hash``, or
    when its recorded ``state_identity`` is not ``expected_states`` (a head's ``state_identity()``; ``{}`` / None:
    the CLS cache, which records none)."""
    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise CacheError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if expected_states is not None and meta.get("state_identity", "") != state_identity_text(expected_states):
        raise StaleCacheError(
            f"state cache {path} holds the states {meta.get('state_identity') or '{} (CLS, last block)'}, not "
            f"{state_identity_text(expected_states) or '{} (CLS, last block)'}: re-run the cache step for this "
            "block (`python scripts/cache_states.py --run_dir RUN --block L`)")
    if expected_hash is not None and meta.get("model_hash") != expected_hash:
        raise StaleCacheError(
            f"state cache {path} was made by model {meta.get('model_hash')!r} but the model in use is "
            f"{expected_hash!r}: re-run the cache step for this checkpoint (`python scripts/cache_states.py "
            f"--run_dir RUN`); it keeps this file until the new cache is complete and then replaces it")
    try:
        t, _ = load_tensors(path, advice=REBUILD)
    except CorruptFileError as e:
        raise CorruptCacheError(f"state cache {e}") from None
    except (FileFormatError, OSError) as e:
        raise CacheError(f"{path} is not a readable safetensors state cache ({e})") from None
    needed = [k for k in KEYS if not (k == "a" and meta.get("tokens"))]  # a token cache stores no activations
    missing = [k for k in needed if k not in t]
    if missing:
        raise CacheError(f"{path} lacks tensors {missing}")
    for k in ("x", "a", "logits"):
        if k in t and not torch.isfinite(t[k]).all():
            raise CacheError(f"{path}: tensor {k!r} holds NaN or inf values")
    return StateCache(t["x"], t.get("a"), t["logits"], t["label"], t["index"], meta)


def merge_shards(shards: list[str | Path], path: str | Path, remove: bool = True) -> StateCache:
    """Join per-rank shards in sample-index order (duplicate indices from sampler padding kept once)."""
    parts = [load_states(s) for s in shards]
    hashes = {p.metadata.get("model_hash") for p in parts}
    if len(hashes) != 1:
        raise CacheError(f"shards {shards} come from different models: {hashes}")
    cat = {k: torch.cat([getattr(p, k) for p in parts]) for k in KEYS if getattr(parts[0], k) is not None}
    uniq, first = _first_occurrence(cat["index"])
    meta = {k: v for k, v in parts[0].metadata.items() if k not in ("n",)}
    meta.pop("rank", None)
    save_states(path, *(cat[k][first] if k in cat else None for k in KEYS), metadata=meta)
    if remove:
        for s in shards:
            os.unlink(s)
    return load_states(path)


def _first_occurrence(index: Tensor) -> tuple[Tensor, Tensor]:
    order = torch.argsort(index, stable=True)
    sorted_idx = index[order]
    keep = torch.ones_like(sorted_idx, dtype=torch.bool)
    keep[1:] = sorted_idx[1:] != sorted_idx[:-1]
    return sorted_idx[keep], order[keep]
