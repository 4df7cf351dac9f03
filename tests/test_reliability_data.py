"""Unreadable images and tampered data files (issue 15, part A).

A truncated JPEG in a Tiny-ImageNet class folder (the real layout) is named when a loader reaches it — also inside a
training epoch — instead of PIL's bare ``OSError``; ``verify_images`` lists *every* unreadable file at once;
``on_bad_image="skip"`` leaves them out and says which. A CIFAR-100 pickle whose payload would run code is refused
by the restricted unpickler before anything is called, while files in the real format (numpy 1 and 2 module names)
still load.
"""
from __future__ import annotations

import pickle
import re

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import HF_KW
from vitfl.datamodules import CIFAR100DataModule, DatasetFormatError, TinyImageNetDataModule
from vitfl.datamodules.base import UnreadableImageError
from vitfl.datamodules.cifar100 import CifarUnpickler
from test_datamodules import WNIDS, make_cifar, make_tiny


def _truncate_jpeg(path, keep: float = 0.5) -> None:
    """Overwrite ``path`` with a noisy 64x64 JPEG cut to ``keep`` of its bytes (a partial download / copy)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, format="JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def tiny_with_bad_files(tmp_path):
    root = make_tiny(tmp_path / "data", n_train=4)
    folder = root / "tiny-imagenet-200"
    bad = [folder / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_2.JPEG", folder / "val" / "images" / "val_4.JPEG"]
    _truncate_jpeg(bad[0])
    bad[1].write_bytes(b"not a jpeg at all")
    return root, bad


def _tiny(root, **kw) -> TinyImageNetDataModule:
    return TinyImageNetDataModule(root=str(root), **{"image_size": 8, "n_folds": 2, "batch_size": 4,
                                                     "val_fraction": 0.0, **kw})


def test_pil_itself_fails_on_the_truncated_file(tiny_with_bad_files):
    """The fixture really is unreadable (so the tests below can fail): PIL's own error names no file."""
    _, bad = tiny_with_bad_files
    with pytest.raises(OSError) as e:
        with Image.open(bad[0]) as im:
            im.convert("RGB")
    assert str(bad[0]) not in str(e.value)


def test_verify_lists_every_unreadable_file(tiny_with_bad_files):
    root, bad = tiny_with_bad_files
    dm = _tiny(root)
    found = dm.verify_data()
    assert sorted(b.where for b in found) == sorted(str(p) for p in bad)
    dm = _tiny(root, verify_images=True)
    with pytest.raises(DatasetFormatError) as e:
        dm.setup("fit")
    msg = str(e.value)
    assert "2 unreadable image(s)" in msg and all(str(p) in msg for p in bad) and "on_bad_image=skip" in msg
    # the check is opt-in: the default setup opens no image
    _tiny(root).setup("fit")


def test_clean_data_verifies(tmp_path):
    dm = _tiny(make_tiny(tmp_path / "data"), verify_images=True)
    dm.setup("fit")
    assert dm.verify_data() == [] and dm.skipped_images == []


@pytest.mark.parametrize("num_workers", [0, 1])  # 1: raised in a worker process, re-raised by the loader
def test_unreadable_image_inside_a_training_epoch_names_the_file(tiny_with_bad_files, tmp_path, num_workers):
    from vitfl.lightning_modules.classifier import ImageClassifier

    root, bad = tiny_with_bad_files
    dm = _tiny(root, folds_path=str(tmp_path / "folds.json"), num_workers=num_workers)
    model = ImageClassifier(backbone="hf_vit", num_classes=3, backbone_kwargs={**HF_KW, "num_channels": 3})
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    with pytest.raises(UnreadableImageError) as e:
        trainer.fit(model, datamodule=dm)
    assert str(bad[0]) in str(e.value) and "verify_images" in str(e.value)


def test_skip_leaves_the_unreadable_images_out_and_says_which(tiny_with_bad_files):
    root, bad = tiny_with_bad_files
    clean = _tiny(root)
    clean.setup()
    n_train, n_eval = len(clean.dataset("train")), len(clean.dataset("eval"))
    dm = _tiny(root, on_bad_image="skip")
    with pytest.warns(UserWarning, match=r"leaving out 2 unreadable image\(s\)") as w:
        dm.setup()
    assert all(str(p) in str(w[0].message) for p in bad)
    assert sorted(b.where for b in dm.skipped_images) == sorted(str(p) for p in bad)
    assert len(dm.dataset("train")) == n_train - 1 and len(dm.dataset("eval")) == n_eval - 1
    paths = [dm.dataset("train").source.paths[i] for i in dm.indices("train")]
    assert str(bad[0]) not in paths
    for split in ("train", "eval", "repair", "test"):  # every remaining item loads
        ds = dm.dataset(split)
        for k in range(len(ds)):
            assert ds[k][0].shape == (3, 8, 8)


# --------------------------------------------------------------------------------------------- CIFAR pickles
class _Payload:
    """Unpickling this runs ``exec``, which creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_cifar_pickle_payload_does_not_run(tmp_path):
    root = make_cifar(tmp_path / "data")
    train = root / "cifar-100-python" / "train"
    with open(train, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    marker = tmp_path / "marker"
    d[b"data"] = _Payload(marker)
    payload = pickle.dumps(d)
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))  # the payload is live: plain pickle runs it
    assert probe.exists()
    train.write_bytes(payload)
    dm = CIFAR100DataModule(root=str(root), image_size=32, n_folds=3, batch_size=4)
    with pytest.raises(DatasetFormatError) as e:
        dm.prepare_data()
    assert not marker.exists()
    assert str(train) in str(e.value) and "builtins.exec" in str(e.value) and "refusing" in str(e.value)


@pytest.mark.parametrize("module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_cifar_real_format_pickles_load(tmp_path, module):
    """The real files are (Python 2) pickles whose only globals are numpy 1's ``numpy.core.multiarray._reconstruct``,
    ``numpy.ndarray`` and ``numpy.dtype`` (text GLOBAL opcodes); numpy 2 writes ``numpy._core``: both load, with the
    same array. (Protocol 3 keeps the text GLOBAL opcodes and stores bytes without any helper global.)"""
    arr = np.random.default_rng(1).integers(0, 256, (5, 3072), dtype=np.uint8)
    obj = {b"data": arr, b"fine_labels": [1, 2, 3, 4, 5], b"filenames": [b"a.png"] * 5, b"batch_label": b"x"}
    raw = pickle.dumps(obj, protocol=3)
    raw = re.sub(rb"numpy\._?core\.multiarray\n", module.encode() + b"\n", raw)
    assert module.encode() + b"\n_reconstruct" in raw
    import io

    got = CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    assert np.array_equal(got[b"data"], arr) and got[b"fine_labels"] == [1, 2, 3, 4, 5]


def test_cifar_unpickler_refuses_other_globals():
    import io

    for obj in (torch.nn.Linear, np.random.default_rng, print):
        with pytest.raises(pickle.UnpicklingError, match="never holds"):
            CifarUnpickler(io.BytesIO(pickle.dumps(obj, protocol=3)), encoding="bytes").load()
