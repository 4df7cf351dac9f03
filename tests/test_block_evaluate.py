"""The FL evaluation on any block's FFN (``run_evaluation(..., block=L)``, ``evaluate_fl --block``).

* interventions through block 0's token head equal the full model's predictions with the same block-0 weights (or
  neurons) edited, in float64;
* the per-epoch weight file holds every block's FFN, and block L's checkpoint ground truth is |W_L(e2) - W_L(e1)|
  of the per-epoch checkpoints; a file of the format before per-block weights (last FFN only) still reads for the
  last block, and block L falls back to the epoch's checkpoint (or a clear error naming both files);
* an injected fault on block 0 changes the full model exactly as the head says;
* ``run_evaluation(..., block=0)`` on a tiny trained run writes ``fl_eval/block=0/`` beside the last block's outputs,
  a rerun recomputes nothing, and the last block's outputs are untouched.
"""
from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
import yaml

from conftest import HF_KW, _fit_tiny_run, images, tiny_classifier

pytestmark = pytest.mark.usefixtures("one_thread")

KW = {"enable_progress_bar": False}
DATA = {"class_path": "vitfl.datamodules.digits.DigitsDataModule",
        "init_args": {"batch_size": 32, "eval_batch_size": 128, "seed": 0}}


def _model64(seed: int = 0):
    return tiny_classifier("hf_vit", seed=seed).double().eval()


def _block0_states(model, imgs):
    from vitfl.localization.ffn import capture_ffn_states

    with torch.no_grad(), capture_ffn_states(model.backbone, block=0) as st:
        logits = model(imgs)
    return st["x"].clone(), logits


def _layer(model, block: int):
    from vitfl.localization.ffn import ffn_head

    h = ffn_head(model.backbone, block, tokens=True)
    return h.fc_bef, h.fc_aft


# ------------------------------------------------------------------------------------------------ interventions
@pytest.mark.parametrize("where", ["post", "pre"])
@pytest.mark.parametrize("mode", ["zero", "double"])
def test_interventions_on_block0_equal_the_full_model_with_the_same_edit(mode, where):
    from vitfl.evaluation.interventions import Target, edited_logits, intervention_records
    from vitfl.localization.ffn import TokenFFNHead, ffn_head

    model = _model64()
    imgs = images(12, seed=3, dtype=torch.float64)
    x, logits = _block0_states(model, imgs)
    head = ffn_head(model.backbone, 0)
    assert isinstance(head, TokenFFNHead) and x.dim() == 3
    f = 0.0 if mode == "zero" else 2.0
    # neurons: every token's neuron j edited == W_aft[:, j] scaled (after GELU) or W_bef[j], b_bef[j] (before)
    j = torch.tensor([1, 7, 30, 63])
    got = edited_logits(head, x, Target("neuron", neurons=j), mode, where)
    full = copy.deepcopy(model)
    fc_bef, fc_aft = _layer(full, 0)
    with torch.no_grad():
        if where == "post":
            fc_aft.weight[:, j] *= f
        else:
            fc_bef.weight[j] *= f
            fc_bef.bias[j] *= f
        want = full(imgs)
    assert not torch.allclose(want, logits)  # the edit matters
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    # weights: a copy of the head with the weights edited == the full model with those weights edited
    w = torch.tensor([[0, 3, 5], [0, 60, 15], [1, 2, 40], [1, 15, 0], [1, 9, 9]])
    got = edited_logits(head, x, Target("weight", weights=w), mode, where)
    full = copy.deepcopy(model)
    fc_bef, fc_aft = _layer(full, 0)
    with torch.no_grad():
        for m, r, c in w.tolist():
            lin = fc_bef if m == 0 else fc_aft
            lin.weight[r, c] *= f
        want = full(imgs)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    # the head itself is unchanged, and the per-input records see the full model's predictions
    torch.testing.assert_close(head(x), logits, atol=1e-10, rtol=0)
    label = logits.argmax(-1)
    import numpy as np

    rec = intervention_records(head, x, label, torch.arange(12), np.array(["rest"] * 12),
                               Target("weight", weights=w), mode, where)
    assert (rec["pred_after"].to_numpy() == want.argmax(-1).numpy()).all()
    with pytest.raises(ValueError, match=r"\[N, T, 16\]"):
        edited_logits(head, x[:, 0], Target("neuron", neurons=j), mode, where)


# ------------------------------------------------------------------------------------------------ injected faults
def test_injected_fault_on_block0_changes_the_full_model_as_the_head_says():
    from vitfl.evaluation.injected_faults import inject_faults, loss_gradient
    from vitfl.localization.ffn import ffn_head

    model = _model64(seed=1)
    imgs = images(40, seed=4, dtype=torch.float64)
    x, logits = _block0_states(model, imgs)
    head = ffn_head(model.backbone, 0)
    label = logits.argmax(-1)
    grad = loss_gradient(head, x, label)
    assert grad.shape == (head.index.total,) and bool((grad > 0).any())
    fault = inject_faults(head, x, label, seed=0, min_changed_frac=0.0, min_changed=3, grad=grad)
    assert fault.n_changed >= 3
    # the head is untouched; the fault's head differs from it exactly in the perturbed weights
    assert torch.equal(head.fc_bef.weight, _layer(model, 0)[0].weight)
    diff = torch.nonzero(head.index.join(fault.head.fc_bef.weight != head.fc_bef.weight,
                                         fault.head.fc_aft.weight != head.fc_aft.weight)).view(-1)
    assert sorted(diff.tolist()) == sorted(fault.weights.tolist())
    # the same perturbation in the full model's block 0
    full = copy.deepcopy(model)
    fc_bef, fc_aft = _layer(full, 0)
    with torch.no_grad():
        # (fault.values is float32; the float64 values are the fault head's)
        new = (fault.head.fc_bef.weight, fault.head.fc_aft.weight)
        for (m, r, c), v in zip(head.index.to_triples(fault.weights).tolist(), fault.values.tolist()):
            assert abs(float(new[m][r, c]) - v) < 1e-6 * max(1.0, abs(v))
            (fc_bef if m == 0 else fc_aft).weight[r, c] = new[m][r, c]
        assert torch.equal(fc_bef.weight, new[0]) and torch.equal(fc_aft.weight, new[1])
        after = full(imgs)
    torch.testing.assert_close(fault.head(x), after, atol=1e-10, rtol=0)
    assert torch.equal(fault.changed, after.argmax(-1) != logits.argmax(-1))


# ------------------------------------------------------------------------------------------------ a trained run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch tiny digits run (HF ViT, 2 blocks) with its run_config, the CLS and block-0 caches of the repair
    split, its settings and FL results of both blocks."""
    from vitfl.core.runstore import RunStore
    from vitfl.pipeline.cache import step_cache
    from vitfl.pipeline.localize import run_localization
    from vitfl.pipeline.misclf import step_misclf

    root = tmp_path_factory.mktemp("block_eval_run")
    _fit_tiny_run(root, "hf_vit", epochs=2)
    data = {**DATA, "init_args": {**DATA["init_args"], "folds_path": str(root / "folds.json")}}
    cfg = {"data": data, "model": {"backbone": "hf_vit", "num_classes": 10, "backbone_kwargs": dict(HF_KW)},
           "trainer": {"max_epochs": 2, "limit_train_batches": 2}}
    store = RunStore(root)
    store.run_config.write_text(yaml.safe_dump(cfg))
    step_cache(store, splits=("repair",), trainer_kwargs=KW)
    step_cache(store, splits=("repair",), trainer_kwargs=KW, block=0)
    step_misclf(store, ranks=1)
    for block in (-1, 0):
        rows = run_localization(store, ["grad_loss", "random"], ["all"], [6], progress=False, block=block)
        assert {r["status"] for r in rows} == {"done"}, rows
    return store


def test_weight_files_hold_every_block_and_block_ground_truth_is_the_checkpoints_change(run):
    from vitfl.callbacks.ffn_weights import block_key, load_ffn_weights as read_all
    from vitfl.evaluation.checkpoint_benchmark import load_ffn_weights, weight_change_ground_truth
    from vitfl.lightning_modules.runs import load_classifier
    from vitfl.localization.ffn import ffn_head, last_ffn_head
    from vitfl.core.states import read_metadata

    assert run.ffn_weight_epochs() == [0, 1, 2]
    for e in (0, 1, 2):
        tensors = read_all(run.ffn_weights(e), all_blocks=True)
        assert set(read_all(run.ffn_weights(e))) == {"W_bef", "b_bef", "W_aft", "b_aft"}  # the last FFN, as before
        assert {"W_bef", "b_bef", "W_aft", "b_aft", block_key(0, "W_bef"), "block=0.b_aft"} <= set(tensors)
        assert not any(k.startswith("block=1.") for k in tensors)  # the last block keeps its plain names
        assert read_metadata(run.ffn_weights(e))["num_blocks"] == "2"
        model = load_classifier(run.checkpoint(e))
        for b, head in ((0, ffn_head(model, 0)), (1, last_ffn_head(model))):
            w = load_ffn_weights(run.ffn_weights(e), b, 2)
            assert set(w) == {"W_bef", "b_bef", "W_aft", "b_aft"}
            assert torch.equal(w["W_bef"], head.fc_bef.weight) and torch.equal(w["b_aft"], head.fc_aft.bias)
        # the last block read as before (no block given): the plain names only
        assert set(load_ffn_weights(run.ffn_weights(e))) == {"W_bef", "b_bef", "W_aft", "b_aft"}
    gt = weight_change_ground_truth(load_ffn_weights(run.ffn_weights(1), 0, 2), load_ffn_weights(run.ffn_weights(2), 0, 2),
                                    2)
    h1, h2 = ffn_head(load_classifier(run.checkpoint(1)), 0), ffn_head(load_classifier(run.checkpoint(2)), 0)
    want = torch.cat([(h2.fc_bef.weight.double() - h1.fc_bef.weight.double()).abs().reshape(-1),
                      (h2.fc_aft.weight.double() - h1.fc_aft.weight.double()).abs().reshape(-1)])
    assert torch.equal(gt.scores, want) and bool(want.max() > 0)
    last = weight_change_ground_truth(load_ffn_weights(run.ffn_weights(1)), load_ffn_weights(run.ffn_weights(2)), 2)
    assert not torch.equal(last.scores, gt.scores)


def test_old_format_weight_file_reads_the_last_block_and_block_L_falls_back_to_the_checkpoint(run, tmp_path):
    from vitfl.callbacks.ffn_weights import MissingBlockError, ffn_state
    from vitfl.core.runstore import RunStore
    from vitfl.core.states import atomic_save_safetensors
    from vitfl.evaluation.checkpoint_benchmark import block_weights_of_epoch, load_ffn_weights
    from vitfl.lightning_modules.runs import load_classifier
    from vitfl.localization.ffn import ffn_head, last_ffn_head

    old = RunStore(tmp_path)
    model = load_classifier(run.checkpoint(1))
    atomic_save_safetensors(ffn_state(last_ffn_head(model)), old.ffn_weights(1), {"epoch": "1"})  # the old format
    w = load_ffn_weights(old.ffn_weights(1))
    assert torch.equal(w["W_aft"], last_ffn_head(model).fc_aft.weight)
    w_last, src = block_weights_of_epoch(old.ffn_weights(1), old.checkpoint(1), 1, 2)
    assert src == old.ffn_weights(1) and torch.equal(w_last["W_bef"], w["W_bef"])
    with pytest.raises(MissingBlockError, match=r"epoch=001\.safetensors holds no weights of block 0"):
        load_ffn_weights(old.ffn_weights(1), 0, 2)
    # no checkpoint either: a clear error naming both files and what to do
    with pytest.raises(FileNotFoundError, match=r"(?s)holds no weights of block 0.*checkpoints/epoch=001\.ckpt.*Retrain"):
        block_weights_of_epoch(old.ffn_weights(1), old.checkpoint(1), 0, 2)
    # with the epoch's checkpoint: block 0 read from it
    old.checkpoint(1).parent.mkdir(parents=True)
    old.checkpoint(1).write_bytes(run.checkpoint(1).read_bytes())
    sha = run.checkpoint(1).with_name("epoch=001.ckpt.sha256")
    if sha.is_file():
        old.checkpoint(1).with_name(sha.name).write_bytes(sha.read_bytes())
    w0, src = block_weights_of_epoch(old.ffn_weights(1), old.checkpoint(1), 0, 2)
    assert src == old.checkpoint(1)
    assert torch.equal(w0["W_bef"], ffn_head(model, 0).fc_bef.weight)
    assert torch.equal(w0["W_bef"], load_ffn_weights(run.ffn_weights(1), 0, 2)["W_bef"])


def test_optimizer_replay_follows_block0(run):
    """The SGD replay and the recorded optimizer's verification on block 0: the replay of the recorded optimizer
    reproduces block 0's recorded weights, and the SGD ground truth is |W_sgd,0(2) - W_0(1)| of block 0."""
    from vitfl.evaluation.checkpoint_benchmark import load_ffn_weights
    from vitfl.evaluation.optimizer_replay import ReplayMismatchError, optimizer_ground_truths, replay_fit
    from vitfl.lightning_modules.runs import datamodule_from_run, load_classifier, run_config
    from vitfl.localization.ffn import ffn_head

    cfg, dm = run_config(run), datamodule_from_run(run)
    load0 = lambda e: load_ffn_weights(run.ffn_weights(e), 0, 2)  # noqa: E731
    out = optimizer_ground_truths(cfg, dm, 2, checkpoint_path=run.checkpoint, ffn_weights_path=run.ffn_weights,
                                  block=0, load_weights=load0, train_grad=False, eval_split=None)
    assert max(out["replay"]["max_diff"].values()) <= 1e-6
    w_sgd, w1 = out["sgd"]["weights"], load0(1)
    want = torch.cat([(w_sgd[k].double() - w1[k].double()).abs().reshape(-1) for k in ("W_bef", "W_aft")])
    assert torch.equal(out["ground_truth_sgd"].scores, want)
    # the replayed model's block 0 is what the record holds (the whole model was trained; block 0 recorded)
    model = load_classifier(run.checkpoint(1))
    res = replay_fit(model, dm, 2, 2, start_epoch=1, optimizer="sgd", limit_train_batches=2, block=0)
    assert torch.equal(res.epoch(2).ffn["W_bef"], ffn_head(model, 0).fc_bef.weight)
    assert res.epoch(2).grad_sum.numel() == 2 * 16 * 64
    assert torch.equal(res.epoch(2).ffn["W_bef"], w_sgd["W_bef"])
    # the wrong block's recorded weights are refused
    with pytest.raises(ReplayMismatchError):
        optimizer_ground_truths(cfg, dm, 2, checkpoint_path=run.checkpoint, ffn_weights_path=run.ffn_weights,
                                block=0, load_weights=lambda e: load_ffn_weights(run.ffn_weights(e)),
                                train_grad=False, eval_split=None)
    with pytest.raises(ValueError, match="load_weights"):
        optimizer_ground_truths(cfg, dm, 2, checkpoint_path=run.checkpoint, ffn_weights_path=run.ffn_weights,
                                block=0)


def _snapshot(root):
    """sha256 of every file under fl_eval/ outside block folders."""
    ev = root / "fl_eval"
    return {p.relative_to(ev).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ev.rglob("*"))
            if p.is_file() and not p.relative_to(ev).as_posix().startswith("block=")}


EVAL = dict(methods=["random", "grad_loss"], inject_seeds=[0], n_random=1, ckpt_settings=["all"], batch_size=64,
            strengths=[3], optimizers=["recorded", "sgd"], comparisons=["corrected"], tensorboard=False,
            replay={"verify": False})


def test_run_evaluation_on_block0_writes_beside_the_last_block_and_resumes(run):
    from vitfl.core.io import read_json
    from vitfl.pipeline.evaluate_fl import eval_dir, run_evaluation
    from vitfl.pipeline.localize import fl_results
    from vitfl.localization.ffn import BlockIndexError

    last = run_evaluation(run, **EVAL)
    before = _snapshot(run.root)
    assert "checkpoint_benchmark.csv" in before and "injected_benchmark.csv" in before
    out = run_evaluation(run, block=0, **EVAL)
    ev = run.fl_eval_dir / "block=0"
    for name in ("interventions_summary.csv", "interventions_meta.json", "checkpoint_benchmark.csv",
                 "checkpoint_benchmark_meta.json", "injected_benchmark.csv", "headline.csv",
                 "figures/injected_R_at_k.png"):
        assert (ev / name).is_file(), name
    assert _snapshot(run.root) == before  # the last block's outputs are untouched
    # interventions: exactly the FL results made on block 0's head
    view0 = {"block": 0, "pooling": "token", "tokens": "all", "token_statistic": "readout"}
    keys = {r["key"]: (r["identity"]["scores"].get("head") or {}) for r in fl_results(run, None, ["all"])}
    res0 = {k.split("-", 1)[1] for k in out["interventions_summary"]["result"]}
    res_last = {k.split("-", 1)[1] for k in last["interventions_summary"]["result"]}
    assert res0 and res_last and not res0 & res_last
    assert all(keys[k] == view0 for k in res0) and all(keys[k] == {} for k in res_last)
    assert read_json(ev / "interventions_meta.json")["evaluated"] == 2
    # checkpoint benchmark: block 0's |W(2) - W(1)|, its FL on block 0's token cache of the epoch 1 model
    meta = read_json(ev / "checkpoint_benchmark_meta.json")
    assert meta["head"] == view0 and meta["epoch"] == 2
    assert meta["ground_truth"]["source"] == ["ffn_weights/epoch=001.safetensors", "ffn_weights/epoch=002.safetensors"]
    assert meta["fl_inputs"]["states"] == "states/repair.epoch=001.block=0.safetensors"
    assert meta["ground_truth"]["total"] == 2 * 16 * 64
    ck = out["checkpoint"]
    assert (ck["error"] == "").all() and (ck.loc[~ck["control"], "fl_block"] == 0).all()
    # the SGD replay of block 0 (its own key, beside the last block's replay)
    assert set(ck["optimizer"]) == {"adamw", "sgd_momentum"} and "error" not in (meta["replay"] or {"error": 1})
    (replay,) = (ev / "checkpoint/epoch=002").glob("replay-*.json")
    assert read_json(replay)["identity"]["block"] == 0
    (replay_last,) = run.fl_eval_dir.glob("checkpoint/epoch=002/replay-*.json")
    assert "block" not in read_json(replay_last)["identity"] and replay.name != replay_last.name
    assert "fl_block" not in last["checkpoint"].columns
    assert not json.dumps(read_json(run.fl_eval("checkpoint_benchmark_meta.json"))).count('"head"')
    inj = out["injected"]
    assert (inj["error"] == "").all() and (inj["n_changed"] >= 3).all()
    faults = [read_json(p) for p in (ev / "injected").rglob("fault.json")]
    assert faults and faults[0]["perturbed"] != read_json(next(run.fl_eval_dir.glob("injected/*/*/fault.json")))["perturbed"]
    # a rerun recomputes nothing
    probe = [p for p in ev.rglob("*") if p.is_file() and p.suffix in (".json", ".csv") and "interventions" in p.parts
             or p.parent.name == "seed=0" or p.parent.name == "all"]
    assert len(probe) >= 6
    mtimes = [p.stat().st_mtime_ns for p in probe]
    again = run_evaluation(run, block=0, figures=False, **EVAL)
    assert [p.stat().st_mtime_ns for p in probe] == mtimes
    assert sorted(again["checkpoint"]["P@1%"].tolist()) == sorted(out["checkpoint"]["P@1%"].tolist())
    assert _snapshot(run.root) == before
    # -1 and the last index are the last block: fl_eval/ itself
    from vitfl.pipeline.context import RunContext

    assert eval_dir(run, RunContext(run, None, 1).head) == run.fl_eval_dir
    assert eval_dir(run, RunContext(run, None, 0).head) == ev
    with pytest.raises(BlockIndexError, match="2 transformer blocks"):
        run_evaluation(run, block=5, **EVAL)


def test_misclassification_settings_do_not_depend_on_the_block(run):
    """The settings come from the model's predictions: block 0's token cache repeats the CLS cache's inputs, labels
    and predictions, so the one misclf_info.json names the same I_neg / I_pos for every block."""
    from vitfl.core.states import load_states
    from vitfl.localization.misclf import analyze
    from vitfl.pipeline.context import RunContext

    cls, tok = load_states(run.states("repair")), load_states(run.states("repair", block=0))
    assert torch.equal(cls.index, tok.index) and torch.equal(cls.label, tok.label)
    assert torch.equal(cls.pred, tok.pred)
    a = analyze(tok.label, tok.pred, tok.index, num_classes=10, ranks=1)
    assert a["settings"]["all"]["i_neg"] == RunContext(run, None, 0).setting("all")["i_neg"]


def test_the_weight_writer_takes_an_average_pooled_model(tmp_path):
    """An average-pooled ViT has no CLS head; the per-epoch weight writer (which runs at every fit start) takes its
    last block's token head: the plain names are the last block's FFN, ``block=L.*`` every other block's."""
    from vitfl.callbacks.ffn_weights import all_ffn_state, block_key
    from vitfl.localization.ffn import ffn_head

    model = tiny_classifier("timm_vit", global_pool="avg")
    state = all_ffn_state(model)
    last, first = ffn_head(model.backbone, -1), ffn_head(model.backbone, 0)
    assert last.block == 1 and last.identity()["pooling"] == "avg"
    assert torch.equal(state["W_bef"], last.fc_bef.weight) and torch.equal(state["b_aft"], last.fc_aft.bias)
    assert torch.equal(state[block_key(0, "W_aft")], first.fc_aft.weight)
    assert not torch.equal(state["W_aft"], state[block_key(0, "W_aft")])
