"""A shared run directory cannot run code, and no step destroys a good artifact (issue 15, part A).

Payloads in a copied run: a ``run_config.yaml`` whose ``class_path`` is ``subprocess.run`` (with ``init_args`` that
would create a marker file), a checkpoint whose pickle would run ``exec``; neither runs, both give a clear error.
A checkpoint of another architecture is its own error naming the settings and shapes (not "the cache is stale"),
raised before the state cache is touched; caching another epoch writes its own file; a failed cache pass keeps the
old cache.
"""
from __future__ import annotations

import shutil
import sys

import lightning as L
import pytest
import torch
import yaml

from conftest import HF_KW, REPO, _fit_tiny_run, tiny_classifier
from vitfl.lightning_modules.runs import (
    ArchitectureMismatchError, RunError, UnsafeCheckpointError, UnsafeConfigError, cache_run_states, cache_tag,
    check_model_fits_data, datamodule_from_run, load_classifier, load_run_model)
from vitfl.core.runstore import RunStore
from vitfl.core.states import StaleCacheError, load_states, read_metadata
from vitfl.localization.ffn import model_fingerprint

DATA = {"class_path": "vitfl.datamodules.digits.DigitsDataModule",
        "init_args": {"batch_size": 32, "eval_batch_size": 128, "seed": 0}}
KW = {"enable_progress_bar": False}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-epoch tiny digits run with a run_config.yaml as the training CLI writes it (data + model)."""
    root = tmp_path_factory.mktemp("run")
    _fit_tiny_run(root, "hf_vit")
    data = {**DATA, "init_args": {**DATA["init_args"], "folds_path": str(root / "folds.json")}}
    cfg = {"data": data, "model": {"backbone": "hf_vit", "num_classes": 10, "backbone_kwargs": dict(HF_KW)}}
    RunStore(root).run_config.write_text(yaml.safe_dump(cfg))
    return RunStore(root)


@pytest.fixture
def copied_run(run_dir, tmp_path):
    dst = tmp_path / "copied"
    shutil.copytree(run_dir.root, dst)
    return RunStore(dst)


def _set_config(layout: RunStore, section: str, value) -> None:
    cfg = yaml.safe_load(layout.run_config.read_text())
    cfg[section] = value
    layout.run_config.write_text(yaml.safe_dump(cfg))


# ------------------------------------------------------------------------------------------- run_config payloads
@pytest.mark.parametrize("class_path", ["subprocess.run", "os.system", "vitfl.datamodules.base.subprocess.run",
                                        "vitfl.datamodules.base.DataLoader", "vitfl.datamodules.base.VisionDataModule",
                                        "vitfl.datamodules.folds.atomic_write_json", "lightning.pytorch.Trainer",
                                        "vitfl.datamodules._evil.Mod", "vitfl.datamodules.digits.DigitsDataModule.__init__"])
def test_config_class_path_payload_does_not_run(copied_run, tmp_path, class_path):
    marker = tmp_path / "marker"
    _set_config(copied_run, "data", {"class_path": class_path,
                                     "init_args": {"args": ["touch", str(marker)], "path": str(marker),
                                                   "obj": {}, "command": f"touch {marker}"}})
    with pytest.raises(UnsafeConfigError) as e:
        datamodule_from_run(copied_run)
    assert not marker.exists()
    msg = str(e.value)
    assert str(copied_run.run_config) in msg and repr(class_path) in msg
    assert "vitfl.datamodules.digits.DigitsDataModule" in msg  # what is expected instead


def test_the_payload_is_live(tmp_path):
    """What the test above refuses would run: subprocess.run with those init_args creates the marker."""
    import subprocess

    marker = tmp_path / "marker"
    subprocess.run(args=["touch", str(marker)], check=True)
    assert marker.exists()


def test_config_names_the_toolkits_data_modules(copied_run):
    for class_path in ("vitfl.datamodules.digits.DigitsDataModule", "vitfl.datamodules.DigitsDataModule"):
        _set_config(copied_run, "data", {**DATA, "class_path": class_path})
        assert type(datamodule_from_run(copied_run)).__name__ == "DigitsDataModule"
    _set_config(copied_run, "data", {**DATA, "init_args": {"no_such_option": 1}})
    with pytest.raises(RunError, match="does not accept these init_args"):
        datamodule_from_run(copied_run)


def test_model_class_path_payload_is_refused(copied_run, tmp_path):
    marker = tmp_path / "marker"
    _set_config(copied_run, "model", {"class_path": "subprocess.run", "init_args": {"args": ["touch", str(marker)]}})
    with pytest.raises(UnsafeConfigError, match="vitfl.lightning_modules.classifier.ImageClassifier"):
        load_run_model(copied_run)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- checkpoint payloads
class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_checkpoint_payload_does_not_run(copied_run, tmp_path):
    marker = tmp_path / "marker"
    path = copied_run.checkpoint(2)
    ck = torch.load(path, weights_only=True)
    ck["hyper_parameters"]["note"] = _Payload(marker)
    torch.save(ck, path)
    for load in (lambda: load_classifier(path), lambda: load_run_model(copied_run)):
        with pytest.raises(UnsafeCheckpointError) as e:
            load()
        assert not marker.exists()
        assert str(path) in str(e.value) and "Python global exec" in str(e.value) and "refusing" in str(e.value)
    torch.load(path, weights_only=False)  # the payload is live: unsafe loading runs it
    assert marker.exists()


def test_real_checkpoints_load_weights_only(run_dir):
    from vitfl.lightning_modules.runs import CHECKPOINT_SAFE_GLOBALS, safe_torch_load

    assert CHECKPOINT_SAFE_GLOBALS == []  # torch's default allow-list covers everything our checkpoints hold
    for epoch in (0, 1, 2):
        ck = safe_torch_load(run_dir.checkpoint(epoch))
        assert "state_dict" in ck and "optimizer_states" not in ck


# ------------------------------------------------------------------------------------------- architecture mismatch
def _other_architecture_checkpoint(path, **backbone_change):
    model = tiny_classifier("hf_vit", seed=3, **backbone_change)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(str(path), weights_only=True)


def test_architecture_mismatch_is_its_own_error_and_keeps_the_cache(copied_run):
    layout = copied_run
    cache = cache_run_states(layout, ["repair"], trainer_kwargs=KW)[0]
    before = cache.read_bytes()
    _other_architecture_checkpoint(layout.checkpoint(3), hidden_size=32, intermediate_size=128)
    with pytest.raises(ArchitectureMismatchError) as e:
        load_run_model(layout)
    msg = str(e.value)
    assert "backbone_kwargs.hidden_size: config 16 vs checkpoint 32" in msg
    assert "backbone_kwargs.intermediate_size: config 64 vs checkpoint 128" in msg
    assert "Tensor shapes:" in msg and "(16," in msg and "(32," in msg
    assert "stale" not in msg
    with pytest.raises(ArchitectureMismatchError):  # what the old advice (re-cache) now does: refuse, touch nothing
        cache_run_states(layout, ["repair"], trainer_kwargs=KW)
    assert cache.read_bytes() == before


def test_model_that_does_not_fit_the_data_is_refused(run_dir):
    from vitfl.datamodules import DigitsDataModule

    dm = DigitsDataModule()
    rgb = tiny_classifier("hf_vit", num_channels=3)
    with pytest.raises(ArchitectureMismatchError, match="input channels: model 3 vs data 1"):
        check_model_fits_data(rgb, dm)
    big = tiny_classifier("hf_vit", image_size=16)
    with pytest.raises(ArchitectureMismatchError, match="image size: model 16 vs data 8"):
        check_model_fits_data(big, dm)
    check_model_fits_data(tiny_classifier("hf_vit"), dm)


# ------------------------------------------------------------------------------------------- state caches
def test_caching_another_epoch_writes_its_own_file(copied_run):
    layout = copied_run
    last = cache_run_states(layout, ["repair"], trainer_kwargs=KW)[0]
    assert last == layout.states("repair") and read_metadata(last)["epoch"] == "2"
    before = last.read_bytes()
    assert cache_tag(layout, 1) == "epoch=001" and cache_tag(layout, 2) == "" and cache_tag(layout, None) == ""
    other = cache_run_states(layout, ["repair"], epoch=1, trainer_kwargs=KW)[0]
    assert other == layout.states("repair", "epoch=001") and other.name == "repair.epoch=001.safetensors"
    assert last.read_bytes() == before  # the last epoch's cache is untouched
    m1, _ = load_run_model(layout, 1)
    m2, _ = load_run_model(layout)
    assert read_metadata(other)["model_hash"] == model_fingerprint(m1) != model_fingerprint(m2)
    load_states(other, expected_hash=model_fingerprint(m1))


def test_a_failed_rebuild_keeps_the_old_cache(copied_run, monkeypatch):
    layout = copied_run
    cache_run_states(layout, ["repair"], epoch=1, trainer_kwargs=KW)
    stale = layout.states("repair")
    shutil.copyfile(layout.states("repair", "epoch=001"), stale)  # a cache of another checkpoint where the last's is
    before = stale.read_bytes()
    m2, _ = load_run_model(layout)
    with pytest.raises(StaleCacheError, match="replaces it") as e:
        load_states(stale, expected_hash=model_fingerprint(m2))
    assert "delete" not in str(e.value)

    def boom(*a, **k):
        raise KeyboardInterrupt("killed during the cache pass")

    monkeypatch.setattr(L.Trainer, "predict", boom)
    with pytest.raises(KeyboardInterrupt):
        cache_run_states(layout, ["repair"], trainer_kwargs=KW)
    assert stale.read_bytes() == before  # still there, unchanged
    monkeypatch.undo()
    cache_run_states(layout, ["repair"], trainer_kwargs=KW)
    load_states(stale, expected_hash=model_fingerprint(m2))  # now replaced by the complete new cache


def test_cache_states_script_checks_options(run_dir):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import cache_states
    finally:
        sys.path.remove(str(REPO / "scripts"))
    for argv in (["--run_dir", str(run_dir.root), "--splits", "trian"], ["--run_dir", str(run_dir.root),
                 "--devices", "0"], ["--run_dir", str(run_dir.root / "typo")],
                 ["--run_dir", str(run_dir.root), "--epoch", "-1"]):
        with pytest.raises(SystemExit) as e:
            cache_states.parse(argv)
        assert e.value.code == 2
    with pytest.raises(ValueError, match="non-empty list"):
        cache_run_states(run_dir, [], trainer_kwargs=KW)
    with pytest.raises(RunError, match="epochs \\[0, 1, 2\\]"):
        cache_run_states(run_dir, ["repair"], epoch=7, trainer_kwargs=KW)


@pytest.mark.parametrize("text, message", [
    ("data: [unclosed\n", "cannot read the run config as YAML"),
    ("- just\n- a list\n", "expected a YAML mapping"),
    ("model: {}\n", "no 'data' section"),
    ("data: {class_path: vitfl.datamodules.digits.DigitsDataModule, init_args: [1, 2]}\n", "init_args must be a mapping"),
])
def test_an_invalid_run_config_names_the_file(copied_run, text, message):
    copied_run.run_config.write_text(text)
    with pytest.raises(RunError, match=message) as e:
        datamodule_from_run(copied_run)
    assert str(copied_run.run_config) in str(e.value)
