"""Issue 31, item 1: a case that cannot run is "not applicable" (recorded once in the run store's
not_applicable.json, counted and reported), never a failure.

configs/experiment/exp_fl_5_digits.yaml exited 1 because vdiff / vdiff_x_mean_act / ours_fl5 "failed" on
src_tgt_r3 of the epoch e-1 model ("needs at least 2 I_neg; got 1"): the checkpoint benchmark localizes on the
settings of the *earlier* model, whose rank-3 pair can have a single misclassified input, and reported the
V-score methods' refusal as a failure, which the experiment runner counted as a failed evaluate_fl step. The tiny
run here reproduces it: its epoch-0 model has src_tgt pairs of 3, 2 and 1 misclassified inputs.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import lightning
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64)
SETTINGS = ["src_tgt_r1", "src_tgt_r3"]  # 3 and 1 I_neg inputs on the epoch-0 model
EVAL = {"parts": ["checkpoint"], "methods": ["random", "vdiff"], "ckpt_settings": SETTINGS,
        "optimizers": ["recorded"], "figures": False, "batch_size": 64}


pytestmark = pytest.mark.usefixtures("one_thread")


def _save_ckpt(path: Path, module) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 0}, path)


def make_two_epoch_run(root: Path) -> Path:
    """Checkpoints and last-FFN weight files of epochs 0 and 1 and the repair states of both models; the epoch-0
    model misclassifies 3 inputs as one (true, pred) pair, 2 as another and 1 as a third (src_tgt_r1..r3)."""
    from vitfl.callbacks.ffn_weights import ffn_state
    from vitfl.core.io import atomic_write_json
    from vitfl.core.runstore import RunStore
    from vitfl.lightning_modules.classifier import ImageClassifier
    from vitfl.core.states import atomic_save_safetensors, save_states
    from vitfl.localization.ffn import capture_ffn_states, last_ffn_head, model_fingerprint
    from vitfl.localization.misclf import analyze

    store = RunStore(root)
    torch.manual_seed(0)
    m0 = ImageClassifier("hf_vit", 10, backbone_kwargs=TINY).eval()
    m1 = copy.deepcopy(m0)
    with torch.no_grad():  # "one epoch of training"
        for p in m1.parameters():
            p.add_(0.02 * torch.randn_like(p))
        last_ffn_head(m1).fc_aft.weight[:, :4].add_(0.5)
    images = torch.randn(60, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for epoch, m in ((0, m0), (1, m1)):
        _save_ckpt(store.checkpoint(epoch), m)
        atomic_save_safetensors(ffn_state(last_ffn_head(m)), store.ffn_weights(epoch), {"epoch": str(epoch)})
        with torch.no_grad(), capture_ffn_states(m) as st:
            logits = m(images)
        pred = logits.argmax(-1)
        label = pred.clone()
        if epoch == 0:  # pairs of 3, 2 and 1 misclassified inputs: true labels c+1, c+2, c+3 predicted as c
            c = int(pred.mode().values)
            rows = torch.nonzero(pred == c).view(-1).tolist()
            assert len(rows) >= 6, "the fixture model predicts its commonest label too rarely"
            for j, (lo, hi) in enumerate(((0, 3), (3, 5), (5, 6))):
                for i in rows[lo:hi]:
                    label[i] = (c + 1 + j) % 10
        else:
            label[::3] = (label[::3] + 1) % 10
        path = store.states("repair") if epoch == 1 else store.states("repair", "epoch=000")
        save_states(path, st["x"], st["a"], logits, label, torch.arange(60),
                    {"model_hash": model_fingerprint(m), "split": "repair", "backbone": "hf"})
        if epoch == 0:
            info0 = analyze(label, pred, torch.arange(60), 10)
            assert [info0["settings"][s]["n_neg"] for s in SETTINGS] == [3, 1], info0["settings"]
        else:
            info = analyze(label, pred, torch.arange(60), 10, ranks=1)
            info["model_hash"] = model_fingerprint(m1)
            atomic_write_json(store.misclf_info, info)
    return root


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    return make_two_epoch_run(tmp_path_factory.mktemp("na") / "run")


def test_checkpoint_benchmark_records_a_method_that_cannot_run_as_not_applicable(two_epoch_run):
    """Old behaviour: vdiff on src_tgt_r3 (1 I_neg) was an error row of checkpoint_benchmark.csv and a "failed"
    line, retried on every run."""
    from vitfl.core.runstore import RunStore
    from vitfl.pipeline.evaluate_fl import run_evaluation

    store = RunStore(two_epoch_run)
    logs: list[str] = []
    out = run_evaluation(RunStore(two_epoch_run), log=logs.append, **EVAL)
    ck = out["checkpoint"]
    assert (ck["error"] == "").all(), ck[ck["error"] != ""][["method", "setting", "error"]].to_string()
    assert not [m for m in logs if "failed" in m], logs
    fl = ck[~ck["control"]]
    assert {(m, s) for m, s in zip(fl["method"], fl["setting"])} == {
        ("random", "src_tgt_r1"), ("random", "src_tgt_r3"), ("vdiff", "src_tgt_r1")}
    na = {k: v for k, v in store.not_applicable().items() if k.startswith("fl_eval/checkpoint/")}
    assert len(na) == 1, na
    (key, why), = na.items()
    assert "/src_tgt_r3/vdiff-" in key and "needs at least 2" in why and "I_neg" in why
    assert len(out["not_applicable"]) == 1
    assert [m for m in logs if "not applicable (recorded, not retried)" in m]
    meta = (store.fl_eval_dir / "checkpoint_benchmark_meta.json").read_text()
    assert "src_tgt_r3" in meta and "not_applicable" in meta
    # the next run counts the known case without trying it again or printing it again
    logs.clear()
    out2 = run_evaluation(RunStore(two_epoch_run), log=logs.append, **EVAL)
    assert len(out2["not_applicable"]) == 1
    assert not [m for m in logs if "recorded, not retried" in m or "failed" in m], logs
    assert store.not_applicable() == {**store.not_applicable(), **na}


def test_experiment_counts_not_applicable_and_exits_zero(tmp_path, capsys):
    """exp_fl_5_digits.yaml's evaluate_fl step through scripts/run_experiment.py (``--only evaluate_fl``): exit 0,
    the case counted as not applicable and printed once. Old behaviour: "1 failed", exit status 1."""
    root = make_two_epoch_run(tmp_path / "run")
    over = tmp_path / "over.yaml"
    over.write_text(yaml.safe_dump({
        "datasets": {"digits": {"run_dir": str(root), "train": None}},
        "compat": [],  # the block below replaces the published one (method_options: the flags' name for method_opts)
        "evaluate_fl": {**EVAL, "ckpt_epoch": 1, "k_rounding": "floor",
                        "method_options": {"vdiff": {"vscore": "signed_mean"}}},
    }))
    sys.path.insert(0, str(REPO / "scripts"))
    from test_cli_steps import script

    run = script("run_experiment")
    argv = ["--config", str(REPO / "configs/experiment/exp_fl_5_digits.yaml"), "--config", str(over),
            "--only", "evaluate_fl", "--root", str(REPO)]
    assert run.main(argv) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("evaluate_fl [digits]"))
    assert "1 not applicable" in line and "failed" not in line, out
    assert out.count("not applicable (recorded, not retried)") == 1, out
    assert "/ 1 n/a" in out.splitlines()[-1] and "failed" not in out.splitlines()[-1]
    from vitfl.core.runstore import RunStore

    na = RunStore(root).not_applicable()
    assert any("src_tgt_r3" in k and "vdiff" in k for k in na), na
    report = (root / "report" / "report.md").read_text()
    assert "## Not applicable" in report and "src_tgt_r3" in report
    # rerun: nothing new, the known case still counted, not printed again
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("evaluate_fl [digits]"))
    assert "1 not applicable" in line and "recorded, not retried" not in out


def test_report_script_lists_the_not_applicable_cases(two_epoch_run, capsys):
    """scripts/report.py --run_dir RUN rebuilds the report after step-by-step work; the recorded cases are listed.
    Old behaviour: no such script (the report was written by run_experiment.py's final phase only)."""
    from vitfl.core.runstore import RunStore
    from vitfl.pipeline.evaluate_fl import run_evaluation
    from test_cli_steps import script

    run_evaluation(RunStore(two_epoch_run), log=lambda m: None, **EVAL)  # read back if the test above ran
    assert script("report").main(["--run_dir", str(two_epoch_run)]) == 0
    out = capsys.readouterr().out
    md = Path(two_epoch_run) / "report" / "report.md"
    assert f"report: {md}" in out and "warning" not in out, out
    text = md.read_text()
    assert "## Not applicable" in text and "src_tgt_r3" in text and "vdiff" in text
    assert (md.parent / "report.html").is_file()
