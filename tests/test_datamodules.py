"""Data modules: tiny on-disk CIFAR-100 / Tiny-ImageNet in their real formats, malformed variants, folds, digits."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitfl.datamodules import (DATAMODULES, CIFAR100DataModule, DatasetFormatError, DigitsDataModule, FoldsFileError,
                         TinyImageNetDataModule, VisionDataModule, build_datamodule, kfold_split,
                         load_or_create_folds)
from vitfl.datamodules.base import SPLITS

# the tiny fake CIFAR has fewer images than classes: its train/val hold-out cannot be stratified (tested once below)
pytestmark = pytest.mark.filterwarnings("ignore:cannot stratify")

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"


# ------------------------------------------------------------------------------------------------ fixtures
def _write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_cifar(root: Path, n_train: int = 40, n_test: int = 15, seed: int = 0) -> Path:
    """ROOT/cifar-100-python/{train,test,meta} in the real pickle format (keys are bytes)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    _write_pickle(folder / "meta", {b"fine_label_names": [f"class{k:03d}".encode() for k in range(100)],
                                    b"coarse_label_names": [f"super{k}".encode() for k in range(20)]})
    for name, n in (("train", n_train), ("test", n_test)):
        _write_pickle(folder / name, {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{name} batch".encode(),
            b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
            b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        })
    return root


WNIDS = ["n02124075", "n01443537", "n01629819"]  # deliberately unsorted, as in the real wnids.txt
WORDS = {"n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander, Salamandra salamandra",
         "n02124075": "Egyptian cat"}


def _jpeg(path: Path, value: int) -> None:
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path, format="JPEG", quality=95)


def make_tiny(root: Path, n_train: int = 3, n_val_per_class: int = 2) -> Path:
    """ROOT/tiny-imagenet-200/ with 3 wnids, ``n_train`` 8x8 JPEGs each, and annotated val images."""
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (folder / "words.txt").write_text("n00001740\tentity\n" + "".join(f"{w}\t{t}\n" for w, t in WORDS.items()))
    for c, wnid in enumerate(WNIDS):
        d = folder / "train" / wnid / "images"
        d.mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(n_train):
            _jpeg(d / f"{wnid}_{i}.JPEG", 40 * c + 10 * i)
    (folder / "val" / "images").mkdir(parents=True)
    lines, k = [], 0
    for wnid in WNIDS:
        for _ in range(n_val_per_class):
            _jpeg(folder / "val" / "images" / f"val_{k}.JPEG", 200)
            lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t7\t7")
            k += 1
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def cifar_root(tmp_path):
    return make_cifar(tmp_path / "data")


@pytest.fixture
def tiny_root(tmp_path):
    return make_tiny(tmp_path / "data")


def _cifar(root, **kw) -> CIFAR100DataModule:
    kw = {"image_size": 32, "n_folds": 3, "batch_size": 4, **kw}
    return CIFAR100DataModule(root=str(root), **kw)


def _tiny(root, **kw) -> TinyImageNetDataModule:
    kw = {"image_size": 16, "n_folds": 3, "batch_size": 4, "val_fraction": 0.0, **kw}
    return TinyImageNetDataModule(root=str(root), **kw)


# ------------------------------------------------------------------------------------------------ CIFAR-100
def test_cifar_loads_real_format(cifar_root):
    dm = _cifar(cifar_root, val_fraction=0.25)
    assert dm.num_classes == 100 and dm.in_channels == 3 and dm.image_size == 32
    dm.prepare_data()
    with pytest.warns(UserWarning, match="cannot stratify"):  # 40 images over 100 classes
        dm.setup("fit")
    assert dm.class_names == [f"class{k:03d}" for k in range(100)]
    with open(cifar_root / "cifar-100-python" / "train", "rb") as f:
        train = pickle.load(f, encoding="bytes")
    with open(cifar_root / "cifar-100-python" / "test", "rb") as f:
        test = pickle.load(f, encoding="bytes")
    assert len(dm.dataset("train")) == 30 and len(dm.dataset("val")) == 10 and len(dm.dataset("eval")) == 15
    assert sorted(dm.indices("train").tolist() + dm.indices("val").tolist()) == list(range(40))
    # items: normalised CHW float image (the pickle's row is R plane, G plane, B plane), label, position in split
    val_idx = dm.indices("val")
    img, label, index = dm.dataset("val")[2]
    assert img.dtype == torch.float32 and img.shape == (3, 32, 32) and isinstance(label, int) and index == 2
    raw = train[b"data"][val_idx[2]].reshape(3, 32, 32).astype(np.float32) / 255
    np.testing.assert_allclose(img.numpy(), (raw - 0.5) / 0.5, atol=1e-6)
    assert label == train[b"fine_labels"][val_idx[2]]
    assert dm.labels("eval").tolist() == test[b"fine_labels"]
    assert [dm.dataset("eval")[k][1] for k in range(15)] == test[b"fine_labels"]


def test_cifar_resizes_and_batches(cifar_root):
    dm = _cifar(cifar_root, image_size=8, mean=[0.1, 0.2, 0.3], std=[1.0, 2.0, 3.0], eval_batch_size=5)
    x, y, i = next(iter(dm.test_dataloader()))
    assert x.shape == (5, 3, 8, 8) and y.dtype == torch.int64 and i.tolist() == [0, 1, 2, 3, 4]
    assert type(x) is torch.Tensor  # plain tensor, not a torchvision TVTensor
    assert len(dm.dataset("test")) == 5 and len(dm.dataset("repair")) == 10


def test_cifar_accepts_the_folder_itself_as_root(cifar_root):
    dm = _cifar(cifar_root / "cifar-100-python")
    assert dm.class_names[0] == "class000"


def _drop(path: Path):
    path.unlink()


def _rewrite(path: Path, fn):
    with open(path, "rb") as f:
        obj = pickle.load(f, encoding="bytes")
    _write_pickle(path, fn(obj))


CIFAR_BROKEN = {
    "missing_folder": ("", lambda f: shutil.rmtree(f)),
    "missing_meta": ("meta", _drop),
    "missing_train": ("train", _drop),
    "missing_test": ("test", _drop),
    "not_a_pickle": ("test", lambda p: p.write_bytes(b"this is not a pickle")),
    "meta_wrong_key": ("meta", lambda p: _rewrite(p, lambda o: {b"label_names": o[b"fine_label_names"]})),
    "meta_99_names": ("meta", lambda p: _rewrite(p, lambda o: {b"fine_label_names": o[b"fine_label_names"][:99]})),
    "train_no_fine_labels": ("train", lambda p: _rewrite(p, lambda o: {k: v for k, v in o.items()
                                                                       if k != b"fine_labels"})),
    "str_keys": ("train", lambda p: _rewrite(p, lambda o: {k.decode(): v for k, v in o.items()})),
    "label_out_of_range": ("test", lambda p: _rewrite(p, lambda o: {**o,
                                                                     b"fine_labels": [100] + o[b"fine_labels"][1:]})),
    "label_count": ("test", lambda p: _rewrite(p, lambda o: {**o, b"fine_labels": o[b"fine_labels"][:-1]})),
    "data_shape": ("train", lambda p: _rewrite(p, lambda o: {**o, b"data": o[b"data"][:, :1024]})),
}


@pytest.mark.parametrize("case", sorted(CIFAR_BROKEN))
def test_cifar_malformed_gives_one_clear_error(cifar_root, case):
    name, breaker = CIFAR_BROKEN[case]
    path = cifar_root / "cifar-100-python" / name if name else cifar_root / "cifar-100-python"
    breaker(path)
    for step in ("prepare_data", "setup"):
        dm = _cifar(cifar_root)
        with pytest.raises(DatasetFormatError) as e:
            getattr(dm, step)()
        msg = str(e.value)
        assert str(path) in msg and "expected" in msg
        assert "cs.toronto.edu/~kriz/cifar.html" in msg and str(cifar_root) in msg


def test_cifar_missing_root(tmp_path):
    with pytest.raises(DatasetFormatError, match="root"):
        CIFAR100DataModule(root=None, image_size=8).prepare_data()
    with pytest.raises(DatasetFormatError, match=str(tmp_path / "nowhere")):
        CIFAR100DataModule(root=str(tmp_path / "nowhere"), image_size=8).setup()


# ------------------------------------------------------------------------------------------------ Tiny-ImageNet
def test_tiny_loads_real_format(tiny_root):
    dm = _tiny(tiny_root)
    dm.prepare_data()
    dm.setup()
    assert dm.num_classes == 3 and dm.in_channels == 3
    assert dm.wnids == sorted(WNIDS)
    assert dm.class_names == ["goldfish", "European fire salamander", "Egyptian cat"]
    assert dm.class_descriptions[0] == "goldfish, Carassius auratus"
    assert len(dm.dataset("train")) == 9 and len(dm.dataset("val")) == 0 and len(dm.dataset("eval")) == 6
    # class k = k-th sorted wnid; val labels come from the annotations, in file order
    order = {w: k for k, w in enumerate(sorted(WNIDS))}
    assert dm.labels("eval").tolist() == [order[w] for w in WNIDS for _ in range(2)]
    assert dm.labels("train").tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    img, label, index = dm.dataset("train")[4]
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32 and label == 1 and index == 4
    # train/n01629819/images/n01629819_1.JPEG is a flat grey of 40*2+10 = 90 (WNIDS index 2)
    np.testing.assert_allclose(img.numpy(), (90 / 255 - 0.5) / 0.5, atol=0.03)
    x, y, i = next(iter(dm.predict_dataloader()))
    assert x.shape[1:] == (3, 16, 16) and i.tolist() == list(range(len(i)))


def test_tiny_val_fraction_and_grey_images(tiny_root):
    folder = tiny_root / "tiny-imagenet-200"
    Image.fromarray(np.full((8, 8), 7, dtype=np.uint8), mode="L").save(folder / "val/images/val_0.JPEG")
    dm = _tiny(tiny_root, val_fraction=1 / 3, n_folds=2)
    dm.setup()
    assert len(dm.dataset("val")) == 3 and len(dm.dataset("train")) == 6
    assert sorted(dm.labels("val").tolist()) == [0, 1, 2]  # stratified: one of each class
    assert dm.dataset("eval")[0][0].shape == (3, 16, 16)  # grey JPEG converted to RGB


def _tiny_folder(root: Path) -> Path:
    return root / "tiny-imagenet-200"


TINY_BROKEN = {
    "missing_folder": ("", lambda p: shutil.rmtree(p)),
    "missing_wnids": ("wnids.txt", _drop),
    "empty_wnids": ("wnids.txt", lambda p: p.write_text("\n")),
    "missing_words": ("words.txt", _drop),
    "words_lacks_a_wnid": ("words.txt", lambda p: p.write_text("n01443537\tgoldfish\n")),
    "missing_train": ("train", lambda p: shutil.rmtree(p)),
    "empty_class_folder": (f"train/{WNIDS[1]}/images",
                           lambda p: [f.unlink() for f in p.iterdir()]),
    "missing_class_folder": (f"train/{WNIDS[2]}/images", lambda p: shutil.rmtree(p.parent)),
    "extra_class_folder": ("train", lambda p: (p / "n09999999" / "images").mkdir(parents=True)),
    "missing_annotations": ("val/val_annotations.txt", _drop),
    "annotation_unknown_wnid": ("val/val_annotations.txt",
                                lambda p: p.write_text(p.read_text().replace(WNIDS[0], "n09999999", 1))),
    "annotation_not_tab_separated": ("val/val_annotations.txt",
                                     lambda p: p.write_text(p.read_text().replace("\t", " "))),
    "missing_val_image": ("val/images/val_3.JPEG", _drop),
}


@pytest.mark.parametrize("case", sorted(TINY_BROKEN))
def test_tiny_malformed_gives_one_clear_error(tiny_root, case):
    name, breaker = TINY_BROKEN[case]
    path = _tiny_folder(tiny_root) / name if name else _tiny_folder(tiny_root)
    breaker(path)
    for step in ("prepare_data", "setup"):
        dm = _tiny(tiny_root)
        with pytest.raises(DatasetFormatError) as e:
            getattr(dm, step)()
        msg = str(e.value)
        assert str(path) in msg and "expected" in msg
        assert "tiny-imagenet-200.zip" in msg


def test_tiny_validation_opens_no_image(tiny_root):
    """The checks only list folders: a corrupt JPEG passes them and fails only when that item is loaded, with an
    error naming the file (not PIL's bare traceback)."""
    bad = _tiny_folder(tiny_root) / "val" / "images" / "val_5.JPEG"
    bad.write_bytes(b"not a jpeg")
    dm = _tiny(tiny_root)
    dm.prepare_data()
    dm.setup()
    assert dm.dataset("eval")[0][0].shape == (3, 16, 16)
    from vitfl.datamodules.base import UnreadableImageError

    with pytest.raises(UnreadableImageError, match="val_5.JPEG") as e:
        dm.dataset("eval")[5]
    assert str(bad) in str(e.value) and "verify_images" in str(e.value)


# ------------------------------------------------------------------------------------------------ folds
def test_kfold_split_partitions_eval_and_matches_sklearn():
    from sklearn.model_selection import KFold

    n, k = 23, 5
    tests = []
    for fold in range(k):
        f = kfold_split(n, n_folds=k, fold_seed=777, fold_index=fold)
        assert not set(f.repair) & set(f.test)
        assert sorted(f.repair.tolist() + f.test.tolist()) == list(range(n))
        ref_repair, ref_test = list(KFold(k, shuffle=True, random_state=777).split(np.arange(n)))[fold]
        assert f.test.tolist() == sorted(ref_test) and f.repair.tolist() == sorted(ref_repair)
        tests += f.test.tolist()
    assert sorted(tests) == list(range(n))  # each sample is in exactly one test fold
    assert kfold_split(n, k, 1, 0).test.tolist() != kfold_split(n, k, 2, 0).test.tolist()


@pytest.mark.parametrize("bad", [dict(n_folds=1), dict(fold_index=5), dict(fold_index=-1), dict(eval_size=3)])
def test_kfold_split_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        kfold_split(**{"eval_size": 20, "n_folds": 5, "fold_seed": 0, "fold_index": 0, **bad})


def test_folds_are_disjoint_cover_eval_and_repeat_across_instances(cifar_root):
    a, b = _cifar(cifar_root, fold_index=1), _cifar(cifar_root, fold_index=1)
    ra, ta = a.indices("repair"), a.indices("test")
    assert not set(ra) & set(ta) and sorted(ra.tolist() + ta.tolist()) == list(range(len(a.dataset("eval"))))
    assert np.array_equal(ra, b.indices("repair")) and np.array_equal(ta, b.indices("test"))
    # the test split's items are the eval split's items at those positions, re-indexed 0..len-1
    for k in range(len(ta)):
        x, y, i = a.dataset("test")[k]
        xe, ye, _ = a.dataset("eval")[int(ta[k])]
        assert i == k and y == ye and torch.equal(x, xe)
    assert not np.array_equal(ta, _cifar(cifar_root, fold_index=2).indices("test"))


def test_folds_written_once_and_read_back(cifar_root, tmp_path, monkeypatch):
    path = tmp_path / "run" / "folds.json"
    dm = _cifar(cifar_root, folds_path=str(path), fold_seed=5)
    test_idx = dm.indices("test")
    obj = json.loads(path.read_text())
    assert (obj["n_folds"], obj["fold_seed"], obj["fold_index"], obj["eval_size"]) == (3, 5, 0, 15)
    assert obj["test"] == test_idx.tolist() and "provenance" in obj
    # read back, not recomputed: a stored (valid) partition wins over what KFold would give now
    obj["test"], obj["repair"] = [0, 1, 2, 3, 4], list(range(5, 15))
    from vitfl.core.io import atomic_write_json

    atomic_write_json(path, obj, checksum=True)  # a partition written by the toolkit (its hash recorded)
    import vitfl.datamodules.folds as folds_mod

    monkeypatch.setattr(folds_mod, "kfold_split", lambda *a, **k: pytest.fail("folds recomputed"))
    dm2 = _cifar(cifar_root, folds_path=str(path), fold_seed=5)
    assert dm2.indices("test").tolist() == [0, 1, 2, 3, 4]
    assert dm2.labels("test").tolist() == dm2.labels("eval")[:5].tolist()


@pytest.mark.parametrize("change", [dict(fold_index=1), dict(n_folds=5), dict(fold_seed=6)])
def test_folds_file_mismatch_is_a_clear_error(cifar_root, tmp_path, change):
    path = tmp_path / "folds.json"
    _cifar(cifar_root, folds_path=str(path), fold_seed=5).setup()
    with pytest.raises(FoldsFileError, match=str(path)):
        _cifar(cifar_root, folds_path=str(path), **{"fold_seed": 5, **change}).setup()


def test_folds_file_other_eval_set_or_corrupt(tmp_path):
    path = tmp_path / "folds.json"
    load_or_create_folds(path, 10, n_folds=2, eval_labels=[0, 1] * 5)
    assert load_or_create_folds(path, 10, n_folds=2, eval_labels=[0, 1] * 5).test.size == 5
    with pytest.raises(FoldsFileError, match="eval_size"):
        load_or_create_folds(path, 12, n_folds=2)
    with pytest.raises(FoldsFileError, match="another evaluation set"):
        load_or_create_folds(path, 10, n_folds=2, eval_labels=[1, 0] * 5)
    obj = json.loads(path.read_text())
    assert "content_sha256" in obj
    # a consistent edit (one input moved from the test fold to the repair fold) keeps the file valid: its content
    # hash catches it
    edited = {**obj, "repair": sorted(obj["repair"] + obj["test"][:1]), "test": obj["test"][1:]}
    path.write_text(json.dumps(edited))
    with pytest.raises(FoldsFileError, match="corrupt.*which inputs are repaired"):
        load_or_create_folds(path, 10, n_folds=2)
    # a file without a hash (an older run) is still checked for structure
    unhashed = {k: v for k, v in obj.items() if k != "content_sha256"}
    path.write_text(json.dumps({**unhashed, "test": obj["test"][:-1]}))
    with pytest.raises(FoldsFileError, match="disjoint"):
        load_or_create_folds(path, 10, n_folds=2)
    path.write_text("{not json")
    with pytest.raises(FoldsFileError, match=str(path)):
        load_or_create_folds(path, 10, n_folds=2)


# ------------------------------------------------------------------------------------------------ digits
@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(seed=0)
    dm.setup()
    return dm


def test_digits_splits_cover_disjoint_and_stratified(digits):
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, 8)
    assert digits.class_names == [str(d) for d in range(10)]
    parts = [digits.indices(s) for s in ("train", "val", "eval")]
    allidx = np.concatenate(parts)
    assert len(allidx) == 1797 and len(set(allidx.tolist())) == 1797
    assert [len(p) for p in parts] == [1077, 180, 540]
    from sklearn.datasets import load_digits

    y = load_digits().target
    overall = np.bincount(y, minlength=10) / len(y)
    for s, p in zip(("train", "val", "eval"), parts):
        np.testing.assert_array_equal(digits.labels(s), y[p])
        counts = np.bincount(y[p], minlength=10)
        assert np.all(np.abs(counts - overall * len(p)) <= 1.5), (s, counts)  # stratified


def test_digits_items_values_and_order(digits):
    from sklearn.datasets import load_digits

    images = load_digits().images
    idx = digits.indices("eval")
    x, y, i = digits.dataset("eval")[7]
    np.testing.assert_allclose(x[0].numpy(), (images[idx[7]] / 16 - 0.3053) / 0.3760, atol=1e-5)
    assert i == 7 and y == digits.labels("eval")[7]
    batches = list(digits.predict_dataloader())
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(len(digits.dataset("repair"))))
    assert torch.cat([b[1] for b in batches]).tolist() == digits.labels("repair").tolist()


def test_digits_deterministic_per_seed(digits):
    again = DigitsDataModule(seed=0)
    other = DigitsDataModule(seed=1)
    for s in SPLITS:
        assert np.array_equal(digits.indices(s), again.indices(s))
    assert not np.array_equal(digits.indices("train"), other.indices("train"))
    # the training shuffle is seeded too
    first = [next(iter(DigitsDataModule(seed=0, batch_size=16).train_dataloader()))[2] for _ in range(2)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], torch.arange(16))


def test_digits_resize_and_augment():
    dm = DigitsDataModule(seed=0, image_size=16, augment=True, batch_size=8)
    x, _, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 16, 16)
    a, b = dm.dataset("train", augment=True), dm.dataset("train")
    assert torch.equal(b[0][0], dm.dataset("train")[0][0])  # unaugmented view stays deterministic
    torch.manual_seed(0)
    assert any(not torch.equal(a[k][0], b[k][0]) for k in range(8))
    with pytest.raises(ValueError, match="train split only"):
        dm.dataset("eval", augment=True)


# ------------------------------------------------------------------------------------------------ API and configs
def test_registry_and_bad_arguments():
    assert set(DATAMODULES) == {"digits", "cifar100", "tiny_imagenet", "mnist_transfer"}
    assert isinstance(build_datamodule("digits", seed=3), DigitsDataModule)
    with pytest.raises(KeyError, match="registered: cifar100, digits, .*tiny_imagenet"):
        build_datamodule("mnist")
    for bad in (dict(predict_split="training"), dict(fold_index=5), dict(n_folds=1), dict(mean=[0.5, 0.5]),
                dict(std=[0.0]), dict(image_size=0), dict(train_fraction=0.95, val_fraction=0.1),
                dict(val_fraction=1.0), dict(batch_size=0)):
        with pytest.raises(ValueError):
            DigitsDataModule(**bad)
    with pytest.raises(ValueError, match="unknown split"):
        DigitsDataModule().dataset("validation")


def test_hyperparameters_saved():
    dm = CIFAR100DataModule(root="somewhere", image_size=64, val_fraction=0.2)
    assert dm.hparams["root"] == "somewhere" and dm.hparams["image_size"] == 64
    assert dm.hparams["val_fraction"] == 0.2 and dm.hparams["fold_seed"] == 777
    with_folds = CIFAR100DataModule(root="somewhere", folds_path="/abs/run/folds.json")
    assert "folds_path" not in with_folds.hparams  # a path inside the run, not a setting (a moved run stays valid)


@pytest.mark.parametrize("name", sorted(DATAMODULES))
def test_yaml_config_parses_like_lightning_cli(name):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(VisionDataModule, "data")
    cfg = parser.parse_path(str(CONFIGS / {"mnist_transfer": "mnist_finetune.yaml"}.get(name, f"{name}.yaml")))
    dm = parser.instantiate_classes(cfg).data
    assert type(dm) is DATAMODULES[name]
    assert dm.fold_seed == 777 and dm.n_folds == 5 and dm.predict_split == "repair"
