"""Repair on any block's FFN (issue: "repair on any block's FFN").

On tiny HF and timm ViTs (class-token pooling, LayerScale, and timm ``global_pool='avg'``) in float64:

* a :class:`Patch` made on ``ffn_head(model, 0)`` (a TokenFFNHead) changes the full model's logits exactly as the
  head says (head logits with the patch == the full model's logits with the patch applied to the model);
* every fitness evaluator (loop, full, sparse) on the token head equals a reference computed through the full model
  with each candidate's values written into block 0's fc1 / fc2 (random candidates touching both matrices, a W_aft
  weight on a touched neuron's column included);
* DE, prune and finetune run end to end on block 0 (the patch records the block, round-trips through JSON and
  refuses a head of another block); LP refuses a token head up front, naming the method, the block and why;
* the steps: cache(block=0) -> misclf -> localize(block=0) -> repair sweep(block=0) on a tiny digits run writes
  results whose identities hold the head, a rerun skips them, the last block's results keep the identities of the
  sweep before block addressing, ``collect_results`` has a ``block`` column, and the cross-validated repair
  caches the block's token states per fold.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from conftest import HF_KW, _fit_tiny_run, images, tiny_hf_vit, tiny_timm_vit
from vitfl.lightning_modules.repair.fitness import make_fitness, repair_fitness
from vitfl.lightning_modules.repair.patch import Patch, PatchMismatchError, RepairInputError
from vitfl.localization.ffn import TokenFFNHead, capture_ffn_states, ffn_head, last_ffn_head

pytestmark = pytest.mark.usefixtures("one_thread")

N = 8
LABEL = torch.tensor([0, 3, 2, 5, 1, 1, 2, 1])
IS_NEG = torch.arange(N) < 4
#: located weights of block 0 (d = 16, d_ff = 64): W_bef rows 3 and 7 (neurons), W_aft entries, one of them
#: on neuron 3's column (it sees the neuron's new activation), one on a column no W_bef weight touches
WEIGHTS = torch.tensor([[0, 3, 1], [0, 3, 5], [0, 7, 2], [1, 2, 3], [1, 4, 7], [1, 5, 10], [1, 4, 3]])
TOL = 1e-10

MODELS = {
    "hf": lambda: tiny_hf_vit(3),
    "timm_token_ls": lambda: tiny_timm_vit(4, init_values=0.1),
    "timm_avg": lambda: tiny_timm_vit(5, global_pool="avg"),
}


def logits_of(model, pixels):
    out = model(pixels)
    return out.logits if hasattr(out, "logits") else out


def block_fcs(model, block):
    if hasattr(model, "vit"):
        blk = model.vit.layers[block] if hasattr(model.vit, "layers") else model.vit.encoder.layer[block]
        return (blk.mlp.fc1, blk.mlp.fc2) if hasattr(blk, "mlp") else (blk.intermediate.dense, blk.output.dense)
    return model.blocks[block].mlp.fc1, model.blocks[block].mlp.fc2


def setup(name, block=0):
    model = MODELS[name]().double().eval()
    px = images(N, seed=1, dtype=torch.float64)
    with torch.no_grad(), capture_ffn_states(model, block=block) as st:
        model(px)
    return model, px, st["x"].clone(), ffn_head(model, block)


def candidates(head, p=5, seed=0):
    """Random candidate values [p, K] around the original values (large enough to change predictions)."""
    g = torch.Generator().manual_seed(seed)
    old = torch.stack([head.weights()[int(m)][int(r), int(c)].detach() for m, r, c in WEIGHTS.tolist()])
    return old + 2.0 * torch.randn(p, len(WEIGHTS), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_block0_patch_changes_the_full_model_exactly_as_the_head_says(name):
    model, px, x, head = setup(name)
    assert isinstance(head, TokenFFNHead) and head.block == 0 and x.dim() == 3
    new = candidates(head, 1)[0]
    patch = Patch.from_values(head, WEIGHTS, new)
    assert patch.block == 0 and patch.to_dict()["block"] == 0
    with torch.no_grad():
        before_head, before_model = head(x), logits_of(model, px)
        with patch.applied(head):
            head_patched = head(x)
        fc1, fc2 = block_fcs(model, 0)
        w1, w2 = fc1.weight.detach().clone(), fc2.weight.detach().clone()
        with patch.applied(model):  # the full model: through ffn_head(model, 0)
            assert fc1.weight[3, 1] == new[0] and fc2.weight[4, 3] == new[-1]
            model_patched = logits_of(model, px)
        assert torch.equal(fc1.weight, w1) and torch.equal(fc2.weight, w2)  # reverted
    assert float((before_head - before_model).abs().max()) <= TOL
    assert float((head_patched - before_head).abs().max()) > 1e-3  # the patch does change the logits
    assert float((head_patched - model_patched).abs().max()) <= TOL
    assert torch.equal(head_patched.argmax(-1), model_patched.argmax(-1))


@pytest.mark.parametrize("evaluator", ["loop", "full", "sparse"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_fitness_evaluator_on_a_token_head_equals_the_full_model(name, evaluator):
    model, px, x, head = setup(name)
    vals = candidates(head, 6, seed=2)
    ev = make_fitness(evaluator, head, WEIGHTS, x, LABEL, IS_NEG, alpha=3.0)
    work = copy.deepcopy(model)
    fc1, fc2 = block_fcs(work, 0)
    ref = []
    with torch.no_grad():
        for v in vals:
            for (m, r, c), val in zip(WEIGHTS.tolist(), v):
                (fc1 if m == 0 else fc2).weight[r, c] = val
            ref.append(logits_of(work, px))
    ref = torch.stack(ref)
    got = ev.logits(vals)
    assert got.shape == ref.shape == (6, N, 10)
    assert float((got - ref).abs().max()) <= TOL
    want = repair_fitness(ref, LABEL, IS_NEG, alpha=3.0)
    res = ev(vals)
    assert torch.allclose(res.fitness, want.fitness, rtol=0, atol=1e-9)
    assert torch.equal(res.n_patched, want.n_patched) and torch.equal(res.n_broken, want.n_broken)
    assert len(set(want.fitness.tolist())) > 1  # the candidates differ: a wrong evaluator could not pass
    info = ev.info()
    assert info["states"] == "tokens" and info["block"] == 0 and info["tokens"] == x.shape[1]
    if evaluator == "sparse":
        assert info["kernel"] == "explicit"  # the only exact kernel on token states, chosen automatically


def test_sparse_fitness_on_a_token_head_chunks_and_refuses_the_folded_kernel():
    model, px, x, head = setup("timm_token_ls")
    vals = candidates(head, 5, seed=3)
    whole = make_fitness("sparse", head, WEIGHTS, x, LABEL, IS_NEG).logits(vals)
    chunked = make_fitness("sparse", head, WEIGHTS, x, LABEL, IS_NEG, chunk_size=2)
    assert chunked.chunk_size == 2 and float((chunked.logits(vals) - whole).abs().max()) <= TOL
    with pytest.raises(RepairInputError, match="kernel='folded' is not exact on the FFN head of block 0"):
        make_fitness("sparse", head, WEIGHTS, x, LABEL, IS_NEG, kernel="folded")
    with pytest.raises(RepairInputError, match="token states"):
        make_fitness("sparse", head, WEIGHTS, x[:, 0], LABEL, IS_NEG)  # a CLS state is not what it takes
    # the last-block CLS head keeps its kernels and records no token view
    with torch.no_grad(), capture_ffn_states(model) as st:
        model(px)
    cls = make_fitness("sparse", last_ffn_head(model), WEIGHTS, st["x"], LABEL, IS_NEG)
    assert "states" not in cls.info() and cls.info()["kernel"] in ("explicit", "folded")


def _module(name, head, x, **kw):
    from vitfl.lightning_modules.repair import get_repair

    return get_repair(name)(head, WEIGHTS, x[IS_NEG], LABEL[IS_NEG], x[~IS_NEG], LABEL[~IS_NEG], seed=0, **kw)


def test_de_on_block0_end_to_end_and_its_patch_keeps_its_block():
    from vitfl.lightning_modules.repair.base import fit_repair

    model, px, x, head = setup("hf")
    module = _module("de", head, x, pop_size=6, generations=3)
    patch = fit_repair(module, enable_progress_bar=False)
    s = module.summary()
    assert s["fitness_patched"] >= s["fitness_original"] and s["fitness_evaluator"]["kernel"] == "explicit"
    assert patch.block == 0 and module.block == 0
    d = json.loads(json.dumps(patch.to_dict()))
    assert d["block"] == 0 and Patch.from_dict(d) == patch
    assert Patch.from_dict({k: v for k, v in d.items() if k != "block"}) != patch  # the block is part of it
    # the fitness it reports is the full model's with the patch applied
    with torch.no_grad(), patch.applied(model):
        full = logits_of(model, px)
    want = repair_fitness(full, LABEL, IS_NEG, alpha=10.0)
    assert s["fitness_patched"] == pytest.approx(float(want.fitness), abs=1e-9)
    # a patch of block 0 refuses the head of block 1, and a last-block patch refuses block 0's head
    with pytest.raises(PatchMismatchError, match="block 0.*block 1"):
        patch.apply(ffn_head(model, 1))
    cls_patch = Patch.from_values(last_ffn_head(model), WEIGHTS, torch.zeros(len(WEIGHTS)))
    assert cls_patch.block is None and "block" not in cls_patch.to_dict()
    assert list(cls_patch.to_dict()) == ["format", "n", "weights", "old", "new"]  # as before block addressing
    with pytest.raises(PatchMismatchError, match="last block"):
        cls_patch.apply(head)
    with pytest.raises(RepairInputError, match="repair 'de': kernel='folded' is not exact on the FFN head of block 0"):
        _module("de", head, x, kernel="folded")  # refused up front, before any Trainer starts
    # the last block's token head (tokens=True) is the last block: a block=None patch fits it
    cls_patch.apply(ffn_head(model, -1, tokens=True))
    cls_patch.revert(model)


def test_prune_and_finetune_run_on_block0_and_lp_refuses_it():
    from vitfl.lightning_modules.repair.base import fit_repair

    model, px, x, head = setup("timm_token_ls")
    for name, kw in (("prune", {}), ("finetune", {"epochs": 2})):
        module = _module(name, head, x, **kw)
        patch = fit_repair(module, enable_progress_bar=False)
        assert patch.block == 0
        s = module.summary()
        with torch.no_grad(), patch.applied(model):
            full = logits_of(model, px)
        assert s["fitness_patched"] == pytest.approx(float(repair_fitness(full, LABEL, IS_NEG).fitness), abs=1e-9)
        if name == "prune":
            assert s["fitness_patched"] >= s["fitness_original"]
    with pytest.raises(RepairInputError, match="repair 'lp' cannot run on the FFN head of block 0.*later blocks"):
        _module("lp", head, x)


# ------------------------------------------------------------------------------------------------ the steps
DATA = {"class_path": "vitfl.datamodules.digits.DigitsDataModule",
        "init_args": {"batch_size": 32, "eval_batch_size": 128, "seed": 0}}
KW = {"enable_progress_bar": False}
VIEW0 = {"block": 0, "pooling": "token", "tokens": "all", "token_statistic": "readout"}
DE = {"pop_size": 6, "generations": 2}
SWEEP = dict(methods=["random"], settings=["all"], budgets=[6], reps=1, repair_options=DE, progress=False,
             on_error="raise")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch tiny digits run (HF ViT, 2 blocks) with the CLS caches and block 0's token caches of the repair and
    test splits, its settings, and block 0's FL result."""
    from vitfl.core.runstore import RunStore
    from vitfl.pipeline.cache import step_cache
    from vitfl.pipeline.localize import run_localization
    from vitfl.pipeline.misclf import step_misclf

    root = tmp_path_factory.mktemp("block_repair_run")
    _fit_tiny_run(root, "hf_vit", epochs=1)
    data = {**DATA, "init_args": {**DATA["init_args"], "folds_path": str(root / "folds.json")}}
    cfg = {"data": data, "model": {"backbone": "hf_vit", "num_classes": 10, "backbone_kwargs": dict(HF_KW)}}
    store = RunStore(root)
    store.run_config.write_text(yaml.safe_dump(cfg))
    step_cache(store, splits=("repair", "test"), trainer_kwargs=KW)
    step_misclf(store, ranks=1)
    step_cache(store, splits=("repair", "test"), trainer_kwargs=KW, block=0)
    rows = run_localization(store, ["random"], ["all"], [6], progress=False, block=0)
    assert [r["status"] for r in rows] == ["done"], rows
    return store


def _repairs(store, head):
    return [r for r in store.list_results("repair_result") if (r["identity"].get("head") or None) == head]


def test_the_sweep_on_block0_records_the_head_and_a_rerun_skips_it(run):
    from vitfl.lightning_modules.repair.metrics import evaluate_patch
    from vitfl.localization.misclf import target_mask
    from vitfl.pipeline.context import RunContext
    from vitfl.pipeline.repair import run_sweep

    rows = run_sweep({"digits": run.root}, **SWEEP, block=0)
    assert [r["status"] for r in rows] == ["done"], rows
    recs = _repairs(run, VIEW0)
    assert len(recs) == 1
    rec = recs[0]
    assert rec["identity"]["head"] == VIEW0 and rec["identity"]["fl"]["scores"]["head"] == VIEW0
    assert rec["block"] == 0 and rec["patch"]["block"] == 0
    ctx = RunContext(run, block=0)
    assert rec["identity"]["inputs"]["test_states"] == run.file_hash(run.states("test", block=0))
    assert rec["identity"]["fl"]["scores"]["inputs"]["states"] == run.file_hash(run.states("repair", block=0))
    # the stored test metrics are the patch's on block 0's head over the test split's token states
    patch = Patch.from_dict(rec["patch"])
    test = ctx.states("test")
    setting = ctx.setting("all")
    m = evaluate_patch(ctx.head, patch, test.x, test.label, lambda y, p: target_mask(setting, y, p))
    assert m == rec["metrics"]["test"]
    again = run_sweep({"digits": run.root}, **SWEEP, block=0)
    assert [r["status"] for r in again] == ["exists"] and again[0]["key"] == rows[0]["key"]
    assert run_sweep({"digits": run.root}, **SWEEP, block=-2)[0]["status"] == "exists"  # -2 is block 0 of 2


def test_the_last_block_sweep_is_the_sweep_before_block_addressing(run):
    from vitfl.core.runstore import identity_key
    from vitfl.pipeline.context import RunContext
    from vitfl.pipeline.repair import build_grid, collect_results, run_sweep, summary_table, task_identity

    rows = run_sweep({"digits": run.root}, **SWEEP)
    assert [r["status"] for r in rows] == ["done"], rows
    recs = _repairs(run, None)
    assert len(recs) == 1
    ident = recs[0]["identity"]
    assert set(ident) == {"kind", "fl", "repair", "repair_options", "rep", "seed", "inputs"}  # no "head"
    assert "head" not in ident["fl"]["scores"] and "block" not in recs[0]["patch"]
    assert ident["inputs"]["test_states"] == run.file_hash(run.states("test"))
    ctx = RunContext(run)
    task = build_grid({"digits": run.root}, ["random"], ["all"], [6], 1, contexts={str(run.root): ctx})[0]
    assert task_identity(ctx, task, seed=0, repair_options=DE, fl_options=None) == ident
    assert rows[0]["key"] == identity_key(ident)
    # block 1 (= the last, spelled non-negatively) is the same run
    assert run_sweep({"digits": run.root}, **SWEEP, block=1)[0]["status"] == "exists"
    # collect_results: one row per block, neither stale (each checked against its own head's caches)
    run_sweep({"digits": run.root}, **SWEEP, block=0)
    df = collect_results({"digits": run.root})
    assert sorted(df["block"].tolist()) == [0, 1], df[["block", "key"]]
    assert df.attrs["provenance"]["stale"] == 0
    table = summary_table(df)
    assert "block" in table.columns and sorted(table["block"]) == ["0", "1"]  # never pooled across blocks


def test_aggregate_keeps_each_block_in_its_own_cells_and_figures(run, tmp_path):
    from vitfl.pipeline.repair import aggregate, run_sweep

    for block in (0, -1):
        assert run_sweep({"digits": run.root}, **SWEEP, block=block)[0]["status"] in ("done", "exists")
    agg = aggregate({"digits": run.root}, tmp_path / "summary")
    assert agg["n_runs"] == 2 and sorted(agg["table"]["block"]) == ["0", "1"]
    stems = {f["file"] for f in agg["manifest"]["figures"]}
    assert {"bar_digits_block0_de.png", "bar_digits_block1_de.png"} <= stems, stems
    assert agg["markdown"].lstrip().startswith("| dataset | block | repair |"), agg["markdown"][:200]


def test_a_record_without_a_block_reads_as_last():
    from vitfl.pipeline.repair import record_block

    assert record_block({"identity": {}, "patch": {"format": "vitfl-patch/1"}}) == "last"
    assert record_block({"identity": {"head": VIEW0}}) == 0
    assert record_block({"identity": {}, "patch": {"block": 3}}) == 3
    assert record_block({"block": 1, "identity": {}}) == 1


def test_a_block_out_of_range_or_not_an_int_is_refused_before_any_work(run):
    from vitfl.localization.ffn import BlockIndexError
    from vitfl.pipeline.repair import run_sweep

    with pytest.raises(BlockIndexError, match="the model has 2 transformer blocks"):
        run_sweep({"digits": run.root}, **SWEEP, block=2)
    with pytest.raises(TypeError, match="block must be an int"):
        run_sweep({"digits": run.root}, **SWEEP, block="0")


def test_crossval_on_block0_caches_the_block_per_fold(run):
    from vitfl.core.states import load_states
    from vitfl.pipeline.crossval import collect_crossval, prepare_folds, run_crossval

    folds = prepare_folds(run, trainer_kwargs=KW, block=0)
    ev = load_states(run.states("eval", block=0))
    for f in folds:
        for split in ("repair", "test"):
            tok, cls = load_states(f.states(split, block=0)), load_states(f.states(split))
            assert tok.x.dim() == 3 and torch.equal(tok.index, cls.index)
            assert torch.equal(tok.x, ev.x[ev.rows_of(tok.index)])
    rows = run_crossval(run, ["random"], ["all"], [6], 1, repair_options=DE, block=0,
                        trainer_kwargs=KW)
    assert rows and {r["status"] for r in rows} == {"done"}, [r["status"] for r in rows]
    df = collect_crossval(run)
    assert set(df["block"]) == {0}


def test_the_command_line_repairs_the_block_it_is_given(run, capsys):
    """scripts/repair_sweep.py --block 0 reaches the sweep: block 0's result (made above) is found, not remade;
    --block 5 is an error naming the number of blocks."""
    import importlib.util
    import sys

    from conftest import REPO
    from vitfl.localization.ffn import BlockIndexError
    from vitfl.pipeline.repair import run_sweep

    assert run_sweep({"digits": run.root}, **SWEEP, block=0)[0]["status"] in ("done", "exists")
    scripts = str(REPO / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    spec = importlib.util.spec_from_file_location("script_repair_sweep_block", REPO / "scripts" / "repair_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--run_dirs", f"digits={run.root}", "--methods", "random", "--settings", "all", "--budgets", "6",
            "--reps", "1", "--repair_options", "{pop_size: 6, generations: 2}", "--no_tensorboard",
            "--progress", "none"]
    assert mod.build_parser().parse_args(argv + ["--block", "0"]).block == 0
    assert mod.build_parser().parse_args(argv).block == -1
    assert mod.main(argv + ["--block", "0"]) == 0
    assert "0 done, 1 skipped" in capsys.readouterr().out
    with pytest.raises((BlockIndexError, SystemExit)) as e:
        mod.main(argv + ["--block", "5"])
    assert "2 transformer blocks" in str(e.value) + capsys.readouterr().err


def test_lp_on_a_token_head_is_not_applicable_and_repairability_is_per_block(run):
    """LP refuses a token head: the sweep records the case as not applicable (even with on_error="raise"), never as
    a failed run; with cross-validated results of two blocks, repairability@N is one headline per block (a pooled
    table over both blocks made the headline's per-method lookup ambiguous: a TypeError)."""
    from vitfl.pipeline.crossval import aggregate_crossval, run_crossval
    from vitfl.pipeline.repair import run_sweep

    rows = run_sweep({"digits": run.root}, **{**SWEEP, "repair_options": {"steps": 2}}, repair="lp", block=0)
    assert rows and all(r["status"].startswith("not applicable") and "block 0" in r["status"] for r in rows), rows
    assert not [r for r in run.list_results("repair_result") if r["identity"].get("repair") == "lp"]
    for block in (0, -1):
        run_crossval(run, ["random"], ["all"], [6], 1, repair="de", repair_options=DE, block=block,
                     trainer_kwargs=KW)
    lp = run_crossval(run, ["random"], ["all"], [6], 1, repair="lp", repair_options={"steps": 2}, block=-1,
                      trainer_kwargs=KW)
    assert {r["status"] for r in lp} == {"done"}, lp
    agg = aggregate_crossval(run)
    parts = agg["repairability_by_block"]
    assert [p.title for p in parts] == ["Repairability@N, block 0", "Repairability@N, block 1"]
    assert parts[0].table.empty and "no `lp` repair runs" in parts[0].sentence
    assert list(parts[1].table["fl_method"]) == ["random"] and agg["repairability"] is parts[1]
    md = run.path("repairability", ext="md").read_text()
    assert "block 0" in md and "block 1" in md


def test_an_average_pooled_run_goes_through_every_step(tmp_path):
    """A timm ViT with global_pool='avg' (no CLS head anywhere: its default head is the last block's token head)
    through training (the weight writer), cache, misclassification settings, FL, the repair sweep and the
    cross-validated repair: the fold caches are cut from the last block's token cache and hold token states (they
    were written under the CLS cache's name, so the fold repair found no cache of its block)."""
    from conftest import TIMM_KW
    from vitfl.core.runstore import RunStore
    from vitfl.core.states import load_states
    from vitfl.pipeline.cache import step_cache
    from vitfl.pipeline.crossval import prepare_folds, run_crossval
    from vitfl.pipeline.localize import run_localization
    from vitfl.pipeline.misclf import ensure_misclf
    from vitfl.pipeline.repair import run_sweep

    _fit_tiny_run(tmp_path, "timm_vit", epochs=1, global_pool="avg")
    data = {**DATA, "init_args": {**DATA["init_args"], "folds_path": str(tmp_path / "folds.json")}}
    cfg = {"data": data, "model": {"backbone": "timm_vit", "num_classes": 10,
                                   "backbone_kwargs": {**TIMM_KW, "global_pool": "avg"}}}
    store = RunStore(tmp_path)
    store.run_config.write_text(yaml.safe_dump(cfg))
    step_cache(store, splits=("repair", "test"), trainer_kwargs=KW)
    assert store.states("repair", block=1).is_file() and not store.states("repair").exists()
    assert ensure_misclf(store, ranks=1) == {"done": 1} and ensure_misclf(store, ranks=1) == {"skipped": 1}
    rows = run_localization(store, ["random"], ["all"], [6], progress=False)
    assert [r["status"] for r in rows] == ["done"], rows
    rows = run_sweep({"digits": store.root}, **SWEEP)
    assert [r["status"] for r in rows] == ["done"], rows
    view = {"block": 1, "pooling": "avg", "tokens": "all", "token_statistic": "readout"}
    assert [r["identity"]["head"] for r in store.list_results("repair_result")] == [view]
    folds = prepare_folds(store, trainer_kwargs=KW)
    for f in folds:
        assert load_states(f.states("repair", block=1)).x.dim() == 3 and not f.states("repair").exists()
    rows = run_crossval(store, ["random"], ["all"], [6], 1, repair_options=DE, trainer_kwargs=KW)
    assert rows and {r["status"] for r in rows} == {"done"}, [r["status"] for r in rows]


def test_a_last_block_result_made_before_records_named_their_block_joins_its_block(run, tmp_path):
    """A repair record without ``block`` (made before block addressing: the last block's CLS head) is the last
    block's in the results table (its index read from the run's model), so it pools with the new records of that
    block instead of forming a block of its own ("last" beside "1")."""
    import shutil

    from vitfl.core.io import read_json
    from vitfl.core.runstore import RunStore
    from vitfl.pipeline.repair import collect_results, run_sweep

    assert run_sweep({"digits": run.root}, **SWEEP, block=-1)[0]["status"] in ("done", "exists")
    root = tmp_path / "copy"
    shutil.copytree(run.root, root)
    store = RunStore(root)
    last = [r for r in store.list_results("repair_result") if not r["identity"].get("head")]
    assert last
    for r in last:  # as a record written before this change: no "block", a patch without one
        rec = {k: v for k, v in read_json(store.abs(r["path"])).items() if k not in ("block", "content_sha256")}
        store.write_json(store.abs(r["path"]), rec)
    assert all("block" not in r for r in store.list_results("repair_result") if not r["identity"].get("head"))
    df = collect_results({"digits": root})
    assert set(df["block"]) <= {0, 1} and 1 in set(df["block"]), set(df["block"])
