"""Resumable training and fit options (issue 15, part A).

A digits fit (the training CLI's configs, dropout and augmentation on, so every RNG matters) killed in epoch 2 of 3
and resumed with ``--ckpt_path last`` ends with the same weights, per epoch, as an uninterrupted fit; resuming
from a weights-only file, from nothing, or past ``max_epochs`` is a clear error; options that would train nothing
are refused before any work; a failed fit leaves ``run_config.yaml`` as it was.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import lightning as L
import pytest
import torch

from conftest import REPO
from vitfl.lightning_modules.cli import FitOptionError, ToolkitCLI
from vitfl.lightning_modules.runs import checkpoint_epochs, load_classifier, safe_torch_load
from vitfl.core.runstore import RunStore

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter", "ignore:.*does not have many workers",
                                        "ignore:The number of training batches")

CONFIGS = ["configs/data/digits.yaml", "configs/model/vit_digits.yaml", "configs/trainer/cpu.yaml"]
EPOCHS = 3


class Killed(Exception):
    """Stands in for a kill: raised inside an epoch, after some optimizer steps."""


class KillInEpoch(L.Callback):
    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise Killed(f"killed in epoch index {self.epoch} at batch {batch_idx}")


class SigkillInEpoch(L.Callback):
    """A real kill -9 of the training process (no Python clean-up) at ``batch`` of epoch index ``epoch``."""

    def __init__(self, epoch: int = 1, batch: int = 1):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def fit_args(root, *extra):
    args = ["fit", *[a for c in CONFIGS for a in ("--config", str(REPO / c))], "--trainer.default_root_dir",
            str(root), f"--trainer.max_epochs={EPOCHS}", "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.logger=false", "--data.init_args.augment=true",
            "--data.init_args.batch_size=32"]
    return args + list(extra)


def cli(root, *extra, callbacks=None):
    return ToolkitCLI(args=fit_args(root, *extra), trainer_defaults={"callbacks": callbacks or []})


def state(path):
    return load_classifier(path).state_dict()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    cli(root)
    return RunStore(root)


def test_resume_after_a_kill_in_epoch_2_gives_the_same_weights(uninterrupted, tmp_path):
    layout = RunStore(tmp_path)
    with pytest.raises(Killed):
        cli(tmp_path, callbacks=[KillInEpoch(epoch=1, batch=2)])
    assert checkpoint_epochs(layout) == [0, 1]  # epoch 2 never finished
    last = layout.checkpoints / "last.ckpt"
    ck = safe_torch_load(last)  # weights_only=True
    assert {"optimizer_states", "lr_schedulers", "loops", "callbacks"} <= set(ck) and ck["epoch"] == 0
    assert not list(layout.checkpoints.glob(".*.tmp"))  # atomic writes leave no temporary file behind

    cli(tmp_path, "--ckpt_path", "last")
    assert checkpoint_epochs(layout) == checkpoint_epochs(uninterrupted) == [0, 1, 2, 3]
    for epoch in range(EPOCHS + 1):
        a, b = state(layout.checkpoint(epoch)), state(uninterrupted.checkpoint(epoch))
        assert a.keys() == b.keys()
        worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        assert worst <= 1e-6, f"epoch {epoch}: resumed weights differ from the uninterrupted run by {worst}"
    # the weights really moved: a test that compared two untrained models would pass trivially
    a0, a3 = state(layout.checkpoint(0)), state(layout.checkpoint(EPOCHS))
    assert any(not torch.equal(a0[k], a3[k]) for k in a0)
    assert safe_torch_load(last)["epoch"] == EPOCHS - 1


def test_resume_options_are_checked(uninterrupted, tmp_path):
    with pytest.raises(FitOptionError, match="no checkpoint at .*last.ckpt"):
        cli(tmp_path, "--ckpt_path", "last")
    assert not RunStore(tmp_path).run_config.exists()  # refused before anything was written
    with pytest.raises(FitOptionError, match="weights only.*--ckpt_path last"):
        cli(tmp_path, "--ckpt_path", str(uninterrupted.checkpoint(1)))
    before = uninterrupted.run_config.read_bytes()
    with pytest.raises(FitOptionError, match="already completed 3 epoch.*max_epochs"):
        cli(uninterrupted.root, "--ckpt_path", "last")  # a finished run: resuming would train nothing
    assert uninterrupted.run_config.read_bytes() == before


def test_a_fresh_fit_never_overwrites_trained_checkpoints(uninterrupted):
    files = {p.name: p.read_bytes() for p in uninterrupted.checkpoints.iterdir()}
    with pytest.raises(FitOptionError, match=r"already holds this run's checkpoints \(epochs \[1, 2, 3\], last.ckpt"):
        cli(uninterrupted.root, "--trainer.max_epochs=5")
    assert {p.name: p.read_bytes() for p in uninterrupted.checkpoints.iterdir()} == files


def test_a_corrupt_resume_checkpoint_is_named(uninterrupted, tmp_path):
    import shutil

    from vitfl.lightning_modules.runs import RunError

    shutil.copytree(uninterrupted.checkpoints, tmp_path / "checkpoints")
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # e.g. a copy cut short
    with pytest.raises(RunError, match=f"checkpoint {last} is corrupt"):
        cli(tmp_path, "--ckpt_path", "last", "--trainer.max_epochs=5")


@pytest.mark.parametrize("option, message", [
    ("--trainer.max_epochs=0", "max_epochs=0 trains nothing"),
    ("--trainer.limit_train_batches=0", r"limit_train_batches=0(\.0)? trains nothing"),
    ("--trainer.max_steps=0", "max_steps=0 trains nothing"),
    ("--trainer.devices=0", "devices must be a positive int"),
])
def test_a_no_op_fit_is_an_error(tmp_path, option, message):
    with pytest.raises(FitOptionError, match=message):
        cli(tmp_path, option)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("option, message", [
    ("--data.init_args.batch_size=0", "batch_size must be a positive int, got 0"),
    ("--data.init_args.eval_batch_size=-4", "eval_batch_size must be a positive int, got -4"),
    ("--data.init_args.on_bad_image=ignore", "on_bad_image must be one of"),
])
def test_bad_data_options_fail_before_any_work(tmp_path, option, message):
    with pytest.raises(ValueError, match=message):
        cli(tmp_path, option)
    assert not RunStore(tmp_path).run_config.exists() and not RunStore(tmp_path).checkpoints.exists()


def test_failed_fit_leaves_run_config_as_it_was(tmp_path):
    """A typo in the data root: the fit fails in the data module's checks and the run's config is untouched."""
    from vitfl.datamodules.base import DatasetFormatError

    layout = RunStore(tmp_path)
    layout.run_config.write_text("data: {class_path: vitfl.datamodules.digits.DigitsDataModule}\n# the good config\n")
    before = layout.run_config.read_bytes()
    with pytest.raises(DatasetFormatError, match="tiny-imagenet-200"):
        cli(tmp_path, "--data", "vitfl.datamodules.tiny_imagenet.TinyImageNetDataModule",
            "--data.init_args.root", str(tmp_path / "no_such_data_root"), "--data.init_args.image_size=8",
            "--data.init_args.mean=[0.5,0.5,0.5]", "--data.init_args.std=[0.5,0.5,0.5]")
    assert layout.run_config.read_bytes() == before
    assert not layout.checkpoints.exists()


@pytest.mark.slow
def test_kill_9_in_epoch_2_then_resume_with_the_script(uninterrupted, tmp_path):
    """scripts/train.py killed with SIGKILL inside epoch 2, then rerun with --ckpt_path last: same weights."""
    # the script runs with this process's thread count: the uninterrupted run it is compared with ran here, and a
    # float32 fit with another thread count sums in another order (2e-6 apart after 3 epochs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    script = [sys.executable, str(REPO / "scripts" / "train.py")]
    killer = ["--trainer.callbacks+=test_reliability_training.SigkillInEpoch"]
    proc = subprocess.run([*script, *fit_args(tmp_path), *killer], env=env, capture_output=True, text=True,
                          cwd=str(REPO), timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    layout = RunStore(tmp_path)
    assert checkpoint_epochs(layout) == [0, 1]
    proc = subprocess.run([*script, *fit_args(tmp_path), "--ckpt_path", "last"], env=env, capture_output=True,
                          text=True, cwd=str(REPO), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for epoch in range(EPOCHS + 1):
        a, b = state(layout.checkpoint(epoch)), state(uninterrupted.checkpoint(epoch))
        worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        assert worst <= 1e-6, f"epoch {epoch}: resumed weights differ from the uninterrupted run by {worst}"


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_a_resume_checkpoint_with_a_payload_is_refused(uninterrupted, tmp_path):
    import shutil

    from vitfl.lightning_modules.runs import UnsafeCheckpointError

    shutil.copytree(uninterrupted.checkpoints, tmp_path / "checkpoints")
    last = tmp_path / "checkpoints" / "last.ckpt"
    marker = tmp_path / "marker"
    ck = torch.load(last, weights_only=True)
    ck["callbacks"]["note"] = _Payload(marker)
    torch.save(ck, last)
    with pytest.raises(UnsafeCheckpointError, match="Python global exec"):
        cli(tmp_path, "--ckpt_path", "last", "--trainer.max_epochs=5")
    assert not marker.exists() and not RunStore(tmp_path).run_config.exists()


def _ddp_fit(root, ckpt_path=None, kill=False):
    from vitfl.callbacks.checkpoints import PerEpochCheckpoint, ResumeCheckpoint
    from conftest import tiny_classifier
    from vitfl.datamodules import DigitsDataModule

    L.seed_everything(0, verbose=False)
    model = tiny_classifier("hf_vit", seed=0, randomize=False, hidden_dropout_prob=0.1).train()
    dm = DigitsDataModule(batch_size=16, eval_batch_size=64, folds_path=str(root / "folds.json"))
    callbacks = [PerEpochCheckpoint(), ResumeCheckpoint(), *([KillInEpoch(epoch=1, batch=1)] if kill else [])]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=EPOCHS,
                        limit_train_batches=3, limit_val_batches=1, default_root_dir=str(root), logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)


@pytest.mark.slow  # ~1-2 min: three 2-process CPU DDP fits
def test_ddp_resume_gives_the_same_weights(tmp_path):
    from conftest import retry_spawn_teardown_abort

    a, b = tmp_path / "a", tmp_path / "b"
    retry_spawn_teardown_abort(lambda: _ddp_fit(a))
    with pytest.raises(Exception, match="Killed|killed"):
        _ddp_fit(b, kill=True)
    assert checkpoint_epochs(RunStore(b)) == [0, 1]
    retry_spawn_teardown_abort(lambda: _ddp_fit(b, ckpt_path=str(RunStore(b).checkpoints / "last.ckpt")))
    for epoch in range(EPOCHS + 1):
        sa, sb = state(RunStore(a).checkpoint(epoch)), state(RunStore(b).checkpoint(epoch))
        worst = max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)
        assert worst <= 1e-6, f"epoch {epoch}: resumed DDP weights differ from the uninterrupted run by {worst}"
