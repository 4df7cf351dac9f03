import copy
import json

import lightning
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vitfl.evaluation.checkpoint_benchmark import (CheckpointMismatchError, evaluate_method_on_checkpoint, head_at_epoch,
                                             load_ffn_weights, weight_change, weight_change_ground_truth)
from vitfl.evaluation.ranking_metrics import k_of_fraction
from vitfl.localization.base import FLResult
from vitfl.localization.ffn import last_ffn_head

TINY = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64)


def ffn_dict(head):
    return {"W_bef": head.fc_bef.weight.detach().clone(), "b_bef": head.fc_bef.bias.detach().clone(),
            "W_aft": head.fc_aft.weight.detach().clone(), "b_aft": head.fc_aft.bias.detach().clone()}


def test_ground_truth_is_top_percent_of_weight_change(tmp_path):
    g = torch.Generator().manual_seed(0)
    prev = {"W_bef": torch.randn(40, 10, generator=g), "b_bef": torch.zeros(40), "W_aft": torch.randn(10, 40,
                                                                                                      generator=g),
            "b_aft": torch.zeros(10)}
    nxt = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in prev.items()}
    save_file(prev, str(tmp_path / "a.safetensors"))
    prev2 = load_ffn_weights(tmp_path / "a.safetensors")
    s = weight_change(prev2, nxt)
    brute = np.abs(np.concatenate([(nxt["W_bef"] - prev["W_bef"]).numpy().ravel(),
                                   (nxt["W_aft"] - prev["W_aft"]).numpy().ravel()]))
    np.testing.assert_allclose(s.numpy(), brute, rtol=1e-6)
    gt = weight_change_ground_truth(prev2, nxt, epoch=5, pos_fraction=0.05)
    k = k_of_fraction(0.05, 800)
    assert gt.positives.sum() == k == 40 and gt.prev_epoch == 4
    assert set(torch.nonzero(gt.positives).view(-1).tolist()) == set(np.argsort(-brute, kind="stable")[:k].tolist())
    save_file({"W_bef": prev["W_bef"]}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="lacks"):
        load_ffn_weights(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        load_ffn_weights(tmp_path / "none.safetensors")
    with pytest.raises(CheckpointMismatchError, match="shape"):
        weight_change(prev, {**nxt, "W_bef": torch.zeros(3, 3)})


def _tiny_model(seed=0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**TINY, num_labels=10)).eval()


def test_head_at_epoch_loads_and_checks():
    model = _tiny_model()
    head = last_ffn_head(model)
    w = ffn_dict(head)
    w2 = {k: v + 1.0 for k, v in w.items()}
    h2 = head_at_epoch(head, w2)
    assert torch.equal(h2.fc_bef.weight, w2["W_bef"]) and torch.equal(h2.fc_aft.bias, w2["b_aft"])
    assert torch.equal(head.fc_bef.weight, w["W_bef"])  # original untouched
    head_at_epoch(head, w, check_tol=0.0)  # same weights pass the check
    with pytest.raises(CheckpointMismatchError, match="not the checkpoint"):
        head_at_epoch(head, w2, check_tol=1e-6)
    with pytest.raises(CheckpointMismatchError, match="shape"):
        head_at_epoch(head, {**w, "W_bef": torch.zeros(2, 2)})


def test_oracle_and_circularity_flag():
    model = _tiny_model()
    head = last_ffn_head(model)
    w0 = ffn_dict(head)
    g = torch.Generator().manual_seed(3)
    w1 = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in w0.items()}
    gt = weight_change_ground_truth(w0, w1, epoch=1)
    x = torch.randn(20, 16, generator=g)
    label = torch.randint(0, 10, (20,), generator=g)
    is_neg = torch.arange(20) < 6

    def oracle(h, x_, label_, is_neg_, method, budget, batch_size, seed):
        assert budget == int(gt.positives.sum()) and is_neg_.sum() == 6
        return FLResult(method, "weight", budget, gt.scores.clone(), torch.zeros(0, 3))

    row = evaluate_method_on_checkpoint(head, x, label, is_neg, "oracle", gt, {"split": "repair", "setting": "all"},
                                        localize_fn=oracle)
    assert row["P@1%"] == 1.0 and row["overlap@5%"] == 1.0 and row["AP"] == 1.0
    assert row["spearman"] == pytest.approx(1.0)
    assert row["circular"] is False and row["fl_split"] == "repair" and row["n_neg"] == 6
    row = evaluate_method_on_checkpoint(head, x, label, is_neg, "oracle", gt, {"split": "train"}, localize_fn=oracle)
    assert row["circular"] is True and "training split" in row["circularity_note"]
    with pytest.raises(ValueError, match="no I_neg"):
        evaluate_method_on_checkpoint(head, x, label, torch.zeros(20, dtype=torch.bool), "oracle", gt, {},
                                      localize_fn=oracle)


def _save_ckpt(path, module):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 0}, path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory as the pipeline leaves it: checkpoints of epochs 0 and 1, their last-FFN weights, the
    repair states of both models, misclf_info.json and two FL results."""
    pytest.importorskip("vitfl.localization.methods")
    from vitfl.callbacks.ffn_weights import ffn_state
    from vitfl.lightning_modules.classifier import ImageClassifier
    from vitfl.core.io import atomic_write_json
    from vitfl.core.runstore import RunStore as RunLayout
    from vitfl.core.states import atomic_save_safetensors, save_states
    from vitfl.localization.ffn import capture_ffn_states, model_fingerprint
    from vitfl.localization.misclf import analyze
    from vitfl.pipeline.localize import run_localization

    root = tmp_path_factory.mktemp("run")
    layout = RunLayout(root)
    torch.manual_seed(0)
    m0 = ImageClassifier("hf_vit", 10, backbone_kwargs=TINY).eval()
    m1 = copy.deepcopy(m0)
    with torch.no_grad():  # "one epoch of training": perturb the whole model a bit, the last FFN more
        for p in m1.parameters():
            p.add_(0.02 * torch.randn_like(p))
        h1 = last_ffn_head(m1)
        h1.fc_aft.weight[:, :4].add_(0.5)
    images = torch.randn(60, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for epoch, m in ((0, m0), (1, m1)):
        _save_ckpt(layout.checkpoint(epoch), m)
        atomic_save_safetensors(ffn_state(last_ffn_head(m)), layout.ffn_weights(epoch), {"epoch": str(epoch)})
        with torch.no_grad(), capture_ffn_states(m) as st:
            logits = m(images)
        label = logits.argmax(-1)
        label[::3] = (label[::3] + 1) % 10  # a third misclassified
        path = layout.states("repair") if epoch == 1 else layout.states("repair", "epoch=000")
        save_states(path, st["x"], st["a"], logits, label, torch.arange(60),
                    {"model_hash": model_fingerprint(m), "split": "repair", "backbone": "hf"})
    from vitfl.core.states import load_states

    states = load_states(layout.states("repair"))
    info = analyze(states.label, states.pred, states.index, 10, ranks=1)
    info["model_hash"] = model_fingerprint(m1)
    atomic_write_json(layout.misclf_info, info)
    kw = {"settings": ["all"], "progress": False, "trainer_kwargs": {"enable_progress_bar": False}}
    rows = run_localization(layout, ["grad_loss", "random"], budgets=[20], **kw)
    rows += run_localization(layout, ["vdiff"], budgets=[40], **kw)
    assert {r["status"] for r in rows} == {"done"}, rows
    return root


def test_run_evaluation_end_to_end_and_resumes(tiny_run, capsys):
    from vitfl.core.runstore import RunStore
    from vitfl.pipeline.evaluate_fl import run_evaluation

    layout = RunStore(tiny_run)
    out = run_evaluation(RunStore(tiny_run), methods=["random", "grad_loss", "vdiff"], inject_seeds=[0, 1], n_random=2,
                         ckpt_settings=["all"], batch_size=64)
    printed = capsys.readouterr().out
    assert "P@1%" in printed
    # a run without a training config cannot be replayed: said once, the recorded ground truth stands alone
    assert "no SGD ground truth for this run" in printed and "run_config.yaml" in printed
    ev = layout.fl_eval_dir
    for name in ("interventions_summary.csv", "checkpoint_benchmark.csv", "checkpoint_benchmark_meta.json",
                 "injected_benchmark.csv", "headline.csv", "headline.md", "stats/interventions_vs_random.md",
                 "stats/checkpoint_vs_random.tex", "stats/injected_vs_random.csv", "figures/injected_R_at_k.pdf",
                 "figures/checkpoint_P_at_k.png", "figures/interventions_all_n20.png", "figures/flips_all_n40.pdf"):
        assert (ev / name).is_file(), name
    per_input = [p for p in (ev / "interventions/all").glob("grad_loss_n20-*.csv") if p.name.count(".") == 1]
    assert len(per_input) == 1
    assert any((layout.tensorboard / "fl_eval").iterdir())
    ck = out["checkpoint"]
    assert (ck["error"] == "").all()
    fl = ck[~ck["control"]]
    assert set(fl["method"]) == {"random", "grad_loss", "vdiff"}
    # every method is compared under both comparisons (one FL run each), the control row under each as well
    assert sorted(fl.groupby("method")["comparison"].apply(sorted).iloc[0]) == ["corrected", "published_positional"]
    assert set(ck.loc[ck["control"], "method"]) == {"worst_possible"} and ck["control"].sum() == 2
    worst = ck[ck["control"]].set_index("comparison")["P@1%"]
    assert worst["corrected"] == 0.0 and worst["published_positional"] > 0.2  # the split alone earns hits
    assert (ck["optimizer"] == "adamw").all() and (ck["k_rounding"] == "round").all()
    assert (fl["epoch"] == 1).all() and (fl["fl_split"] == "repair").all() and not fl["circular"].any()
    meta = json.loads((ev / "checkpoint_benchmark_meta.json").read_text())
    assert meta["epoch_prev"] == 0 and meta["fl_inputs"]["states"].endswith("repair.epoch=000.safetensors")
    assert "run_config.yaml" in meta["replay"]["error"]
    inj = out["injected"]
    assert len(inj) == 12 and (inj["error"] == "").all() and (inj["n_changed"] >= 2).all()
    assert (inj.loc[inj["strength"] == "30", "n_changed"] >= 30).all()
    assert set(inj["strength"]) == {"30", "published"}
    summ = out["interventions_summary"]
    assert {r.split("-")[0] for r in summ["result"]} == {"grad_loss_n20", "random_n20", "vdiff_n40"}
    assert any(m.startswith("random@grad_loss_n20-") for m in summ["method"])
    head = out["headline"]
    # one block per ground truth x comparison and per strength, each with a verdict per method
    assert head["block"].nunique() == 4 and {"P@1%", "E[random]", "p_holm", "verdict"} <= set(head.columns)
    md = (ev / "headline.md").read_text()
    assert md.count("**Checkpoint benchmark") == 2 and md.count("**Injected faults**") == 2
    assert "comparison **published_positional**" in md and "strength 30" in md
    # resumable: a second call recomputes nothing (files keep their mtimes)
    probe = [*per_input,
             *(ev / "checkpoint/epoch=001/all").glob("grad_loss-*.json"),
             *(ev / "injected/strength=30/seed=1").glob("vdiff-*.json")]
    assert len(probe) == 4
    before = [p.stat().st_mtime_ns for p in probe]
    out2 = run_evaluation(RunStore(tiny_run), methods=["random", "grad_loss", "vdiff"], inject_seeds=[0, 1], n_random=2,
                          ckpt_settings=["all"], batch_size=64, figures=False)
    assert [p.stat().st_mtime_ns for p in probe] == before
    key = ["method", "comparison"]
    np.testing.assert_allclose(out2["checkpoint"].sort_values(key)["P@1%"], out["checkpoint"].sort_values(key)["P@1%"])
    with pytest.raises(ValueError, match="unknown FL methods"):
        run_evaluation(RunStore(tiny_run), methods=["nope"])
