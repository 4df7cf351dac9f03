"""Training (ImageClassifier + PerEpochCheckpoint + LastFFNWeightsWriter) on digits, shrunk: per-epoch checkpoints
and last-FFN weight files (000 = the untrained start), exact reload, clear errors for corrupt checkpoints and
missing pretrained folders, a 2-process CPU DDP fit, and local ``from_pretrained`` folders."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from vitfl.callbacks.checkpoints import PerEpochCheckpoint, ResumeCheckpoint
from vitfl.callbacks.ffn_weights import LastFFNWeightsWriter, load_ffn_weights
from conftest import TIMM_KW, images, retry_spawn_teardown_abort, tiny_classifier, tiny_hf_vit
from vitfl.lightning_modules.backbones import PretrainedWeightsError, hf_vit
from vitfl.lightning_modules.runs import RunError, checkpoint_epochs, last_epoch, load_classifier
from vitfl.core.runstore import RunStore
from vitfl.localization.ffn import last_ffn_head, model_fingerprint


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------- the shared trained run
def test_per_epoch_checkpoints(trained_run):
    layout = RunStore(trained_run["root"])
    names = sorted(p.name for p in layout.checkpoints.iterdir() if not p.name.endswith(".sha256"))
    assert names == ["epoch=000.ckpt", "epoch=001.ckpt", "epoch=002.ckpt"]
    assert all((layout.checkpoints / f"{n}.sha256").is_file() for n in names)  # each with its content hash
    assert checkpoint_epochs(layout) == [0, 1, 2] and last_epoch(layout) == 2
    start, mid, end = (load_classifier(layout.checkpoint(e)) for e in (0, 1, 2))
    assert state_equal(start, trained_run["initial"])  # 000 = the untrained start
    assert state_equal(end, trained_run["final"])  # NNN = after NNN epochs
    assert not state_equal(mid, start) and not state_equal(mid, end)  # training moved the weights each epoch
    ckpt = torch.load(layout.checkpoint(1), map_location="cpu", weights_only=True)
    assert "optimizer_states" not in ckpt  # weights only


def test_ffn_weight_files_match_checkpoints(trained_run):
    layout = RunStore(trained_run["root"])
    assert sorted(p.name for p in layout.ffn_weights_dir.iterdir()) == [
        "epoch=000.safetensors", "epoch=001.safetensors", "epoch=002.safetensors"]
    timm = trained_run["backbone"] == "timm_vit"
    for epoch in range(3):
        model = load_classifier(layout.checkpoint(epoch))
        head = last_ffn_head(model)
        w = load_ffn_weights(layout.ffn_weights(epoch))
        assert set(w) == {"W_bef", "b_bef", "W_aft", "b_aft"} | ({"ls_gamma"} if timm else set())
        assert torch.equal(w["W_bef"], head.fc_bef.weight) and torch.equal(w["W_aft"], head.fc_aft.weight)
        assert torch.equal(w["b_bef"], head.fc_bef.bias) and torch.equal(w["b_aft"], head.fc_aft.bias)
        if timm:
            assert torch.equal(w["ls_gamma"], head.layer_scale.gamma)
    w0, w1 = load_ffn_weights(layout.ffn_weights(0)), load_ffn_weights(layout.ffn_weights(1))
    assert not torch.equal(w0["W_bef"], w1["W_bef"])
    from safetensors import safe_open

    with safe_open(str(layout.ffn_weights(2)), framework="pt") as f:
        meta = f.metadata()
    assert meta["epoch"] == "2" and meta["model_hash"] == model_fingerprint(trained_run["final"])
    with pytest.raises(FileNotFoundError, match="LastFFNWeightsWriter"):
        load_ffn_weights(layout.ffn_weights(7))


def test_reload_gives_identical_logits(trained_run):
    layout = RunStore(trained_run["root"])
    pixels = images(9, seed=4)
    with torch.no_grad():
        want_end = trained_run["final"].eval()(pixels)
        want_start = trained_run["initial"].eval()(pixels)
        got_end = load_classifier(layout.checkpoint(2))(pixels)
        got_start = load_classifier(layout.checkpoint(0))(pixels)
    assert torch.equal(got_end, want_end) and torch.equal(got_start, want_start)
    assert not torch.equal(want_end, want_start)
    assert model_fingerprint(load_classifier(layout.checkpoint(2))) == model_fingerprint(trained_run["final"])


def test_trained_run_validates(trained_run):
    metrics = trained_run["trainer"].callback_metrics
    assert {"val/loss", "val/acc", "train/loss_epoch"} <= set(metrics)
    assert torch.isfinite(metrics["val/loss"])


def test_corrupt_and_missing_checkpoint(trained_run, tmp_path):
    src = RunStore(trained_run["root"]).checkpoint(1)
    bad = tmp_path / "epoch=001.ckpt"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(RunError, match=rf"checkpoint {bad} is corrupt"):
        load_classifier(bad)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match="corrupt"):
        load_classifier(junk)
    with pytest.raises(RunError, match="no checkpoint at"):
        load_classifier(tmp_path / "missing.ckpt")


def test_nan_checkpoint_refused(trained_run, tmp_path):
    ckpt = torch.load(RunStore(trained_run["root"]).checkpoint(1), map_location="cpu", weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith("fc1.weight"))
    ckpt["state_dict"][key][0, 0] = float("nan")
    path = tmp_path / "nan.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(RunError, match="NaN or inf"):
        load_classifier(path)


# ------------------------------------------------------------------------------------ 2-process CPU DDP
@pytest.mark.slow  # ~15-35 s: two spawned processes import torch, lightning and transformers
def test_ddp_spawn_fit(tmp_path):
    from vitfl.datamodules import DigitsDataModule

    L.seed_everything(0, verbose=False)

    def fit():
        for p in [*tmp_path.rglob("*.ckpt"), *tmp_path.rglob("*.safetensors")]:  # a retried run starts clean
            p.unlink()
        model = tiny_classifier("hf_vit", seed=0, randomize=False).train()
        dm = DigitsDataModule(batch_size=16, eval_batch_size=64, folds_path=str(tmp_path / "folds.json"))
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1,
                            limit_train_batches=2, limit_val_batches=1, default_root_dir=str(tmp_path), logger=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[PerEpochCheckpoint(), ResumeCheckpoint(), LastFFNWeightsWriter()])
        trainer.fit(model, datamodule=dm)
        return model, trainer

    model, trainer = retry_spawn_teardown_abort(fit)
    layout = RunStore(tmp_path)
    assert checkpoint_epochs(layout) == [0, 1]
    assert layout.ffn_weights(0).is_file() and layout.ffn_weights(1).is_file()
    assert {"val/loss", "val/acc"} <= set(trainer.callback_metrics)
    full = torch.load(layout.checkpoints / "last.ckpt", map_location="cpu", weights_only=True)  # written once, atomically
    assert "optimizer_states" in full and not list(layout.checkpoints.glob(".*.tmp"))
    # the main process gets rank 0's trained weights back; they are the last checkpoint's
    assert state_equal(load_classifier(layout.checkpoint(1)), model.eval())
    assert not state_equal(load_classifier(layout.checkpoint(0)), model)
    assert torch.equal(load_ffn_weights(layout.ffn_weights(1))["W_bef"], last_ffn_head(model).fc_bef.weight)


# ------------------------------------------------------------------------------------ local pretrained folders
def test_local_pretrained_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved = tiny_hf_vit(seed=9)
    folder = tmp_path / "tiny-vit"
    saved.save_pretrained(str(folder))
    model = hf_vit(num_classes=10, pretrained_path=str(folder)).eval()
    pixels = images(5, seed=3)
    with torch.no_grad():
        assert torch.equal(model(pixels), saved(pixel_values=pixels).logits)
    # another class count: the encoder is loaded, the classifier re-initialised
    other = hf_vit(num_classes=4, pretrained_path=str(folder)).eval()
    assert other(pixels).shape == (5, 4)
    assert torch.equal(last_ffn_head(other).fc_bef.weight, last_ffn_head(saved).fc_bef.weight)
    # through the classifier, as configs/model/vit_b16_hf.yaml does
    from vitfl.lightning_modules.classifier import ImageClassifier

    clf = ImageClassifier(backbone="hf_vit", num_classes=10, backbone_kwargs={"pretrained_path": str(folder)}).eval()
    with torch.no_grad():
        assert torch.equal(clf(pixels), saved(pixel_values=pixels).logits)


def _save_lightning_checkpoint(module: L.LightningModule, path) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(str(path))


@pytest.mark.parametrize("backbone", ["hf_vit", "timm_vit"])
def test_checkpoint_of_a_pretrained_start_loads_without_its_folder(tmp_path, monkeypatch, backbone):
    """A model fine-tuned from local pretrained weights: its checkpoint rebuilds the architecture it recorded and
    reads nothing else, so it loads (equal logits) after the pretrained folder has moved away."""
    import shutil

    from safetensors.torch import save_file

    from vitfl.lightning_modules.classifier import ImageClassifier

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if backbone == "hf_vit":
        pre = tmp_path / "pre"
        tiny_hf_vit(seed=4).save_pretrained(str(pre))
        kwargs = {"pretrained_path": str(pre)}
    else:
        pre = tmp_path / "pre" / "w.safetensors"
        pre.parent.mkdir()
        src = tiny_classifier("timm_vit", seed=4).backbone
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(pre))
        kwargs = {**TIMM_KW, "pretrained_path": str(pre)}
    clf = ImageClassifier(backbone=backbone, num_classes=7, backbone_kwargs=kwargs).eval()
    arch = clf.hparams["backbone_arch"]
    assert "pretrained_path" not in arch and (backbone != "hf_vit" or arch["config"]["hidden_size"] == 16)
    with torch.no_grad():
        for p in clf.parameters():  # "fine-tuned": not the pretrained weights any more
            p.add_(0.01 * torch.randn_like(p))
    _save_lightning_checkpoint(clf, tmp_path / "e1.ckpt")
    shutil.rmtree(tmp_path / "pre")
    loaded = load_classifier(tmp_path / "e1.ckpt")
    pixels = images(3, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(pixels), clf(pixels))
    assert loaded.hparams["backbone_kwargs"]["pretrained_path"] == kwargs["pretrained_path"]  # provenance kept


def test_missing_pretrained_folder(tmp_path):
    with pytest.raises(PretrainedWeightsError, match=r"no Hugging Face model folder at .*config\.json"):
        hf_vit(num_classes=10, pretrained_path=str(tmp_path / "absent"))
    from vitfl.lightning_modules.backbones import timm_vit

    with pytest.raises(PretrainedWeightsError, match="no timm weights file"):
        timm_vit(num_classes=10, model_name="vit_tiny_patch16_224", pretrained_path=str(tmp_path / "absent.pth"),
                 img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2)
    assert issubclass(PretrainedWeightsError, FileNotFoundError)


def test_timm_local_weights_file(tmp_path):
    from safetensors.torch import save_file

    from vitfl.lightning_modules.backbones import timm_vit

    kw = {k: v for k, v in TIMM_KW.items() if k != "model_name"}
    src = tiny_classifier("timm_vit", seed=5).backbone
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = timm_vit(num_classes=10, model_name=TIMM_KW["model_name"], pretrained_path=str(path), **kw).eval()
    pixels = images(4, seed=8)
    with torch.no_grad():
        assert torch.equal(model(pixels), src(pixels))
