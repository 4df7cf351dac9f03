"""The training CLI (scripts/train.py, lightning_modules/cli.py): --print_config composes the YAMLs, and a shrunk
in-process fit writes the run directory every later step reads (run_config.yaml, folds.json, checkpoints, last-FFN
weights, TensorBoard logs); the steps after training (cache, misclassification analysis, FL) then run on it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO
from vitfl.lightning_modules.cli import ToolkitCLI
from vitfl.lightning_modules.runs import RunError, checkpoint_epochs, datamodule_from_run, load_run_model, run_config
from vitfl.core.runstore import RunStore

# pytest's own argv is in sys.argv; the CLI is given its args explicitly
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

CONFIGS = ["configs/data/digits.yaml", "configs/model/vit_digits.yaml", "configs/trainer/cpu.yaml"]


def config_args():
    return [a for c in CONFIGS for a in ("--config", str(REPO / c))]


def test_print_config():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "fit", *config_args(),
                           "--print_config"], capture_output=True, text=True, cwd=str(REPO), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "class_path: vitfl.datamodules.digits.DigitsDataModule" in proc.stdout
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["backbone"] == "hf_vit" and cfg["model"]["backbone_kwargs"]["hidden_size"] == 64
    assert cfg["trainer"]["max_epochs"] == 40
    assert "per_epoch_checkpoint" in cfg and "ffn_weights" in cfg


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_run")
    cli = ToolkitCLI(args=["fit", *config_args(), "--trainer.default_root_dir", str(root), "--trainer.max_epochs=1",
                           "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                           "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                           "--trainer.log_every_n_steps=1"])
    return cli, RunStore(root)


def test_fit_writes_the_run_directory(cli_run):
    cli, layout = cli_run
    assert layout.run_config.is_file() and layout.folds.is_file()
    assert checkpoint_epochs(layout) == [0, 1]
    assert layout.ffn_weights(0).is_file() and layout.ffn_weights(1).is_file()
    events = list(layout.tensorboard.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard events under {layout.tensorboard}"
    assert cli.trainer.current_epoch == 1 and cli.model.hparams.num_classes == 10  # linked from the data module


def test_run_config_rebuilds_the_data(cli_run):
    cli, layout = cli_run
    cfg = run_config(layout)
    assert "__path__" not in json.dumps(cfg)
    assert cfg["data"]["class_path"] == "vitfl.datamodules.digits.DigitsDataModule"
    assert cfg["data"]["init_args"]["folds_path"] == "folds.json"  # relative to the run root (issue 29, item 8)
    assert cfg["trainer"]["max_epochs"] == 1 and cfg["trainer"]["default_root_dir"] == "."
    dm = datamodule_from_run(layout)
    assert type(dm).__name__ == "DigitsDataModule" and dm.folds_path == str(layout.folds)
    dm.setup()
    cli.datamodule.setup()
    for split in ("repair", "test"):
        assert (dm.indices(split) == cli.datamodule.indices(split)).all()
    folds = json.loads(layout.folds.read_text())
    assert sorted(folds["repair"] + folds["test"]) == list(range(folds["eval_size"]))


def test_reloaded_model_is_the_trained_one(cli_run):
    cli, layout = cli_run
    model, epoch = load_run_model(layout)
    assert epoch == 1
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), cli.model.eval()(x))


def test_missing_run_config(tmp_path):
    with pytest.raises(RunError, match="train first"):
        run_config(RunStore(tmp_path))


def test_steps_after_training(cli_run):
    """cache -> misclassification analysis -> FL on the CLI's run (shrunk: one setting, two methods)."""
    from vitfl.pipeline.cache import step_cache
    from vitfl.pipeline.localize import run_localization
    from vitfl.pipeline.misclf import step_misclf
    from vitfl.core.states import load_states, save_states
    from vitfl.localization.ffn import last_ffn_head, model_fingerprint

    _, layout = cli_run
    model, _ = load_run_model(layout)
    kw = {"enable_progress_bar": False}
    step_cache(layout, splits=("repair",), trainer_kwargs=kw)
    path = layout.states("repair")
    st = load_states(path, expected_hash=model_fingerprint(model))
    dm = datamodule_from_run(layout)
    assert len(st) == len(dm.dataset("repair")) and torch.equal(st.index, torch.arange(len(st)))
    assert torch.equal(st.label, torch.from_numpy(dm.labels("repair")))
    with torch.no_grad():
        assert float((last_ffn_head(model)(st.x) - st.logits).abs().max()) <= 1e-4
    # present and made by this model: skipped; stale: rebuilt
    mtime = path.stat().st_mtime_ns
    step_cache(layout, splits=("repair",), trainer_kwargs=kw)
    assert path.stat().st_mtime_ns == mtime
    save_states(path, st.x, st.a, st.logits, st.label, st.index, metadata={"model_hash": "stale"})
    step_cache(layout, splits=("repair",), trainer_kwargs=kw)
    assert load_states(path).metadata["model_hash"] == model_fingerprint(model)

    info = step_misclf(layout)
    assert layout.misclf_info.is_file() and (layout.misclf_dir / "confusion.png").is_file()
    assert "all" in info["settings"] and info["model_hash"] == model_fingerprint(model)
    rows = run_localization(layout, methods=["grad_loss", "vdiff"], settings=["all"], budgets=[5],
                            trainer_kwargs=kw, progress=False)
    assert [r["status"] for r in rows] == ["done", "done"]
    recs = {r["method"]: r for r in layout.list_results("fl_result")}
    for method in ("grad_loss", "vdiff"):
        assert len(recs[method]["weights"]) == 5
        assert recs[method]["provenance"]["model_hash"] == model_fingerprint(model)
        assert recs[method]["identity"]["scores"]["inputs"]["model"] == model_fingerprint(model)
    assert layout.fl_timing.is_file()
    rows = run_localization(layout, methods=["grad_loss"], settings=["all"], budgets=[5], progress=False)
    assert [r["status"] for r in rows] == ["exists"]  # resumes


def test_a_backbone_option_on_the_command_line_keeps_its_type(tmp_path):
    """``--model.backbone_kwargs.num_hidden_layers=2`` is the int 2 (it was the string '2', which the ViT config
    refuses), a float stays a float and a name stays a string."""
    cli = ToolkitCLI(args=[*config_args(), "--trainer.default_root_dir", str(tmp_path),
                           "--model.backbone_kwargs.num_hidden_layers=2",
                           "--model.backbone_kwargs.hidden_dropout_prob=0.25"], run=False)
    kwargs = cli.model.hparams["backbone_kwargs"]
    assert kwargs["num_hidden_layers"] == 2 and isinstance(kwargs["num_hidden_layers"], int)
    assert kwargs["hidden_dropout_prob"] == 0.25 and isinstance(kwargs["hidden_dropout_prob"], float)
    from vitfl.localization.ffn import num_ffn_blocks
    assert num_ffn_blocks(cli.model.backbone) == 2
