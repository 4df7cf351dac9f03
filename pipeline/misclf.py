"""The misclassification step: the settings of the repair split (``vitfl.localization.misclf.analyze``) and the
confusion-matrix figure, written to the run store.

The settings do not depend on the FFN block that FL or its evaluation addresses (``--block``): they come from the
model's predictions (the logits of the run's state cache, which every block's cache of the same model and split
repeats) and name inputs by sample index, so one ``misclf/misclf_info.json`` serves every block."""
from __future__ import annotations

import os

from typing import Any

import numpy as np

from vitfl.core.runstore import RunStore
from vitfl.lightning_modules.runs import UnsafeConfigError, datamodule_from_run, load_run
from vitfl.localization.misclf import DEFAULT_KINDS, analyze

__all__ = ["step_misclf", "ensure_misclf", "plot_confusion"]


def step_misclf(store: RunStore, split: str = "repair", ranks: int = 3, seed: int = 0,
                pos_fraction: float = 0.05, tie_order: str = "pred_true", no_true_input: str = "skip",
                kinds=DEFAULT_KINDS) -> dict[str, Any]:
    """Write ``misclf/misclf_info.json`` and the confusion figure; ``tie_order``, ``no_true_input`` and ``kinds``
    are :func:`vitfl.localization.misclf.analyze`'s options (recorded in the JSON under ``options``)."""
    states = load_run(store).states(split)
    info = analyze(states.label, states.pred, states.index, num_classes=states.logits.shape[1], ranks=ranks,
                   pos_fraction=pos_fraction, seed=seed, split=split, tie_order=tie_order,
                   no_true_input=no_true_input, kinds=kinds)
    info["model_hash"] = states.metadata.get("model_hash")
    store.write_json(store.misclf_info, info)
    try:
        names = datamodule_from_run(store).class_names
    except UnsafeConfigError:  # a refused class_path is never silent
        raise
    except Exception:  # noqa: BLE001 - class names are decoration only (e.g. the data folder is not mounted)
        names = None
    from vitfl.core.style import save_figure

    stem = store.path("misclf_figure", ext="png").with_suffix("")
    save_figure(plot_confusion(info, names), stem, dpi=150, writer=store.save_figure)
    return info


def ensure_misclf(store: RunStore, split: str = "repair", kinds=DEFAULT_KINDS, **rules) -> dict[str, int]:
    """The settings step of an experiment (:func:`step_misclf` when needed). The analysis on disk is kept when it was
    made by the same model with the same rules (``rules``: ranks, seed, I_pos share, tie order, no-true-input rule)
    and already holds every kind asked for; otherwise it is rebuilt with the union of the kinds on disk and the kinds
    asked for, so experiments that share a run directory but need different kinds do not rebuild it in turn
    (settings are content-hashed in every result identity, so a rebuilt analysis never mixes results of other input
    sets). Returns the counts (done / skipped)."""
    from vitfl.core.io import read_json
    from vitfl.core.states import read_metadata
    from vitfl.localization.misclf import ALL_KINDS

    kinds = list(kinds)
    if store.misclf_info.is_file():
        info = read_json(store.misclf_info)
        have = dict(info.get("options") or {})
        same_model = info.get("model_hash") == read_metadata(load_run(store).states_path(split)).get("model_hash")
        same_rules = all(have.get(k) == v for k, v in rules.items())
        have_kinds = list(have.get("kinds") or [])
        if same_model and same_rules and info.get("split", split) == split:
            if set(kinds) <= set(have_kinds):
                return {"skipped": 1}
            kinds = [k for k in ALL_KINDS if k in set(kinds) | set(have_kinds)]
    step_misclf(store, split=split, kinds=tuple(kinds), **rules)
    return {"done": 1}


def plot_confusion(info: dict[str, Any], class_names: list[str] | None = None):
    """A confusion-matrix figure (counts, log colour scale; rows = true class) of an ``analyze`` result or any
    ``{"confusion", "split", "n", "accuracy"}`` dict, in the house style (:mod:`vitfl.core.style`): single-column
    width up to 20 classes (counts printed), wider for more."""
    from matplotlib.colors import LogNorm

    from vitfl.core import style

    c = np.asarray(info["confusion"])
    k = c.shape[0]
    if c.size == 0 or c.sum() == 0:
        return style.nothing_to_plot(f"no inputs in the {info.get('split', '?')} split")
    w = style.COLUMN_WIDTH if k <= 20 else min(style.DOUBLE_WIDTH, 2.0 + 0.05 * k)
    fig, ax = style.figure(w, w * 0.9)
    ax = ax[0, 0]
    ax.grid(False)
    im = ax.imshow(c + 1, norm=LogNorm(), cmap="viridis")
    fig.colorbar(im, ax=ax, label="count + 1", fraction=0.046, pad=0.04)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{info['split']} (n = {info['n']}): accuracy {info['accuracy']:.3f}")
    if k <= 20:
        names = class_names or [str(i) for i in range(k)]
        ax.set_xticks(range(k), names, rotation=90 if max(len(n) for n in names) > 2 else 0)
        ax.set_yticks(range(k), names)
        for s in range(k):
            for t in range(k):
                if c[s, t]:
                    ax.text(t, s, str(c[s, t]), ha="center", va="center", fontsize=5,
                            color="white" if s != t else "black")
    fig.tight_layout()
    return fig
