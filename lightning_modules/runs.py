"""Loading what a training run left behind: the fit config, the data module, checkpoints, the model.

Every later step (state cache, misclassification analysis, FL, repair, evaluation) rebuilds the data module from
``<run>/run_config.yaml`` (written by ``scripts/train.py fit``) and loads a checkpoint, so it sees the same
data, folds and model as training did.

Nothing read from a run directory can run code: a ``class_path`` in ``run_config.yaml`` must name one of the
toolkit's own data modules (checked as text before anything is imported, :func:`resolve_datamodule_class`), and
checkpoints are read with ``torch.load(weights_only=True)`` (tensors and plain Python types only; a checkpoint that
holds anything else is refused with :class:`UnsafeCheckpointError`). A checkpoint whose architecture differs from
the run's config is :class:`ArchitectureMismatchError`, naming the differing settings and tensor shapes.

Integrity: torch does not check a checkpoint's zip CRC, so flipped bytes would load silently. Every checkpoint the
training callbacks write has its sha256 in ``<name>.ckpt.sha256`` (:mod:`vitfl.callbacks.checkpoints`), verified here
before the file is unpickled (once per process and file version); a mismatch is :class:`CorruptCheckpointError`
("restore it from a backup or retrain"). A checkpoint without a recorded hash (an older run) still loads, with one
:class:`UnverifiedCheckpointWarning` per file and process; nothing is recorded for it, so a corrupt file is never
adopted.

Paths in ``run_config.yaml`` are relative to the run root (:mod:`vitfl.lightning_modules.cli`); :func:`run_path` resolves
one against the run root, so a moved run reads only its own files.
"""
from __future__ import annotations

import importlib
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from vitfl.callbacks.state_cache import StateCacheWriter
from vitfl.lightning_modules.classifier import ImageClassifier
from vitfl.core.io import CorruptFileError, verify_file
from vitfl.core.runstore import RunStore, require_store


class RunError(RuntimeError):
    """A run directory lacks what a step needs (checkpoint, config), or a checkpoint is corrupt."""


class UnsafeConfigError(RunError):
    """A run config names a component outside the toolkit (refused before anything is imported)."""


class UnsafeCheckpointError(RunError):
    """A checkpoint holds Python objects beyond tensors and plain types (refused: loading them could run code)."""


class ArchitectureMismatchError(RunError):
    """A checkpoint is of another architecture than the run's config (or than the data's images / classes)."""


class CorruptCheckpointError(RunError):
    """A checkpoint's content differs from the sha256 recorded when it was written."""


class TokenStatisticError(ValueError):
    """A token statistic that is unknown, or that has no meaning on the head asked for (``"mean"`` on the last-block
    CLS head)."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint has no recorded content hash (an older run): it loads, but cannot be checked for corruption."""


_warned_unverified: set[str] = set()


def verify_checkpoint(path: str | Path) -> bool:
    """Check a checkpoint against the sha256 recorded when it was written (``<name>.ckpt.sha256``): True if it
    matches; False, with one :class:`UnverifiedCheckpointWarning` per file and process, if none was recorded;
    :class:`CorruptCheckpointError` naming the file if it differs."""
    path = Path(path)
    advice = ("restore it from a backup or retrain; do not regenerate the run's caches or settings from it, they "
              "would describe a damaged model")
    try:
        ok = verify_file(path, advice=advice)
    except CorruptFileError as e:
        raise CorruptCheckpointError(f"checkpoint {e}") from None
    if not ok and str(path) not in _warned_unverified:
        _warned_unverified.add(str(path))
        warnings.warn(f"checkpoint {path} has no recorded content hash ({path.name}.sha256; written before hashes "
                      "were recorded, or its writer was killed before recording it): it is loaded unverified",
                      UnverifiedCheckpointWarning, stacklevel=2)
    return ok


def _check_integrity(path: Path) -> None:
    """:func:`verify_checkpoint`; a file that fails it and holds a pickled payload is named as unsafe (the more
    specific error; the probe is ``torch.load(weights_only=True)``, which never runs code)."""
    try:
        verify_checkpoint(path)
    except CorruptCheckpointError:
        try:
            with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise _unsafe_checkpoint(path, e) from None
        except Exception:  # noqa: BLE001 - unreadable as well: the corruption error says it
            pass
        raise


def run_path(layout: RunStore, value: Any) -> Path | None:
    """A path stored in ``run_config.yaml`` as a path here: relative ones against the run root (a moved run reads
    its own files), ``toolkit:<path>`` against the toolkit's folder, an old absolute one as it is; ``None`` for no
    value or an ``external:<name>`` input (recorded by name and hash only)."""
    if value is None or value == "":
        return None
    text = str(value)
    if text.startswith("external:"):
        return None
    if text.startswith("toolkit:"):
        return Path(__file__).resolve().parents[1] / text[len("toolkit:"):]
    p = Path(text)
    return p if p.is_absolute() else layout.abs(p)


#: globals our Lightning checkpoints need beyond ``torch.load(weights_only=True)``'s default allow-list. Empty: the
#: per-epoch and full (``last.ckpt``) checkpoints hold only tensors, dicts, lists, tuples, str, int, float, bool and
#: None (hyperparameters, optimizer / scheduler / loop / callback states, RNG states as tensors).
CHECKPOINT_SAFE_GLOBALS: list[Any] = []

#: the one model class a run's config may name (LightningCLI writes none: the model is always this class)
MODEL_CLASS_PATH = "vitfl.lightning_modules.classifier.ImageClassifier"

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def run_config(layout: RunStore) -> dict[str, Any]:
    path = layout.run_config
    if not path.is_file():
        raise RunError(f"no {path}: train first (`python scripts/train.py fit ... "
                       f"--trainer.default_root_dir {layout.root}`)")
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RunError(f"{path}: cannot read the run config as YAML ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise RunError(f"{path}: expected a YAML mapping with 'data', 'model' and 'trainer', got "
                       f"{type(cfg).__name__}")
    return cfg


def resolve_datamodule_class(class_path: Any, source: str = "the config") -> type:
    """The data-module class named by ``class_path``, which must be ``vitfl.datamodules.<module>.<Class>`` (or
    ``vitfl.datamodules.<Class>``) for a module file inside the toolkit's data-module package and a subclass of
    :class:`~vitfl.datamodules.base.VisionDataModule` defined there. Runs written before the ``vitfl`` namespace
    spell it without the prefix (``vitfl.datamodules.digits.DigitsDataModule``); that spelling names the same class. The
    text is checked before anything is imported; any other path (``subprocess.run``, ``os.system``, a class
    elsewhere) raises :class:`UnsafeConfigError`."""
    import vitfl.datamodules as package
    from vitfl.datamodules.base import VisionDataModule

    def refuse(why: str) -> UnsafeConfigError:
        return UnsafeConfigError(
            f"{source}: data class_path {class_path!r} {why}; expected one of the toolkit's data modules, "
            f"vitfl.datamodules.<module>.<Class> (e.g. vitfl.datamodules.digits.DigitsDataModule, "
            f"vitfl.datamodules.cifar100.CIFAR100DataModule, vitfl.datamodules.tiny_imagenet.TinyImageNetDataModule). "
            f"Refusing to import or call it")

    if not isinstance(class_path, str) or not re.fullmatch(rf"(vitfl\.)?datamodules(\.{_IDENT}){{1,2}}", class_path):
        raise refuse("is not a class of the toolkit's data-module package")
    parts = class_path.removeprefix("vitfl.").split(".")
    if len(parts) == 3:
        if parts[1].startswith("_") or not (Path(package.__file__).parent / f"{parts[1]}.py").is_file():
            raise refuse(f"names no module of the data-module package (no datamodules/{parts[1]}.py)")
        module = importlib.import_module(f"vitfl.datamodules.{parts[1]}")
    else:
        module = package
    cls = getattr(module, parts[-1], None)
    if not (isinstance(cls, type) and issubclass(cls, VisionDataModule) and cls is not VisionDataModule
            and cls.__module__.startswith("vitfl.datamodules.")):
        raise refuse("is not a VisionDataModule subclass defined in the data-module package")
    return cls


def build_from_spec(spec: Any, source: str = "the config", **override: Any):
    """Instantiate a data module from ``{"class_path": "vitfl.datamodules.mod.Class", "init_args": {...}}`` (the class
    path checked by :func:`resolve_datamodule_class`; ``init_args`` must be a mapping)."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise RunError(f"{source}: expected 'data' as a mapping with class_path and init_args, got {spec!r}")
    cls = resolve_datamodule_class(spec["class_path"], source)
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise RunError(f"{source}: data init_args must be a mapping, got {type(init_args).__name__}")
    try:
        return cls(**{**init_args, **override})
    except TypeError as e:  # an argument the data module does not take
        raise RunError(f"{source}: {cls.__name__} does not accept these init_args ({e})") from None


def datamodule_from_run(layout: RunStore, **override: Any):
    cfg = run_config(layout)
    if "data" not in cfg:
        raise RunError(f"{layout.run_config}: no 'data' section")
    # the run's own folds (run_config.yaml may name the folder the run was trained in: a copied or moved run must
    # not read the original's)
    override.setdefault("folds_path", str(layout.folds))
    return build_from_spec(cfg["data"], source=str(layout.run_config), **override)


def model_spec_from_run(layout: RunStore) -> dict[str, Any] | None:
    """The ImageClassifier arguments in ``run_config.yaml`` (``None`` when the run has no config). A ``class_path``
    other than :data:`MODEL_CLASS_PATH` is refused (:class:`UnsafeConfigError`)."""
    if not layout.run_config.is_file():
        return None
    model = run_config(layout).get("model")
    if model is None:
        return None
    if not isinstance(model, dict):
        raise RunError(f"{layout.run_config}: expected 'model' as a mapping, got {type(model).__name__}")
    if "class_path" in model:
        if model["class_path"] not in (MODEL_CLASS_PATH, MODEL_CLASS_PATH.removeprefix("vitfl.")):  # runs before vitfl
            raise UnsafeConfigError(f"{layout.run_config}: model class_path {model['class_path']!r} is not the "
                                    f"toolkit's classifier; expected {MODEL_CLASS_PATH}. Refusing to import it")
        model = model.get("init_args") or {}
    return {k: v for k, v in model.items() if not str(k).startswith("_")}


def checkpoint_epochs(layout: RunStore) -> list[int]:
    """Epochs with a per-epoch checkpoint, ascending (:meth:`vitfl.core.runstore.RunStore.checkpoint_epochs`)."""
    return layout.checkpoint_epochs()


def last_epoch(layout: RunStore) -> int:
    eps = checkpoint_epochs(layout)
    if not eps:
        raise RunError(f"no checkpoints in {layout.checkpoints}: train first")
    return eps[-1]


def _unsafe_checkpoint(path: Path, e: Exception) -> UnsafeCheckpointError:
    m = re.search(r"GLOBAL (\S+)", str(e))
    what = f"the Python global {m.group(1)}" if m else "Python objects beyond tensors and plain types"
    return UnsafeCheckpointError(
        f"checkpoint {path} holds {what}, which no checkpoint of this toolkit contains (expected tensors, dicts, "
        f"lists, strings and numbers only); refusing to load it, since unpickling it could run code")


def safe_torch_load(path: str | Path, map_location: str = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with :data:`CHECKPOINT_SAFE_GLOBALS`; a file holding anything
    else raises :class:`UnsafeCheckpointError`, a missing or unreadable one :class:`RunError`."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}")
    _check_integrity(path)
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _unsafe_checkpoint(path, e) from None
    except Exception as e:  # truncated zip, not a torch file
        raise RunError(f"checkpoint {path} is corrupt or not a torch checkpoint: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from None


def load_classifier(path: str | Path, map_location: str = "cpu") -> ImageClassifier:
    """Load an :class:`ImageClassifier` checkpoint in eval mode (``weights_only=True``), with a clear error for a
    missing, corrupt or unsafe file."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}")
    _check_integrity(path)
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            model = ImageClassifier.load_from_checkpoint(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unsafe_checkpoint(path, e) from None
    except Exception as e:  # truncated zip, wrong pickle, mismatched keys
        raise RunError(f"checkpoint {path} is corrupt or not an ImageClassifier checkpoint: "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise RunError(f"checkpoint {path}: parameter {name} holds NaN or inf values")
    return model.eval()


_ARCH_KEYS = ("backbone", "num_classes", "backbone_kwargs")
#: backbone arguments that change where the start weights come from, not the architecture
_NON_ARCH_BACKBONE_KWARGS = ("pretrained_path", "hidden_dropout_prob", "attention_probs_dropout_prob", "drop_rate",
                             "attn_drop_rate", "proj_drop_rate", "pos_drop_rate", "patch_drop_rate", "drop_path_rate")


def _arch_args(hparams: dict[str, Any]) -> dict[str, Any]:
    kw = dict(hparams.get("backbone_kwargs") or {})
    for k in _NON_ARCH_BACKBONE_KWARGS:
        kw.pop(k, None)
    return {"backbone": hparams.get("backbone", "hf_vit"), "num_classes": hparams.get("num_classes"),
            "backbone_kwargs": kw}


def _shape_differences(expected: dict[str, Any], model: ImageClassifier, limit: int = 5) -> list[str]:
    """Parameter keys / shapes of the configured architecture (built on the meta device) vs ``model``'s."""
    try:
        with torch.device("meta"):
            ref = ImageClassifier(**expected)
    except Exception:  # the config itself does not build; the hyperparameter difference says enough
        return []
    a = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out = [f"{k}: config {a[k]} vs checkpoint {b[k]}" for k in a if k in b and a[k] != b[k]]
    out += [f"{k}: only in the config's architecture" for k in a if k not in b]
    out += [f"{k}: only in the checkpoint" for k in b if k not in a]
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def check_architecture(layout: RunStore, model: ImageClassifier, path: str | Path) -> None:
    """Raise :class:`ArchitectureMismatchError` when ``model`` (loaded from ``path``) is not the architecture that
    ``run_config.yaml`` describes (backbone, class count, backbone settings); no-op for a run without a config."""
    spec = model_spec_from_run(layout)
    if spec is None:
        return
    want, got = _arch_args(spec), _arch_args(dict(model.hparams))
    if want["num_classes"] is None:  # linked from the data module at fit time, absent from the written config
        want["num_classes"] = got["num_classes"]
    diff = []
    for k in ("backbone", "num_classes"):
        if want[k] != got[k]:
            diff.append(f"{k}: config {want[k]!r} vs checkpoint {got[k]!r}")
    kw_w, kw_g = want["backbone_kwargs"], got["backbone_kwargs"]
    for k in sorted(set(kw_w) | set(kw_g)):
        if kw_w.get(k) != kw_g.get(k):
            diff.append(f"backbone_kwargs.{k}: config {kw_w.get(k)!r} vs checkpoint {kw_g.get(k)!r}")
    if diff:
        shapes = _shape_differences(want, model)
        raise ArchitectureMismatchError(
            f"checkpoint {path} is of another architecture than this run ({layout.run_config}): "
            + "; ".join(diff) + (". Tensor shapes: " + "; ".join(shapes) if shapes else "")
            + ". Use the checkpoints this run trained (or the run directory this checkpoint belongs to); nothing "
              "was changed on disk")


def load_run_model(layout: RunStore, epoch: int | None = None) -> tuple[ImageClassifier, int]:
    """The run's checkpoint of ``epoch`` (default: the last), checked against the run's config
    (:func:`check_architecture`)."""
    epoch = last_epoch(layout) if epoch is None else epoch
    path = layout.checkpoint(epoch)
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}; this run has epochs {checkpoint_epochs(layout)}")
    model = load_classifier(path)
    check_architecture(layout, model, path)
    return model, epoch


def cache_block(head) -> int | None:
    """The ``block`` of :meth:`RunStore.states` for the states ``head`` takes: None (the CLS cache) for the
    last-block CLS head (``state_identity() == {}``), else the head's non-negative block index (a block cache)."""
    return None if not head.state_identity() else int(head.block)


class LoadedRun:
    """A run's model as every step after training needs it, loaded through one function (:func:`load_run`): the
    checkpoint of ``epoch`` (checked against the run's config), its fingerprint (the ``model`` hash of result
    identities), the FFN head of transformer block ``block`` (:func:`vitfl.localization.ffn.ffn_head`; default -1,
    the last block, whose head on a CLS-pooled model is the last-FFN CLS head of every run before block
    addressing; an index out of range is a :class:`vitfl.localization.ffn.BlockIndexError` naming the number of
    blocks) and its state caches (loaded on first use and checked to be this model's and this head's: the CLS cache,
    or block ``L``'s token cache). A fold run loads its parent run's model.

    ``token_statistic`` (:data:`vitfl.localization.ffn.TOKEN_STATISTICS`; default ``"readout"``): a token head's
    per-input token statistic (:class:`vitfl.localization.ffn.TokenFFNHead`), recorded in its ``identity()``. The
    last-block CLS head reads the CLS token and nothing else: it takes ``"readout"`` or ``"cls"`` (the same head,
    the same identities) and refuses ``"mean"`` (:class:`TokenStatisticError`), which has no meaning there."""

    def __init__(self, store: RunStore, epoch: int | None = None, block: int = -1, token_statistic: str = "readout"):
        from vitfl.localization.ffn import TOKEN_STATISTICS, model_fingerprint

        if token_statistic not in TOKEN_STATISTICS:
            raise TokenStatisticError(f"unknown token_statistic {token_statistic!r}; expected one of "
                                      f"{list(TOKEN_STATISTICS)}")
        self.store = store
        self.model, self.epoch = load_run_model(store.model_store(), epoch)
        self.model_hash = model_fingerprint(self.model)
        self.block = block
        self.token_statistic = token_statistic
        self._head = None
        self._states: dict[tuple[str, str], Any] = {}
        if block != -1 or token_statistic != "readout":  # an index out of range / a refused statistic: now
            self.head  # noqa: B018

    @property
    def head(self):
        """The FFN head of block ``block`` (eval mode): for the last block of a CLS-pooled model the last FFN's CLS
        head (:func:`vitfl.localization.ffn.last_ffn_head`), else a token head."""
        if self._head is None:
            from vitfl.localization.ffn import ffn_head, last_ffn_head

            stat = self.token_statistic
            cls_head = _cls_pooled(self.model) if self.block == -1 else not ffn_head(self.model, self.block).identity()
            if cls_head:
                if stat not in ("readout", "cls"):
                    raise TokenStatisticError(
                        f"token_statistic={stat!r} on the last block of a class-token model: its FFN head reads the "
                        "CLS token alone (the classifier's input), so a statistic over tokens has no meaning there; "
                        "use 'readout' (or 'cls', the same head), or a non-last block / an average-pooled model")
                self._head = (last_ffn_head(self.model) if self.block == -1 else ffn_head(self.model, self.block))
            else:
                self._head = ffn_head(self.model, self.block, token_statistic=stat)
            self._head.eval()
        return self._head

    def states_path(self, split: str = "repair", tag: str = "") -> Path:
        """Where the state cache of ``split`` for :attr:`head` lives (:func:`cache_block`)."""
        return self.store.states(split, tag, block=cache_block(self.head))

    def states(self, split: str = "repair", tag: str = ""):
        """The state cache of ``split`` (``tag``: another checkpoint's) for :attr:`head`, checked to be this model's
        and this head's states."""
        if (split, tag) not in self._states:
            from vitfl.core.states import load_states

            self._states[split, tag] = load_states(self.states_path(split, tag), expected_hash=self.model_hash,
                                                   expected_states=self.head.state_identity() or None)
        return self._states[split, tag]


def _cls_pooled(model) -> bool:
    """Whether ``model``'s last block has the CLS head (anything :func:`ffn_head` would not serve keeps the
    last-FFN head it always had)."""
    from vitfl.localization.ffn import UnsupportedModelError, ffn_head

    try:
        return not ffn_head(model, -1).state_identity()
    except UnsupportedModelError:
        return True


def load_run(store: RunStore, epoch: int | None = None, block: int = -1, token_statistic: str = "readout"
             ) -> LoadedRun:
    """The one way a step loads a run's model, fingerprint, FFN head (of ``block``, with ``token_statistic``) and
    state caches (:class:`LoadedRun`)."""
    return LoadedRun(require_store(store, "load_run"), epoch, block, token_statistic)


def cache_tag(layout: RunStore, epoch: int | None) -> str:
    """The state-cache tag of a checkpoint: ``""`` (``states/{split}.safetensors``) for the run's last epoch, else
    ``epoch=NNN`` (``states/{split}.epoch=NNN.safetensors``), so caching another epoch never replaces the last
    epoch's cache."""
    if epoch is None or epoch == last_epoch(layout):
        return ""
    return f"epoch={int(epoch):03d}"


def _model_input(model: ImageClassifier) -> tuple[int | None, int | None]:
    """(input channels, image side) the model's patch embedding expects (None where it cannot be told)."""
    channels = next((m.in_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    cfg = getattr(getattr(model.backbone, "model", None), "config", None)
    size = getattr(cfg, "image_size", None)
    if size is None:
        pe = getattr(model.backbone, "patch_embed", None)
        img = getattr(pe, "img_size", None)
        size = img[0] if isinstance(img, (tuple, list)) and getattr(pe, "strict_img_size", True) else None
    return channels, (int(size) if isinstance(size, int) else None)


def check_model_fits_data(model: ImageClassifier, dm, where: str = "the checkpoint") -> None:
    """:class:`ArchitectureMismatchError` when the data's images or class count do not fit the model."""
    channels, size = _model_input(model)
    diff = []
    if channels is not None and channels != dm.in_channels:
        diff.append(f"input channels: model {channels} vs data {dm.in_channels}")
    if size is not None and size != dm.image_size:
        diff.append(f"image size: model {size} vs data {dm.image_size}")
    n = model.hparams.get("num_classes")
    if n is not None and n != dm.num_classes:
        diff.append(f"classes: model {n} vs data {dm.num_classes}")
    if diff:
        raise ArchitectureMismatchError(f"{where} does not fit the run's data ({type(dm).__name__}): "
                                        + "; ".join(diff) + "; nothing was changed on disk")


def cache_states(layout: RunStore, model: ImageClassifier, splits: list[str], tag: str = "",
                 trainer_kwargs: dict[str, Any] | None = None, datamodule=None,
                 extra_metadata: dict[str, str] | None = None, block: int = -1) -> list[Path]:
    """One ``Trainer.predict`` pass per split writing ``states/{split}[.tag].safetensors`` (skipped if present
    and made by this model). A stale or unreadable cache is kept until its replacement is complete (the new file is
    renamed over it), so a failed pass never loses the old one. The model must fit the data (channels, image size,
    classes: :func:`check_model_fits_data`), checked before any pass.

    ``block`` (default -1, the last; Python-style negative allowed): the states of that block's FFN head
    (:func:`vitfl.localization.ffn.ffn_head`). The last block of a CLS-pooled model is the CLS cache above,
    unchanged; any other block (or an average-pooled model) writes the token cache
    ``states/{split}[.tag].block=L.safetensors`` (``L`` the non-negative index; :meth:`RunStore.states`)."""
    from vitfl.datamodules.base import SPLITS
    from vitfl.core.states import CacheError, load_states
    from vitfl.localization.ffn import model_fingerprint

    bad = [s for s in splits if s not in SPLITS]
    if not splits or bad:
        raise ValueError(f"splits to cache must be a non-empty list from {list(SPLITS)}, got {list(splits)}")
    view = None
    if block != -1 or not _cls_pooled(model):
        from vitfl.localization.ffn import ffn_head

        view = ffn_head(model, block)  # an index out of range: BlockIndexError naming the number of blocks
    wblock = None if view is None else cache_block(view)
    expected = None if wblock is None else view.state_identity()
    dm = datamodule or datamodule_from_run(layout)
    check_model_fits_data(model, dm)
    h = model_fingerprint(model)
    out = []
    for split in splits:
        path = layout.states(split, tag, block=wblock)
        if path.exists():
            try:
                load_states(path, expected_hash=h, expected_states=expected)
                out.append(path)
                continue
            except CacheError:
                pass  # stale or corrupt: rebuilt below, replaced only once the new cache is complete
        dm.predict_split = split
        kw = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": True,
              **(trainer_kwargs or {})}
        writer = StateCacheWriter(split, path=str(path), extra_metadata=extra_metadata, block=wblock)
        trainer = L.Trainer(callbacks=[writer], **kw)
        trainer.predict(model, datamodule=dm, return_predictions=False)
        out.append(path)
    return out


def cache_run_states(layout: RunStore, splits: list[str], epoch: int | None = None,
                     trainer_kwargs: dict[str, Any] | None = None, block: int = -1) -> list[Path]:
    """Cache the states of ``epoch``'s checkpoint (default: the last) for ``splits``: the last epoch's cache is
    ``states/{split}.safetensors``, any other epoch's ``states/{split}.epoch=NNN.safetensors`` (:func:`cache_tag`);
    ``block`` as in :func:`cache_states` (another block's token cache adds ``.block=L``).
    The checkpoint is checked against the run's config and data before anything is written."""
    model, epoch = load_run_model(layout, epoch)
    return cache_states(layout, model, list(splits), tag=cache_tag(layout, epoch), trainer_kwargs=trainer_kwargs,
                        extra_metadata={"epoch": str(epoch), "checkpoint": layout.checkpoint(epoch).name},
                        block=block)
