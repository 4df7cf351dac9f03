"""Shared fixtures: tiny ViTs of both backbones (random, every parameter perturbed so that no bias is zero and no
LayerNorm is the identity), tiny ImageClassifiers, and one tiny trained digits run per backbone (session-scoped,
shared by the tests that only read it)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

#: the tiny Hugging Face ViT of the tests: 8x8 grey images, patch 2 -> 16 tokens + CLS, d = 16, d_ff = 64
HF_KW = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64)
#: the same shape as a timm VisionTransformer (class-token pooling)
TIMM_KW = dict(model_name="vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2,
               num_heads=2, global_pool="token")
D, D_FF, C = 16, 64, 10


def pytest_collection_modifyitems(config, items):
    """The slow tests run one after another on one pytest-xdist worker (group "slow" under ``--dist loadgroup``):
    several of them time kills, start 2-process DDP runs or use every core themselves."""
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.xdist_group("slow"))


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Add seeded noise to every parameter in place (zero biases, unit LayerNorms and constant LayerScales would
    hide a forgotten term in a hand-written reference)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def tiny_hf_vit(seed: int = 0, num_labels: int = C, randomize: bool = True):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, num_labels=num_labels)
    model = ViTForImageClassification(cfg).eval()
    return randomize_(model, seed + 1) if randomize else model


def tiny_timm_vit(seed: int = 0, randomize: bool = True, **kw):
    import timm

    torch.manual_seed(seed)
    kw = {"global_pool": "token", **kw}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=C, img_size=8, patch_size=2,
                              in_chans=1, embed_dim=16, depth=2, num_heads=2, **kw).eval()
    return randomize_(model, seed + 1) if randomize else model


def tiny_classifier(backbone: str = "hf_vit", seed: int = 0, randomize: bool = True, **extra):
    from vitfl.lightning_modules.classifier import ImageClassifier

    torch.manual_seed(seed)
    kw = dict(HF_KW if backbone == "hf_vit" else TIMM_KW, **extra)
    model = ImageClassifier(backbone=backbone, num_classes=C, backbone_kwargs=kw)
    if randomize:
        randomize_(model, seed + 1)
    return model.eval()


def images(n: int = 6, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on 2 shared cores, OpenMP's spin-waiting threads made them up to 50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def make_hf_vit():
    return tiny_hf_vit


@pytest.fixture
def make_timm_vit():
    return tiny_timm_vit


@pytest.fixture
def make_classifier():
    return tiny_classifier


# --------------------------------------------------------------------------------------- a tiny trained run
def _fit_tiny_run(root: Path, backbone: str, epochs: int = 2, **extra) -> dict:
    import lightning as L

    from vitfl.callbacks.checkpoints import PerEpochCheckpoint
    from vitfl.callbacks.ffn_weights import LastFFNWeightsWriter
    from vitfl.datamodules import DigitsDataModule

    L.seed_everything(0, verbose=False)
    model = tiny_classifier(backbone, seed=0, randomize=False, **extra).train()
    initial = copy.deepcopy(model).eval()
    dm = DigitsDataModule(batch_size=32, eval_batch_size=128, folds_path=str(root / "folds.json"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=2, limit_val_batches=1,
                        default_root_dir=str(root), logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[PerEpochCheckpoint(), LastFFNWeightsWriter()])
    trainer.fit(model, datamodule=dm)
    return {"root": root, "backbone": backbone, "initial": initial, "final": model.eval(), "trainer": trainer,
            "datamodule": dm, "epochs": epochs}


@pytest.fixture(scope="session", params=["hf_vit", "timm_vit"])
def trained_run(request, tmp_path_factory):
    """A 2-epoch, 2-batches-per-epoch digits fit of a tiny ViT (timm with LayerScale) with per-epoch checkpoints and
    last-FFN weight files; dict with ``root``, ``initial`` / ``final`` models, ``trainer``, ``datamodule``."""
    extra = {"init_values": 0.1} if request.param == "timm_vit" else {}
    return _fit_tiny_run(tmp_path_factory.mktemp(f"run_{request.param}"), request.param, **extra)


def retry_spawn_teardown_abort(fn, tries: int = 2):
    """Run a Lightning ``ddp_spawn`` job, once more if a worker died by SIGABRT. Gloo's threads occasionally abort a
    spawned CPU worker at interpreter exit ("terminate called without an active exception", after the work is
    done); that is the library's teardown, not the code under test, and a rerun is independent. Any other failure,
    or the abort twice, still fails the test."""
    import torch.multiprocessing as mp

    for attempt in range(tries):
        try:
            return fn()
        except mp.ProcessExitedException as e:
            if "SIGABRT" not in str(e) or attempt == tries - 1:
                raise
