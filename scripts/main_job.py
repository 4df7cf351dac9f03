"""The main job, end to end on the embedded testbed (docs/testbed.md; no download): a small ViT pretrained on
MNIST-5k's pretraining pool + sklearn's digits, then fine-tuned 2 epochs on MNIST-5k's fine-tuning pool.

  1. pretrain (``<run>/pretrain``), export the backbone without its head, fine-tune 2 epochs with a new head
     (per-epoch checkpoints 0, 1, 2 + last-FFN weight files; TensorBoard logs), test it;
  2. cache the CLS states of the repair and test folds; the layer study (test accuracy with each block's FFN
     removed, and the FFN output's share of the residual stream, per block; evaluation.testbed) and the checkpoint
     benchmark's diagnostics (what |W(2) - W(1)| follows);
  3. misclassification analysis (settings, confusion matrix);
  4. every registered FL method on every available setting and budget (FL LightningModule under the Trainer);
  5. FL evaluation (interventions on the repair sweep's settings; the checkpoint-diff and injected-fault benchmarks on
     every setting; statistics, figures);
  6. a small repair sweep (DE and baselines over a few settings, budgets 0.1 / 0.5 / 1 % of the layer, 2
     repetitions), and the cross-validated repair (DE and the LP optimiser; repairability per FL method);
  7. the coverage table (every criterion, clean vs adversarial inputs) of the digits ViT.

Every step skips what is already on disk, so an interrupted job resumes where it stopped.

    python scripts/main_job.py                          # outputs/mnist
    python scripts/main_job.py --backbone timm --run_dir outputs/mnist_timm
    python scripts/main_job.py --testbed digits         # the older from-scratch digits ViT, outputs/digits
"""
from __future__ import annotations

import argparse
import os
import time

import _bootstrap  # noqa: F401

ROOT = _bootstrap.ROOT
#: FL / repair budgets as shares of the last FFN's 2 d d_ff weights, resolved by each step against the model (the
#: MNIST testbed's 65,536 -> 66, 328, 655; the digits ViT's 32,768 -> 33, 164, 328), as 236 / 472 / 944 are 0.005% / 0.01% / 0.02% of ViT-B/16's 4,718,592.
MAIN_JOB_BUDGETS = ["0.1%", "0.5%", "1%"]


def _budget(text: str):
    """A --budgets value: a count, a share 'P%' of the layer, or avg (localization.ranking.parse_budget)."""
    from localization.ranking import parse_budget

    return parse_budget(text)


def banner(msg: str) -> None:
    """Print a step's banner and name the step (an interrupted job's message says where it stopped)."""
    from pipeline.parallel import set_step

    set_step(f"main job: {msg}")
    print(f"\n=== {msg} ===", flush=True)


def table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in cols}
    line = "  ".join(c.ljust(widths[c]) for c in cols)
    out = [line, "  ".join("-" * widths[c] for c in cols)]
    out += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(out)


def fl_summary(rows: list[dict]) -> str:
    """One line per method (:func:`pipeline.localize.status_summary`): settings computed, selected from stored
    scores, already on disk, not applicable, failed; budgets; mean / max time of the settings computed now."""
    from pipeline.localize import status_summary

    out = status_summary(rows)
    if not out:
        return "(no FL method was asked for)"
    return table(out, ["method", "computed", "selected", "on disk", "n/a", "failed", "N", "mean_s", "max_s",
                       "not run"])


#: The embedded testbed (``--testbed mnist``, the default): pretrain a small ViT on MNIST-5k's pretraining pool +
#: sklearn's digits, then fine-tune it for 2 epochs (per-epoch checkpoints 0, 1, 2) on MNIST-5k's fine-tuning
#: pool with a new classification head, as the published protocol fine-tunes an ImageNet-21k ViT-B/16 on
#: CIFAR-100 (docs/testbed.md). ``--testbed digits``: the older recipe, a 4-layer ViT trained 40 epochs from
#: scratch on sklearn's digits.
TESTBEDS = {
    "mnist": {
        "pretrain": {"data": "configs/data/mnist_pretrain.yaml", "trainer": "configs/testbed/pretrain.yaml",
                     "model": {"hf": "configs/model/vit_mnist_pretrain.yaml",
                               "timm": "configs/model/vit_mnist_pretrain_timm.yaml"}},
        "finetune": {"data": "configs/data/mnist_finetune.yaml", "trainer": "configs/testbed/finetune.yaml",
                     "model": {"hf": "configs/model/vit_mnist_finetune.yaml",
                               "timm": "configs/model/vit_mnist_finetune_timm.yaml"}},
    },
    "digits": {
        "finetune": {"data": "configs/data/digits.yaml", "trainer": "configs/trainer/cpu.yaml",
                     "model": {"hf": "configs/model/vit_digits.yaml", "timm": "configs/model/vit_digits_timm.yaml"}},
    },
}
MODEL_CONFIGS = TESTBEDS["digits"]["finetune"]["model"]


def _cfg(path: str) -> str:
    return os.path.join(ROOT, path)


def pretrained_dir(layout) -> str:
    """Where the testbed's pretraining run lives (``<run>/pretrain``) and exports its weights
    (``<run>/pretrain/export``: an HF ``save_pretrained`` folder or a timm ``model.safetensors``, head left out)."""
    return str(layout.path("pretrain_run"))


def export_pretrained(ckpt_path: str, backbone: str, out_dir: str) -> str:
    """Write the pretrained backbone without its classification head where ``hf_vit`` / ``timm_vit`` read local
    weights (``pretrained_path``): HF: ``ViTModel.save_pretrained(out_dir)`` (so ``ViTForImageClassification.
    from_pretrained`` builds a new, randomly initialised classifier, as for ``google/vit-base-patch16-224-in21k``);
    timm: ``out_dir/model.safetensors`` with every ``head.*`` entry dropped. Returns the ``pretrained_path``.

    Atomic: the HF folder is written beside ``out_dir`` and renamed into place (a kill never leaves a folder whose
    ``config.json`` says "done" beside partial weights); the timm file through ``core.io`` (with its content
    hash)."""
    import shutil

    from core.io import atomic_save_tensors
    from lightning_modules.runs import load_classifier

    model = load_classifier(ckpt_path)
    if backbone == "hf":
        tmp = f"{out_dir.rstrip(os.sep)}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.backbone.model.vit.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.backbone.state_dict().items() if not k.startswith("head.")}
    path = os.path.join(out_dir, "model.safetensors")
    atomic_save_tensors(path, state)
    return path


def _finetune_model_config(layout, backbone: str, pretrained_path: str) -> str:
    """The fine-tuning model YAML with ``backbone_kwargs.pretrained_path`` set, written into the run directory.

    A ``pretrained_path`` inside the run (its ``pretrain/export``) is written relative to the run root: the
    training CLI reads a relative one that exists in the run directory from there, so the file names no path of
    the machine and a moved run still resumes."""
    import yaml

    from core.io import atomic_write_text

    with open(_cfg(TESTBEDS["mnist"]["finetune"]["model"][backbone])) as f:
        spec = yaml.safe_load(f)
    root = os.path.realpath(str(layout.root))
    real = os.path.realpath(pretrained_path)
    if os.path.commonpath([root, real]) == root:
        pretrained_path = os.path.relpath(real, root)
    spec["model"].setdefault("backbone_kwargs", {})["pretrained_path"] = pretrained_path
    path = layout.path("finetune_config")
    atomic_write_text(path, yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def pretrain(layout, backbone: str, epochs: int | None, extra: list[str]) -> str:
    """Pretrain (``<run>/pretrain``, skipped when its export exists) and export the backbone; returns its
    ``pretrained_path``. ``epochs=None``: the testbed's ``max_epochs``."""
    from lightning_modules.cli import ToolkitCLI
    from core.runstore import RunStore as RunLayout

    pre = RunLayout(pretrained_dir(layout))  # everything under the run root: a moved run finds its export
    export = str(pre.path("export"))
    done = os.path.join(export, "config.json" if backbone == "hf" else "model.safetensors")
    if os.path.isfile(done):
        print(f"pretrained weights {done} exist: pretraining skipped")
        return export if backbone == "hf" else done
    import yaml

    tb = TESTBEDS["mnist"]["pretrain"]
    if not epochs:
        with open(_cfg(tb["trainer"])) as f:
            epochs = int(yaml.safe_load(f)["trainer"]["max_epochs"])
    if epochs not in pre.checkpoint_epochs():
        ToolkitCLI(args=["fit", "--config", _cfg(tb["data"]), "--config", _cfg(tb["model"][backbone]),
                         "--config", _cfg(tb["trainer"]), f"--trainer.default_root_dir={pre.root}",
                         f"--trainer.max_epochs={epochs}", *_resume_args(pre), *extra])
    return export_pretrained(str(pre.checkpoint(epochs)), backbone, export)


def _resume_args(layout) -> list[str]:
    """``--ckpt_path last`` when an interrupted fit left ``checkpoints/last.ckpt`` behind, else nothing."""
    return ["--ckpt_path", "last"] if layout.last_checkpoint.is_file() else []


def train(layout, backbone: str, epochs: int, extra: list[str], testbed: str = "mnist",
          pretrain_epochs: int | None = None) -> None:
    """Fine-tune the pretrained testbed ViT for ``epochs`` (2) epochs, or (``testbed="digits"``) train the digits
    ViT from scratch; skipped when the last epoch's checkpoint exists."""
    from lightning_modules.cli import ToolkitCLI
    from lightning_modules.runs import checkpoint_epochs

    if epochs in checkpoint_epochs(layout):
        print(f"checkpoint {layout.checkpoint(epochs)} exists: training skipped")
        return
    tb = TESTBEDS[testbed]["finetune"]
    model_cfg = _cfg(tb["model"][backbone])
    if testbed == "mnist":
        t0 = time.perf_counter()
        path = pretrain(layout, backbone, pretrain_epochs, extra)
        print(f"pretraining: {time.perf_counter() - t0:.1f} s; fine-tuning from {path}")
        model_cfg = _finetune_model_config(layout, backbone, path)
    ToolkitCLI(args=["fit", "--config", _cfg(tb["data"]), "--config", model_cfg, "--config", _cfg(tb["trainer"]),
                     f"--trainer.default_root_dir={layout.root}", f"--trainer.max_epochs={epochs}",
                     *_resume_args(layout), *extra])


def test(layout) -> float:
    import lightning as L

    from lightning_modules.runs import datamodule_from_run, load_run_model

    from lightning.pytorch.loggers import TensorBoardLogger

    from core.io import read_json

    model, epoch = load_run_model(layout)
    done = layout.path("test_metrics", epoch=epoch)
    if done.is_file():  # tested already: no second run, no duplicate TensorBoard events
        out = read_json(done)
    else:
        tb = TensorBoardLogger(save_dir=str(layout.root), name="tb", version="test", default_hp_metric=False)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=tb, enable_progress_bar=False,
                            enable_model_summary=False)
        out = trainer.test(model, datamodule=datamodule_from_run(layout), verbose=False)[0]
        layout.write_json(done, {"epoch": epoch, **out})
    print(f"epoch {epoch}: test (held-out fold) top-1 {out['test/acc']:.4f}, top-5 {out['test/acc_top5']:.4f}")
    return out["test/acc"]


def crossval(layout, budgets, quick: bool = False, workers: int | str = 1) -> dict:
    """The held-out repair rate by cross-validation over the k folds of the evaluation split: DE with Ours /
    ArachneW / random at the middle budget on the 9 benchmark settings and ``all`` of each fold (quick: ``all``,
    5 generations of 20); counts pooled over folds (docs/methods.md, section 6.5)."""
    from pipeline.crossval import aggregate_crossval, run_crossval
    from pipeline.localize import BENCHMARK_SETTINGS

    settings = ["all"] if quick else [*BENCHMARK_SETTINGS, "all"]
    budget = [budgets[0]] if quick else [budgets[len(budgets) // 2]]
    opts = {"generations": 5, "pop_size": 20} if quick else {}
    rows = run_crossval(layout, ["ours", "arachne_w", "random"], settings, budget, 1, repair_options=opts,
                        trainer_kwargs={"enable_progress_bar": False}, workers=workers)
    # repairability@N: the LP optimiser of the located weights' values on the same FL results (where, not what)
    rows += run_crossval(layout, ["ours", "arachne_w", "random"], settings, budget, 1, repair="lp",
                         repair_options={"steps": 3} if quick else {}, trainer_kwargs={"enable_progress_bar": False},
                         workers=workers, logger=True)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"].split(":")[0]] = counts.get(r["status"].split(":")[0], 0) + 1
    agg = aggregate_crossval(layout)
    df = agg.get("runs")
    if df is not None and len(df):
        one = df[(df["fl_method"] == df["fl_method"].iloc[0]) & (df["repair"] == "de")]  # targets: per FL run
        n_all = int(one.loc[one["setting"] == "all", "n_targets"].sum())
        n_bench = int(one.loc[one["setting"] != "all", "n_targets"].sum())
        print(f"cross-validated repair: {len(df)} runs over {df['fold'].nunique()} folds ("
              + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f"); held-out targets: 'all' {n_all}, "
              f"the 9 settings together {n_bench} (per FL method and repetition)")
        print(agg["markdown"])
        if agg.get("repairability") is not None:
            print(agg["repairability"].sentence)
    return {"rows": rows, "n_runs": agg["n_runs"]}


import _cli  # noqa: E402 - the scripts' shared error handling (a known failure: one paragraph, no traceback)


@_cli.guard("main_job")
def main() -> None:
    p = _cli.ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default=None, help="default: outputs/<testbed> (outputs/mnist, outputs/digits)")
    p.add_argument("--testbed", choices=sorted(TESTBEDS), default="mnist",
                   help="mnist: pretrain + 2-epoch fine-tune (default); digits: 40 epochs from scratch")
    p.add_argument("--backbone", choices=sorted(MODEL_CONFIGS), default="hf")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: mnist 2, digits 40)")
    p.add_argument("--pretrain_epochs", type=int, default=None,
                   help="mnist testbed: pretraining epochs (default: configs/testbed/pretrain.yaml)")
    p.add_argument("--methods", nargs="+", default=None, help="FL methods (default: all registered)")
    p.add_argument("--budgets", nargs="+", type=_budget, default=None,
                   help="FL / repair budgets: counts or shares of the last FFN's weights (default: 0.1%% 0.5%% 1%%)")
    p.add_argument("--repair_reps", type=int, default=2)
    p.add_argument("--workers", type=lambda v: v if v == "auto" else int(v), default="auto",
                   help="processes for the repair sweeps (default auto: the cores, at most 4)")
    p.add_argument("--skip", nargs="*", default=[], choices=["evaluate", "repair", "crossval", "coverage"])
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 epochs, few methods (for tests)")
    p.add_argument("--debug", action="store_true",
                   help=f"show the traceback of an error instead of its one-paragraph message ({_cli.DEBUG_ENV}=1)")
    p.add_argument("--train_args", nargs=argparse.REMAINDER, default=[],
                   help="extra LightningCLI arguments for training (last on the line)")
    a = p.parse_args()

    from core.runstore import RunStore as RunLayout
    from pipeline.experiment import quiet

    quiet()  # no Lightning tips, banners or known deprecation warnings
    layout = RunLayout(a.run_dir or os.path.join(ROOT, "outputs", a.testbed))
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        timings[name] = time.perf_counter() - t0
        return out

    epochs = a.epochs or (2 if a.quick or a.testbed == "mnist" else 40)
    pre_epochs = a.pretrain_epochs or (3 if a.quick else None)
    what = "pretrain + fine-tune" if a.testbed == "mnist" else "train"
    banner(f"1. {what} the {a.testbed} ViT ({a.backbone}, {epochs} epochs) -> {layout.root}")
    timed("train", train, layout, a.backbone, epochs, a.train_args, testbed=a.testbed, pretrain_epochs=pre_epochs)
    acc = timed("test", test, layout)
    a.budgets = a.budgets or list(MAIN_JOB_BUDGETS)

    banner("2. cache CLS states (repair, test folds)")
    from pipeline.cache import step_cache
    from pipeline.localize import run_localization
    from pipeline.misclf import step_misclf

    timed("cache", step_cache, layout, ("repair", "test"), trainer_kwargs={"enable_progress_bar": False})
    from evaluation.testbed import testbed_checks

    testbed = timed("testbed", testbed_checks, layout)  # layer matters, the per-block curve, checkpoint diagnostics
    layout.write_json(layout.path("report", name="testbed.json"), testbed)  # the report shows them

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

        from pipeline.repair import MAIN_JOB_SETTINGS

        # interventions on the repair sweep's settings (the checkpoint and injected-fault benchmarks: all of them)
        timed("evaluate", run_evaluation, layout.root, quick=a.quick,
              settings=None if a.quick else list(MAIN_JOB_SETTINGS))

    if "repair" not in a.skip:
        banner("6. repair sweep")
        from pipeline.repair import main_job_sweep

        timed("repair", main_job_sweep, layout, budgets=a.budgets, reps=a.repair_reps, quick=a.quick,
              workers=a.workers)

    if "crossval" not in a.skip:
        banner("6b. cross-validated repair: repair on the other folds, test on fold k, counts pooled")
        timed("crossval", crossval, layout, a.budgets, quick=a.quick, workers=a.workers)

    if "coverage" not in a.skip:
        banner("7. test adequacy: coverage of the digits ViT, clean vs adversarial")
        from pipeline.adequacy import step_coverage

        timed("coverage", step_coverage, layout, quick=a.quick)

    banner("8. report")
    from pipeline.report import write_report

    report = timed("report", write_report, layout, {"testbed": a.testbed, "backbone": a.backbone, "epochs": epochs,
                                                    "budgets": a.budgets, "repair_reps": a.repair_reps,
                                                    "quick": a.quick})
    print(f"report: {report} (and {report.with_suffix('.html')})")

    banner("done")
    print(f"{a.testbed} ViT test accuracy: {acc:.4f}")
    print("step times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"total wall time: {time.perf_counter() - t_start:.1f} s")
    print(f"outputs: {layout.root}")
    print(f"TensorBoard: tensorboard --logdir {layout.root}")


if __name__ == "__main__":
    main()
