"""The report step and the repair aggregation's honest uncertainty, on a synthetic run store: every link of the
report resolves, every table states split and n, targetless runs are counted, intervals match scipy."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from vitfl.core.runstore import RunStore

SETTINGS = {"src_tgt_r1": ("src_tgt", 1), "tgt_fp_r1": ("tgt_fp", 1), "tgt_fn_r2": ("tgt_fn", 2)}
METHODS = ("ours", "arachne_w", "random")
BUDGETS = ((236, 236), ("avg", 57))


def fake_run(root, seed: int = 0, reps: int = 3, targetless_every: int = 3, tb: bool = True, n_classes: int = 5):
    """A run store with synthetic repair results (some without a test target), DE fitness logged to TensorBoard
    the way ``run_task`` names it, an FL timing log, a checkpoint benchmark, an FL headline and a test cache."""
    store = RunStore(root)
    rng = np.random.default_rng(seed)
    recs = []
    for i, ((setting, (kind, rank)), m, (b, n), rep) in enumerate(
            itertools.product(SETTINGS.items(), METHODS, BUDGETS, range(reps))):
        def split_metrics(no_target):
            n_t = 0 if no_target else int(rng.integers(1, 6))
            n_f = int(rng.integers(0, n_t + 1))
            n_c = int(rng.integers(80, 100))
            n_b = int(rng.integers(0, 6))
            n_all = n_c + 8
            return {"rr": n_f / n_t if n_t else None, "br": n_b / n_c, "acc_before": n_c / n_all,
                    "acc_after": (n_c - n_b + n_f) / n_all, "delta_acc": (n_f - n_b) / n_all, "n_targets": n_t,
                    "n_fixed": n_f, "n_correct_before": n_c, "n_broken": n_b, "n": n_all}
        identity = {"kind": "repair", "setting": setting, "method": m, "budget": n, "rep": rep,
                    "repair_options": {"generations": 5}}
        fo = float(rng.uniform(50, 60))
        rec = {"kind": "repair_result", "dataset": root.name, "run_dir": ".", "setting": setting, "method": m,
               "budget": b, "rep": rep, "repair": "de", "label": m, "n_weights": n, "budget_n": n, "seed": rep,
               "setting_info": {"kind": kind, "rank": rank},
               "metrics": {"test": split_metrics(i % targetless_every == 0), "repair": split_metrics(False)},
               "fitness": {"n_patched": 1, "n_broken": 0, "fitness_original": fo, "fitness_patched": fo * 1.1,
                           "generations_run": 5, "early_stopped": False},
               "timings": {"fl_s": 0.1, "repair_s": float(rng.uniform(1, 3)), "total_s": 3.0}, "patch": {}}
        path = store.repair_result_path(identity, setting=setting, label=m, budget=n, rep=rep)
        r = store.write_result(path, identity, rec)
        recs.append(r)
        if tb:
            from torch.utils.tensorboard import SummaryWriter

            from vitfl.pipeline.repair import _tb_run_dir

            w = SummaryWriter(str(_tb_run_dir(store, {"setting": setting, "label": m, "budget_n": n, "rep": rep,
                                                      "key": r["key"]})))
            best = fo
            for step in range(5):
                best += float(rng.uniform(0, 1))
                w.add_scalar("repair/best_fitness", best, step)
                w.add_scalar("repair/mean_fitness", best - 1, step)
            w.close()
    for m in ("ours", "arachne_w", "random", "grad_loss"):
        for s in SETTINGS:
            store.append_row(store.fl_timing, {"method": m, "setting": s, "wall_s": float(rng.uniform(0.01, 2)),
                                               "peak_mb": 1.0})
    from vitfl.evaluation.headline import benchmark_block, blocks_markdown

    rows = []
    for m in ("ours", "arachne_w", "random"):
        for s in SETTINGS:
            hits = int(rng.integers(0, 4))
            rows.append({"method": m, "setting": s, "optimizer": "adamw", "comparison": "corrected", "total": 1000,
                         "n_pos": 10, "K@1%": 10, "hits@1%": hits, "P@1%": hits / 10, "rand_P@1%": 0.01,
                         "R@1%": hits / 10, "AP": 0.1, "rand_AP": 0.01, "error": "", "control": False})
    bench = pd.DataFrame(rows)
    store.write_text(store.fl_eval("checkpoint_benchmark.csv"), bench.to_csv(index=False))
    store.write_json(store.fl_eval("checkpoint_benchmark_meta.json"),
                     {"epoch": 2, "epoch_prev": 1, "recorded_optimizer": "adamw",
                      "fl_inputs": {"split": "repair", "n": 108, "settings": list(SETTINGS)}})
    block = benchmark_block(bench, "Checkpoint benchmark", "synthetic ground truth", "P@1%", "settings",
                            split="FL inputs: the repair split's settings")
    store.write_text(store.fl_eval("headline.md"), blocks_markdown([block]))
    from vitfl.core.states import save_states

    n = 60
    label = torch.as_tensor(rng.integers(0, n_classes, n))
    logits = torch.randn(n, n_classes, generator=torch.Generator().manual_seed(seed))
    logits[torch.arange(n), label] += 1.5
    save_states(store.states("test"), torch.zeros(n, 4), torch.zeros(n, 8), logits, label, torch.arange(n),
                {"model_hash": "x"})
    return store, recs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One synthetic run, aggregated once (figures cost ~1 s each on a loaded machine)."""
    from vitfl.pipeline.repair import aggregate

    store, recs = fake_run(tmp_path_factory.mktemp("report") / "digits", reps=2)
    agg = aggregate({"digits": store.root})
    return store, recs, agg


def test_summary_rates_are_pooled_wilson_and_targetless_runs_are_counted(run):
    from vitfl.pipeline.repair import collect_results

    store, recs, agg = run
    df = collect_results({"digits": store.root})
    t = agg["table"]
    assert len(df) == len(recs)
    for r in t.to_dict("records"):
        sub = df[(df.fl_method == r["fl_method"]) & (df.budget == r["budget"])]
        k, n = int(sub.n_fixed.sum()), int(sub.n_targets.sum())
        assert r["n_test_targets"] == n and r["runs_without_target"] == int((sub.n_targets == 0).sum())
        ci = sps.binomtest(k, n).proportion_ci(method="wilson")
        assert r["rr_pooled"] == pytest.approx(k / n)
        assert (r["rr_lo"], r["rr_hi"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
        assert 0 <= r["rr_lo"] <= r["rr_hi"] <= 1 and 0 <= r["br_lo"] <= r["br_hi"] <= 1
        kb, nb = int(sub.n_broken.sum()), int(sub.n_correct_before.sum())
        assert r["br_pooled"] == pytest.approx(kb / nb)
        assert r["delta_acc_lo"] <= r["delta_acc_mean"] <= r["delta_acc_hi"]
        assert r["rr_mean"] == pytest.approx(sub.rr.dropna().mean())
    k_none = int((df.n_targets == 0).sum())
    assert k_none > 0
    md = (store.repair_summary_dir / "summary.md").read_text()
    assert f"{k_none} of {len(df)} runs had no target in the test fold" in md
    # per-kind pooling over ranks and repetitions, as the published tables
    bk = agg["by_kind"]
    assert set(bk["kind"]) == {"src_tgt", "tgt_fp", "tgt_fn"}
    assert bk["n_runs"].sum() == len(df)


def test_a_cell_without_targets_is_na_never_zero(tmp_path):
    from vitfl.pipeline.repair import aggregate

    store, recs = fake_run(tmp_path / "d", targetless_every=1, tb=False, reps=1)  # no run has a test target
    agg = aggregate({"d": store.root})
    assert agg["table"]["rr_pooled"].isna().all() and agg["table"]["rr_lo"].isna().all()
    md = (store.repair_summary_dir / "summary.md").read_text()
    lines = [l for l in md.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    col = next(i for i, c in enumerate(header) if c.startswith("RR (test fold, n = 0 targets"))
    cells = [[c.strip() for c in l.strip("|").split("|")][col] for l in lines[2:]]
    assert cells and all(c == "n/a (0 targets)" for c in cells)
    assert f"{len(recs)} of {len(recs)} runs had no target" in md


def test_report_links_resolve_and_tables_state_split_and_n(run):
    from vitfl.pipeline.report import check_report, report_links, write_report
    store, _, _ = run
    md_path = write_report(store, {"experiment": "synthetic", "reps": 3})
    assert md_path == store.path("report", name="report.md") and md_path.is_file()
    assert check_report(md_path) == []
    links = report_links(md_path)
    text = md_path.read_text()
    for must in ("summary.md", "bar_digits_de.png", "fitness_digits_de.png", "rr_in_vs_held_digits_de.png",
                 "by_kind_digits_de.png", "time_vs_rr_digits_de.png", "fl_cost_vs_quality.png",
                 "confusion_test.png", "headline.md"):
        assert any(l.endswith(must) for l in links), must
    # the report opens with the headline (before the config), and its sentence says what the benchmark separates
    assert text.index("## Headline") < text.index("## The run") < text.index('"experiment": "synthetic"')
    # the repair verdicts open the report too: FL methods by held-out RR with intervals, paired test vs random
    assert text.index("Repair: which FL method's weights repair best") < text.index("## The run")
    assert "RR vs random (Wilcoxon, Holm)" in text
    assert "**Checkpoint benchmark** (synthetic ground truth" in text
    assert "runs had no target in the test fold" in text and '"experiment": "synthetic"' in text
    assert "test fold (held out)" in text
    html = store.path("report", name="report.html").read_text()
    # figures are files beside the page, never inlined; the page is small and links nothing remote
    assert "data:image" not in html and "http://" not in html and "https://" not in html
    assert len(html.encode()) < 1_000_000
    import re as _re

    srcs = _re.findall(r'<img[^>]* src="([^"]+)"', html)
    assert srcs and all((store.report_dir / s).resolve().is_file() for s in srcs), srcs
    assert '<details>' in html and "<summary>" in html and "<table>" in html  # folded figures, real tables
    # the test-fold confusion matrix equals a plain count
    from vitfl.pipeline.report import confusion_of_split
    from vitfl.core.states import load_states

    s = load_states(store.states("test"))
    ref = np.zeros((5, 5), int)
    for t, p in zip(s.label.tolist(), s.pred.tolist()):
        ref[t, p] += 1
    assert np.array_equal(np.array(confusion_of_split(store)["confusion"]), ref)


def test_check_report_finds_broken_links_and_tables_without_n(tmp_path):
    from vitfl.pipeline.report import check_report

    store = RunStore(tmp_path / "r")
    p = store.path("report", name="report.md")
    store.write_text(p, "# r\n\n![x](../nope.png)\n\nsome text\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    problems = check_report(p)
    assert any("does not resolve" in q for q in problems) and any("states no split" in q for q in problems)


def test_report_of_an_empty_run_says_so(tmp_path):
    from vitfl.pipeline.report import check_report, write_report

    (tmp_path / "empty").mkdir()
    p = write_report(RunStore(tmp_path / "empty"))
    text = p.read_text()
    assert "No repair results" in text and "No FL evaluation" in text and check_report(p) == []
