"""The training step: pretrain (optional), export, fit or resume, test -- one function per stage, each skipping what
the run store already holds, called by the experiment runner (``datasets.<name>.train`` of an experiment config).

A data set's ``train`` block::

    train:
      configs: [configs/data/mnist_finetune.yaml, configs/model/vit_mnist_finetune.yaml, ...]  # LightningCLI configs
      args: []                # more LightningCLI arguments
      epochs: 2               # the fit is done when this epoch's checkpoint exists
      test: true              # test the last epoch on the held-out fold (test_metrics.json, TensorBoard tb/test)
      pretrain:               # optional: pretrain first in <run>/pretrain, export the backbone without its head,
        configs: [...]        # and fine-tune from it (the model config of `configs` gets its pretrained_path)
        epochs: 30
        args: []

Training runs through :class:`vitfl.lightning_modules.cli.ToolkitCLI` (``scripts/train.py`` is the same CLI). An
interrupted fit resumes from the run's ``checkpoints/last.ckpt``. Paths written into the run (the fine-tune model
config's ``pretrained_path``) are relative to the run root, so a moved run resumes.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from vitfl.core.runstore import RunStore

__all__ = ["fit", "pretrain", "export_pretrained", "finetune_model_config", "train", "test"]


def _abs(path: str | Path, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


def fit(store: RunStore, configs: Sequence[str | Path], epochs: int, args: Sequence[str] = (),
        root: Path | None = None) -> bool:
    """Fit for ``epochs`` epochs into ``store`` (resumed from ``checkpoints/last.ckpt`` when an interrupted fit left
    one); skipped when that epoch's checkpoint exists. Returns whether it trained."""
    if epochs in store.checkpoint_epochs():
        return False
    from vitfl.lightning_modules.cli import ToolkitCLI

    root = Path(root or Path.cwd())
    argv = ["fit"]
    for c in configs:
        argv += ["--config", str(_abs(c, root))]
    argv += [f"--trainer.default_root_dir={store.root}", f"--trainer.max_epochs={epochs}",
             "--trainer.enable_model_summary=false", *[str(a) for a in args]]
    if store.last_checkpoint.is_file():
        argv.append(f"--ckpt_path={store.last_checkpoint}")
    ToolkitCLI(args=argv)
    return True


def export_pretrained(ckpt_path: str | Path, out_dir: Path) -> Path:
    """Write a pretrained classifier's backbone without its classification head where ``hf_vit`` / ``timm_vit``
    read local weights (``pretrained_path``); returns that path. HF: ``ViTModel.save_pretrained(out_dir)`` (so
    ``ViTForImageClassification.from_pretrained`` builds a new, randomly initialised classifier, as for
    ``google/vit-base-patch16-224-in21k``); timm: ``out_dir/model.safetensors`` with every ``head.*`` entry dropped.

    Atomic: the HF folder is written beside ``out_dir`` and renamed into place (a kill never leaves a folder whose
    ``config.json`` says "done" beside partial weights); the timm file through :mod:`vitfl.core.io` (with its content
    hash)."""
    from vitfl.core.io import atomic_save_tensors
    from vitfl.lightning_modules.runs import load_classifier

    model = load_classifier(ckpt_path)
    out_dir = Path(out_dir)
    hf = getattr(getattr(model.backbone, "model", None), "vit", None)
    if hf is not None:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        hf.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.replace(out_dir)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.backbone.state_dict().items() if not k.startswith("head.")}
    path = out_dir / "model.safetensors"
    atomic_save_tensors(path, state)
    return path


def _exported(export: Path) -> Path | None:
    """The ``pretrained_path`` of a finished export (HF folder or timm file), else None."""
    if (export / "config.json").is_file():
        return export
    if (export / "model.safetensors").is_file():
        return export / "model.safetensors"
    return None


def pretrain(store: RunStore, spec: Mapping[str, Any], root: Path | None = None,
             log: Callable[[str], None] = print) -> Path:
    """Pretrain into ``<run>/pretrain`` (a run directory of its own) and export its backbone (``<run>/pretrain/
    export``); skipped when the export exists. Returns the ``pretrained_path``."""
    pre = RunStore(store.path("pretrain_run"))
    export = pre.path("export")
    done = _exported(export)
    if done is not None:
        log(f"pretrained weights {done} exist: pretraining skipped")
        return done
    t0 = time.perf_counter()
    fit(pre, spec.get("configs") or [], int(spec["epochs"]), spec.get("args") or [], root)
    out = export_pretrained(pre.checkpoint(int(spec["epochs"])), export)
    log(f"pretraining: {time.perf_counter() - t0:.1f} s; exported {out}")
    return out


def finetune_model_config(store: RunStore, model_config: str | Path, pretrained_path: str | Path) -> Path:
    """``model_config`` with ``model.backbone_kwargs.pretrained_path`` set, written into the run (``finetune_model
    .yaml``). A ``pretrained_path`` inside the run is written relative to the run root: the training CLI reads a
    relative one that exists in the run directory from there, so the file names no path of the machine and a moved
    run still resumes."""
    import yaml

    spec = yaml.safe_load(Path(model_config).read_text())
    pretrained_path = store.rel(pretrained_path)  # outside the run (a user's own export): kept as given
    spec["model"].setdefault("backbone_kwargs", {})["pretrained_path"] = pretrained_path
    path = store.path("finetune_config")
    store.write_text(path, yaml.safe_dump(spec, sort_keys=False))
    return path


def _model_config(configs: Sequence[Path]) -> int:
    """The index of the LightningCLI config that holds the ``model`` block (the one fine-tuning patches)."""
    import yaml

    found = [i for i, c in enumerate(configs) if "model" in (yaml.safe_load(Path(c).read_text()) or {})]
    if len(found) != 1:
        raise ValueError(f"train.pretrain needs exactly one of train.configs to hold the `model` block; found "
                         f"{len(found)} in {[str(c) for c in configs]}")
    return found[0]


def train(store: RunStore, spec: Mapping[str, Any] | None, root: Path | None = None,
          log: Callable[[str], None] = print) -> dict[str, int]:
    """The train step of a data set (the ``train`` block above; ``None``: the run must hold a checkpoint already).
    Returns counts (done / skipped) for the experiment log."""
    if not spec:
        if not store.checkpoint_epochs():
            raise FileNotFoundError(f"{store.root} has no checkpoints and the experiment gives no "
                                    "datasets.<name>.train: train it first (scripts/train.py fit ...)")
        return {"skipped": 1}
    root = Path(root or Path.cwd())
    epochs = int(spec["epochs"])
    configs = [_abs(c, root) for c in spec.get("configs") or []]
    done = 0
    if epochs in store.checkpoint_epochs():
        log(f"checkpoint {store.checkpoint(epochs)} exists: training skipped")
    else:
        if spec.get("pretrain"):
            i = _model_config(configs)
            configs[i] = finetune_model_config(store, configs[i], pretrain(store, spec["pretrain"], root, log))
        done += fit(store, configs, epochs, spec.get("args") or [], root)
    if spec.get("test"):
        test(store, log)
    return {"done": done, "skipped": 1 - done}


def test(store: RunStore, log: Callable[[str], None] = print) -> dict[str, float]:
    """Test the run's last epoch on its held-out fold (``test_metrics``; TensorBoard ``tb/test``); skipped when that
    epoch's metrics exist (no second TensorBoard run)."""
    from vitfl.core.io import read_json

    from vitfl.lightning_modules.runs import load_run_model

    model, epoch = load_run_model(store)
    done = store.path("test_metrics", epoch=epoch)
    if done.is_file():
        out = read_json(done)
    else:
        import lightning as L
        from lightning.pytorch.loggers import TensorBoardLogger

        from vitfl.lightning_modules.runs import datamodule_from_run

        tb = TensorBoardLogger(save_dir=str(store.root), name="tb", version="test", default_hp_metric=False)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=tb, enable_progress_bar=False,
                            enable_model_summary=False)
        out = trainer.test(model, datamodule=datamodule_from_run(store), verbose=False)[0]
        store.write_json(done, {"epoch": epoch, **out})
    log(f"epoch {epoch}: test (held-out fold) top-1 {out['test/acc']:.4f}, top-5 {out['test/acc_top5']:.4f}")
    return out
