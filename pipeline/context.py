"""What every step after training shares: the run's model and FFN head, its state caches, its misclassification
settings, and the input hashes that go into result identities (:mod:`vitfl.core.runstore`).

Setting names become parts of paths (``fl/{setting}/...``, ``repair/{setting}/...``), so :func:`load_misclf`
checks every one against :data:`vitfl.core.runstore.NAME_PATTERN` where it is read (a run's and a fold run's
``misclf/misclf_info.json``): a name that is not one is an error naming the file and the name, never skipped."""
from __future__ import annotations

from functools import cached_property
from typing import Any

from vitfl.core.io import read_json
from vitfl.core.runstore import ResultError, RunStore, check_name, identity_key

__all__ = ["RunContext", "load_misclf", "SETTING_KEYS", "SettingsFileError", "SettingsModelMismatchError"]

#: the parts of a setting that decide a result (its input sets)
SETTING_KEYS = ("kind", "rank", "true", "pred", "label", "i_neg", "i_neg_published", "i_pos", "i_pos_label",
                "i_pos_repair")


class SettingsFileError(ResultError, ValueError):
    """The settings file (``misclf/misclf_info.json``) is malformed."""


class SettingsModelMismatchError(ResultError, ValueError):
    """The settings file was made by another model than the run's checkpoint."""


def load_misclf(store: RunStore) -> dict[str, Any]:
    """The run's settings JSON, with a clear error when it is missing or malformed; every setting name is checked
    (:func:`vitfl.core.runstore.check_name`: :class:`vitfl.core.runstore.UnsafeNameError` naming the file and the name)."""
    if not store.misclf_info.is_file():
        raise FileNotFoundError(f"no {store.misclf_info}: run `python scripts/analyze_misclf.py --run_dir "
                                f"{store.root}` first")
    info = read_json(store.misclf_info)
    if not isinstance(info, dict) or not isinstance(info.get("settings"), dict):
        raise SettingsFileError(f"{store.misclf_info} has no 'settings' mapping: rerun scripts/analyze_misclf.py")
    for name, setting in info["settings"].items():
        check_name(name, "setting name", source=store.misclf_info)
        if not isinstance(setting, dict):
            raise SettingsFileError(f"{store.misclf_info}: setting {name!r} is not a mapping "
                                    f"({type(setting).__name__}): rerun scripts/analyze_misclf.py")
    return info


class RunContext:
    """The final (or ``epoch``'s) model of a run, the FFN head of transformer block ``block`` and the caches made
    by it.

    ``block`` is a list index over the blocks (default -1, the last; -n..n-1; out of range: a
    :class:`vitfl.localization.ffn.BlockIndexError` naming the number of blocks, raised here). It is normalised once,
    by :func:`vitfl.localization.ffn.ffn_head`, to the head's non-negative ``head.block``, which is what identities
    and file names record. For the last block of a CLS-pooled model (``-1`` or ``n - 1``) the head is the last-FFN
    CLS head with ``identity() == {}``: the CLS cache and every identity exactly as before block addressing. Any
    other block (or an average-pooled model) reads the token cache of that block, and :meth:`view` (the head's
    ``identity()``: block, pooling, token statistic) joins every FL identity made here.

    ``token_statistic`` (default ``"readout"``): a token head's per-input token statistic
    (:class:`vitfl.localization.ffn.TokenFFNHead`, recorded in :meth:`view`); the last-block CLS head takes only
    ``"readout"`` / ``"cls"`` (:class:`vitfl.lightning_modules.runs.TokenStatisticError` otherwise)."""

    def __init__(self, store: RunStore, epoch: int | None = None, block: int = -1, token_statistic: str = "readout"):
        from vitfl.lightning_modules.runs import load_run

        self.run = load_run(store, epoch, block, token_statistic)
        self.store, self.model, self.epoch, self.model_hash = store, self.run.model, self.run.epoch, self.run.model_hash
        self.head = self.run.head

    def view(self) -> dict[str, Any]:
        """What joins an identity made on this head besides the model hash: ``{}`` for the last-block CLS head."""
        return self.head.identity()

    def states(self, split: str = "repair"):
        return self.run.states(split)

    def states_hash(self, split: str = "repair") -> str:
        return self.store.file_hash(self.run.states_path(split))

    @cached_property
    def misclf(self) -> dict[str, Any]:
        info = load_misclf(self.store)
        made_by = info.get("model_hash")
        if made_by not in (None, self.model_hash):
            ckpt = self.store.model_store().checkpoint(self.epoch)
            raise SettingsModelMismatchError(
                f"{self.store.misclf_info} was made by model {made_by}, but the run's checkpoint {ckpt} is model "
                f"{self.model_hash}. If you replaced or retrained that checkpoint on purpose, rerun "
                "scripts/cache_states.py and scripts/analyze_misclf.py for it; if not, the checkpoint may be damaged: "
                "restore it from a backup (do not regenerate the settings from it)")
        return info

    @property
    def settings(self) -> dict[str, Any]:
        return self.misclf["settings"]

    def setting(self, name: str) -> dict[str, Any]:
        if name not in self.settings:
            why = self.misclf.get("skipped", {}).get(name)
            raise KeyError(f"setting {name!r} is not available in {self.store.misclf_info}"
                           + (f" ({why})" if why else f"; available: {sorted(self.settings)}"))
        return self.settings[name]

    def setting_hash(self, name: str) -> str:
        s = self.setting(name)
        return identity_key({k: s.get(k) for k in SETTING_KEYS})

    def inputs(self, setting: str, split: str = "repair") -> dict[str, str]:
        """The input hashes of a result made on ``setting`` of ``split``."""
        return {"model": self.model_hash, "states": self.states_hash(split), "setting": self.setting_hash(setting)}
