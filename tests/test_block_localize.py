"""FL on a chosen transformer block through the cache and localize steps (issue 32 item 2, cache + localize).

On a tiny trained digits run (HF ViT, 2 blocks): the cache step with ``block=0`` writes the token states entering
block 0's FFN in a file of its own; the localize step with ``block=0`` runs the methods on ``ffn_head(model, 0)``
and its identities record the head; ``block=-1`` (= the last block) is exactly the run before block addressing
(the CLS cache, the same identities, keys and files); an index out of range is an error naming the number of
blocks; a rerun finds its results, and another block never reuses them.
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
import yaml

from conftest import HF_KW, _fit_tiny_run
from vitfl.core.runstore import RunStore, identity_key
from vitfl.core.states import StaleCacheError, load_states

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = {"class_path": "vitfl.datamodules.digits.DigitsDataModule",
        "init_args": {"batch_size": 32, "eval_batch_size": 128, "seed": 0}}
KW = {"enable_progress_bar": False}
METHOD, SETTING, BUDGETS = "grad_loss", "all", [6]
#: what block 0's head adds to an FL identity (``TokenFFNHead.identity()``)
VIEW0 = {"block": 0, "pooling": "token", "tokens": "all", "token_statistic": "readout"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch tiny digits run with its run_config, the CLS cache of the repair split and its settings."""
    from vitfl.pipeline.cache import step_cache
    from vitfl.pipeline.misclf import step_misclf

    root = tmp_path_factory.mktemp("block_run")
    _fit_tiny_run(root, "hf_vit", epochs=1)
    data = {**DATA, "init_args": {**DATA["init_args"], "folds_path": str(root / "folds.json")}}
    cfg = {"data": data, "model": {"backbone": "hf_vit", "num_classes": 10, "backbone_kwargs": dict(HF_KW)}}
    store = RunStore(root)
    store.run_config.write_text(yaml.safe_dump(cfg))
    step_cache(store, splits=("repair",), trainer_kwargs=KW)
    step_misclf(store, ranks=1)
    return store


@pytest.fixture(scope="module")
def direct(run):
    """The repair split's states of block 0 captured from the full model (no cache, no step): x [N, T, d] by sample
    index, the model and its labels."""
    from vitfl.lightning_modules.runs import datamodule_from_run, load_run_model
    from vitfl.localization.ffn import capture_ffn_states

    model, _ = load_run_model(run)
    ds = datamodule_from_run(run).dataset("repair")
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad(), capture_ffn_states(model.backbone, block=0) as st:
        logits = model(images)
    return {"model": model, "x": st["x"].clone(), "a": st["a"].clone(), "logits": logits,
            "label": torch.tensor([ds[i][1] for i in range(len(ds))])}


@pytest.fixture(scope="module")
def block0(run):
    """The block-0 cache step and localize step, run once."""
    from vitfl.pipeline.cache import step_cache
    from vitfl.pipeline.localize import run_localization

    cached = step_cache(run, splits=("repair",), trainer_kwargs=KW, block=0)
    rows = run_localization(run, [METHOD], [SETTING], BUDGETS, progress=False, block=0)
    return cached, rows


def _records(store, block_view: dict | None):
    from vitfl.pipeline.localize import fl_results

    return [r for r in fl_results(store, [METHOD], [SETTING])
            if (r["identity"]["scores"].get("head") or None) == block_view]


def test_block0_cache_holds_the_token_states_of_the_full_model(run, direct, block0):
    cached, _ = block0
    assert cached == {"done": 1, "skipped": 0}
    path = run.states("repair", block=0)
    assert path != run.states("repair") and path.is_file() and run.states("repair").is_file()
    assert path.name == "repair.block=0.safetensors"
    st = load_states(path)
    assert st.x.shape == direct["x"].shape and st.x.dim() == 3  # [N, T, d]
    assert st.x.shape[1] == 17 and st.x.shape[2] == 16 and st.metadata["d_ff"] == "64"
    assert torch.allclose(st.x, direct["x"], atol=1e-6, rtol=0), float((st.x - direct["x"]).abs().max())
    # no activations stored (a [N, T, 4d] would be four times x): block 0's head recomputes them from x
    assert st.a is None and "a" not in safe_open(str(path), "pt").keys()
    from vitfl.localization.ffn import ffn_head

    with torch.no_grad():
        recomputed = ffn_head(direct["model"].backbone, 0).activation(st.x)
    assert torch.allclose(recomputed, direct["a"], atol=1e-5, rtol=0)
    assert torch.allclose(st.logits, direct["logits"], atol=1e-5, rtol=0)
    assert torch.equal(st.index, torch.arange(len(st))) and torch.equal(st.label, direct["label"])
    assert st.metadata["tokens"] == "17" and '"block":0' in st.metadata["state_identity"]
    # the CLS cache is the one it always was: [N, d], no state identity
    cls = load_states(run.states("repair"))
    assert cls.x.dim() == 2 and "state_identity" not in cls.metadata
    # a cache of another view is never read as this one
    with pytest.raises(StaleCacheError, match="block"):
        load_states(path, expected_states={})
    with pytest.raises(StaleCacheError, match="block"):
        load_states(run.states("repair"), expected_states={"block": 0, "pooling": "token", "tokens": "all"})
    # present and made by this model: skipped
    mtime = path.stat().st_mtime_ns
    from vitfl.pipeline.cache import step_cache

    assert step_cache(run, splits=("repair",), trainer_kwargs=KW, block=0) == {"done": 0, "skipped": 1}
    assert path.stat().st_mtime_ns == mtime


def test_block0_results_record_the_block_and_equal_the_head_computed_directly(run, direct, block0):
    from vitfl.localization.ffn import ffn_head
    from vitfl.localization.ranking import localize
    from vitfl.pipeline.context import RunContext
    from vitfl.pipeline.localize import fl_identity, load_fl_result

    _, rows = block0
    assert [r["status"] for r in rows] == ["done"], rows
    recs = _records(run, VIEW0)
    assert len(recs) == 1, [r["identity"] for r in _records(run, None)]
    rec = recs[0]
    ctx = RunContext(run, block=0)
    assert rec["identity"]["scores"] == fl_identity(ctx, METHOD, SETTING)
    assert rec["identity"]["scores"]["inputs"]["states"] == run.file_hash(run.states("repair", block=0))
    res = load_fl_result(run, rec)
    setting = ctx.setting(SETTING)
    neg, pos = list(setting["i_neg"]), list(setting["i_pos"])
    rows_ = torch.tensor(neg + pos)
    is_neg = torch.zeros(len(rows_), dtype=torch.bool)
    is_neg[: len(neg)] = True
    head = ffn_head(direct["model"].backbone, 0)
    want = localize(head, direct["x"][rows_], direct["label"][rows_], is_neg, METHOD, BUDGETS[0]).scores
    assert res.scores.shape == want.shape
    err = float((res.scores - want).abs().max() / want.abs().max())
    assert err <= 1e-6, err
    # and not the last block's scores
    last = _records(run, None)
    if last:
        assert not torch.allclose(load_fl_result(run, last[0]).scores, res.scores)


def test_last_block_is_the_run_before_block_addressing(run, block0):
    """block -1 (and its non-negative spelling, n - 1): no "head" key, the same identities, keys and files as the
    step without a block argument."""
    from vitfl.pipeline.context import RunContext
    from vitfl.pipeline.localize import fl_identity, run_localization

    rows = run_localization(run, [METHOD], [SETTING], BUDGETS, progress=False, block=-1)
    assert [r["status"] for r in rows] == ["done"], rows
    plain = fl_identity(RunContext(run), METHOD, SETTING)
    assert "head" not in plain and set(plain) == {"kind", "method", "options", "seed", "setting", "inputs"}
    assert plain["inputs"]["states"] == run.file_hash(run.states("repair"))
    recs = _records(run, None)
    assert len(recs) == 1 and recs[0]["identity"]["scores"] == plain
    assert rows[0]["scores_key"] == identity_key(plain) == recs[0]["scores_key"]
    files = sorted(p.relative_to(run.root).as_posix() for p in (run.root / "fl").rglob("*") if p.is_file())
    for again in (run_localization(run, [METHOD], [SETTING], BUDGETS, progress=False),
                  run_localization(run, [METHOD], [SETTING], BUDGETS, progress=False, block=1)):
        assert [r["status"] for r in again] == ["exists"], again
        assert again[0]["scores_key"] == rows[0]["scores_key"]
    assert fl_identity(RunContext(run, block=1), METHOD, SETTING) == plain
    assert sorted(p.relative_to(run.root).as_posix() for p in (run.root / "fl").rglob("*") if p.is_file()) == files


def test_rerun_finds_block0_and_another_block_does_not_reuse_it(run, block0):
    from vitfl.pipeline.context import RunContext
    from vitfl.pipeline.localize import current_fl_results, run_localization

    _, first = block0
    again = run_localization(run, [METHOD], [SETTING], BUDGETS, progress=False, block=0)
    assert [r["status"] for r in again] == ["exists"] and again[0]["scores_key"] == first[0]["scores_key"]
    assert run_localization(run, [METHOD], [SETTING], BUDGETS, progress=False, block=-2)[0]["status"] == "exists"
    other = run_localization(run, [METHOD], [SETTING], BUDGETS, progress=False, block=1)
    assert other[0]["scores_key"] != first[0]["scores_key"]
    assert other[0]["status"] in ("done", "exists")  # exists only when the last-block test ran first
    # readers of one head never see another head's results (nor call them stale)
    for block, view in ((0, VIEW0), (-1, None)):
        recs, counts = current_fl_results(RunContext(run, block=block), [METHOD], [SETTING])
        assert len(recs) == 1 and counts["stale"] == 0
        assert recs[0]["identity"]["scores"].get("head") == view


def test_a_block_out_of_range_names_the_number_of_blocks(run):
    from vitfl.localization.ffn import BlockIndexError
    from vitfl.pipeline.cache import step_cache
    from vitfl.pipeline.localize import run_localization

    for block in (2, -3, 7):
        with pytest.raises(BlockIndexError, match="the model has 2 transformer blocks"):
            run_localization(run, [METHOD], [SETTING], BUDGETS, progress=False, block=block)
        with pytest.raises(BlockIndexError, match="the model has 2 transformer blocks"):
            step_cache(run, splits=("repair",), trainer_kwargs=KW, block=block)
    with pytest.raises(TypeError, match="block must be an int"):
        run_localization(run, [METHOD], [SETTING], BUDGETS, progress=False, block="0")
    assert not (run.root / "states" / "repair.block=2.safetensors").exists()


def test_command_lines_take_block():
    from test_cli_steps import script

    assert script("localize").build_parser().parse_args(["--block", "0"]).block == 0
    assert script("localize").build_parser().parse_args([]).block == -1
    assert script("cache_states").build_parser().parse_args(["--block", "-2"]).block == -2



def test_experiment_config_takes_block(tmp_path, monkeypatch):
    """`block` in an experiment config's cache / localize blocks is checked as an int and reaches the steps (the
    cache step makes the CLS cache, which the misclassification analysis reads, and the block's token cache)."""
    from vitfl.pipeline import cache, experiment
    from vitfl.pipeline.experiment import ExperimentConfigError, check_experiment

    def cfg(block):
        return {"name": "x", "variant": "corrected", "datasets": {"d": {"run_dir": str(tmp_path)}},
                "steps": ["cache", "localize"], "cache": {"block": block}, "localize": {"methods": ["random"],
                                                                                        "block": block}}

    check_experiment(cfg(0))
    with pytest.raises(ExperimentConfigError, match="block"):
        check_experiment(cfg("0"))
    calls = []
    monkeypatch.setattr(cache, "step_cache", lambda store, splits, trainer_kwargs=None, block=-1:
                        calls.append(block) or {"done": 1, "skipped": 0})
    assert experiment._cache(RunStore(tmp_path), {"block": 0}) == {"done": 2, "skipped": 0}
    assert calls == [-1, 0]
    calls.clear()
    assert experiment._cache(RunStore(tmp_path), {}) == {"done": 1, "skipped": 0} and calls == [-1]


def test_readers_find_results_by_the_budget_as_the_user_spells_it(run, block0):
    """A record stores the size it selected (e.g. 66); a reader asked for the share that gave it ("0.5%", "0.50%")
    finds it (the FL evaluation's ``budgets`` filter matched nothing when given as a share)."""
    from vitfl.localization.ranking import ResolvedBudget
    from vitfl.pipeline.context import RunContext
    from vitfl.pipeline.localize import current_fl_results, run_localization

    ctx = RunContext(run, block=0)
    n = ResolvedBudget.resolve("0.5%", ctx.head.index.total).value
    run_localization(run, [METHOD], [SETTING], ["0.5%"], progress=False, block=0)
    for spelled in ("0.5%", "0.50%", n):
        recs, _ = current_fl_results(ctx, [METHOD], [SETTING], [spelled])
        assert [r["budget"] for r in recs] == [n], spelled
    assert current_fl_results(ctx, [METHOD], [SETTING], ["1%"])[0] == []
