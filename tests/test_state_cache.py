"""The state-cache format (core/states.py) and its writer (callbacks/state_cache.py): round trip, order,
refusals with clear errors, shard merging, and a predict pass whose cached x reproduces the model's logits."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from vitfl.callbacks.state_cache import StateCacheWriter
from conftest import C, D, D_FF, images, rel_err, tiny_classifier
from vitfl.core.states import (FORMAT, CacheError, StaleCacheError, load_states, merge_shards, read_metadata,
                                save_states)
from vitfl.localization.ffn import last_ffn_head, model_fingerprint


def random_states(n: int, seed: int = 0, index=None):
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(n, generator=g) * 3 + 5 if index is None else torch.as_tensor(index)
    return {"x": torch.randn(n, D, generator=g), "a": torch.randn(n, D_FF, generator=g),
            "logits": torch.randn(n, C, generator=g), "label": torch.randint(0, C, (n,), generator=g),
            "index": index}


def test_round_trip_sorted_by_index(tmp_path):
    t = random_states(17, seed=1)
    path = tmp_path / "states" / "repair.safetensors"
    save_states(path, **t, metadata={"model_hash": "abc123", "split": "repair", "backbone": "hf"})
    assert path.is_file() and not list(path.parent.glob(".*tmp"))  # atomic: no temp file left
    st = load_states(path, expected_hash="abc123")
    order = torch.argsort(t["index"])
    assert torch.equal(st.index, t["index"][order]) and bool((st.index[1:] > st.index[:-1]).all())
    for k in ("x", "a", "logits", "label"):
        assert torch.equal(getattr(st, k), t[k][order]), k
    assert st.x.dtype == torch.float32 and st.label.dtype == torch.int64 and st.index.dtype == torch.int64
    assert len(st) == 17
    assert st.metadata["format"] == FORMAT and st.metadata["model_hash"] == "abc123"
    assert (st.metadata["n"], st.metadata["d"], st.metadata["d_ff"], st.metadata["num_classes"]) == (
        "17", str(D), str(D_FF), str(C))
    assert read_metadata(path)["split"] == "repair"
    # row lookup by sample index, and subsets by row
    want = t["index"][[4, 0, 9]]
    rows = st.rows_of(want)
    assert torch.equal(st.index[rows], want)
    sub = st.subset(rows)
    assert torch.equal(sub.x, t["x"][[4, 0, 9]]) and torch.equal(sub.pred, t["logits"][[4, 0, 9]].argmax(-1))
    with pytest.raises(CacheError, match="not in the cache"):
        st.rows_of(torch.tensor([4]))  # 4 is not of the form 3k + 5


def test_stale_hash_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    save_states(path, **random_states(4), metadata={"model_hash": "old"})
    load_states(path)  # no expectation: accepted
    load_states(path, expected_hash="old")
    with pytest.raises(StaleCacheError, match=r"'old'.*'new'"):
        load_states(path, expected_hash="new")
    assert issubclass(StaleCacheError, CacheError)


@pytest.mark.parametrize("key", ["x", "a", "logits"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_refused(tmp_path, key, bad):
    t = random_states(6, seed=2)
    t[key][3, 1] = bad
    path = tmp_path / "s.safetensors"
    save_states(path, **t, metadata={"model_hash": "h"})
    with pytest.raises(CacheError, match=rf"{path}.*'{key}'.*NaN or inf"):
        load_states(path)


def test_missing_and_corrupt_files(tmp_path):
    missing = tmp_path / "nope" / "repair.safetensors"
    with pytest.raises(CacheError, match=str(missing)):
        load_states(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00not json at all" * 3)
    with pytest.raises(CacheError, match=str(garbage)):
        load_states(garbage)
    # a valid file cut short
    good = tmp_path / "good.safetensors"
    save_states(good, **random_states(8), metadata={"model_hash": "h"})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CacheError, match=str(cut)):
        load_states(cut)


def test_foreign_safetensors_and_ragged_rows_refused(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CacheError, match="format"):
        load_states(other)
    t = random_states(5)
    t["label"] = t["label"][:4]
    with pytest.raises(CacheError, match="'label' has 4 rows"):
        save_states(tmp_path / "r.safetensors", **t, metadata={})


def test_merge_shards_drops_padding_duplicates(tmp_path):
    # a DistributedSampler over 7 samples on 2 ranks pads to 8: rank r gets indices r, r+2, ...; index 0 repeats
    full = random_states(7, seed=3, index=torch.arange(7))
    rank_idx = [torch.tensor([0, 2, 4, 6]), torch.tensor([1, 3, 5, 0])]
    shards = []
    for r, idx in enumerate(rank_idx):
        p = tmp_path / f"repair.rank{r}.safetensors"
        save_states(p, **{k: v[idx] for k, v in full.items()}, metadata={"model_hash": "h", "rank": str(r)})
        shards.append(p)
    out = tmp_path / "repair.safetensors"
    st = merge_shards(shards, out)
    assert torch.equal(st.index, torch.arange(7))
    for k in ("x", "a", "logits", "label"):
        assert torch.equal(getattr(st, k), full[k]), k
    assert st.metadata["n"] == "7" and "rank" not in st.metadata and st.metadata["model_hash"] == "h"
    assert not any(p.exists() for p in shards)
    assert torch.equal(load_states(out).x, full["x"])


def test_merge_shards_of_different_models_refused(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_states(a, **random_states(3, index=[0, 1, 2]), metadata={"model_hash": "h1"})
    save_states(b, **random_states(3, index=[3, 4, 5]), metadata={"model_hash": "h2"})
    with pytest.raises(CacheError, match="different models"):
        merge_shards([a, b], tmp_path / "m.safetensors")
    assert a.exists() and b.exists()


# ------------------------------------------------------------------------------ the writer in a predict pass
@pytest.mark.parametrize("backbone", ["hf_vit", "timm_vit"])
def test_state_cache_writer_reproduces_logits(tmp_path, backbone):
    extra = {"init_values": 0.1} if backbone == "timm_vit" else {}
    model = tiny_classifier(backbone, seed=21, **extra)
    n = 23
    pixels = images(n, seed=22)
    labels = torch.randint(0, C, (n,), generator=torch.Generator().manual_seed(0))
    index = torch.randperm(n, generator=torch.Generator().manual_seed(1)) + 100  # shuffled: the cache sorts
    loader = DataLoader(TensorDataset(pixels, labels, index), batch_size=5)
    path = tmp_path / "states" / "repair.safetensors"
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[StateCacheWriter("repair", path=str(path))])
    trainer.predict(model, dataloaders=loader, return_predictions=False)
    assert path.is_file() and not list(path.parent.glob("*.rank*"))
    st = load_states(path, expected_hash=model_fingerprint(model))
    assert st.metadata["split"] == "repair" and st.metadata["backbone"] == ("hf" if backbone == "hf_vit" else "timm")
    order = torch.argsort(index)
    assert torch.equal(st.index, index[order]) and torch.equal(st.label, labels[order])
    model.eval()
    with torch.no_grad():
        logits = model(pixels)[order]
        head_logits = last_ffn_head(model)(st.x)
    assert st.x.shape == (n, D) and st.a.shape == (n, D_FF)
    assert rel_err(st.logits, logits) <= 1e-5
    assert rel_err(head_logits, logits) <= 1e-5
    assert rel_err(last_ffn_head(model).activation(st.x), st.a) <= 1e-5
    raw = load_file(str(path))
    assert set(raw) == {"x", "a", "logits", "label", "index"}
