"""The steps after training, each a function of a run directory (``RunLayout``) that the thin scripts and the main
job call: cache states, analyse misclassifications, localize. Each step skips what is already on disk."""
from __future__ import annotations

from typing import Any

from lightning_modules.runs import cache_states, datamodule_from_run, load_run_model, run_config
from localization.artifacts import RunLayout, atomic_savefig, atomic_write_json
from localization.cache import load_states
from localization.ffn import last_ffn_head, model_fingerprint
from localization.misclf import analyze, load_misclf, plot_confusion


def step_cache(layout: RunLayout, splits=("repair", "test"), epoch: int | None = None,
               trainer_kwargs: dict[str, Any] | None = None) -> None:
    model, _ = load_run_model(layout, epoch)
    cache_states(layout, model, list(splits), trainer_kwargs=trainer_kwargs)


def step_misclf(layout: RunLayout, split: str = "repair", ranks: int = 3, seed: int = 0,
                pos_fraction: float = 0.05, tie_order: str = "pred_true", no_true_input: str = "skip",
                kinds=("src_tgt", "tgt_fp", "tgt_fn", "all")) -> dict[str, Any]:
    """Write ``misclf/misclf_info.json`` and the confusion-matrix figure; report skipped settings.
    ``tie_order``, ``no_true_input`` and ``kinds`` are ``localization.misclf.analyze``'s options (recorded in the
    JSON under ``options``)."""
    model, _ = load_run_model(layout)
    states = load_states(layout.states(split), expected_hash=model_fingerprint(model))
    info = analyze(states.label, states.pred, states.index, num_classes=states.logits.shape[1], ranks=ranks,
                   pos_fraction=pos_fraction, seed=seed, split=split, tie_order=tie_order,
                   no_true_input=no_true_input, kinds=kinds)
    info["model_hash"] = states.metadata.get("model_hash")
    atomic_write_json(layout.misclf_info, info)
    try:
        names = datamodule_from_run(layout).class_names
    except Exception:  # class names are decoration only
        names = None
    import matplotlib.pyplot as plt

    fig = plot_confusion(info, names)
    for ext in ("png", "pdf"):
        atomic_savefig(fig, layout.misclf_dir / f"confusion.{ext}", dpi=150)
    plt.close(fig)
    return info


def step_localize(layout: RunLayout, methods=None, settings=None, budgets=(236, 472, 944), seed: int = 0,
                  batch_size: int = 512, engine: str = "trainer", trainer_kwargs: dict[str, Any] | None = None,
                  method_options: dict[str, dict[str, Any]] | None = None, progress: bool = True):
    """Transitional: the localize step now lives in ``pipeline.localize`` (``engine`` is ignored: the FL
    LightningModule is the only engine)."""
    from pipeline.localize import run_localization

    return run_localization(layout, methods, settings, budgets, seed=seed, batch_size=batch_size,
                            trainer_kwargs=trainer_kwargs, method_options=method_options, progress=progress)
