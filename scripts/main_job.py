"""The main job, end to end on the embedded default (scikit-learn's digits, a small ViT trained from scratch):

  1. train the digits ViT (per-epoch checkpoints + last-FFN weight files; TensorBoard logs), test it;
  2. cache the CLS states of the repair and test folds;
  3. misclassification analysis (settings, confusion matrix);
  4. every registered FL method on every available setting and budget (FL LightningModule under the Trainer);
  5. FL evaluation (interventions, checkpoint-diff and injected-fault benchmarks, statistics, figures);
  6. a small repair sweep (DE and baselines over a few settings, budgets scaled to the small layer, 2 repetitions);
  7. the coverage table (every criterion, clean vs adversarial inputs) of the digits ViT.

Every step skips what is already on disk, so an interrupted job resumes where it stopped.

    python scripts/main_job.py                          # outputs/digits
    python scripts/main_job.py --backbone timm --run_dir outputs/digits_timm
"""
from __future__ import annotations

import argparse
import os
import time

import _bootstrap  # noqa: F401

ROOT = _bootstrap.ROOT
MODEL_CONFIGS = {"hf": "configs/model/vit_digits.yaml", "timm": "configs/model/vit_digits_timm.yaml"}
#: FL / repair budgets scaled to the digits layer (2 x 64 x 256 = 32,768 weights): 0.1%, 0.5%, 1% of it, as
#: 236 / 472 / 944 are 0.005% / 0.01% / 0.02% of ViT-B/16's 4,718,592.
DIGITS_BUDGETS = [33, 164, 328]


def banner(msg: str) -> None:
    print(f"\n=== {msg} ===", flush=True)


def table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in cols}
    line = "  ".join(c.ljust(widths[c]) for c in cols)
    out = [line, "  ".join("-" * widths[c] for c in cols)]
    out += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(out)


def fl_summary(rows: list[dict]) -> str:
    """One line per method: settings localized, budgets, mean / max time per setting, settings it could not do."""
    by: dict[str, dict] = {}
    for r in rows:
        d = by.setdefault(r["method"], {"ok": [], "t": [], "budgets": set(), "failed": []})
        if r["status"] == "ok":
            d["ok"].append(r["setting"])
            d["t"].append(float(r["wall_s"]))
            d["budgets"].update(r["budgets"].split())
        else:
            d["failed"].append(f"{r['setting']} ({r['status'].split(';')[0][:60]})")
    out = []
    for m, d in by.items():
        t = d["t"] or [float("nan")]
        out.append({"method": m, "settings": len(d["ok"]), "N": " ".join(sorted(d["budgets"], key=lambda b: (len(b), b))),
                    "mean_s": f"{sum(t) / len(t):.3f}", "max_s": f"{max(t):.3f}",
                    "not run": "; ".join(d["failed"]) or "-"})
    if not out:
        return "(every FL result already on disk)"
    return table(out, ["method", "settings", "N", "mean_s", "max_s", "not run"])


def train(layout, backbone: str, epochs: int, extra: list[str]) -> None:
    from lightning_modules.cli import ToolkitCLI
    from lightning_modules.runs import checkpoint_epochs

    if epochs in checkpoint_epochs(layout):
        print(f"checkpoint {layout.checkpoint(epochs)} exists: training skipped")
        return
    ToolkitCLI(args=["fit", "--config", os.path.join(ROOT, "configs/data/digits.yaml"),
                     "--config", os.path.join(ROOT, MODEL_CONFIGS[backbone]),
                     "--config", os.path.join(ROOT, "configs/trainer/cpu.yaml"),
                     f"--trainer.default_root_dir={layout.root}", f"--trainer.max_epochs={epochs}", *extra])


def test(layout) -> float:
    import lightning as L

    from lightning_modules.runs import datamodule_from_run, load_run_model

    model, epoch = load_run_model(layout)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    out = trainer.test(model, datamodule=datamodule_from_run(layout), verbose=False)[0]
    print(f"epoch {epoch}: test (held-out fold) top-1 {out['test/acc']:.4f}, top-5 {out['test/acc_top5']:.4f}")
    return out["test/acc"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default=os.path.join(ROOT, "outputs", "digits"))
    p.add_argument("--backbone", choices=sorted(MODEL_CONFIGS), default="hf")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--methods", nargs="+", default=None, help="FL methods (default: all registered)")
    p.add_argument("--budgets", nargs="+", type=int, default=DIGITS_BUDGETS)
    p.add_argument("--repair_reps", type=int, default=2)
    p.add_argument("--skip", nargs="*", default=[], choices=["evaluate", "repair", "coverage"])
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 epochs, few methods (for tests)")
    p.add_argument("--train_args", nargs=argparse.REMAINDER, default=[],
                   help="extra LightningCLI arguments for training (last on the line)")
    a = p.parse_args()

    from localization.artifacts import RunLayout

    layout = RunLayout(a.run_dir)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        timings[name] = time.perf_counter() - t0
        return out

    epochs = 2 if a.quick else a.epochs
    banner(f"1. train the digits ViT ({a.backbone}, {epochs} epochs) -> {layout.root}")
    timed("train", train, layout, a.backbone, epochs, a.train_args)
    acc = timed("test", test, layout)

    banner("2. cache CLS states (repair, test folds)")
    from pipeline.cache import step_cache
    from pipeline.localize import run_localization
    from pipeline.misclf import step_misclf

    timed("cache", step_cache, layout, ("repair", "test"), trainer_kwargs={"enable_progress_bar": False})

    banner("3. misclassification analysis")
    info = timed("misclf", step_misclf, layout)
    settings = ", ".join(f"{k} ({v['n_neg']})" for k, v in info["settings"].items())
    print(f"repair split: {info['n']} inputs, accuracy {info['accuracy']:.4f}; settings (|I_neg|): {settings}")
    for name, why in info["skipped"].items():
        print(f"  skipped {name}: {why}")

    banner("4. fault localization (every method x setting x budget)")
    methods = a.methods or (["random", "grad_loss", "arachne_w", "ours", "bl"] if a.quick else None)
    rows = timed("localize", run_localization, layout, methods=methods, budgets=[*a.budgets, "avg"],
                 progress=False)
    print(fl_summary(rows))

    if "evaluate" not in a.skip:
        banner("5. FL evaluation")
        from pipeline.evaluate_fl import run_evaluation

        timed("evaluate", run_evaluation, layout.root, quick=a.quick)

    if "repair" not in a.skip:
        banner("6. repair sweep")
        from pipeline.repair import main_job_sweep

        timed("repair", main_job_sweep, layout, budgets=a.budgets, reps=a.repair_reps, quick=a.quick)

    if "coverage" not in a.skip:
        banner("7. test adequacy: coverage of the digits ViT, clean vs adversarial")
        from pipeline.adequacy import step_coverage

        timed("coverage", step_coverage, layout, quick=a.quick)

    banner("done")
    print(f"digits ViT test accuracy: {acc:.4f}")
    print("step times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"total wall time: {time.perf_counter() - t_start:.1f} s")
    print(f"outputs: {layout.root}")
    print(f"TensorBoard: tensorboard --logdir {layout.tensorboard}")


if __name__ == "__main__":
    main()
