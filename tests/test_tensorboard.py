"""TensorBoard a researcher can use: the learning rate and hp_metric (the test accuracy) of a fit, test in its own
folder (never overwriting fit's), FL benchmark scalars, one HParams entry per repair run with its final metrics,
and no new event file when a rerun finds everything done."""
from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO
from vitfl.core.runstore import RunStore
from vitfl.lightning_modules.cli import ToolkitCLI

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
CONFIGS = ["configs/data/digits.yaml", "configs/model/vit_digits.yaml", "configs/trainer/cpu.yaml"]


def _events(folder: Path) -> list[Path]:
    return sorted(folder.rglob("events.out.tfevents.*"))


def _acc(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_fit_logs_lr_and_test_logs_hp_metric_in_its_own_folder(tmp_path):
    args = [a for c in CONFIGS for a in ("--config", str(REPO / c))]
    common = ["--trainer.default_root_dir", str(tmp_path), "--trainer.limit_train_batches=2",
              "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1"]
    ToolkitCLI(args=["fit", *args, *common, "--trainer.max_epochs=1"])
    store = RunStore(tmp_path)
    fit_run = store.path("tb_run", name="fit")  # a named run, not the log folder's root ('.')
    fit_events = [p for p in _events(store.tensorboard) if p.parent == fit_run]
    assert len(fit_events) == 1 and not [p for p in _events(store.tensorboard) if p.parent == store.tensorboard]
    tags = _acc(fit_events[0]).Tags()["scalars"]
    assert any(t.startswith("lr-") for t in tags), tags  # LearningRateMonitor
    config_before = (fit_run / "config.yaml").read_text()
    ToolkitCLI(args=["test", *args, *common, "--ckpt_path", str(store.checkpoint(1))])
    assert [p for p in _events(store.tensorboard) if p.parent == fit_run] == fit_events  # untouched
    assert (fit_run / "config.yaml").read_text() == config_before
    test_events = _events(store.tensorboard / "test")
    assert test_events
    scalars = {t: _acc(p).Scalars(t) for p in test_events for t in _acc(p).Tags()["scalars"]}
    assert "hp_metric" in scalars and 0.0 <= scalars["hp_metric"][-1].value <= 1.0
    assert scalars["hp_metric"][-1].value == pytest.approx(scalars["test/acc"][-1].value)


def test_repair_runs_are_hparams_entries_and_reruns_add_no_event_file(tmp_path, make_classifier):
    from test_repair_sweep import make_run

    from vitfl.pipeline.repair import run_sweep

    store, _, _ = make_run(tmp_path / "run", make_classifier)
    kw = dict(repair_options={"pop_size": 4, "generations": 2}, progress=False, logger=True, on_error="raise")
    run_sweep([store.root], ["random", "grad_loss"], ["all"], [6], 2, **kw)
    events = _events(store.tensorboard / "repair")
    versions = {p.parent for p in events}
    assert len(versions) == 4  # one TensorBoard run per repair run (method, rep), named by its identity
    for v in versions:
        hparams, scalars = set(), set()
        for p in _events(v):
            acc = _acc(p)
            scalars |= set(acc.Tags()["scalars"])
            try:
                hparams |= set(acc.PluginTagToContent("hparams"))
            except KeyError:
                pass
        assert "_hparams_/session_start_info" in hparams  # an HParams entry with the run's hparams
        # the final metrics are the HParams metrics, named to sort after the curves in the Scalars tab
        assert {"repair_final/rr_test", "repair_final/br_test", "repair_final/delta_acc_test"} <= scalars
        assert sorted(t for t in scalars if t.startswith("repair"))[0].startswith("repair/")
        assert "repair/best_fitness" in scalars
    run_sweep([store.root], ["random", "grad_loss"], ["all"], [6], 2, **kw)
    assert _events(store.tensorboard / "repair") == events  # rerun: everything exists, no new event file


def test_fl_evaluation_scalars_and_no_new_event_file_on_rerun(tmp_path, make_classifier):
    from test_repair_sweep import make_run

    from vitfl.pipeline.evaluate_fl import run_evaluation
    from vitfl.pipeline.localize import run_localization

    store, _, _ = make_run(tmp_path / "run", make_classifier)
    run_localization(store, ["grad_loss", "random"], settings=["all"], budgets=[6], progress=False)
    kw = dict(methods=["grad_loss", "random"], parts=["interventions", "injected"], inject_seeds=[0], n_random=1,
              log=lambda m: None)
    run_evaluation(store, **kw)
    events = _events(store.tensorboard / "fl_eval")
    assert len(events) == 1
    tags = _acc(events[0]).Tags()["scalars"]
    # one series per strength (the default 30 changed predictions, the published 0.1 %)
    assert {"fl_eval/injected/strength=30/R@K/grad_loss", "fl_eval/injected/strength=published/P@K/random"} <= set(
        tags), tags
    assert len(_acc(events[0]).Scalars("fl_eval/injected/strength=30/R@K/grad_loss")) >= 3  # one point per K
    run_evaluation(store, **kw)
    assert _events(store.tensorboard / "fl_eval") == events
